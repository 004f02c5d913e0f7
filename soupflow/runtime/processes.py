"""Worker processes: more interpreters on the same queue, so the pipeline uses more cores.

Upstream: supervisor (`soupflow run --processes N` starts N of them; its own process then
only receives, so conversion and activities never hold the interpreter lock its
associations need), cli (`soupflow work`, what each one runs). Downstream: workers, store,
handoff (the connections the runtime hands them).

A worker process loads the workflows folder itself (and reloads it when it changes), leases
from the shared queue with owners `node/boot/worker-N` of its own, and processes messages
exactly as the runtime's own workers do. It opens no listener: started with a control
socket (`--control-fd`), it serves the connections its runtime hands it (runtime.handoff),
into the incoming folder the runtime made and clears. The runtime watches its children: one
that exits unexpectedly has its leases taken back at once (`Queue.recover` of its own `node/boot`) and is started again;
one whose runtime exits stops too. An idle worker process looks at the queue every
`POLL_SECONDS` (a message queued by the runtime waits at most that long).

What a worker process counts (finished messages, latencies, activity attempts) it writes to
`<data>/worker-metrics/<boot>.json` every `REPORT_SECONDS` and when it stops; the runtime's
`/metrics` adds those files to its own counts. A child that exits has its last report folded
into `departed.json`, so that no total goes down while the runtime runs (one killed with
SIGKILL loses at most its last second). The runtime clears the folder when it starts, as its
own counters start again from zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from soupflow import durable, metrics
from soupflow.ingest import Ingest
from soupflow.network import Egress
from soupflow.receivers import handed
from soupflow.runtime.handoff import Handoff, Served
from soupflow.runtime.pacing import BACKLOG_LIMIT, Pacing
from soupflow.runtime.workers import LEASE_SECONDS, RETENTION_DAYS, Workers, taken_back
from soupflow.store import Storage
from soupflow.store.queue import Queue
from soupflow.workflow.checks import check_egress
from soupflow.workflow.load import LoadedWorkflow, load_file, workflow_paths

log = logging.getLogger(__name__)

_WATCH_SECONDS = 0.5
# A worker process that exits within _STEADY_SECONDS of its start waits longer before the next
# starts (1 s, doubled to _RESTART_LIMIT_SECONDS): one that cannot start (a queue it cannot
# open, a broken install) is not started twice a second, each start a core's worth of imports.
_STEADY_SECONDS = 30.0
_RESTART_LIMIT_SECONDS = 60.0
POLL_SECONDS = 0.02
_STOP_SECONDS = 40.0  # a child's workers get 30 s to finish their messages
REPORTS_FOLDER = "worker-metrics"
REPORT_SECONDS = 1.0
_DEPARTED = "departed"


def new_boot() -> str:
    """A process's id in lease owners."""
    return uuid.uuid4().hex[:12]


