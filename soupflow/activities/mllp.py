"""MLLP sender (`MLLPSenderSetting`): an HL7 v2 message over TCP, framed, and its ACK.

Frames come from `FrameStart`/`FrameEnd` (characters or their codes). The format's matrix:
without `WaitForResponse` nothing is read; with it the reply is read until `FrameEnd` (within
`TimeoutSeconds`, else a transient failure) and kept as the activity's inbound message; an
AE/AR (or CE/CR) ACK is a permanent failure; an empty reply is a failure only with
`UseResponse`. A refused connection is transient. The ACK's text may describe the patient: it
is kept in the dead record, not in the reason the logs carry.
"""

from __future__ import annotations

import socket
import time

from soupflow import hl7
from soupflow.activities.base import Activity
from soupflow.paths import parse_hl7_path
from soupflow.pipeline.errors import PermanentError, TransientError
from soupflow.workflow import model

NEGATIVE_ACKS = frozenset({"AE", "AR", "CE", "CR"})
_ACK_CODE, _ACK_TEXT = parse_hl7_path("MSA-1"), parse_hl7_path("MSA-3")


def frame(characters: list[str | int], encoding: str) -> bytes:
    return b"".join(
        bytes([item])
        if isinstance(item, int) and item < 256
        else (chr(item) if isinstance(item, int) else item).encode(encoding)
        for item in characters
    )


def run(setting: model.MLLPSenderSetting, activity: Activity) -> str | None:
    where = f"{setting.server}:{setting.port}"
    try:
        payload = (
            frame(setting.frame_start, setting.encoding)
            + activity.outbound.encode(setting.encoding)
            + frame(setting.frame_end, setting.encoding)
        )
    except LookupError:
        raise PermanentError(f"unknown Encoding {setting.encoding!r}") from None
    try:
        connection = socket.create_connection(
            (setting.server, setting.port), timeout=setting.timeout_seconds
        )
    except OSError as exc:
        raise TransientError(
            f"cannot connect to the MLLP listener at {where}: {type(exc).__name__}"
        ) from None
    with connection:
        try:
            connection.sendall(payload)
            if not setting.wait_for_response:
                return None
            reply = _read_frame(
                connection, frame(setting.frame_end, setting.encoding), setting.timeout_seconds
            )
        except TimeoutError:
            raise TransientError(
                f"no ACK from {where} within {setting.timeout_seconds} s"
            ) from None
        except OSError as exc:
            raise TransientError(
                f"the MLLP connection to {where} failed: {type(exc).__name__}"
            ) from None
    start = frame(setting.frame_start, setting.encoding)
    text = reply.removeprefix(start).decode(setting.encoding, errors="replace")
    if not text.strip():
        if setting.use_response:
            raise PermanentError(f"an empty reply from {where}")
        return ""
    code = hl7.read(text, _ACK_CODE)
    if code in NEGATIVE_ACKS:
        error = PermanentError(f"negative ACK {code} from {where}")
        error.detail = f"ACK text: {hl7.read(text, _ACK_TEXT)}"
        raise error
    return text


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
