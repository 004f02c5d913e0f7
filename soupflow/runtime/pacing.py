"""Back-pressure on intake: answers held back while a workflow's deliverable backlog is long.

Upstream: runtime.supervisor (one per runtime), receivers (`hold` before an answer), through
ingest. Without it, a router whose senders offer more than its workers deliver (on a small
machine the listener, the workers and often the destination share the cores) builds a backlog
that only grows while they send. With it, a workflow whose backlog of messages due now is
above `limit` while its workers are delivering has each answer held, after its object is
committed (nothing is at risk), until the backlog is back at the limit or `HOLD_SECONDS` have
passed: the senders slow to the pace of delivery, the way TCP's window slows a writer.

What does not hold intake: a destination that is down (its messages wait out their retry
delay, so they are not due, and nothing finishes), workers that are stuck (nothing finished
in the last `WINDOW_SECONDS`), and a queue that cannot be read (answers are never held on a
guess). Store-and-forward stays what it is for: a PACS outage never slows a modality.
The backlog is read from the queue, so workers in other processes and on other nodes count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from soupflow import metrics
from soupflow.store.queue import Queue, QueueError

log = logging.getLogger(__name__)

BACKLOG_LIMIT = 500  # messages due now, per workflow (`soupflow run --backlog-limit`)
HOLD_SECONDS = 2.0  # the longest one answer waits: far below any sender's DIMSE timeout
WINDOW_SECONDS = 2.0  # workers that finished nothing in this long are not delivering
SAMPLE_SECONDS = 0.1
_LOG_EVERY_SECONDS = 60.0  # a workflow held on and off under load says so once a minute


class Pacing:
    def __init__(
        self,
        queue: Queue,
        limit: int = BACKLOG_LIMIT,
        clock: Callable[[], float] = time.time,
        sample_seconds: float = SAMPLE_SECONDS,
    ) -> None:
        self.queue = queue
        self.limit = limit  # 0: never hold
        self.clock = clock
        self.sample_seconds = sample_seconds
        self._over: set[str] = set()  # workflows whose answers are held
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreadable = False
        self._said: dict[str, float] = {}
        self._intake = False  # an answer since the last sample: the backlog can have grown

    def start(self) -> None:
        if self.limit <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="soupflow-pacing", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._over.clear()
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def hold(self, workflow_id: str) -> float:
        """Wait while `workflow_id` is over its backlog limit (at most HOLD_SECONDS); the
        seconds waited."""
        self._intake = True
        if workflow_id not in self._over:  # the common case takes no lock
            return 0.0
        started = time.monotonic()
        deadline = started + HOLD_SECONDS
        with self._changed:
            while workflow_id in self._over and (remaining := deadline - time.monotonic()) > 0:
                self._changed.wait(remaining)
        held = time.monotonic() - started
        metrics.HELD.labels(workflow_id).inc(held)
        return held

    def over(self) -> set[str]:
        """The workflows whose answers are held now."""
        return set(self._over)

    def _run(self) -> None:
        while not self._stopping.wait(self.sample_seconds):
            if self._intake or self._over:  # an idle runtime reads nothing
                self._intake = False
                self.sample()

    def sample(self) -> None:
        """Read the queue's flow once and release or hold each workflow's answers."""
        now = self.clock()
        try:
            flows = self.queue.flow(now, since=now - WINDOW_SECONDS)
        except QueueError as exc:
            if not self._unreadable:
                log.warning("intake pacing cannot read the queue (%s); answers are not held", exc)
            self._unreadable = True
            flows = {}
        else:
            self._unreadable = False
        over = {w for w, flow in flows.items() if flow.ready > self.limit and flow.finished > 0}
        for workflow_id in over - self._over:
            if time.monotonic() - self._said.get(workflow_id, -_LOG_EVERY_SECONDS) >= (
                _LOG_EVERY_SECONDS
            ):
                self._said[workflow_id] = time.monotonic()
                log.info(
                    "workflow %s has %d messages due, over the backlog limit of %d: answers "
                    "are held (at most %g s each) while its workers catch up",
                    workflow_id,
                    flows[workflow_id].ready,
                    self.limit,
                    HOLD_SECONDS,
                )
        with self._changed:
            self._over = over
            self._changed.notify_all()