class WorkerRuntime:
    """`soupflow work`: workers only, in a process of their own."""

    def __init__(
        self,
        workflows: Path,
        data: Path,
        workers: int,
        node: str,
        boot: str,
        keep_objects: bool = False,
        egress: Egress | None = None,
        storage: Storage | None = None,
        lease_seconds: float = LEASE_SECONDS,
        retention_days: float = RETENTION_DAYS,
        housekeeping: bool = True,
        metrics_file: Path | None = None,
        control: socket.socket | None = None,
        backlog_limit: int = BACKLOG_LIMIT,
    ) -> None:
        """`metrics_file`: where this process's counts go for its runtime (`--metrics-file`);
        `control`: its runtime's end for connections to serve (`--control-fd`), with the
        runtime's `backlog_limit`."""
        self.storage = storage or Storage(data)
        self.metrics_file = metrics_file
        self.control, self.backlog_limit = control, backlog_limit
        self.served: Served | None = None
        self.pacing: Pacing | None = None
        self._reporting = threading.Event()
        self._reporter: threading.Thread | None = None
        self._reported = b""
        self.lease_seconds, self.retention_days = lease_seconds, retention_days
        self.housekeeping = housekeeping
        self.workflows_folder = workflows
        self.egress = egress or Egress()
        self.data = data
        self.worker_count = workers
        self.node, self.boot = node, boot
        self.keep_objects = keep_objects
        self.known: dict[str, LoadedWorkflow] = {}
        self.queue: Queue | None = None
        self.workers: Workers | None = None
        self._digests: dict[Path, str] = {}
        self._stats: dict[Path, tuple[int, int, int]] = {}  # each file as last read
        self._lock = threading.Lock()

    def start(self) -> None:
        sys.path.insert(0, str(self.workflows_folder.resolve()))  # PythonCallable modules
        self.queue = self.storage.open_queue(create=False)
        self.reload()
        spool = self.storage.spool(self.node)
        self.workers = Workers(
            self.queue,
            spool,
            self.data,
            self.current,
            self.worker_count,
            owner_prefix=f"{self.node}/{self.boot}",
            keep_objects=self.keep_objects,
            idle_seconds=POLL_SECONDS,
            egress=self.egress,
            lease_seconds=self.lease_seconds,
            retention_days=self.retention_days,
            housekeeping=self.housekeeping,
        )
        if self.control is not None:
            self.pacing = Pacing(self.queue, self.backlog_limit)
            self.pacing.start()
            ingest = Ingest(spool, self.queue, on_queued=self.workers.wake, hold=self.pacing.hold)
            self.served = Served(self.control, ingest, handed)
            self.served.count_associations(self.workers.connections.associations)
            self.served.start()
        self.workers.start()
        if self.metrics_file is not None:
            self._reporter = threading.Thread(
                target=self._report_loop, name="soupflow-metrics-report", daemon=True
            )
            self._reporter.start()

    def _report_loop(self) -> None:
        failing = False
        while True:
            stopping = self._reporting.wait(REPORT_SECONDS)
            try:
                self._report()
            except OSError as exc:  # a full disk: the counts are reported once it has room
                if not failing:
                    log.error("cannot report metrics to the runtime: %s", exc.strerror or exc)
                failing = True
            else:
                failing = False
            if stopping:
                return

    def _report(self) -> None:
        assert self.metrics_file is not None
        data = json.dumps(metrics.report()).encode("utf-8")
        if data != self._reported:  # an idle process writes nothing
            durable.replace(self.metrics_file, data, sync=False)
            self._reported = data

    def reload(self) -> None:
        """Know the last good version of every workflow the folder has defined."""
        with self._lock:
            paths = (
                workflow_paths([self.workflows_folder]) if self.workflows_folder.is_dir() else []
            )
            for path in paths:
                if (signature := _signature(path)) is not None:
                    self._stats[path] = signature
                content = digest(path)
                if self._digests.get(path) == content:
                    continue
                self._digests[path] = content
                loaded = load_file(path)
                check_egress(loaded, self.egress)
                if loaded.valid and loaded.workflow_id is not None and loaded.receiver:
                    self.known[loaded.workflow_id] = loaded

    def current(self, workflow_id: str) -> LoadedWorkflow | None:
        """The last good version of `workflow_id` as its file is now. The runtime applies a
        new version as soon as its own watcher sees the file change; this process's watcher
        may see it later, and a message the runtime received after the change must not run
        the version before it here. A stat per message; a read only when the file changed."""
        loaded = self.known.get(workflow_id)
        if loaded is None or self._changed(loaded.path):
            self.reload()
            loaded = self.known.get(workflow_id)
        return loaded

    def _changed(self, path: Path) -> bool:
        """`path` differs from when it was last read (a file gone keeps its last version)."""
        signature = _signature(path)
        return signature is not None and signature != self._stats.get(path)

    def stop(self) -> None:
        with self._lock:
            if self.pacing is not None:  # held answers go out now
                self.pacing.stop()
                self.pacing = None
            if self.served is not None:
                self.served.stop()
                self.served = None
            if self.workers is not None:
                self.workers.stop()
                self.workers = None
            if self._reporter is not None:  # one last report, with every message finished
                self._reporting.set()
                self._reporter.join()
                self._reporter = None
            if self.queue is not None:
                self.queue.close()
                self.queue = None


