"""DICOM receiver (`DicomReceiverSetting`): a C-STORE listener. Upstream: runtime.
Downstream: dicom.acceptor (the protocol), ingest (what Success means).

One listening socket per workflow port; each accepted connection is a `dicom.acceptor`
association in its own thread, with a `_Handler` of this listener. Association policy (the
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

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from soupflow import metrics, tls
from soupflow.dicom import negotiation, status
from soupflow.dicom.acceptor import Association, ReceivedObject, Session
from soupflow.dicom.negotiation import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    LOCAL_LIMIT_EXCEEDED,
    Rejection,
    Request,
)
from soupflow.events import fields
from soupflow.ingest import Ingest
from soupflow.receivers.base import Admission, Sharing
from soupflow.receivers.server import (
    HandedContexts,
    Limits,
    Server,
    drain,
    server_contexts,
    tls_restart_key,
)
from soupflow.store.queue import Origin
from soupflow.workflow.model import DicomReceiverSetting, parse_allow_list

log = logging.getLogger(__name__)

_ABORT_WAIT_SECONDS = 5.0
# Connections served at once, per allowed association: the others are still negotiating,
# or are over the limit and about to hear A-ASSOCIATE-RJ.
_CONNECTIONS_PER_ASSOCIATION = 2


def _reject_at_once(connection: socket.socket) -> None:
    """A-ASSOCIATE-RJ (transient, local limit exceeded) without a thread."""
    try:
        drain(connection)
        connection.send(negotiation.reject(LOCAL_LIMIT_EXCEEDED))
        connection.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        connection.close()


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
            *tls_restart_key(receiver),
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
        self._refusing = threading.Event()
        self._server: Server | None = None
        self._lock = threading.Lock()
        self._associations: set[Association] = set()
        self._admitted = 0  # associations accepted, served here or by worker processes
        self._sharing: Sharing | None = None
        self._handed = HandedContexts(receiver, folder)

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when `Port` is 0)."""
        return self._server.port if self._server is not None else self.receiver.port

    @property
    def active_connections(self) -> int:
        """Connections being served (established or negotiating)."""
        return self._server.active if self._server is not None else 0

    active_associations = active_connections

    @classmethod
    def from_settings(
        cls, workflow_id: str, settings: dict[str, Any], folder: Path, ingest: Ingest
    ) -> Listener:
        """The listener a worker process serves handed connections with (`settings`)."""
        return cls(workflow_id, DicomReceiverSetting.model_validate(settings), "", ingest, folder)

    def settings(self) -> dict[str, Any]:
        return self.receiver.model_dump(mode="json", by_alias=True)

    def _make_server(
        self, secure: tls.ServerContexts | None, handle: Callable[..., None] | None = None
    ) -> Server:
        receiver = self.receiver
        limits = Limits(
            float(receiver.association_timeout_seconds),
            _CONNECTIONS_PER_ASSOCIATION * receiver.max_associations,
        )
        return Server(
            f"workflow {self.workflow_id}",
            self.host,
            receiver.port,
            limits,
            handle or self._associate,
            _reject_at_once,
            secure,
        )

    def start(self) -> None:
        receiver = self.receiver
        secure = server_contexts(receiver, self.folder)
        server = self._make_server(secure)
        if self._sharing is not None:
            server.hand = partial(self._sharing.offer, self)
        server.start()
        self.ingest.spool.incoming.mkdir(parents=True, exist_ok=True)
        self._server = server
        if self._sharing is not None:  # once it listens: a failed start leaves nothing
            self._sharing.share(self)
        log.info(
            "workflow %s listening on %s:%d as %s%s",
            self.workflow_id,
            self.host,
            self.port,
            receiver.our_aet,
            " (TLS)" if secure else "",
        )

    def update(self, receiver: DicomReceiverSetting) -> None:
        """New allow-list, AE rules and thumbprints apply to the next association; open ones
        go on."""
        self.receiver = receiver
        self.policy = Policy.from_receiver(receiver)
        if self._server is not None:
            self._server.fingerprints = tls.fingerprints(receiver.client_certificate_thumb_print)

    def share(self, sharing: Sharing) -> None:
        self._sharing = sharing

    def serve_handed(self, connection: socket.socket, admission: Admission) -> None:
        """Serve an association the runtime accepted (in a worker process), TLS included."""
        server = self._make_server(
            self._handed.get(), partial(self._associate, admission=admission)
        )
        server.fingerprints = tls.fingerprints(self.receiver.client_certificate_thumb_print)
        server.serve_handed(connection)

    def stop_handed(self) -> None:
        """Open associations go on until the runtime's grace is over (`abort_handed`)."""

    def abort_handed(self) -> None:
        self._abort()

    # ------------------------------------------------------------------ admissions
    def admit(self, slot: str) -> bool:
        """One of `MaxAssociations` ("association"), wherever the association is served."""
        with self._lock:
            if slot != "association" or self._admitted >= self.receiver.max_associations:
                return False
            self._admitted += 1
            return True

    def release(self, slot: str) -> None:
        with self._lock:
            self._admitted -= 1

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; let open associations finish for up to `grace_seconds`, then
        refuse stores (0xA700) and abort what is left."""
        server = self._server
        if server is None:
            return
        server.stop_accepting()
        if self._sharing is not None:
            self._sharing.unshare(self)
        if not server.wait_idle(grace_seconds) and self._sharing is not None:
            self._sharing.abort(self)  # those served by worker processes, too
        self._abort()
        server.wait_idle(_ABORT_WAIT_SECONDS)
        self._server = None
        log.info("workflow %s stopped listening", self.workflow_id)

    def _abort(self) -> None:
        """Refuse stores (0xA700) and abort every association this process serves."""
        self._refusing.set()
        with self._lock:
            left = list(self._associations)
        for association in left:
            association.abort()

    def _associate(
        self,
        connection: socket.socket,
        certificate: tls.PeerCertificate | None,
        admission: Admission | None = None,
    ) -> None:
        """In the connection's own thread, after TLS: the association; `admission`: who
        counts it against `MaxAssociations` (this listener, or a worker process's runtime)."""
        if self._refusing.is_set():
            return
        receiver = self.receiver
        association = Association(
            connection,
            self.ingest.spool.incoming,
            our_max_pdu=receiver.max_pdu_size,
            timeout_seconds=float(receiver.association_timeout_seconds),
            handler=_Handler(self, admission or self),
            client_certificate=(certificate.sha256, certificate.subject)
            if certificate
            else ("", ""),
        )
        with self._lock:
            self._associations.add(association)
        try:
            association.run()
        finally:
            with self._lock:
                self._associations.discard(association)

    # ------------------------------------------------------------ the Handler hooks
    def on_associate(
        self, session: Session, request: Request, admission: Admission
    ) -> Rejection | None:
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
                extra=self._association_fields(where, request.calling_aet, "rejected"),
            )
            metrics.ASSOCIATIONS.labels(self.workflow_id, "rejected").inc()
            return rejection
        if not admission.admit("association"):
            log.warning(
                "rejected association from %s:%s calling %r: %d associations open (MaxAssociations)",
                *where,
                request.calling_aet,
                self.receiver.max_associations,
                extra=self._association_fields(where, request.calling_aet, "rejected"),
            )
            metrics.ASSOCIATIONS.labels(self.workflow_id, "rejected").inc()
            return LOCAL_LIMIT_EXCEEDED
        log.info(
            "accepted association from %s:%s calling %r",
            *where,
            request.calling_aet,
            extra=self._association_fields(where, request.calling_aet, "accepted"),
        )
        metrics.ASSOCIATIONS.labels(self.workflow_id, "accepted").inc()
        return None

    def _association_fields(
        self, where: tuple[str, int], calling_aet: str, result: str
    ) -> dict[str, dict[str, object]]:
        return fields(
            workflow=self.workflow_id,
            peer=f"{where[0]}:{where[1]}",
            calling_aet=calling_aet,
            result=result,
        )

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
        code = self.ingest.store(
            self.workflow_id, origin, received, float(self.receiver.deduplicate_window_seconds)
        )
        if code == status.SUCCESS:
            self.ingest.hold(self.workflow_id)
        return code


class _Handler:
    """One association's `Handler`: its listener's policy, with whoever counts it."""

    def __init__(self, listener: Listener, admission: Admission) -> None:
        self.listener, self.admission = listener, admission
        self.admitted = False

    def on_associate(self, session: Session, request: Request) -> Rejection | None:
        rejection = self.listener.on_associate(session, request, self.admission)
        self.admitted = rejection is None
        return rejection

    def on_c_store(self, session: Session, received: ReceivedObject) -> int:
        return self.listener.on_c_store(session, received)

    def on_release(self, session: Session) -> None:
        if self.admitted:
            self.admitted = False
            self.admission.release("association")
