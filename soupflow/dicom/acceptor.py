"""One accepted connection: the acceptor's side of the DICOM upper layer, C-ECHO and C-STORE.

Upstream: a receiver (accepts the connection and is the `Handler`: decides who may associate,
makes a received object durable). Downstream: pdu (framing), negotiation (A-ASSOCIATE),
dimse (command sets), part10 (file meta), status.

State is kept the way aiosmtpd keeps it: a `Session` per association (the peer and its AE
titles) apart from the `ReceivedObject` of each C-STORE; the handler gets both.

Each association runs in its own thread with blocking reads; the association timeout is
the socket timeout, so it bounds the wait for the A-ASSOCIATE-RQ (ARTIM), for every read
inside a PDU, and for an idle peer. Dataset fragments are written to a file in the
incoming folder as they arrive: memory stays bounded whatever the instance or PDU size,
and nothing is decoded on the way. Only when the last fragment is in does the handler's
`on_c_store` decide the status; the response goes out after it returns.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from soupflow.dicom import dimse, negotiation, pdu, status
from soupflow.dicom.negotiation import AcceptedContext, Rejection, Request
from soupflow.dicom.part10 import file_meta
from soupflow.dicom.pdu import ProtocolError

log = logging.getLogger(__name__)

_READ_BUFFER = 256 * 1024
_WRITE_BUFFER = 64 * 1024
WRITE_BEHIND_BYTES = 16 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024
_MAX_COMMAND_BYTES = 64 * 1024  # a C-STORE-RQ command set is a few hundred bytes

# A sender that leaves Nagle's algorithm on (Debian's dcmtk without TCP_NODELAY=1) holds its
# next small segment until the previous one is acknowledged; a receiver that delays its ACKs
# (Linux: up to 40 ms) then stalls every instance. Acknowledging at once avoids it
# (bench: tiny instances from such a sender, 22 -> 321 inst/s).
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


@dataclass(frozen=True, eq=False)  # one per association: compared by identity
class Session:
    """Who is on the other end of one association."""

    peer_address: str
    peer_port: int
    calling_aet: str
    called_aet: str
    client_cert_sha256: str = ""  # over TLS with a client certificate
    client_cert_subject: str = ""


@dataclass(frozen=True, kw_only=True)
class ReceivedObject:
    """A dataset received in full, in a Part 10 file under the incoming folder."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


class Handler(Protocol):
    """What a receiver decides for its associations (pynetdicom's intervention events)."""

    def on_associate(self, session: Session, request: Request) -> Rejection | None:
        """The A-ASSOCIATE-RJ to answer, or None to accept."""
        ...

    def on_c_store(self, session: Session, received: ReceivedObject) -> int:
        """The C-STORE status to answer; the handler owns (and removes) `received.path`."""
        ...

    def on_release(self, session: Session) -> None:
        """The association ended (released, aborted or lost), after `on_associate` accepted it."""


