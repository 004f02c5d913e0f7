"""DICOM receiver (`DicomReceiverSetting`): a C-STORE listener. Upstream: runtime.
Downstream: dicom.acceptor (the protocol), ingest (what Success means).

One listening socket per workflow port; each accepted connection is a `dicom.acceptor`
association in its own thread, and this listener is its `Handler`. Association policy (the
calling-AE allow-list with the format's semantics, `EnforceOurAET`, `MaxAssociations`,
timeouts) is applied at A-ASSOCIATE; each received object goes to `ingest`, which answers
Success only after the object's bytes are fsynced in the spool and its queue entry is
committed.

Why not pynetdicom's AE here (the tests use it as a peer): its acceptor polls two reactor
loops that each sleep 1 ms per idle pass and decodes every PDU through generic machinery,
which capped soupflow's ingest at a third of dcmtk's (BENCHMARKS.md). `dicom.acceptor`
reuses pynetdicom's A-ASSOCIATE PDU codec and context negotiation and frames the data phase
itself.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from soupflow import tls
from soupflow.dicom import negotiation, status
from soupflow.dicom.acceptor import Association, ReceivedObject, Session
from soupflow.dicom.negotiation import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    LOCAL_LIMIT_EXCEEDED,
    Rejection,
    Request,
)
from soupflow.ingest import Ingest
from soupflow.receivers.base import ReceiverError
from soupflow.store.queue import Origin
from soupflow.workflow.model import DicomReceiverSetting
from soupflow.workflow.types import ListenerAuthentication

log = logging.getLogger(__name__)

_ABORT_WAIT_SECONDS = 5.0
# Connections served at once, per allowed association: the others are still negotiating,
# or are over the limit and about to hear A-ASSOCIATE-RJ.
_CONNECTIONS_PER_ASSOCIATION = 2
_ACCEPT_RETRY_SECONDS = 0.1
# Connections that have not sent a byte yet, per listener: each costs only a descriptor.
_MAX_WAITING = 1000
_SILENT_REPORT_SECONDS = 60.0


class _SilentCount:
    """Connections closed before they said anything, reported at most once a minute."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self.closed = self.evicted = 0
        self._reported = time.monotonic()

    def report(self) -> None:
        now = time.monotonic()
        if (self.closed or self.evicted) and now - self._reported >= _SILENT_REPORT_SECONDS:
            log.warning(
                "workflow %s closed %d connections that sent nothing within"
                " AssociationTimeoutSeconds and %d more to make room for new ones",
                self.workflow_id,
                self.closed,
                self.evicted,
            )
            self.closed = self.evicted = 0
            self._reported = now


def _drop_oldest(selector: selectors.BaseSelector, waiting: dict[socket.socket, float]) -> None:
    connection = next(iter(waiting))
    del waiting[connection]
    selector.unregister(connection)
    connection.close()


def _closed_unheard(connection: socket.socket) -> bool:
    """The connection's first event was its end (it sent nothing): closed here, no thread."""
    try:
        ended = not connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:  # reset
        ended = True
    if ended:
        connection.close()
    return ended


def _reject_at_once(connection: socket.socket) -> None:
    """A-ASSOCIATE-RJ (transient, local limit exceeded) without a thread: read what the peer
    sent (so that closing does not reset the connection before it reads the answer), answer,
    close."""
    try:
        connection.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(16):  # a request is a few KiB; this bounds a peer that floods
                if not connection.recv(65536):
                    break
        connection.send(negotiation.reject(LOCAL_LIMIT_EXCEEDED))
        connection.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        connection.close()


def parse_allow_list(allow_list: str) -> frozenset[str] | None:
    """`AcceptedCallingAETs` as upper-case titles; None when `*` lets anyone in."""
    titles = {token.strip().upper() for token in allow_list.split(",")}
    titles.discard("")
    return None if "*" in titles else frozenset(titles)


