"""Associations we open: the requestor's side of the upper layer, C-STORE and C-ECHO.

Upstream: activities.dicom_sender, cli (`echo`). Downstream: pdu, negotiation, dimse,
part10, status. Blocking sockets with `TCP_NODELAY`, no polling: every operation (associate,
one C-STORE, one C-ECHO, release) has a deadline of `timeout_seconds` from its start, so a
peer that trickles its answer a byte at a time cannot hold a worker past the timeout. A
stored object is streamed from its file in P-DATA fragments sized to the peer's maximum PDU:
the dataset bytes go as they are on disk (byte-exact) and memory stays flat for any size.

Failures are `RequestorError`s that say whether trying again later could help (`transient`):
no connection, a transient rejection, an abort, a timeout or a broken connection may; a
permanent rejection or a refused presentation context will not.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from soupflow.dicom import dimse, negotiation, pdu, status
from soupflow.dicom.negotiation import Acceptance, Proposal, Rejection
from soupflow.dicom.part10 import IMPLICIT_VR_LITTLE_ENDIAN, dataset_offset
from soupflow.dicom.pdu import ProtocolError

OUR_MAX_PDU = 65536  # we receive only response command sets: a few hundred bytes
_HEAD_BYTES = 64 * 1024  # the file meta group of a Part 10 file fits in this
_UNLIMITED_FRAGMENT = 1024 * 1024  # when the peer sets no limit
_RELEASE_SECONDS = 5.0


@dataclass(frozen=True)
class Destination:
    """A remote AE and how we call it."""

    host: str
    port: int
    our_aet: str
    remote_aet: str
    timeout_seconds: float
    tls_server_name: str = ""  # "": cleartext; else TLS, and the certificate must name it
    # How to reach it, asked at each new connection (not compared: the same destination).
    # `address` gives where to connect (the caller's checked address for `host`).
    address: Callable[[], str] | None = field(default=None, compare=False, repr=False)
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        secured = " (TLS)" if self.tls_server_name else ""
        return f"{self.remote_aet} at {self.host}:{self.port}{secured}"


class RequestorError(Exception):
    """An association or operation failed; `transient` says whether a retry may succeed."""

    transient = True


class NoConnectionError(RequestorError):
    """Nothing answered at the address (refused, unreachable, timed out)."""


class AssociationRejectedError(RequestorError):
    """The peer sent A-ASSOCIATE-RJ."""

    def __init__(self, message: str, rejection: Rejection) -> None:
        super().__init__(message)
        self.rejection = rejection
        self.transient = rejection.transient


class ContextRefusedError(RequestorError):
    """The peer accepts none of the presentation contexts an operation needs."""

    transient = False


class TlsRefusedError(RequestorError):
    """The TLS handshake failed: an untrusted, expired or misnamed certificate, or the peer
    refused ours. Retrying will not help until someone changes a certificate."""

    transient = False


class AssociationLostError(RequestorError):
    """The association broke: aborted, timed out, reset, or the peer broke the protocol."""


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


class Association:
    """One association we requested (PS3.8 9.2, requestor side). Not thread-safe: one
    operation at a time, as negotiated (no asynchronous operations window)."""

    def __init__(
        self,
        destination: Destination,
        connection: socket.socket,
        acceptance: Acceptance,
        proposed: frozenset[Proposal] = frozenset(),
    ) -> None:
        self.destination = destination
        self.contexts = acceptance.contexts
        self.proposed = proposed  # what was asked for: a refused context stays refused here
        self._connection = connection
        peer_max = acceptance.peer_max_pdu
        self._fragment = (
            peer_max - pdu.PDV_HEADER.size
            if peer_max > pdu.PDV_HEADER.size
            else _UNLIMITED_FRAGMENT
        )
        self._peer_max_pdu = peer_max
        self._message_id = 0
        self.closed = False

    # ------------------------------------------------------------------ establishment
    @classmethod
    def open(cls, destination: Destination, proposals: list[Proposal]) -> Association:
        """Connect and negotiate; RequestorError when no association results."""
        deadline = _Deadline(destination.timeout_seconds)
        address = destination.address() if destination.address else destination.host
        try:
            connection = socket.create_connection(
                (address, destination.port), timeout=deadline.remaining()
            )
        except OSError as exc:
            raise NoConnectionError(
                f"cannot connect to {destination}: {type(exc).__name__}"
            ) from None
        if destination.tls_context is not None:
            connection = _secure(connection, destination, deadline)
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            proposed, request = negotiation.request(
                destination.our_aet, destination.remote_aet, proposals, OUR_MAX_PDU
            )
            _send(connection, request, deadline)
            pdu_type, body = _read_pdu(connection, deadline, pdu.MAX_CONTROL_PDU_BYTES)
            whole = pdu.PDU_HEADER.pack(pdu_type, len(body)) + body
            if pdu_type == pdu.A_ASSOCIATE_AC_PDU:
                acceptance = negotiation.decode_acceptance(whole, proposed)
                return cls(destination, connection, acceptance, frozenset(proposals))
            if pdu_type == pdu.A_ASSOCIATE_RJ_PDU:
                rejection = negotiation.decode_rejection(whole)
                raise AssociationRejectedError(
                    f"{destination} rejected the association (result {rejection.result}, "
                    f"source {rejection.source}, reason {rejection.diagnostic})",
                    rejection,
                )
            if pdu_type == pdu.A_ABORT_PDU:
                raise AssociationLostError(f"{destination} aborted the association request")
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} in answer to A-ASSOCIATE-RQ")
        except RequestorError:
            connection.close()
            raise
        except TimeoutError:
            connection.close()
            raise AssociationLostError(
                f"{destination} did not accept the association within "
                f"{destination.timeout_seconds:g} s"
            ) from None
        except ssl.SSLError as exc:  # TLS 1.3: the server refuses our certificate after
            connection.close()  # the handshake, in its first record (an alert)
            raise TlsRefusedError(f"TLS with {destination} failed: {_ssl_reason(exc)}") from None
        except (OSError, EOFError, ProtocolError) as exc:
            _abort_and_close(connection, exc)
            raise AssociationLostError(
                f"association with {destination} failed: {_why(exc)}"
            ) from None

    def context_for(self, abstract_syntax: str, transfer_syntaxes: tuple[str, ...]) -> int | None:
        """An accepted context for the SOP class in one of the transfer syntaxes, in their order."""
        for syntax in transfer_syntaxes:
            for context_id, context in self.contexts.items():
                if context.abstract_syntax == abstract_syntax and context.transfer_syntax == syntax:
                    return context_id
        return None

    def still_open(self) -> bool:
        """False when the peer has closed or aborted an idle association (or sent something
        unasked): it must not be used again."""
        if self.closed:
            return False
        try:
            readable, _, _ = select.select([self._connection], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    # ------------------------------------------------------------------ operations
    def c_store(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: BinaryIO
    ) -> int:
        """Send the dataset (read from `dataset` to its end) on `context_id`; the status."""
        message_id = self._next_message_id()
        command = dimse.store_request(message_id, sop_class_uid, sop_instance_uid)
        return self._operation(message_id, context_id, command, dataset)

    def c_store_file(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, path: Path
    ) -> int:
        """C-STORE of a Part 10 file's dataset, streamed from disk as it is stored."""
        with path.open("rb") as stream:
            stream.seek(dataset_offset(stream.read(_HEAD_BYTES)))
            return self.c_store(context_id, sop_class_uid, sop_instance_uid, stream)

    def c_echo(self) -> int:
        context_id = self.context_for(negotiation.VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,))
        if context_id is None:  # `echo` proposes Verification in Implicit VR Little Endian only
            raise ContextRefusedError(f"{self.destination} refused Verification")
        message_id = self._next_message_id()
        return self._operation(message_id, context_id, dimse.echo_request(message_id), None)

    def release(self) -> None:
        """A-RELEASE-RQ, wait (briefly) for A-RELEASE-RP, close. Never raises."""
        if self.closed:
            return
        deadline = _Deadline(min(self.destination.timeout_seconds, _RELEASE_SECONDS))
        with contextlib.suppress(OSError, EOFError, TimeoutError, ProtocolError):
            _send(
                self._connection, pdu.PDU_HEADER.pack(pdu.A_RELEASE_RQ_PDU, 4) + bytes(4), deadline
            )
            while True:  # P-DATA may still be in flight (PS3.8 Sta7); the RP ends it
                pdu_type, _ = _read_pdu(self._connection, deadline, pdu.MAX_CONTROL_PDU_BYTES)
                if pdu_type in (pdu.A_RELEASE_RP_PDU, pdu.A_ABORT_PDU):
                    break
        self._close()

    def abort(self) -> None:
        """A-ABORT and close. Never raises."""
        if not self.closed:
            _abort_and_close(self._connection, None)
            self.closed = True

    # ------------------------------------------------------------------ plumbing
    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _operation(
        self, message_id: int, context_id: int, command: bytes, dataset: BinaryIO | None
    ) -> int:
        if self.closed:
            raise AssociationLostError(f"the association with {self.destination} is closed")
        deadline = _Deadline(self.destination.timeout_seconds)
        try:
            _send(
                self._connection,
                pdu.p_data(context_id, command, self._peer_max_pdu, command=True),
                deadline,
            )
            if dataset is not None:
                self._send_dataset(context_id, dataset, deadline)
            response = self._response(deadline)
        except TimeoutError:
            self.abort()
            raise AssociationLostError(
                f"no response from {self.destination} within {self.destination.timeout_seconds:g} s"
            ) from None
        except (OSError, EOFError, ProtocolError, dimse.CommandError) as exc:
            _abort_and_close(self._connection, exc)
            self.closed = True
            raise AssociationLostError(
                f"the association with {self.destination} broke: {_why(exc)}"
            ) from None
        if response.message_id_being_responded_to != message_id:
            self.abort()
            raise AssociationLostError(
                f"{self.destination} answered message {response.message_id_being_responded_to}"
            )
        return response.status

    def _send_dataset(self, context_id: int, dataset: BinaryIO, deadline: _Deadline) -> None:
        size = self._fragment
        chunk = dataset.read(size)
        while True:
            following = dataset.read(size)
            control = 0 if following else pdu.LAST_FRAGMENT
            header = pdu.PDU_HEADER.pack(pdu.P_DATA_TF_PDU, len(chunk) + 6) + pdu.PDV_HEADER.pack(
                len(chunk) + 2, context_id, control
            )
            _send(self._connection, header + chunk, deadline)
            if not following:
                return
            chunk = following

    def _response(self, deadline: _Deadline) -> dimse.Response:
        command = bytearray()
        while True:
            pdu_type, body = _read_pdu(self._connection, deadline, pdu.MAX_CONTROL_PDU_BYTES)
            if pdu_type == pdu.A_ABORT_PDU:
                self.closed = True
                raise EOFError("the peer aborted the association")
            if pdu_type != pdu.P_DATA_TF_PDU:
                raise ProtocolError(f"PDU type 0x{pdu_type:02X} instead of a response")
            view, offset = memoryview(body), 0
            while offset < len(body):
                item_length, _, control = pdu.PDV_HEADER.unpack_from(view, offset)
                if not control & pdu.COMMAND_FRAGMENT or item_length < 2:
                    raise ProtocolError("a response with a dataset, or an empty PDV")
                command += view[offset + pdu.PDV_HEADER.size : offset + 4 + item_length]
                offset += 4 + item_length
                if control & pdu.LAST_FRAGMENT:
                    return dimse.parse_response(bytes(command))

    def _close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self._connection.close()