class WriteBehind:
    """The disk starts writing a large file while it is still being received, so that the
    fsync that makes it durable has little left to wait for, and its bytes leave the page
    cache instead of pushing out what else is cached. Every WRITE_BEHIND_BYTES written, the
    file's buffer is flushed and the kernel asked to write that range back
    (POSIX_FADV_DONTNEED starts writeback of dirty pages; it never drops one unwritten).
    Files under the threshold (a CT image) are never touched. Advisory: a filesystem that
    refuses the advice changes nothing."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.written = 0
        self._started = 0  # where the range not yet handed to writeback begins

    def wrote(self, count: int) -> None:
        self.written += count
        if self.written - self._started < WRITE_BEHIND_BYTES:
            return
        self.file.flush()
        with contextlib.suppress(OSError):
            os.posix_fadvise(
                self.file.fileno(),
                self._started,
                self.written - self._started,
                os.POSIX_FADV_DONTNEED,
            )
        self._started = self.written


class _Dataset:
    """The file a C-STORE's dataset is streamed into. A write failure is remembered (the
    peer keeps sending; the rest is read and dropped) and answered when the dataset ends."""

    def __init__(self, path: Path, command: dimse.Command, context: AcceptedContext) -> None:
        self.path = path
        self.command = command
        self.context = context
        self.failure: OSError | None = None
        self.file: BinaryIO | None = None
        try:
            try:
                self.file = path.open("wb", buffering=_WRITE_BUFFER)
            except FileNotFoundError:  # the incoming folder was removed under us
                path.parent.mkdir(parents=True, exist_ok=True)
                self.file = path.open("wb", buffering=_WRITE_BUFFER)
            self.behind = WriteBehind(self.file)
            meta = file_meta(
                command.affected_sop_class_uid,
                command.affected_sop_instance_uid,
                context.transfer_syntax,
            )
            self.file.write(meta)
            self.behind.wrote(len(meta))
        except OSError as exc:
            self._fail(exc)

    def write(self, fragment: bytes) -> None:
        if self.file is None:
            return
        try:
            self.file.write(fragment)
            self.behind.wrote(len(fragment))
        except OSError as exc:
            self._fail(exc)

    def close(self) -> OSError | None:
        """Flush and close the file; the failure, if any (then the file is gone)."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                self._fail(exc)
            self.file = None
        return self.failure

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def _fail(self, exc: OSError) -> None:
        self.failure = self.failure or exc
        if self.file is not None:
            with contextlib.suppress(OSError):  # the first failure is the one reported
                self.file.close()
            self.file = None
        self.path.unlink(missing_ok=True)


