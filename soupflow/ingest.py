"""Ingest: make a received object durable and say what to answer. One path for every receiver.

Upstream: receivers (a DICOM listener today; a STOW-RS receiver next), each with an object
already written to the spool's incoming folder. Downstream: dicom.part10 (is the object
usable?), store.spool (commit), store.queue (enqueue). The answer is a DIMSE status
(`dicom.status`); a receiver that is not DICOM maps it to its own protocol (PS3.18's STOW-RS
Failure Reasons use the same codes). The object is answered Success only once its bytes and
its queue entry are both durable; on any failure the object is removed and nothing is left
half-stored. Log lines carry ids, never a value from the dataset.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from soupflow import metrics
from soupflow.dicom import status
from soupflow.dicom.acceptor import ReceivedObject
from soupflow.dicom.part10 import MalformedObjectError, identify
from soupflow.events import fields
from soupflow.store.queue import Arrival, Delivery, Origin, Queue, QueueError
from soupflow.store.spool import Spool, SpoolError

log = logging.getLogger(__name__)


def check_object(received: ReceivedObject) -> int | None:
    """A failure status when the received object is unusable, else None (headers only)."""
    try:
        found_class, found_instance = identify(received.path)
    except (MalformedObjectError, ValueError, TypeError, KeyError, AttributeError):
        return status.CANNOT_UNDERSTAND
    if found_class != received.sop_class_uid or found_instance != received.sop_instance_uid:
        return status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    return None


class Ingest:
    """Check the object, commit it to the spool, enqueue it, choose the status."""

    def __init__(
        self,
        spool: Spool,
        queue: Queue,
        clock: Callable[[], float] = time.time,
        on_queued: Callable[[], None] = lambda: None,
        hold: Callable[[str], float] = lambda _workflow_id: 0.0,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self.clock = clock
        self.on_queued = on_queued  # the workers' wake-up
        # back-pressure (runtime.pacing): a receiver calls it after a commit, before answering
        self.hold = hold

    def store(
        self,
        workflow_id: str,
        origin: Origin,
        received: ReceivedObject,
        dedupe_seconds: float = 0,
        delivery: Delivery | None = None,
    ) -> int:
        """The status to answer; the received file is moved into the spool or removed.
        Never raises: any surprise is 0xA700 (the sender may try again)."""
        started = time.monotonic()
        try:
            code = self._store(workflow_id, origin, received, dedupe_seconds, delivery)
        except Exception as exc:
            log.error(
                "C-STORE for workflow %s failed: %s; answered %s",
                workflow_id,
                type(exc).__name__,
                status.describe(status.OUT_OF_RESOURCES),
            )
            code = status.OUT_OF_RESOURCES
        finally:
            received.path.unlink(missing_ok=True)
        metrics.COMMIT.observe(time.monotonic() - started)
        if code != status.SUCCESS:
            metrics.REFUSED.labels(workflow_id, f"0x{code:04X}").inc()
        return code

    def _committed(self, request_id: str) -> bool | None:
        """Whether a failed enqueue's entry exists after all (a shared server can commit and
        lose the connection before it says so); None when the queue cannot tell now."""
        try:
            return self.queue.get(request_id) is not None
        except QueueError:
            return None

    def _store(
        self,
        workflow_id: str,
        origin: Origin,
        received: ReceivedObject,
        dedupe_seconds: float,
        delivery: Delivery | None,
    ) -> int:
        sop_instance_uid = received.sop_instance_uid
        problem = check_object(received)
        if problem is not None:
            log.warning(
                "refused SOPInstanceUID %s from %r: %s",
                sop_instance_uid,
                origin.calling_aet or origin.peer_address,
                status.describe(problem),
                extra=fields(
                    workflow=workflow_id,
                    sop_instance_uid=sop_instance_uid,
                    calling_aet=origin.calling_aet,
                    peer=origin.peer_address,
                    status=f"0x{problem:04X}",
                ),
            )
            return problem
        request_id = str(uuid.uuid4())
        try:
            byte_count = self.spool.commit(received.path, request_id)
        except SpoolError as exc:
            log.error(
                "cannot spool SOPInstanceUID %s (RequestId %s): %s; answered %s",
                sop_instance_uid,
                request_id,
                exc.strerror,
                status.describe(status.OUT_OF_RESOURCES),
            )
            return status.OUT_OF_RESOURCES
        arrival = Arrival(
            request_id=request_id,
            workflow_id=workflow_id,
            object_path=self.spool.relative(request_id),
            byte_count=byte_count,
            received_at=self.clock(),
            sop_class_uid=received.sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=received.transfer_syntax_uid,
            origin=origin,
        )
        try:
            enqueued = self.queue.enqueue(arrival, dedupe_seconds, delivery)
        except QueueError as exc:
            committed = self._committed(request_id)
            if not committed:
                log.error(
                    "cannot queue SOPInstanceUID %s (RequestId %s): %s; answered %s",
                    sop_instance_uid,
                    request_id,
                    exc,
                    status.describe(status.OUT_OF_RESOURCES),
                )
                if committed is False:  # else the sweep removes it if no entry names it
                    self.spool.remove(request_id)
                return status.OUT_OF_RESOURCES
            log.warning(  # a server's reply lost after its commit: the message is queued
                "queueing RequestId %s reported %s, but its entry is committed", request_id, exc
            )
            enqueued = True
        if not enqueued:
            self.spool.remove(request_id)
            log.info(
                "SOPInstanceUID %s is a duplicate within %g s for workflow %s: answered "
                "Success, not queued again",
                sop_instance_uid,
                dedupe_seconds,
                workflow_id,
            )
            return status.SUCCESS
        self.on_queued()
        metrics.RECEIVED.labels(workflow_id).inc()
        metrics.BYTES.labels(workflow_id).inc(byte_count)
        log.info(
            "stored SOPInstanceUID %s as RequestId %s (%d bytes)",
            sop_instance_uid,
            request_id,
            byte_count,
            extra=fields(
                workflow=workflow_id,
                request_id=request_id,
                sop_instance_uid=sop_instance_uid,
                calling_aet=origin.calling_aet,
                peer=origin.peer_address,
                transport=origin.transport or "DICOM",
                status="0x0000",
                bytes=byte_count,
            ),
        )
        return status.SUCCESS
