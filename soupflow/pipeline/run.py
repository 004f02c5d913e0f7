"""One message through its workflow. Upstream: runtime.workers. Downstream: filters, transformers,
activities.

Order (workflow-files.md 2.1-2.4): the receiver's filter (its transformers, then its items;
false = filtered) -> the receiver's VariableTransformers -> each activity in `Activities`
order: its filter (false skips only it), its message from `MessageTemplate`, its
Transformers, then the activity. An activity that already succeeded for this message (an
earlier attempt) is not run again; its filter and transformers still run, so the variables
later activities use are the same on every attempt.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import httpx

from soupflow import metrics
from soupflow.activities import RUNNERS
from soupflow.activities.base import Activity, Outcome
from soupflow.activities.connections import Connections
from soupflow.pipeline.context import RunContext
from soupflow.pipeline.errors import ActivityError, PermanentError, TransientError
from soupflow.pipeline.transformers import filter_passes, run_actions
from soupflow.workflow import model
from soupflow.workflow.types import normalize_reference

RECEIVER_STEP = "receiver"


class Ending(enum.StrEnum):
    COMPLETED = "completed"
    FILTERED = "filtered"  # the receiver's filter said no: a successful end
    FAILED = "failed"


@dataclass(frozen=True)
class Result:
    state: Ending
    error: ActivityError | None = None
    activity_id: str | None = None  # where it failed (RECEIVER_STEP before any activity)
    # The last success, not recorded yet: the caller writes it with the message's end, in
    # one transaction (every earlier one was recorded before the next activity ran).
    unrecorded: tuple[str, str] | None = None


class _Progress:
    """Each success is recorded before the next activity runs; the last waits for the end."""

    def __init__(self, record: Callable[[str, str], None]) -> None:
        self.record = record
        self.pending: tuple[str, str] | None = None

    def before_activity(self) -> None:
        if self.pending is not None:
            self.record(*self.pending)
            self.pending = None

    def succeeded(self, activity_id: str, detail: str) -> None:
        self.pending = (activity_id, detail)


def run_message(
    context: RunContext,
    done: Collection[str],
    succeeded: Callable[[str, str], None],
    http: httpx.Client,
    connections: Connections,
) -> Result:
    """Run the workflow for one message; `succeeded(activity_id, detail)` records progress
    durably before the next activity runs (the last success comes back in the Result)."""
    workflow = context.workflow
    receiver = workflow.receiver
    assert receiver is not None  # RunContext refuses a workflow without one
    step = RECEIVER_STEP
    progress = _Progress(succeeded)
    try:
        if not _host_passes(context, receiver.filters, None):
            return Result(Ending.FILTERED)
        _transform(context, receiver.variable_transformers, None)
        for reference in receiver.activities:
            activity_id = normalize_reference(reference)
            entry = workflow.setting(activity_id)
            if (
                activity_id is None
                or entry is None
                or not isinstance(entry.setting, model.SenderSetting)
            ):
                continue
            step = activity_id
            _activity(context, activity_id, entry.setting, done, progress, http, connections)
    except ActivityError as exc:
        return Result(Ending.FAILED, exc, step, progress.pending)
    return Result(Ending.COMPLETED, unrecorded=progress.pending)


def _activity(
    context: RunContext,
    activity_id: str,
    sender: model.SenderSetting,
    done: Collection[str],
    progress: _Progress,
    http: httpx.Client,
    connections: Connections,
) -> None:
    if sender.disabled or not _host_passes(context, sender.filters, activity_id):
        return
    if sender.SENDS_ITS_MESSAGE or sender.transformers:
        context.outbound[activity_id] = context.expand(sender.message_template)
    else:  # it sends the received object: its message is made only if something reads it
        template = sender.message_template
        context.outbound.defer(activity_id, lambda: context.expand(template))
    _transform(context, sender.transformers, activity_id)
    if activity_id in done:
        return
    runner = RUNNERS.get(type(sender))
    if runner is None:
        raise PermanentError(f"{type(sender).__name__} activities are not run by this version yet")
    progress.before_activity()
    outcome = _attempt(runner, sender, Activity(context, activity_id, http, connections))
    if outcome.response is not None:
        context.inbound[activity_id] = outcome.response
    progress.succeeded(activity_id, outcome.detail)


def _attempt(runner: Any, sender: model.SenderSetting, activity: Activity) -> Outcome:
    """Run the activity once, counted and timed by outcome (`soupflow_activity_*`)."""
    workflow, started = activity.context.arrival.workflow_id, time.monotonic()
    outcome = "permanent"
    try:
        done: Outcome = runner(sender, activity)
        outcome = "success"
        return done
    except TransientError:
        outcome = "transient"
        raise
    finally:
        metrics.ATTEMPTS.labels(workflow, activity.activity_id, outcome).inc()
        metrics.DURATION.labels(workflow, activity.activity_id).observe(time.monotonic() - started)


def _host_passes(context: RunContext, reference: str | None, activity_id: str | None) -> bool:
    entry = context.workflow.setting(normalize_reference(reference))
    if entry is None or not isinstance(entry.setting, model.FilterHostSetting):
        return True
    run_actions(context, entry.setting.transformers, activity_id)
    return filter_passes(context, entry.setting.filters)


def _transform(context: RunContext, reference: str | None, activity_id: str | None) -> None:
    entry = context.workflow.setting(normalize_reference(reference))
    if entry is not None and isinstance(entry.setting, model.TransformerSetting):
        run_actions(context, entry.setting.transformers, activity_id)