def _secure(
    connection: socket.socket, destination: Destination, deadline: _Deadline
) -> ssl.SSLSocket:
    """The TLS handshake, within the deadline (CPython bounds the whole handshake by the
    socket timeout); the chain and the server name are always verified."""
    assert destination.tls_context is not None
    try:
        connection.settimeout(deadline.remaining())
        return destination.tls_context.wrap_socket(
            connection, server_hostname=destination.tls_server_name
        )
    except ssl.SSLCertVerificationError as exc:
        connection.close()
        raise TlsRefusedError(
            f"the certificate of {destination} is not accepted: {exc.verify_message}"
        ) from None
    except ssl.SSLError as exc:
        connection.close()
        raise TlsRefusedError(f"TLS with {destination} failed: {_ssl_reason(exc)}") from None
    except TimeoutError:
        connection.close()
        raise AssociationLostError(
            f"the TLS handshake with {destination} did not finish within "
            f"{destination.timeout_seconds:g} s"
        ) from None
    except OSError as exc:
        connection.close()
        raise NoConnectionError(f"TLS with {destination} broke: {type(exc).__name__}") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLEOFError):
        return (
            "the peer closed the TLS connection without a word (a server that requires a "
            "client certificate does so when it gets none, or one it does not trust)"
        )
    reason = (exc.reason or type(exc).__name__).replace("_", " ").lower()
    if "certificate required" in reason:
        return f"the peer requires a client certificate ({reason})"
    return reason


