"""C-STORE listener: accept, spool, enqueue, answer. Upstream: runtime. Downstream: store.

One listening socket per workflow port; each accepted connection is an `Association` in
its own thread. Association policy (the calling-AE allow-list with the format's semantics,
`EnforceOurAET`, `MaxAssociations`, timeouts) is applied at A-ASSOCIATE. A C-STORE is
answered Success only after the object's bytes are fsynced in the spool and its queue
entry is committed; every failure maps to a named status and the store path never raises.

Why not pynetdicom's AE here (it is soupflow's SCU, and the tests' peer): its acceptor
polls two reactor loops that each sleep 1 ms per idle pass and decodes every PDU through
generic machinery, which capped soupflow's ingest at a third of dcmtk's (BENCHMARKS.md).
The acceptor in `association` reuses pynetdicom's A-ASSOCIATE PDU codec and context
negotiation and frames the data phase itself.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soupflow.association import Association, Received
from soupflow.dicomfile import MalformedObjectError, identify
from soupflow.dimse import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from soupflow.store.queue import Arrival, Queue, QueueError
from soupflow.store.spool import Spool, SpoolError
from soupflow.upperlayer import REJECT_LOCAL_LIMIT, Request
from soupflow.workflow.model import DicomReceiverSetting

log = logging.getLogger(__name__)


# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_CALLING_AE = (
    0x01,
    0x01,
    0x03,
)  # rejected-permanent, service-user, calling AE not recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognized

_ABORT_WAIT_SECONDS = 5.0
# Connections served at once, per allowed association: the others are still negotiating,
# or are over the limit and about to hear A-ASSOCIATE-RJ.
_CONNECTIONS_PER_ASSOCIATION = 2
_ACCEPT_RETRY_SECONDS = 0.1


class ListenerError(Exception):
    """A listener could not start (port in use, not permitted, bad address)."""


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

    def rejection(self, calling_aet: str, called_aet: str) -> tuple[int, int, int] | None:
        """The A-ASSOCIATE-RJ to send, or None to go on with the association."""
        allowed = self.allowed_calling_aets
        if allowed is not None and calling_aet.strip().upper() not in allowed:
            return REJECT_CALLING_AE
        if self.enforce_our_aet and called_aet.strip() != self.our_aet:
            return REJECT_CALLED_AE
        return None


def _check_object(path: Path, sop_class_uid: str, sop_instance_uid: str) -> int | None:
    """A failure status when the received object is unusable, else None (headers only)."""
    try:
        found_class, found_instance = identify(path)
    except (MalformedObjectError, ValueError, TypeError, KeyError, AttributeError):
        return CANNOT_UNDERSTAND
    if found_class != sop_class_uid or found_instance != sop_instance_uid:
        return DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    return None


class Ingest:
    """Make a received object durable (spool + queue) and say what to answer."""

    def __init__(self, spool: Spool, queue: Queue, clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.queue = queue
        self.clock = clock

    def store(self, workflow_id: str, received: Received) -> int:
        """The status to answer; the received file is moved into the spool or removed."""
        try:
            return self._store(workflow_id, received)
        finally:
            received.path.unlink(missing_ok=True)

    def _store(self, workflow_id: str, received: Received) -> int:
        sop_instance_uid = received.sop_instance_uid
        problem = _check_object(received.path, received.sop_class_uid, sop_instance_uid)
        if problem is not None:
            log.warning(
                "refused SOPInstanceUID %s from %r: status 0x%04X",
                sop_instance_uid,
                received.calling_aet,
                problem,
            )
            return problem
        request_id = str(uuid.uuid4())
        try:
            byte_count = self.spool.commit(received.path, request_id)
        except SpoolError as exc:
            log.error(
                "cannot spool SOPInstanceUID %s (RequestId %s): %s; answered 0xA700",
                sop_instance_uid,
                request_id,
                exc.strerror,
            )
            return OUT_OF_RESOURCES
        arrival = Arrival(
            request_id=request_id,
            workflow_id=workflow_id,
            object_path=self.spool.relative(request_id),
            byte_count=byte_count,
            received_at=self.clock(),
            **received.origin(),
        )
        try:
            self.queue.enqueue(arrival)
        except QueueError as exc:
            self.spool.remove(request_id)
            log.error(
                "cannot queue SOPInstanceUID %s (RequestId %s): %s; answered 0xA700",
                sop_instance_uid,
                request_id,
                exc,
            )
            return OUT_OF_RESOURCES
        log.info(
            "stored SOPInstanceUID %s as RequestId %s (%d bytes)",
            sop_instance_uid,
            request_id,
            byte_count,
        )
        return SUCCESS


class Listener:
    """One workflow's C-STORE SCP on its port."""

    def __init__(
        self, workflow_id: str, receiver: DicomReceiverSetting, host: str, ingest: Ingest
    ) -> None:
        self.workflow_id = workflow_id
        self.receiver = receiver
        self.host = host
        self.ingest = ingest
        self.policy = Policy.from_receiver(receiver)
        self._refusing = threading.Event()
        self._server: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Condition()
        self._associations: set[Association] = set()
        self._admitted: set[Association] = set()

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
            return len(self._associations)

    def start(self) -> None:
        receiver = self.receiver
        try:
            family = socket.getaddrinfo(self.host, receiver.port, type=socket.SOCK_STREAM)[0][0]
            server = socket.create_server((self.host, receiver.port), family=family, backlog=128)
        except OSError as exc:
            raise ListenerError(_bind_problem(self.host, receiver.port, exc)) from exc
        self.ingest.spool.incoming.mkdir(parents=True, exist_ok=True)
        self._server, self._wake = server, socket.socketpair()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"listener {self.workflow_id}", daemon=True
        )
        self._acceptor.start()
        log.info(
            "workflow %s listening on %s:%d as %s",
            self.workflow_id,
            self.host,
            self.port,
            receiver.our_aet,
        )

    def update_policy(self, receiver: DicomReceiverSetting) -> None:
        """New allow-list and AE rules apply to the next association; open ones go on."""
        self.receiver = receiver
        self.policy = Policy.from_receiver(receiver)

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
            self._lock.wait_for(lambda: not self._associations, timeout=grace_seconds)
            self._refusing.set()
            left = list(self._associations)
        for association in left:
            association.abort()
        with self._lock:
            self._lock.wait_for(lambda: not self._associations, timeout=_ABORT_WAIT_SECONDS)
        log.info("workflow %s stopped listening", self.workflow_id)

    # --------------------------------------------------------------------- serving
    def _accept_loop(self) -> None:
        assert self._server is not None and self._wake is not None
        server, wake = self._server, self._wake[0]
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake in ready:
                    return
                try:
                    connection, _ = server.accept()
                except OSError as exc:  # out of file descriptors, or the peer already left
                    log.error(
                        "workflow %s cannot accept a connection: %s", self.workflow_id, exc.strerror
                    )
                    time.sleep(_ACCEPT_RETRY_SECONDS)
                    continue
                self._serve(connection)

    def _serve(self, connection: socket.socket) -> None:
        receiver = self.receiver
        with self._lock:
            open_connections = len(self._associations)
        if open_connections >= _CONNECTIONS_PER_ASSOCIATION * receiver.max_associations:
            # A flood of connections that never associate (a scanner, a broken client) would
            # otherwise hold a thread each for the association timeout.
            log.warning(
                "workflow %s closed a new connection: %d connections open (MaxAssociations %d)",
                self.workflow_id,
                open_connections,
                receiver.max_associations,
            )
            connection.close()
            return
        try:
            association = Association(
                connection,
                self.ingest.spool.incoming,
                our_max_pdu=receiver.max_pdu_size,
                timeout_seconds=float(receiver.association_timeout_seconds),
                decide=self._decide,
                store=self._store,
            )
        except OSError:  # the peer left before we looked at it
            connection.close()
            return
        with self._lock:
            self._associations.add(association)
        threading.Thread(
            target=self._run,
            args=(association,),
            name=f"association {self.workflow_id}",
            daemon=True,
        ).start()

    def _run(self, association: Association) -> None:
        try:
            association.run()
        finally:
            with self._lock:
                self._associations.discard(association)
                self._admitted.discard(association)
                self._lock.notify_all()

    def _decide(self, association: Association, request: Request) -> tuple[int, int, int] | None:
        where = (association.peer_address, association.peer_port)
        rejection = self.policy.rejection(request.calling_aet, request.called_aet)
        if rejection is not None:
            reason = (
                "calling AE not allowed"
                if rejection == REJECT_CALLING_AE
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
                return REJECT_LOCAL_LIMIT
            self._admitted.add(association)
        log.info("accepted association from %s:%s calling %r", *where, request.calling_aet)
        return None

    def _store(self, received: Received) -> int:
        if self._refusing.is_set():
            received.path.unlink(missing_ok=True)
            return OUT_OF_RESOURCES
        try:
            return self.ingest.store(self.workflow_id, received)
        except Exception as exc:  # the store path never raises: any surprise is "out of resources"
            log.error(
                "C-STORE for workflow %s failed: %s; answered 0xA700",
                self.workflow_id,
                type(exc).__name__,
            )
            return OUT_OF_RESOURCES


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if port < 1024 and exc.errno == 13:
        return f"cannot listen on {host}:{port}: ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port >= 1024"
    if exc.errno == 98:
        return f"cannot listen on {host}:{port}: the port is already in use by another program"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