class WorkerProcesses:
    """The runtime's worker processes: started, watched, started again, stopped."""

    def __init__(
        self,
        count: int,
        command: Callable[[str], list[str]],
        queue: Queue,
        node: str,
        environment: dict[str, str] | None = None,
        reports: Path | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        """`command`: a boot -> the child's command line;
        `environment`: variables the children get besides ours (secrets such as the
        queue's URL go there, not on a command line every local user can read);
        `reports`: the folder of the children's metrics files (`reports()`); `handoff`: the
        runtime's connections they may serve."""
        self.count = count
        self.reports_folder = reports
        self.handoff = handoff
        self.environment = {**os.environ, **(environment or {})}
        self.command = command
        self.queue = queue
        self.node = node
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._started: dict[str, float] = {}  # by boot: when (monotonic)
        self._due: list[float] = []  # when the next ones start (monotonic)
        self._delay = 0.0  # before the next start after an early exit
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._reports_lock = threading.Lock()  # a scrape never sees a report folded halfway

    def start(self) -> None:
        if self.reports_folder is not None:  # what children of an earlier run counted
            shutil.rmtree(self.reports_folder, ignore_errors=True)
            self.reports_folder.mkdir(parents=True, exist_ok=True)
        for _ in range(self.count):
            self._spawn()
        self._watcher = threading.Thread(
            target=self._watch, name="soupflow-worker-processes", daemon=True
        )
        self._watcher.start()

    def _spawn(self) -> None:
        boot = new_boot()
        command = self.command(boot)
        report = self._report_file(boot)
        if report is not None:
            command += ["--metrics-file", str(report)]
        control = self.handoff.channel(boot) if self.handoff is not None else None
        passed = () if control is None else (control.fileno(),)
        if control is not None:
            command += ["--control-fd", str(control.fileno())]
        try:
            self._children[boot] = subprocess.Popen(
                command, env=self.environment, pass_fds=passed
            )  # its lines go to ours
        finally:
            if control is not None:
                control.close()  # the child's end: the child has it now
        self._started[boot] = time.monotonic()
        metrics.WORKER_PROCESSES.set(len(self._children))
        log.info("worker process %s started (pid %d)", boot, self._children[boot].pid)

    def _watch(self) -> None:
        while not self._stopping.wait(_WATCH_SECONDS):
            for boot, child in list(self._children.items()):
                if child.poll() is None or self._stopping.is_set():
                    continue
                self._exited(boot, child.returncode)
            now = time.monotonic()
            while self._due and self._due[0] <= now and not self._stopping.is_set():
                self._due.pop(0)
                self._spawn()

    def _exited(self, boot: str, code: int) -> None:
        """Take back what it held, keep its counts, and start another: at once after a
        steady run, later and later after early exits."""
        del self._children[boot]
        lived = time.monotonic() - self._started.pop(boot)
        metrics.WORKER_PROCESSES.set(len(self._children))
        metrics.WORKER_EXITS.inc()
        steady = lived >= _STEADY_SECONDS
        self._delay = 0.0 if steady else min(max(1.0, 2 * self._delay), _RESTART_LIMIT_SECONDS)
        log.error(
            "worker process %s exited with %s after %.1f s: starting another %s",
            boot,
            code,
            lived,
            "now" if steady else f"in {self._delay:g} s",
        )
        taken = self.queue.recover(f"{self.node}/{boot}", time.time())
        taken_back(taken, f"worker process {boot} held")
        self._fold(boot)
        self._due.append(time.monotonic() + self._delay)
        self._due.sort()

    def _report_file(self, boot: str) -> Path | None:
        return None if self.reports_folder is None else self.reports_folder / f"{boot}.json"

    def reports(self) -> list[list[metrics.ReportRow]]:
        """What the children reported (and those that exited), for `metrics.WithReports`."""
        if self.reports_folder is None:
            return []
        with self._reports_lock:
            return [_read_report(path) for path in sorted(self.reports_folder.glob("*.json"))]

    def _fold(self, boot: str) -> None:
        """Add an exited child's last report to the departed ones' (its file goes)."""
        gone, departed = self._report_file(boot), self._report_file(_DEPARTED)
        if gone is None or departed is None or not gone.exists():
            return
        with self._reports_lock:
            rows = metrics.added_up([_read_report(departed), _read_report(gone)])
            try:
                durable.replace(departed, json.dumps(rows).encode("utf-8"), sync=False)
            except OSError as exc:  # a full disk: its counts stay in its own file meanwhile
                log.error("cannot keep the metrics of worker process %s: %s", boot, exc)
                return
            gone.unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM every child (each finishes its messages), then wait; kill what is left."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        for child in self._children.values():
            child.terminate()
        deadline = time.monotonic() + _STOP_SECONDS
        for child in self._children.values():
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._children.clear()
        metrics.WORKER_PROCESSES.set(0)


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written or replaced: inode, size, modification time."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def digest(path: Path) -> str:
    """A file's content hash, "" when it cannot be read (a rescan compares them)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _read_report(path: Path) -> list[metrics.ReportRow]:
    """A metrics file's rows; none when it cannot be read (it is replaced whole, never torn)."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        return [
            (str(family), str(name), {str(k): str(v) for k, v in labels.items()}, float(value))
            for family, name, labels, value in json.loads(path.read_bytes())
        ]
    return []
