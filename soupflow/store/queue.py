"""The message queue: its state machine and the interface every backend implements.

Upstream: listener (enqueue), workers (lease ... complete/retry/dead), CLI (status, dead).
A message moves queued -> processing (leased until `lease_expires_at`) -> completed |
filtered | dead; a failed attempt returns it to queued with `next_attempt_at`; a lease that
expires (the worker died) makes it queued again. Each activity's outcome is recorded so a
retry resumes at the first activity that has not succeeded. Time is a parameter (`now`,
seconds since the epoch) so tests step it instead of sleeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol


class State(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FILTERED = "filtered"
    DEAD = "dead"


FINAL_STATES = frozenset({State.COMPLETED, State.FILTERED, State.DEAD})


class QueueError(Exception):
    """The queue could not record a change (locked database, full disk, ...)."""


class LeaseLostError(QueueError):
    """The message is no longer leased by this owner (its lease expired and moved on)."""


@dataclass(frozen=True, kw_only=True)
class Origin:
    """What a C-STORE says of its object: the request and the association it came on."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_aet: str
    called_aet: str
    peer_address: str
    peer_port: int

    def origin(self) -> dict[str, Any]:
        """These fields alone, as keyword arguments for another record (Any: mixed types)."""
        return {name: getattr(self, name) for name in Origin.__dataclass_fields__}


@dataclass(frozen=True, kw_only=True)
class Arrival(Origin):
    """What the listener knows of a received object when it enqueues it."""

    request_id: str
    workflow_id: str
    object_path: str  # relative to the spool
    byte_count: int
    received_at: float


@dataclass(frozen=True)
class Message:
    """A queue entry: the arrival plus where it is in the state machine."""

    arrival: Arrival
    state: State
    attempts: int
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


class Queue(Protocol):
    def enqueue(self, arrival: Arrival) -> None:
        """Commit a new queued message durably (before the sender hears Success)."""

    def lease(self, owner: str, now: float, lease_seconds: float) -> Message | None:
        """Take the oldest ready message (queued, `next_attempt_at` <= now) for `owner`."""

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
    ) -> None:
        """End an attempt: completed, filtered or dead (with reason and activity)."""

    def retry(
        self,
        request_id: str,
        owner: str,
        now: float,
        next_attempt_at: float,
        reason: str,
        failed_activity: str | None,
    ) -> None:
        """End a failed attempt: queued again at `next_attempt_at`, attempts + 1."""

    def expire_leases(self, now: float) -> int:
        """Messages whose lease ran out go back to queued; returns how many."""

    def recover(self) -> int:
        """At start: every message left processing by a crash goes back to queued."""

    def get(self, request_id: str) -> Message | None: ...

    def messages(
        self, state: State | None = None, workflow_id: str | None = None, limit: int = 1000
    ) -> list[Message]: ...

    def counts(self) -> list[WorkflowCounts]: ...

    def revive(self, request_ids: list[str] | None, workflow_id: str | None, now: float) -> int:
        """Dead messages back to queued (by id, by workflow, or all); returns how many."""

    def purge(self, request_ids: list[str] | None, workflow_id: str | None) -> list[Message]:
        """Delete dead messages (by id, by workflow, or all); returns what was deleted."""

    def close(self) -> None: ...
