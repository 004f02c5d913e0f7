"""Workers: lease a queued message, make its DICOM message, run its workflow, record the end.

Upstream: runtime.supervisor. Downstream: store.queue, message.convert, pipeline.run. Workers
are threads; each holds its lease while it works and a renewer thread extends the leases
held (every third of the lease time), so a long activity (a 1 GB STOW-RS, a slow PACS) keeps
its message. Lease owners are `node/boot/worker-N` (`store.queue.owner_id`): unique per
process, so runtimes sharing a queue never finish each other's messages. Each activity that
succeeds is recorded before the next one starts, so a retry resumes at the failed activity.
A transient failure is retried with exponential backoff and jitter (`RetryPolicy`, from the
failing activity's `RetryInitialSeconds`, `RetryMaxSeconds`, `RetryMaxAttempts`); a
permanent one, or the last attempt, makes the message dead with its reason. Time is a
parameter (`clock`), so tests step it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from soupflow import metrics
from soupflow.activities.connections import Connections
from soupflow.activities.egress import checked_client
from soupflow.events import fields
from soupflow.message.convert import Options, convert
from soupflow.network import Egress
from soupflow.pipeline.context import RunContext
from soupflow.pipeline.errors import ActivityError, TransientError
from soupflow.pipeline.run import RECEIVER_STEP, Ending, Result, run_message
from soupflow.store.queue import (
    ActivityOutcome,
    LeaseLostError,
    Message,
    Queue,
    QueueError,
    State,
    owner_id,
)
from soupflow.store.spool import Spool
from soupflow.workflow import model
from soupflow.workflow.load import Entry, LoadedWorkflow

log = logging.getLogger(__name__)

LEASE_SECONDS = 300.0
RETENTION_DAYS = 7.0  # completed and filtered messages are kept this long (for status)
# An object older than this with no queue entry is an orphan (a crash between its commit
# and its enqueue, which take milliseconds): the sweep deletes it.
SWEEP_GRACE_SECONDS = 3600.0
_HOUSEKEEPING_SECONDS = 300.0
_IDLE_SECONDS = 0.2
_NOTIFIED_IDLE_SECONDS = 1.0  # how often workers poll a queue that also notifies them
_EXPIRE_EVERY_SECONDS = 5.0
_UNLOADED_RETRY_SECONDS = 30.0

WorkflowLookup = Callable[[str], LoadedWorkflow | None]


def backoff_seconds(
    attempt: int, initial: float, cap: float, draw: Callable[[], float] = random.random
) -> float:
    """Delay before retry number `attempt` (1-based): doubling from `initial`, at most `cap`,
    half of it fixed and half random ("equal jitter") so that retries spread out."""
    delay = min(float(cap), float(initial) * 2.0 ** (attempt - 1))
    return delay / 2 + draw() * delay / 2


def _default(name: str) -> int:
    default = model.SenderSetting.model_fields[name].default
    assert isinstance(default, int)
    return default


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed activity is tried again (the format's defaults when
    the failure is not an activity's)."""

    max_attempts: int
    initial_seconds: float
    max_seconds: float

    @classmethod
    def from_setting(cls, sender: model.SenderSetting | None) -> RetryPolicy:
        if sender is None:
            return cls(
                _default("retry_max_attempts"),
                _default("retry_initial_seconds"),
                _default("retry_max_seconds"),
            )
        return cls(
            sender.retry_max_attempts, sender.retry_initial_seconds, sender.retry_max_seconds
        )

    def delay(self, attempt: int, draw: Callable[[], float] = random.random) -> float:
        return backoff_seconds(attempt, self.initial_seconds, self.max_seconds, draw)