def _send(connection: socket.socket, data: bytes, deadline: _Deadline) -> None:
    connection.settimeout(deadline.remaining())
    connection.sendall(data)  # the timeout bounds the whole call (Python >= 3.5)


def _read_pdu(connection: socket.socket, deadline: _Deadline, limit: int) -> tuple[int, bytes]:
    header = _read_exactly(connection, pdu.PDU_HEADER.size, deadline)
    pdu_type, length = pdu.PDU_HEADER.unpack(header)
    if pdu_type not in pdu.KNOWN_PDU_TYPES:
        raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02X}", pdu.REASON_UNRECOGNIZED_PDU)
    if length > limit:
        raise ProtocolError(f"a PDU of {length} bytes")
    return int(pdu_type), _read_exactly(connection, length, deadline)


def _read_exactly(connection: socket.socket, size: int, deadline: _Deadline) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        connection.settimeout(deadline.remaining())
        count = connection.recv_into(view[got:])
        if not count:
            raise EOFError("the peer closed the connection")
        got += count
    return bytes(buffer)


def _abort_and_close(connection: socket.socket, cause: BaseException | None) -> None:
    reason = cause.reason if isinstance(cause, ProtocolError) else pdu.REASON_NOT_SPECIFIED
    with contextlib.suppress(OSError):
        connection.settimeout(1.0)
        connection.sendall(pdu.abort(reason))
    with contextlib.suppress(OSError):
        connection.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError | dimse.CommandError):
        return str(exc)
    if isinstance(exc, EOFError):
        return "the peer closed the connection"
    return type(exc).__name__


def echo(destination: Destination) -> tuple[bool, str]:
    """C-ECHO: can we associate with the peer and does it answer? (ok, what happened)"""
    proposal = Proposal(negotiation.VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,))
    try:
        association = Association.open(destination, [proposal])
    except AssociationRejectedError as exc:
        rejection = exc.rejection
        return False, (
            f"association rejected (result {rejection.result}, source {rejection.source}, "
            f"reason {rejection.diagnostic})"
        )
    except RequestorError as exc:
        return False, f"no association ({exc})"
    try:
        code = association.c_echo()
    except RequestorError as exc:
        return False, f"no C-ECHO response ({exc})"
    finally:
        association.release()
    return code == status.SUCCESS, f"C-ECHO status {status.describe(code)}"