class Association:
    """The acceptor's side of one association (PS3.8 9.2), run by `run` in its own thread."""

    def __init__(
        self,
        connection: socket.socket,
        incoming: Path,
        our_max_pdu: int,
        timeout_seconds: float,
        handler: Handler,
        client_certificate: tuple[str, str] = ("", ""),
    ) -> None:
        """`connection` may be a TLS socket whose handshake is done; `client_certificate`
        is its peer's (SHA-256 fingerprint, subject)."""
        self.connection = connection
        self.client_certificate = client_certificate
        self.peer_address, self.peer_port = connection.getpeername()[:2]
        self.incoming = incoming
        self.our_max_pdu = our_max_pdu
        self.handler = handler
        self.session: Session | None = None
        self.request: Request | None = None
        self._contexts: dict[int, AcceptedContext] = {}
        self._command = bytearray()
        self._dataset: _Dataset | None = None
        self._reply_to = 0  # the presentation context of the C-STORE-RQ being received
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._abort_requested = threading.Event()
        self.timeout_seconds = timeout_seconds
        connection.settimeout(timeout_seconds)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = cast(io.BufferedReader, connection.makefile("rb", buffering=_READ_BUFFER))

    @property
    def calling_aet(self) -> str:
        return self.request.calling_aet if self.request else ""

    def run(self) -> None:
        """Serve the connection until release, abort, timeout or a protocol error; then close."""
        try:
            if self._associate():
                self._data_phase()
        except ProtocolError as exc:
            log.warning(
                "aborted association from %s:%s calling %r: %s",
                self.peer_address,
                self.peer_port,
                self.calling_aet,
                exc,
            )
            self._send(pdu.abort(exc.reason))
        except TimeoutError:
            log.warning(
                "aborted association from %s:%s calling %r: the peer sent nothing within the timeout",
                self.peer_address,
                self.peer_port,
                self.calling_aet,
            )
            self._send(pdu.abort(pdu.REASON_NOT_SPECIFIED))
        except (ConnectionError, EOFError, OSError) as exc:
            if self._abort_requested.is_set():
                log.warning(
                    "aborted association from %s:%s calling %r: the listener is stopping",
                    self.peer_address,
                    self.peer_port,
                    self.calling_aet,
                )
                # Over TLS the read side's end broke the session (OpenSSL reads it as an
                # unexpected EOF): closing the connection is the abort (PS3.8 9.1.4).
                if not isinstance(self.connection, ssl.SSLSocket):
                    self._send(pdu.abort(pdu.REASON_NOT_SPECIFIED))
            elif not self._closed.is_set():
                log.warning(
                    "association from %s:%s calling %r ended: connection lost (%s)",
                    self.peer_address,
                    self.peer_port,
                    self.calling_aet,
                    type(exc).__name__,
                )
        finally:
            if self._dataset is not None:
                self._dataset.discard()
            self.close()
            if self.session is not None:
                self.handler.on_release(self.session)

    def abort(self) -> None:
        """From another thread: end the association. Only the association's own thread
        writes (OpenSSL forbids two writers on one TLS socket): this shuts the socket's read
        side, which wakes that thread's read; it sends the A-ABORT (cleartext) and closes."""
        self._abort_requested.set()
        with contextlib.suppress(OSError):  # the plain socket's call: no TLS state touched
            socket.socket.shutdown(self.connection, socket.SHUT_RD)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):  # already gone
            self.connection.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in `run`
        self.connection.close()

    # ----------------------------------------------------------------- establishment
    def _associate(self) -> bool:
        # The whole request within the timeout (ARTIM, PS3.8 9.1.5), not each read: a peer
        # trickling a byte at a time must not hold a connection slot.
        deadline = time.monotonic() + self.timeout_seconds
        pdu_type, length = self._pdu_header(deadline)
        if pdu_type != pdu.A_ASSOCIATE_RQ_PDU:
            raise ProtocolError(
                f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                pdu.REASON_UNEXPECTED_PDU,
            )
        if length > pdu.MAX_CONTROL_PDU_BYTES:
            raise ProtocolError(f"an A-ASSOCIATE-RQ of {length} bytes")
        body = self._read_by(length, deadline)
        self.request = request = negotiation.decode_request(
            pdu.PDU_HEADER.pack(pdu_type, length) + body  # the whole PDU, as pynetdicom reads it
        )
        session = Session(
            self.peer_address,
            self.peer_port,
            request.calling_aet,
            request.called_aet,
            *self.client_certificate,
        )
        rejection = request.rejection() or self.handler.on_associate(session, request)
        if rejection is not None:
            self._send(negotiation.reject(rejection))
            self._await_close()
            return False
        self.session = session
        self._contexts, accept = negotiation.accept(request, self.our_max_pdu)
        self._send(accept)
        return True

    # ----------------------------------------------------------------- data transfer
    def _data_phase(self) -> None:
        while True:
            pdu_type, length = self._pdu_header()
            if pdu_type == pdu.P_DATA_TF_PDU:
                self._p_data(length)
            elif pdu_type == pdu.A_RELEASE_RQ_PDU:
                self._read(length)
                self._send(pdu.release_response())
                self._await_close()
                return
            elif pdu_type == pdu.A_ABORT_PDU:
                log.info(
                    "association from %s:%s calling %r aborted by the peer",
                    self.peer_address,
                    self.peer_port,
                    self.calling_aet,
                )
                return
            else:
                raise ProtocolError(
                    f"unexpected PDU type 0x{pdu_type:02X} during data transfer",
                    pdu.REASON_UNEXPECTED_PDU,
                )

    def _p_data(self, length: int) -> None:
        header = pdu.PDV_HEADER
        remaining = length
        while remaining:
            if remaining < header.size:
                raise ProtocolError("a P-DATA-TF PDU ends inside a PDV header")
            item_length, context_id, control = header.unpack(self._read(header.size))
            value_length = item_length - 2
            remaining -= 4 + item_length
            if value_length < 0 or remaining < 0:
                raise ProtocolError("a PDV overruns its P-DATA-TF PDU")
            context = self._contexts.get(context_id)
            if context is None:
                raise ProtocolError(f"a PDV on presentation context {context_id}, not accepted")
            if control & pdu.COMMAND_FRAGMENT:
                self._command_fragment(context_id, context, value_length, control)
            else:
                self._dataset_fragment(context, value_length, control)

    def _command_fragment(
        self, context_id: int, context: AcceptedContext, length: int, control: int
    ) -> None:
        if self._dataset is not None:
            raise ProtocolError("a command fragment before the dataset ended")
        if len(self._command) + length > _MAX_COMMAND_BYTES:
            raise ProtocolError("a command set over 64 KiB")
        self._command += self._read(length)
        if not control & pdu.LAST_FRAGMENT:
            return
        try:
            command = dimse.parse_command(bytes(self._command))
        except dimse.CommandError as exc:
            raise ProtocolError(str(exc)) from exc
        self._command.clear()
        if command.command_field == dimse.C_ECHO_RQ and not command.has_data_set:
            self._respond(context_id, command, status.SUCCESS)
        elif command.command_field == dimse.C_STORE_RQ and command.has_data_set:
            self._reply_to = context_id
            path = self.incoming / f"{uuid.uuid4()}.part"
            self._dataset = _Dataset(path, command, context)
        else:
            raise ProtocolError(
                f"command 0x{command.command_field:04X}: only C-ECHO and C-STORE are served"
            )

    def _dataset_fragment(self, context: AcceptedContext, length: int, control: int) -> None:
        dataset = self._dataset
        if dataset is None or dataset.context != context:
            raise ProtocolError("a dataset fragment without its C-STORE-RQ")
        while length:
            chunk = self._read(min(length, _COPY_CHUNK))
            dataset.write(chunk)
            length -= len(chunk)
        if control & pdu.LAST_FRAGMENT:
            self._dataset = None
            self._respond(self._reply_to, dataset.command, self._stored(dataset))

    def _stored(self, dataset: _Dataset) -> int:
        failure = dataset.close()
        command = dataset.command
        if failure is not None:
            log.error(
                "cannot write SOPInstanceUID %s from %r to the incoming folder: %s; answered 0xA700",
                command.affected_sop_instance_uid,
                self.calling_aet,
                failure.strerror or type(failure).__name__,
            )
            return status.OUT_OF_RESOURCES
        assert self.session is not None
        return self.handler.on_c_store(
            self.session,
            ReceivedObject(
                path=dataset.path,
                sop_class_uid=command.affected_sop_class_uid,
                sop_instance_uid=command.affected_sop_instance_uid,
                transfer_syntax_uid=dataset.context.transfer_syntax,
            ),
        )

    def _respond(self, context_id: int, command: dimse.Command, code: int) -> None:
        assert self.request is not None
        response = dimse.response(command, code)
        self._send(pdu.p_data(context_id, response, self.request.peer_max_pdu, command=True))

    # ----------------------------------------------------------------- transport
    def _await_close(self) -> None:
        """After an A-ASSOCIATE-RJ or A-RELEASE-RP the requestor closes the connection
        (PS3.8 9.2, state Sta13): closing first can make it see the connection drop before
        it has read our answer. Wait for it, the whole wait bounded by the timeout (ARTIM)."""
        deadline = time.monotonic() + self.timeout_seconds
        with contextlib.suppress(TimeoutError, OSError):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.connection.settimeout(remaining)
                if not self.connection.recv(_READ_BUFFER):
                    return  # closed; anything that came before is dropped

    def _read_by(self, size: int, deadline: float) -> bytes:
        """`size` bytes, all of them before `deadline` (monotonic)."""
        data = bytearray()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.connection.settimeout(remaining)
            chunk = self._reader.read1(size - len(data))
            if not chunk:
                raise EOFError("the peer closed the connection")
            data += chunk
        self.connection.settimeout(self.timeout_seconds)
        return bytes(data)

    def _pdu_header(self, deadline: float | None = None) -> tuple[int, int]:
        """The next PDU's type and length (read before `deadline`, when one is given)."""
        if _QUICKACK is not None:  # re-armed per PDU: Linux drops back to delayed ACKs
            self.connection.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        size = pdu.PDU_HEADER.size
        header = self._read(size) if deadline is None else self._read_by(size, deadline)
        pdu_type, length = pdu.PDU_HEADER.unpack(header)
        if pdu_type not in pdu.KNOWN_PDU_TYPES:
            raise ProtocolError(
                f"unrecognized PDU type 0x{pdu_type:02X}", pdu.REASON_UNRECOGNIZED_PDU
            )
        return int(pdu_type), int(length)

    def _read(self, size: int) -> bytes:
        data: bytes = self._reader.read(size)
        if len(data) < size:
            raise EOFError("the peer closed the connection")
        return data

    def _send(self, data: bytes) -> None:
        if self._closed.is_set():
            return
        # A failed send means the peer is gone; `run` notices on its next read.
        with self._send_lock, contextlib.suppress(OSError):
            self.connection.sendall(data)