class Workers:
    def __init__(
        self,
        queue: Queue,
        spool: Spool,
        data_folder: Path,
        workflows: WorkflowLookup,
        count: int = 2,
        *,
        owner_prefix: str = "local/0",
        keep_objects: bool = False,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = LEASE_SECONDS,
        http: httpx.Client | None = None,
        idle_seconds: float = _IDLE_SECONDS,
        egress: Egress | None = None,
        retention_days: float = RETENTION_DAYS,
        housekeeping: bool | None = None,
    ) -> None:
        """`egress`: where activities may connect (default: loopback only);
        `retention_days`: how long finished messages stay in the queue (0: for ever);
        `housekeeping`: run the retention purge and the orphan sweep (default: when there
        are workers; a runtime whose workers are in worker processes runs it once for them)."""
        egress = egress or Egress()
        self.queue = queue
        self.spool = spool
        self.data_folder = data_folder
        self.workflows = workflows
        self.count = count
        self.owner_prefix = owner_prefix
        self.keep_objects = keep_objects
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.idle_seconds = idle_seconds  # how long an idle worker waits before it looks again
        self.retention_seconds = retention_days * 86400.0
        self.runs_housekeeping = count > 0 if housekeeping is None else housekeeping
        self.http = http if http is not None else checked_client(egress.http)
        self.connections = Connections(egress=egress)
        self._stopping = threading.Event()
        self._work = threading.Event()  # set when a message was queued in this process
        self._threads: list[threading.Thread] = []
        self._held: dict[str, str] = {}  # owner -> request id of the message it works on
        self._held_lock = threading.Lock()

    def wake(self) -> None:
        """A message was just queued: idle workers look at once (others poll the queue)."""
        self._work.set()

    def owner(self, number: int) -> str:
        node, _, boot = self.owner_prefix.partition("/")
        return owner_id(node, boot, number)

    def start(self) -> None:
        for number in range(1, self.count + 1):
            thread = threading.Thread(
                target=self._loop,
                args=(self.owner(number),),
                name=f"soupflow-worker-{number}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        loops = []
        if self.count:
            if self.queue.watch(self.wake):  # messages other processes queue wake us too
                # so polling is only the fallback (a worker process's 20 ms poll would cost
                # a shared server two statements per idle worker 50 times a second)
                self.idle_seconds = max(self.idle_seconds, _NOTIFIED_IDLE_SECONDS)
            loops.append((self._renew_loop, "soupflow-leases"))
        if self.runs_housekeeping:
            loops.append((self._housekeeping_loop, "soupflow-housekeeping"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the messages in progress (bounded by `timeout`), then stop."""
        self._stopping.set()
        self._work.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        self._threads.clear()
        self.connections.close_all()
        self.http.close()

    def renew_leases(self) -> int:
        """Extend every lease a worker holds now; how many were extended."""
        with self._held_lock:
            held = list(self._held.items())
        renewed = 0
        for owner, request_id in held:
            try:
                self.queue.renew(request_id, owner, self.clock(), self.lease_seconds)
                renewed += 1
            except LeaseLostError:
                log.warning("message %s: its lease was lost before it could be renewed", request_id)
            except QueueError as exc:
                log.error("cannot renew the lease of message %s: %s", request_id, exc)
        return renewed

    def _renew_loop(self) -> None:
        while not self._stopping.wait(self.lease_seconds / 3):
            self.renew_leases()

    def housekeeping(self, now: float) -> tuple[int, int]:
        """Delete finished messages past the retention period, then objects no queue entry
        names (orphans of a crash, or of purged messages); returns (messages, objects)."""
        purged = swept = 0
        if self.retention_seconds > 0:
            for _ in range(100):  # bounded batches: no transaction holds the queue for long
                batch = self.queue.purge_finished(now - self.retention_seconds)
                purged += batch
                if batch == 0:
                    break
        candidates = list(self.spool.unclaimed(now - SWEEP_GRACE_SECONDS))
        known = self.queue.existing(candidates) if candidates else set()
        for request_id in candidates:
            if request_id not in known:
                self.spool.remove(request_id)
                swept += 1
        if purged or swept:
            log.info(
                "housekeeping: %d finished message(s) past retention deleted, %d object(s) "
                "without a queue entry removed",
                purged,
                swept,
            )
        return purged, swept

    def _housekeeping_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.housekeeping(self.clock())
            except (QueueError, OSError) as exc:
                log.error("housekeeping failed (tried again later): %s", exc)
            self._stopping.wait(_HOUSEKEEPING_SECONDS)

    def _loop(self, owner: str) -> None:
        last_expiry = 0.0
        while not self._stopping.is_set():
            try:
                now = self.clock()
                if now - last_expiry >= _EXPIRE_EVERY_SECONDS:
                    self._expire(now)
                    last_expiry = now
                message = self.queue.lease(owner, now, self.lease_seconds)
            except QueueError as exc:
                log.error("cannot read the queue: %s", exc)
                message = None
            if message is None:
                self.connections.close_idle()
                self._work.wait(self.idle_seconds)  # woken by `wake`, else it polls
                self._work.clear()
                continue
            with self._held_lock:
                self._held[owner] = message.request_id
            try:
                self.process(message, owner)
            except LeaseLostError:
                log.warning(
                    "message %s was taken over by another worker after its lease expired",
                    message.request_id,
                )
            except QueueError as exc:
                log.error(
                    "cannot record the outcome of message %s: %s (its lease will expire and it runs again)",
                    message.request_id,
                    exc,
                )
            finally:
                with self._held_lock:
                    self._held.pop(owner, None)

    def _expire(self, now: float) -> None:
        self.connections.close_idle()  # also under load: another destination may be idle
        taken_back(self.queue.expire_leases(now), "whose worker stopped")

    def process(self, message: Message, owner: str) -> None:
        """Run one leased message to its outcome."""
        arrival = message.arrival
        workflow = self.workflows(arrival.workflow_id)
        if workflow is None or workflow.receiver is None:
            reason = f"workflow {arrival.workflow_id} is not loaded"
            now = self.clock()
            self.queue.retry(
                message.request_id, owner, now, now + _UNLOADED_RETRY_SECONDS, reason, None
            )
            log.warning("message %s waits: %s", message.request_id, reason)
            return
        object_path = self.spool.root / arrival.object_path
        if not object_path.is_file():
            self._dead(
                message,
                owner,
                workflow,
                RECEIVER_STEP,
                "the received object is missing from the spool",
            )
            return
        options = Options.from_setting(workflow.receiver.message_type_options)
        context = RunContext(
            workflow,
            lambda: convert(object_path, arrival, options),
            arrival,
            object_path,
            self.data_folder,
        )
        done = {
            outcome.activity_id
            for outcome in self.queue.activity_outcomes(message.request_id)
            if outcome.succeeded
        }

        def succeeded(activity_id: str, detail: str) -> None:
            self.queue.record_activity(
                message.request_id, owner, ActivityOutcome(activity_id, True, detail, self.clock())
            )

        try:
            result = run_message(context, done, succeeded, self.http, self.connections)
        except QueueError:
            raise
        except Exception as exc:  # a bug must not kill the worker; the message is retried
            result = Result(
                Ending.FAILED, TransientError(f"unexpected {type(exc).__name__}"), RECEIVER_STEP
            )
            log.error(  # one line: an exception's text may quote values from the message
                "unexpected %s running message %s (retried)",
                type(exc).__name__,
                message.request_id,
            )
        self._finish(message, owner, workflow, result)

    def _finish(
        self, message: Message, owner: str, workflow: LoadedWorkflow, result: Result
    ) -> None:
        request_id, now = message.request_id, self.clock()
        outcomes: tuple[ActivityOutcome, ...] = ()
        if result.unrecorded is not None:
            activity_id, detail = result.unrecorded
            outcomes = (ActivityOutcome(activity_id, True, detail, now),)
        if result.state != Ending.FAILED:
            self.queue.finish(request_id, owner, State(result.state), now, outcomes=outcomes)
            _finished(message, str(result.state), now)
            if not self.keep_objects:
                self.spool.remove(request_id)
            log.info(
                "message %s (SOPInstanceUID %s) %s",
                request_id,
                message.arrival.sop_instance_uid,
                result.state,
                extra=fields(
                    workflow=message.arrival.workflow_id,
                    request_id=request_id,
                    sop_instance_uid=message.arrival.sop_instance_uid,
                    state=str(result.state),
                ),
            )
            return
        error = result.error or ActivityError("failed")
        activity = result.activity_id or RECEIVER_STEP
        entry = workflow.setting(activity)
        sender = entry.setting if entry and isinstance(entry.setting, model.SenderSetting) else None
        policy = RetryPolicy.from_setting(sender)
        attempt = message.attempts + 1
        if isinstance(error, TransientError) and attempt < policy.max_attempts:
            delay = policy.delay(attempt)
            self.queue.retry(
                request_id, owner, now, now + delay, str(error), activity, outcomes=outcomes
            )
            log.warning(
                "message %s: %s failed (attempt %d of %d): %s; retry in %.0f s",
                request_id,
                _name(entry),
                attempt,
                policy.max_attempts,
                error,
                delay,
            )
            return
        reason = (
            str(error)
            if not isinstance(error, TransientError)
            else f"{error} (gave up after {attempt} attempts)"
        )
        self._dead(message, owner, workflow, activity, reason, error.detail, outcomes)

    def _dead(
        self,
        message: Message,
        owner: str,
        workflow: LoadedWorkflow,
        activity: str,
        reason: str,
        detail: str = "",
        outcomes: tuple[ActivityOutcome, ...] = (),
    ) -> None:
        """Dead: the reason goes to the log and the record; `detail` (may hold PHI) to the record only."""
        recorded = f"{reason}\n{detail}" if detail else reason
        now = self.clock()
        self.queue.finish(
            message.request_id,
            owner,
            State.DEAD,
            now,
            reason=recorded,
            failed_activity=activity,
            outcomes=outcomes,
        )
        _finished(message, State.DEAD.value, now)
        log.error(
            "message %s (SOPInstanceUID %s) is dead at %s: %s",
            message.request_id,
            message.arrival.sop_instance_uid,
            _name(workflow.setting(activity)),
            reason,
            extra=fields(
                workflow=message.arrival.workflow_id,
                request_id=message.request_id,
                sop_instance_uid=message.arrival.sop_instance_uid,
                state="dead",
                activity=activity,
            ),
        )


def _finished(message: Message, state: str, now: float) -> None:
    workflow = message.arrival.workflow_id
    metrics.FINISHED.labels(workflow, state).inc()
    metrics.LATENCY.labels(workflow).observe(max(now - message.arrival.received_at, 0.0))


def taken_back(messages: list[Message], whose: str) -> None:
    """Log the messages a lost worker held (`whose`: how it was lost): queued again, or dead
    at their last allowed expiry (the queue decides, `MAX_LEASE_EXPIRIES`)."""
    again = [message for message in messages if message.state != State.DEAD]
    if again:
        log.info("%d message(s) %s are queued again", len(again), whose)
    for message in messages:
        if message.state == State.DEAD:
            log.error("message %s is dead: %s", message.request_id, message.reason)


def _name(entry: Entry | None) -> str:
    return entry.label if entry is not None else "the receiver"
