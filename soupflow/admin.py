"""What operators ask of a data folder: status and dead messages. Upstream: cli. No printing.

`status` combines the running runtime's `listeners.json` (absent when it is not running)
with the queue's counts, and names the workflows from the workflows folder when no runtime
runs; `dead` lists, shows, retries and purges dead messages. Every value here is
routing-safe (ids, AE titles, counts, reasons written by soupflow), never PHI. Nothing here
imports the runtime: `status` beside a busy runtime loads no receiver or network client.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from soupflow.runtime import listeners_file
from soupflow.store import NoDataError, Storage
from soupflow.store.queue import ActivityOutcome, Message, State, WorkflowCounts
from soupflow.workflow.load import LoadedWorkflow, load_paths

__all__ = ["NoDataError", "dead_messages", "purge_dead", "retry_dead", "status", "status_json"]

NOT_RUNNING = "not running"


@dataclass(frozen=True)
class WorkflowStatus:
    workflow_id: str
    workflow: str
    port: int | None
    state: str  # a ListenerState, or NOT_RUNNING
    counts: dict[str, int]  # by queue state, and "duplicates"
    oldest_pending_seconds: float | None


def status(
    storage: Storage, workflows: Path | None = None, now: float | None = None
) -> list[WorkflowStatus]:
    moment = time.time() if now is None else now
    rows = listeners_file.read(storage.data)
    with storage.using(read_only=True) as queue:
        counts = {entry.workflow_id: entry for entry in queue.counts()}
    found: list[WorkflowStatus] = []
    seen: set[str] = set()
    for row in rows:
        seen.add(row.workflow_id)
        found.append(
            _status(
                row.workflow_id,
                row.workflow,
                row.port or None,
                row.state,
                counts.get(row.workflow_id),
                moment,
            )
        )
    names = _workflow_names(workflows) if any(w not in seen for w in counts) else {}
    for workflow_id, entry in counts.items():
        if workflow_id not in seen:
            name = names.get(workflow_id, "")
            found.append(_status(workflow_id, name, None, NOT_RUNNING, entry, moment))
    return found


def _workflow_names(workflows: Path | None) -> dict[str, str]:
    """WorkflowId -> name, from the files of the workflows folder (valid or not)."""
    if workflows is None or not workflows.is_dir():
        return {}
    return {
        loaded.workflow_id: loaded.name for loaded in load_paths([workflows]) if loaded.workflow_id
    }


def _status(
    workflow_id: str,
    name: str,
    port: int | None,
    state: str,
    entry: WorkflowCounts | None,
    now: float,
) -> WorkflowStatus:
    by_state = {s.value: (entry.by_state.get(s, 0) if entry else 0) for s in State}
    by_state["duplicates"] = entry.duplicates if entry else 0
    oldest = entry.oldest_pending_received_at if entry else None
    return WorkflowStatus(
        workflow_id, name, port, state, by_state, None if oldest is None else max(now - oldest, 0.0)
    )


def status_json(rows: list[WorkflowStatus]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]


# --------------------------------------------------------------------------------- dead
@dataclass(frozen=True)
class DeadMessage:
    request_id: str
    workflow_id: str
    sop_instance_uid: str
    calling_aet: str
    activity: str  # the failed activity's name (its id when the workflow is not found)
    attempts: int
    reason: str  # one line written by soupflow: safe for lists and logs
    detail: str  # what else the failure left (a traceback, an ACK's text): may hold PHI
    died_at: float
    outcomes: list[ActivityOutcome]


def _names(workflows: Path | None) -> dict[str, str]:
    """Setting id -> label, from the workflow files (for readable activity names)."""
    if workflows is None or not workflows.is_dir():
        return {}
    labels: dict[str, str] = {}
    loaded: list[LoadedWorkflow] = load_paths([workflows])
    for workflow in loaded:
        for entry in workflow.entries:
            if entry.id:
                labels[entry.id] = entry.label
    return labels


def dead_messages(
    storage: Storage,
    workflow_id: str | None = None,
    request_ids: list[str] | None = None,
    workflows: Path | None = None,
) -> list[DeadMessage]:
    names = _names(workflows)
    with storage.using(read_only=True) as queue:
        messages = [
            m
            for m in queue.messages(State.DEAD, workflow_id, limit=100_000)
            if not request_ids or m.request_id in request_ids
        ]
        return [
            _dead(message, queue.activity_outcomes(message.request_id), names)
            for message in messages
        ]


def _dead(message: Message, outcomes: list[ActivityOutcome], names: dict[str, str]) -> DeadMessage:
    activity = message.failed_activity or ""
    reason, _, detail = (message.reason or "").partition("\n")
    return DeadMessage(
        message.request_id,
        message.arrival.workflow_id,
        message.arrival.sop_instance_uid,
        message.arrival.origin.calling_aet,
        names.get(activity, activity),
        message.attempts,
        reason,
        detail,
        message.updated_at,
        outcomes,
    )


def retry_dead(storage: Storage, request_ids: list[str] | None, workflow_id: str | None) -> int:
    with storage.using(create=False) as queue:
        return queue.revive(request_ids, workflow_id, time.time())


def purge_dead(storage: Storage, request_ids: list[str] | None, workflow_id: str | None) -> int:
    spool = storage.spool()
    with storage.using(create=False) as queue:
        purged = queue.purge(request_ids, workflow_id)
    for message in purged:
        spool.remove(message.request_id)
    return len(purged)