@dataclass(frozen=True)
class Policy:
    """Who may associate with a workflow's listener."""

    our_aet: str
    allowed_calling_aets: frozenset[str] | None  # None: anyone
    enforce_our_aet: bool

    @classmethod
    def from_receiver(cls, receiver: DicomReceiverSetting) -> Policy:
        return cls(
            our_aet=receiver.our_aet.strip(),
            allowed_calling_aets=parse_allow_list(receiver.accepted_calling_aets),
            enforce_our_aet=receiver.enforce_our_aet,
        )

    def rejection(self, calling_aet: str, called_aet: str) -> Rejection | None:
        """The A-ASSOCIATE-RJ to send, or None to go on with the association."""
        allowed = self.allowed_calling_aets
        if allowed is not None and calling_aet.strip().upper() not in allowed:
            return CALLING_AE_NOT_RECOGNIZED
        if self.enforce_our_aet and called_aet.strip() != self.our_aet:
            return CALLED_AE_NOT_RECOGNIZED
        return None


class Listener:
    """One workflow's C-STORE SCP on its port; the `Handler` of its associations."""

    @staticmethod
    def restart_key(receiver: DicomReceiverSetting) -> tuple[object, ...]:
        """Fields a running listener cannot take without restarting (a new thumbprint list
        applies to the next connection; new certificate files on disk, too)."""
        return (
            receiver.port,
            receiver.our_aet.strip(),
            receiver.association_timeout_seconds,
            receiver.max_associations,
            receiver.max_pdu_size,
            receiver.use_ssl,
            receiver.certificate_file,
            receiver.private_key_file,
            receiver.private_key_password,
            receiver.trusted_certificates_file,
            receiver.authentication_type,
            receiver.tls_minimum_version,
        )

    def __init__(
        self,
        workflow_id: str,
        receiver: DicomReceiverSetting,
        host: str,
        ingest: Ingest,
        folder: Path,
    ) -> None:
        """`folder`: the workflow file's, which relative certificate paths start from."""
        self.workflow_id = workflow_id
        self.receiver = receiver
        self.host = host
        self.ingest = ingest
        self.folder = folder
        self.policy = Policy.from_receiver(receiver)
        self._tls: tls.ServerContexts | None = None
        self._fingerprints = tls.fingerprints(receiver.client_certificate_thumb_print)
        self._refusing = threading.Event()
        self._server: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Condition()
        self._connections = 0  # served by a thread: in the TLS handshake or associated
        self._associations: set[Association] = set()
        self._admitted: set[Session] = set()

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when `Port` is 0)."""
        if self._server is None:
            return self.receiver.port
        return int(self._server.getsockname()[1])

    @property
    def active_associations(self) -> int:
        """Connections being served (established or negotiating)."""
        with self._lock:
            return self._connections

    def start(self) -> None:
        receiver = self.receiver
        if receiver.use_ssl:
            require = receiver.authentication_type == ListenerAuthentication.Certificate
            try:
                self._tls = tls.ServerContexts(tls.listener_tls(receiver, require, self.folder))
            except tls.TlsError as exc:
                raise ReceiverError(f"cannot start TLS: {exc}") from exc
        try:
            family = socket.getaddrinfo(self.host, receiver.port, type=socket.SOCK_STREAM)[0][0]
            server = socket.create_server((self.host, receiver.port), family=family, backlog=128)
        except OSError as exc:
            raise ReceiverError(_bind_problem(self.host, receiver.port, exc)) from exc
        self.ingest.spool.incoming.mkdir(parents=True, exist_ok=True)
        self._server, self._wake = server, socket.socketpair()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"listener {self.workflow_id}", daemon=True
        )
        self._acceptor.start()
        log.info(
            "workflow %s listening on %s:%d as %s%s",
            self.workflow_id,
            self.host,
            self.port,
            receiver.our_aet,
            " (TLS)" if self._tls else "",
        )

    def update(self, receiver: DicomReceiverSetting) -> None:
        """New allow-list and AE rules apply to the next association; open ones go on."""
        self.receiver = receiver
        self.policy = Policy.from_receiver(receiver)
        self._fingerprints = tls.fingerprints(receiver.client_certificate_thumb_print)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; let open associations finish for up to `grace_seconds`, then
        refuse stores (0xA700) and abort what is left."""
        server, wake, acceptor = self._server, self._wake, self._acceptor
        if server is None or wake is None or acceptor is None:
            return
        wake[1].send(b"x")
        acceptor.join()
        server.close()
        for end in wake:
            end.close()
        self._server = self._wake = self._acceptor = None
        with self._lock:
            self._lock.wait_for(lambda: not self._connections, timeout=grace_seconds)
            self._refusing.set()
            left = list(self._associations)
        for association in left:
            association.abort()
        with self._lock:
            self._lock.wait_for(lambda: not self._connections, timeout=_ABORT_WAIT_SECONDS)
        log.info("workflow %s stopped listening", self.workflow_id)

    def _accept_loop(self) -> None:
        """Accept, and keep each new connection here until its first bytes arrive: a silent
        connection costs a descriptor, not a thread, and is closed at the association
        timeout (or, past `_MAX_WAITING`, when a newer one needs its place)."""
        assert self._server is not None and self._wake is not None
        server, wake = self._server, self._wake[0]
        waiting: dict[socket.socket, float] = {}  # connection -> deadline, oldest first
        silent = _SilentCount(self.workflow_id)
        timeout = float(self.receiver.association_timeout_seconds)
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            try:
                while True:
                    wait = None
                    if waiting:
                        wait = max(0.0, next(iter(waiting.values())) - time.monotonic())
                    for key, _ in selector.select(wait):
                        if key.fileobj is wake:
                            return
                        if key.fileobj is server:
                            self._accept(server, selector, waiting, silent, timeout)
                        else:
                            connection = key.fileobj
                            assert isinstance(connection, socket.socket)
                            selector.unregister(connection)
                            del waiting[connection]
                            if _closed_unheard(connection):  # a scanner, or gave up
                                silent.closed += 1
                            else:
                                self._serve(connection)
                    now = time.monotonic()
                    while waiting and next(iter(waiting.values())) <= now:
                        _drop_oldest(selector, waiting)
                        silent.closed += 1
                    silent.report()
            finally:
                for connection in waiting:
                    connection.close()

    def _accept(
        self,
        server: socket.socket,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, float],
        silent: _SilentCount,
        timeout: float,
    ) -> None:
        try:
            connection, _ = server.accept()
        except OSError as exc:  # out of file descriptors, or the peer already left
            if waiting:  # the longest-silent connection gives its descriptor up
                _drop_oldest(selector, waiting)
                silent.evicted += 1
                return
            log.error("workflow %s cannot accept a connection: %s", self.workflow_id, exc.strerror)
            time.sleep(_ACCEPT_RETRY_SECONDS)
            return
        if len(waiting) >= _MAX_WAITING:
            _drop_oldest(selector, waiting)
            silent.evicted += 1
        selector.register(connection, selectors.EVENT_READ)
        waiting[connection] = time.monotonic() + timeout

    def _serve(self, connection: socket.socket) -> None:
        """A connection that has sent its first bytes: an association thread, or, past the
        connection limit, a transient A-ASSOCIATE-RJ at once."""
        receiver = self.receiver
        with self._lock:
            open_connections = self._connections
        if open_connections >= _CONNECTIONS_PER_ASSOCIATION * receiver.max_associations:
            # Peers that trickle their requests hold a thread each, up to the negotiation
            # deadline; the next one hears "try again later" instead of waiting for them.
            log.warning(
                "workflow %s rejected a connection: %d connections open (MaxAssociations %d)",
                self.workflow_id,
                open_connections,
                receiver.max_associations,
            )
            _reject_at_once(connection)
            return
        with self._lock:
            self._connections += 1
        threading.Thread(
            target=self._run,
            args=(connection,),
            name=f"association {self.workflow_id}",
            daemon=True,
        ).start()

    def _run(self, connection: socket.socket) -> None:
        """In the connection's own thread: the TLS handshake (under the association
        timeout), then the association."""
        association = None
        try:
            served = self._secure(connection) if self._tls is not None else (connection, None)
            if served is None or self._refusing.is_set():
                return
            connection, certificate = served
            receiver = self.receiver
            association = Association(
                connection,
                self.ingest.spool.incoming,
                our_max_pdu=receiver.max_pdu_size,
                timeout_seconds=float(receiver.association_timeout_seconds),
                handler=self,
                client_certificate=(
                    (certificate.sha256, certificate.subject) if certificate else ("", "")
                ),
            )
            with self._lock:
                self._associations.add(association)
            association.run()
        except OSError:  # the peer left before we looked at it
            pass
        finally:
            connection.close()
            with self._lock:
                self._connections -= 1
                if association is not None:
                    self._associations.discard(association)
                self._lock.notify_all()

    def _secure(
        self, connection: socket.socket
    ) -> tuple[socket.socket, tls.PeerCertificate | None] | None:
        """The TLS handshake and the thumbprint check; None (and one log line) when refused."""
        assert self._tls is not None
        context = self._tls.current()
        if self._tls.reload_error:
            log.error(
                "workflow %s keeps its previous TLS certificate: %s",
                self.workflow_id,
                self._tls.reload_error,
            )
        where = _peer(connection)
        deadline = time.monotonic() + float(self.receiver.association_timeout_seconds)
        try:
            secured = tls.handshake(context, connection, deadline, server_side=True)
        except (OSError, TimeoutError) as exc:
            log.warning(
                "workflow %s: TLS handshake with %s failed: %s",
                self.workflow_id,
                where,
                tls.failure_reason(exc),
            )
            return None
        certificate = tls.peer_certificate(secured)
        allowed = self._fingerprints
        if allowed and (certificate is None or certificate.sha256 not in allowed):
            log.warning(
                "workflow %s refused a TLS connection from %s: client certificate sha256 %s "
                "is not in ClientCertificateThumbPrint",
                self.workflow_id,
                where,
                certificate.sha256 if certificate else "(none)",
            )
            secured.close()
            return None
        return secured, certificate

    # ------------------------------------------------------------ the Handler hooks
    def on_associate(self, session: Session, request: Request) -> Rejection | None:
        where = (session.peer_address, session.peer_port)
        rejection = self.policy.rejection(request.calling_aet, request.called_aet)
        if rejection is not None:
            reason = (
                "calling AE not allowed"
                if rejection == CALLING_AE_NOT_RECOGNIZED
                else "called AE is not ours"
            )
            log.warning(
                "rejected association from %s:%s calling %r called %r: %s",
                *where,
                request.calling_aet,
                request.called_aet,
                reason,
            )
            return rejection
        with self._lock:
            if len(self._admitted) >= self.receiver.max_associations:
                limit = self.receiver.max_associations
                log.warning(
                    "rejected association from %s:%s calling %r: %d associations open (MaxAssociations)",
                    *where,
                    request.calling_aet,
                    limit,
                )
                return LOCAL_LIMIT_EXCEEDED
            self._admitted.add(session)
        log.info("accepted association from %s:%s calling %r", *where, request.calling_aet)
        return None

    def on_c_store(self, session: Session, received: ReceivedObject) -> int:
        if self._refusing.is_set():
            received.path.unlink(missing_ok=True)
            return status.OUT_OF_RESOURCES
        origin = Origin(
            peer_address=session.peer_address,
            peer_port=session.peer_port,
            calling_aet=session.calling_aet,
            called_aet=session.called_aet,
            client_cert_sha256=session.client_cert_sha256,
            client_cert_subject=session.client_cert_subject,
        )
        return self.ingest.store(
            self.workflow_id, origin, received, float(self.receiver.deduplicate_window_seconds)
        )

    def on_release(self, session: Session) -> None:
        with self._lock:
            self._admitted.discard(session)


def _peer(connection: socket.socket) -> str:
    try:
        address, port = connection.getpeername()[:2]
    except OSError:
        return "a peer that left"
    return f"{address}:{port}"


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if port < 1024 and exc.errno == 13:
        return f"cannot listen on {host}:{port}: ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port >= 1024"
    if exc.errno == 98:
        return f"cannot listen on {host}:{port}: the port is already in use by another program"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
