"""The message queue: its state machine and the interface every backend implements.

Upstream: ingest (enqueue), runtime.workers (lease ... finish/retry), admin (status, dead).
A message moves queued -> processing (leased until `lease_expires_at`) -> completed |
filtered | dead; a failed attempt returns it to queued with `next_attempt_at`; a lease that
expires (the worker died) makes it queued again. Each activity's outcome is recorded so a
retry resumes at the first activity that has not succeeded. Time is a parameter (`now`,
seconds since the epoch) so tests step it instead of sleeping.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class State(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FILTERED = "filtered"
    DEAD = "dead"


FINAL_STATES = frozenset({State.COMPLETED, State.FILTERED, State.DEAD})
# A message whose lease ran out this many times (its worker died or hung each time) is dead:
# a step that crashes the process must not crash every restart.
MAX_LEASE_EXPIRIES = 3


class QueueError(Exception):
    """The queue could not record a change (locked database, full disk, ...)."""


class LeaseLostError(QueueError):
    """The message is no longer leased by this owner (its lease expired and moved on)."""


@dataclass(frozen=True, kw_only=True)
class Origin:
    """Where an object came from: the peer, the AE titles of the association it came on
    (empty for a receiver without AE titles), and its TLS client certificate if it had one."""

    peer_address: str
    peer_port: int
    calling_aet: str = ""
    called_aet: str = ""
    client_cert_sha256: str = ""
    client_cert_subject: str = ""
    transport: str = ""  # "" for DICOM (C-STORE); "STOW-RS"
    # JSON of what the transport adds: for STOW-RS {"Headers": {name: value} of the mapped
    # request headers, "StowStudyInstanceUID": the study in the URL}; "" when nothing.
    details: str = ""


@dataclass(frozen=True)
class Delivery:
    """A sender's name for what it delivered (STOW-RS `DeduplicateHeader`): kept with the
    queue entry, in its transaction, so that a replay is recognised."""

    delivery_id: str
    sha256: str  # of the object's bytes as received


@dataclass(frozen=True, kw_only=True)
class Arrival:
    """What ingest knows of a received object when it enqueues it."""

    request_id: str
    workflow_id: str
    object_path: str  # relative to the spool
    byte_count: int
    received_at: float
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    origin: Origin


@dataclass(frozen=True)
class Message:
    """A queue entry: the arrival plus where it is in the state machine."""

    arrival: Arrival
    state: State
    attempts: int
    lease_expiries: int  # leases taken back from a worker that stopped or hung
    next_attempt_at: float
    lease_owner: str | None
    lease_expires_at: float | None
    reason: str | None  # why it was last retried or why it died
    failed_activity: str | None
    updated_at: float

    @property
    def request_id(self) -> str:
        return self.arrival.request_id


@dataclass(frozen=True)
class ActivityOutcome:
    activity_id: str
    succeeded: bool
    detail: str
    at: float


@dataclass(frozen=True)
class WorkflowCounts:
    """One workflow's share of the queue, for `status`."""

    workflow_id: str
    by_state: dict[State, int]
    oldest_pending_received_at: float | None
    duplicates: int = 0  # arrivals dropped by DeduplicateWindowSeconds


@dataclass(frozen=True)
class Flow:
    """One workflow's traffic through the queue, for intake back-pressure (runtime.pacing)."""

    ready: int  # queued and due now: work the workers could take
    finished: int  # completed, filtered or dead since the asked moment


def owner_id(node: str, boot: str, worker: int) -> str:
    """A lease owner: unique per worker, process start (`boot`) and machine (`node`), so two
    processes on one queue can never finish each other's messages."""
    return f"{node}/{boot}/worker-{worker}"


class Queue(Protocol):
    """The queue's verbs; `tests/test_queue_contract.py` holds every backend to them."""

    @property
    def schema_version(self) -> int: ...

    def enqueue(
        self, arrival: Arrival, dedupe_seconds: float = 0, delivery: Delivery | None = None
    ) -> bool:
        """Commit a new queued message durably (before the sender hears Success). With
        `dedupe_seconds`, an arrival whose SOPInstanceUID reached the same workflow within
        that many seconds is not enqueued (False) and counted as a duplicate instead. With
        `delivery`, its key (workflow, delivery id, SOPInstanceUID) and digest are stored in
        the same transaction."""

    def delivered(self, workflow_id: str, delivery_id: str, sop_instance_uid: str) -> str | None:
        """The SHA-256 recorded for a delivery key, or None when it was never enqueued."""

    def writable(self) -> str | None:
        """None when a write transaction can be opened now; else why not (for `/readyz`)."""

    def lease(self, owner: str, now: float, lease_seconds: float) -> Message | None:
        """Take the oldest ready message (queued, `next_attempt_at` <= now) for `owner`, in
        one statement (no other owner can take it between the look and the take)."""

    def renew(self, request_id: str, owner: str, now: float, lease_seconds: float) -> None:
        """Extend a lease still held by `owner`; LeaseLostError otherwise."""

    def record_activity(self, request_id: str, owner: str, outcome: ActivityOutcome) -> None:
        """Record one activity's outcome for a message leased by `owner`."""

    def activity_outcomes(self, request_id: str) -> list[ActivityOutcome]: ...

    def finish(
        self,
        request_id: str,
        owner: str,
        state: State,
        now: float,
        reason: str | None = None,
        failed_activity: str | None = None,
        outcomes: tuple[ActivityOutcome, ...] = (),
    ) -> None:
        """End an attempt: completed, filtered or dead (with reason and activity), recording
        `outcomes` in the same transaction."""

    def retry(
        self,
        request_id: str,
        owner: str,
        now: float,
        next_attempt_at: float,
        reason: str,
        failed_activity: str | None,
        outcomes: tuple[ActivityOutcome, ...] = (),
    ) -> None:
        """End a failed attempt: queued again at `next_attempt_at`, attempts + 1, recording
        `outcomes` in the same transaction."""

    def expire_leases(self, now: float) -> list[Message]:
        """Messages whose lease ran out go back to queued (or dead, at the
        `MAX_LEASE_EXPIRIES`-th time); returns them as they are now."""

    def recover(self, node: str, now: float) -> list[Message]:
        """At start: the leases this node's earlier processes held (their workers are gone)
        are taken back as `expire_leases` does. Other nodes' leases are left to expire."""

    def get(self, request_id: str) -> Message | None: ...

    def existing(self, request_ids: list[str]) -> set[str]:
        """Which of these request ids have a queue entry (the sweep of orphaned objects)."""

    def messages(
        self, state: State | None = None, workflow_id: str | None = None, limit: int = 1000
    ) -> list[Message]: ...

    def counts(self) -> list[WorkflowCounts]: ...

    def flow(self, now: float, since: float) -> dict[str, Flow]:
        """Per workflow with traffic: messages due at `now`, and finished since `since`."""

    def revive(self, request_ids: list[str] | None, workflow_id: str | None, now: float) -> int:
        """Dead messages back to queued (by id, by workflow, or all); returns how many."""

    def purge(self, request_ids: list[str] | None, workflow_id: str | None) -> list[Message]:
        """Delete dead messages (by id, by workflow, or all); returns what was deleted."""

    def purge_finished(self, before: float, limit: int = 10_000) -> int:
        """Delete up to `limit` completed and filtered messages last changed before `before`
        (the retention period); returns how many."""

    def watch(self, wake: Callable[[], None]) -> bool:
        """Call `wake` when another process made a message ready, where the backend can tell
        (a shared server's notifications): True then; False when workers must poll."""

    def close(self) -> None: ...
