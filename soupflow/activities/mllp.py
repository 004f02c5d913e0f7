"""MLLP sender (`MLLPSenderSetting`): an HL7 v2 message over TCP, framed, and its ACK.

Frames come from `FrameStart`/`FrameEnd` (characters or their codes). The format's matrix:
without `WaitForResponse` nothing is read; with it the reply is read until `FrameEnd` (within
`TimeoutSeconds`, else a transient failure) and kept as the activity's inbound message; an
AE/AR (or CE/CR) ACK is a permanent failure; an empty reply is a failure only with
`UseResponse`. A refused connection is transient. The ACK's text may describe the patient: it
is kept in the dead record, not in the reason the logs carry.

With `UseSsl` the connection is TLS (the chain and the name `Server` verified, a client
certificate sent when set). With `KeepConnectionOpen` the connection is reused for the next message to the same server
(kept while messages keep coming, closed after `KEEP_OPEN_SECONDS` idle); a kept connection
the peer has closed meanwhile is noticed before it is used and replaced by a new one.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

from soupflow import tls
from soupflow.activities.base import Activity, Outcome
from soupflow.activities.connections import still_open
from soupflow.pipeline import hl7
from soupflow.pipeline.errors import PermanentError, TransientError
from soupflow.workflow import model
from soupflow.workflow.paths import parse_hl7_path

NEGATIVE_ACKS = frozenset({"AE", "AR", "CE", "CR"})
KEEP_OPEN_SECONDS = 60.0
_ACK_CODE, _ACK_TEXT = parse_hl7_path("MSA-1"), parse_hl7_path("MSA-3")


def frame(characters: list[str | int], encoding: str) -> bytes:
    return b"".join(
        bytes([item])
        if isinstance(item, int) and item < 256
        else (chr(item) if isinstance(item, int) else item).encode(encoding)
        for item in characters
    )


def run(setting: model.MLLPSenderSetting, activity: Activity) -> Outcome:
    where = f"{setting.server}:{setting.port}"
    try:
        payload = (
            frame(setting.frame_start, setting.encoding)
            + activity.outbound.encode(setting.encoding)
            + frame(setting.frame_end, setting.encoding)
        )
    except LookupError:
        raise PermanentError(f"unknown Encoding {setting.encoding!r}") from None
    key = (setting.server, setting.port)
    pool = activity.connections.sockets
    connection = pool.take(key) if setting.keep_connection_open else None
    if connection is not None and not still_open(connection):
        connection.close()
        connection = None
    if connection is None:
        connection = _connect(setting, activity, where)
    try:
        reply = _exchange(setting, connection, payload, where)
    except BaseException:
        with contextlib.suppress(OSError):
            connection.close()
        raise
    if setting.keep_connection_open:
        pool.give(key, connection, KEEP_OPEN_SECONDS)
    else:
        connection.close()
    if reply is None:
        return Outcome(None, "sent")
    start = frame(setting.frame_start, setting.encoding)
    text = reply.removeprefix(start).decode(setting.encoding, errors="replace")
    if not text.strip():
        if setting.use_response:
            raise PermanentError(f"an empty reply from {where}")
        return Outcome("", "sent; empty reply")
    code = hl7.read(text, _ACK_CODE)
    if code in NEGATIVE_ACKS:
        error = PermanentError(f"negative ACK {code} from {where}")
        error.detail = f"ACK text: {hl7.read(text, _ACK_TEXT)}"
        raise error
    return Outcome(text, f"ACK {code}" if code else "reply without MSA-1")


def _connect(setting: model.MLLPSenderSetting, activity: Activity, where: str) -> socket.socket:
    """A connection to the checked address (`--allowed-tcp`); with `UseSsl`, TLS verified
    against the system store and `TrustedCertificatesFile`, the server name `Server`."""
    host = setting.server.strip()
    address = activity.connections.egress.tcp.address(host, setting.port)
    context = None
    if setting.use_ssl:
        folder = activity.context.workflow.path.parent
        try:
            context = tls.cached_client_context(tls.sender_tls(setting, host, folder))
        except tls.TlsError as exc:
            raise PermanentError(f"TLS to {where}: {exc}") from None
    try:
        connection = socket.create_connection(
            (address, setting.port), timeout=setting.timeout_seconds
        )
    except OSError as exc:
        raise TransientError(
            f"cannot connect to the MLLP listener at {where}: {type(exc).__name__}"
        ) from None
    if context is None:
        return connection
    try:
        return context.wrap_socket(connection, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        connection.close()
        raise PermanentError(
            f"the certificate of the MLLP listener at {where} is not accepted: {exc.verify_message}"
        ) from None
    except ssl.SSLError as exc:
        connection.close()
        raise PermanentError(
            f"TLS with the MLLP listener at {where} failed: {exc.reason}"
        ) from None
    except OSError as exc:
        connection.close()
        raise TransientError(
            f"TLS with the MLLP listener at {where} broke: {type(exc).__name__}"
        ) from None


def _exchange(
    setting: model.MLLPSenderSetting, connection: socket.socket, payload: bytes, where: str
) -> bytes | None:
    """Send the framed message; the reply when `WaitForResponse` (else None)."""
    try:
        connection.settimeout(setting.timeout_seconds)
        connection.sendall(payload)
        if not setting.wait_for_response:
            return None
        return _read_frame(
            connection, frame(setting.frame_end, setting.encoding), setting.timeout_seconds
        )
    except TimeoutError:
        raise TransientError(f"no ACK from {where} within {setting.timeout_seconds} s") from None
    except OSError as exc:
        raise TransientError(
            f"the MLLP connection to {where} failed: {type(exc).__name__}"
        ) from None


def _read_frame(connection: socket.socket, end: bytes, timeout: float) -> bytes:
    """Bytes up to the end frame; TimeoutError when it does not come in time."""
    deadline = time.monotonic() + timeout
    received = b""
    while end not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        connection.settimeout(remaining)
        chunk = connection.recv(65536)
        if not chunk:
            break
        received += chunk
    return received.split(end, 1)[0]
