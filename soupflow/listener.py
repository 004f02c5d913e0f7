"""C-STORE listener: accept, spool, enqueue, answer. Upstream: runtime. Downstream: store.

One pynetdicom AE per workflow port. Association policy (the calling-AE allow-list with the
format's semantics, `EnforceOurAET`, `MaxAssociations`, timeouts) is applied at A-ASSOCIATE.
A C-STORE is answered Success only after the object's bytes are fsynced in the spool and its
queue entry is committed; every failure maps to a named status and the handler never raises.
pynetdicom streams each dataset to a file as it arrives (chunked receive), so memory stays
bounded whatever the instance size.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from soupflow.dicomfile import MalformedObjectError, read_object
from soupflow.store.queue import Arrival, Queue, QueueError
from soupflow.store.spool import Spool, SpoolError
from soupflow.workflow.model import DicomReceiverSetting

log = logging.getLogger(__name__)

# pynetdicom's process-wide switches: stream datasets to a file instead of memory, and
# accept every storage SOP class (private ones too) in the transfer syntax proposed first.
_config.STORE_RECV_CHUNKED_DATASET = True
_config.UNRESTRICTED_STORAGE_SERVICE = True

# C-STORE statuses, PS3.4 Annex B.2.3 (Table B.2-1) and PS3.7 Annex C.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (the sender may retry)
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_CALLING_AE = (
    0x01,
    0x01,
    0x03,
)  # rejected-permanent, service-user, calling AE not recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognized

_STOP_POLL_SECONDS = 0.05


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
        dataset = read_object(path)
        found_class = str(dataset.get("SOPClassUID", ""))
        found_instance = str(dataset.get("SOPInstanceUID", ""))
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

    def store(self, workflow_id: str, event: Any) -> int:
        request, assoc = event.request, event.assoc
        sop_class_uid = str(request.AffectedSOPClassUID)
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        source = Path(event.dataset_path)
        problem = _check_object(source, sop_class_uid, sop_instance_uid)
        if problem is not None:
            log.warning(
                "refused SOPInstanceUID %s from %s: status 0x%04X",
                sop_instance_uid,
                assoc.requestor.ae_title,
                problem,
            )
            return problem
        request_id = str(uuid.uuid4())
        try:
            byte_count = self.spool.commit(source, request_id)
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
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_aet=assoc.requestor.ae_title,
            called_aet=assoc.acceptor.ae_title,
            peer_address=assoc.requestor.address,
            peer_port=assoc.requestor.port,
            received_at=self.clock(),
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
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when `Port` is 0)."""
        if self._server is None:
            return self.receiver.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        receiver = self.receiver
        ae = AE(ae_title=receiver.our_aet.strip())
        timeout = float(receiver.association_timeout_seconds)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
        ae.maximum_associations = receiver.max_associations
        ae.maximum_pdu_size = receiver.max_pdu_size
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            server = ae.start_server((self.host, receiver.port), block=False, evt_handlers=handlers)  # type: ignore[arg-type]
        except OSError as exc:
            raise ListenerError(_bind_problem(self.host, receiver.port, exc)) from exc
        self._ae, self._server = ae, server
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
        server, ae = self._server, self._ae
        if server is None or ae is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(_STOP_POLL_SECONDS)
        self._refusing.set()
        for assoc in ae.active_associations:
            assoc.abort()
        self._server = None
        log.info("workflow %s stopped listening", self.workflow_id)

    # --------------------------------------------------------------------- handlers
    def _on_connection_open(self, event: Any) -> None:
        """Bound every read and write on the connection by the association timeout.

        pynetdicom reads a PDU only once data is waiting, then blocks until the length its
        header announced has arrived; without a socket timeout a peer that stops mid-PDU
        (or sends garbage that looks like a header) would hold the connection forever.
        """
        event.assoc.dul.socket.socket.settimeout(float(self.receiver.association_timeout_seconds))

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling, called = str(request.calling_ae_title), str(request.called_ae_title)
        rejection = self.policy.rejection(calling, called)
        if rejection is None:
            return
        reason = (
            "calling AE not allowed" if rejection == REJECT_CALLING_AE else "called AE is not ours"
        )
        log.warning(
            "rejected association from %s:%s calling %r called %r: %s",
            assoc.requestor.address,
            assoc.requestor.port,
            calling,
            called,
            reason,
        )
        assoc.acse.send_reject(*rejection)
        assoc.kill()  # returns once the A-ASSOCIATE-RJ is on the wire (pynetdicom's own pattern)

    def _on_established(self, event: Any) -> None:
        requestor = event.assoc.requestor
        log.info(
            "accepted association from %s:%s calling %r",
            requestor.address,
            requestor.port,
            requestor.ae_title,
        )

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "rejected association from %s:%s calling %r (limit or negotiation)",
            requestor.address,
            requestor.port,
            requestor.ae_title,
        )

    def _on_c_store(self, event: Any) -> int:
        if self._refusing.is_set():
            return OUT_OF_RESOURCES
        try:
            return self.ingest.store(self.workflow_id, event)
        except Exception as exc:  # the handler never raises: any surprise is "out of resources"
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
