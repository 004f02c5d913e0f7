"""The running product: workflows folder -> receivers -> ingest (spool + queue) -> workers.

Upstream: cli (`run`). Loads the folder, starts one listener per valid, enabled workflow and
the workers, and from then on reloads whenever the folder changes (`reload`, driven by
`watch`): a pure plan (`reconcile.plan`) applied in stop-before-start order. What listens is
written to `<data>/listeners.json` (ports included, so a port 0 can be found, and `status`
can show it). Every workflow ever loaded stays known to the workers, so messages queued for
a workflow that was deleted still complete with its last version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from soupflow import metrics, tls
from soupflow.activities.dicom_sender import destination
from soupflow.dicom.requestor import Destination
from soupflow.ingest import Ingest
from soupflow.network import CleartextPorts, Egress, is_loopback
from soupflow.receivers import RECEIVERS
from soupflow.receivers.base import Receiver, ReceiverError
from soupflow.runtime import listeners_file, reconcile
from soupflow.runtime.admin_http import AdminServer
from soupflow.runtime.handoff import Handoff
from soupflow.runtime.listeners_file import ListenerRow, ListenerState
from soupflow.runtime.pacing import BACKLOG_LIMIT, Pacing
from soupflow.runtime.processes import REPORTS_FOLDER, WorkerProcesses, digest, new_boot
from soupflow.runtime.workers import LEASE_SECONDS, RETENTION_DAYS, Workers, taken_back
from soupflow.store import Storage
from soupflow.store.queue import Queue
from soupflow.workflow.checks import Problem, egress_problems
from soupflow.workflow.load import LoadedWorkflow, load_file, workflow_paths
from soupflow.workflow.model import DicomSenderSetting

log = logging.getLogger(__name__)


NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def node_name() -> str:
    """This machine's name in lease owners (`SOUPFLOW_NODE`, else the host name, with
    anything but letters, digits, '.', '_' and '-' replaced)."""
    name = os.environ.get("SOUPFLOW_NODE") or socket.gethostname() or "node"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:64]


@dataclass
class _Workflow:
    loaded: LoadedWorkflow
    listener: Receiver | None
    state: ListenerState
    detail: str = ""


class Runtime:
    def __init__(
        self,
        workflows: Path,
        data: Path,
        host: str,
        workers: int = 2,
        keep_objects: bool = False,
        processes: int = 0,
        allow_cleartext: CleartextPorts | None = None,
        egress: Egress | None = None,
        admin: tuple[str, int] | None = None,
        admin_token: str = "",
        storage: Storage | None = None,
        admin_tls: tls.ServerContexts | None = None,
        node: str = "",
        lease_seconds: float = LEASE_SECONDS,
        retention_days: float = RETENTION_DAYS,
        backlog_limit: int = BACKLOG_LIMIT,
    ) -> None:
        """`allow_cleartext`: ports whose listener may be cleartext on a non-loopback `host`
        (`--allow-cleartext`); `egress`: where activities may connect (fail closed);
        `storage`: the queue and objects folder when they are not the data folder's own
        (`--queue`, `--objects`); `node`: this node's name in leases (`--node-id`);
        `backlog_limit`: messages due per workflow above which answers are held (pacing)."""
        self.storage = storage or Storage(data)
        self.admin_tls = admin_tls
        self.lease_seconds = lease_seconds
        self.retention_days = retention_days
        self.backlog_limit = backlog_limit
        self.pacing: Pacing | None = None
        self.workflows_folder = workflows
        self.allow_cleartext = allow_cleartext or CleartextPorts()
        self.egress = egress or Egress()
        self.admin_address = admin  # None: no admin endpoint
        self.admin_token = admin_token
        self.admin: AdminServer | None = None
        self._collectors = (
            metrics.QueueCollector(lambda: self.queue),
            metrics.RuntimeCollector(self._served),
        )
        self.data = data
        self.host = host
        self.worker_count = workers
        self.keep_objects = keep_objects
        self.processes = processes  # worker processes; 0: the workers are threads of this one
        self.known: dict[str, LoadedWorkflow] = {}
        self.running: dict[str, _Workflow] = {}
        self.problems: list[ListenerRow] = []
        self.node = node or node_name()
        self.boot = new_boot()  # this process, in lease owners
        self.queue: Queue | None = None
        self.workers: Workers | None = None
        self.children: WorkerProcesses | None = None
        # worker processes serve some of the listeners' connections
        self.handoff = Handoff() if processes else None
        self._ingest: Ingest | None = None
        self._digests: dict[Path, str] = {}
        self._egress_checked: dict[tuple[Path, str], list[Problem]] = {}
        self._lock = threading.Lock()

    @property
    def rows(self) -> list[ListenerRow]:
        rows = [self._row(entry) for entry in self.running.values()]
        return sorted(rows + self.problems, key=lambda row: row.file)

    def start(self) -> None:
        """Open the store, recover from a crash, load the folder, start the workers."""
        _raise_descriptor_limit()
        spool = self.storage.spool(self.node)
        spool.clear_incoming()
        sys.path.insert(
            0, str(self.workflows_folder.resolve())
        )  # where PythonCallable modules may live
        self.queue = self.storage.open_queue()
        recovered = self.queue.recover(self.node, time.time())
        taken_back(recovered, f"left processing by the last run on {self.node}")
        self.pacing = Pacing(self.queue, self.backlog_limit)
        self.pacing.start()
        self._ingest = Ingest(
            spool, self.queue, on_queued=self._wake_workers, hold=self.pacing.hold
        )
        self.reload()
        network = {
            "host": self.host,
            "allow_cleartext": str(self.allow_cleartext),
            "allowed_tcp": str(self.egress.tcp),
            "allowed_http": str(self.egress.http),
        }
        try:
            listeners_file.write_network(self.data, network)
        except OSError as exc:  # a full disk: `status` will not show the lists, nothing else
            log.error("cannot write the network policy for status: %s", exc.strerror or exc)
        self.workers = Workers(
            self.queue,
            spool,
            self.data,
            self.known.get,
            0 if self.processes else self.worker_count,
            owner_prefix=f"{self.node}/{self.boot}",
            keep_objects=self.keep_objects,
            egress=self.egress,
            lease_seconds=self.lease_seconds,
            retention_days=self.retention_days,
            housekeeping=self.worker_count > 0,  # here, not in each worker process
        )
        self.workers.start()
        self._start_admin()
        if self.processes:
            self.children = WorkerProcesses(
                self.processes,
                self._work_command,
                self.queue,
                self.node,
                {"SOUPFLOW_QUEUE": self.storage.queue} if self.storage.queue else None,
                self.data / REPORTS_FOLDER,
                self.handoff,
            )
            self.children.start()

    def _start_admin(self) -> None:
        for collector in self._collectors:
            metrics.REGISTRY.register(collector)
        if self.admin_address is None:
            return
        host, port = self.admin_address
        admin = AdminServer(
            host,
            port,
            self.admin_token,
            self.readiness,
            dataclasses.replace(self.storage, lent=self.queue),  # no queue opened per request
            self.workflows_folder,
            self.admin_tls,
            metrics.WithReports(self._reports),
        )
        try:
            admin.start()
        except ReceiverError as exc:  # the router still receives and delivers without it
            log.error("no admin endpoint: %s", exc)
            return
        self.admin = admin

    def readiness(self) -> list[str]:
        """What keeps this runtime from being ready (empty: ready), for `/readyz`."""
        problems = [
            f"workflow {row.workflow} ({row.file}): {row.state}"
            + (f": {row.detail}" if row.detail else "")
            for row in self.rows
            if row.state not in (ListenerState.LISTENING, ListenerState.DISABLED)
        ]
        queue = self.queue
        blocked = queue.writable() if queue is not None else "the queue is closed"
        if blocked:
            problems.append(f"the queue cannot be written: {blocked}")
        return problems

    def _served(self) -> list[tuple[str, str, int]]:
        """(WorkflowId, name, connections served) of each running workflow."""
        return [
            (
                workflow_id,
                entry.loaded.name,
                entry.listener.active_connections if entry.listener is not None else 0,
            )
            for workflow_id, entry in list(self.running.items())
        ]

    def _reports(self) -> list[list[metrics.ReportRow]]:
        children = self.children
        return children.reports() if children is not None else []

    def _work_command(self, boot: str) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "soupflow",
            "work",
            "--workflows",
            str(self.workflows_folder),
            "--data",
            str(self.data),
            "--workers",
            str(self.worker_count),
            "--node",
            self.node,
            "--boot",
            boot,
            "--lease-seconds",
            str(self.lease_seconds),
            "--retention-days",
            str(self.retention_days),
            "--no-housekeeping",
            "--backlog-limit",
            str(self.backlog_limit),
        ]
        if self.storage.objects is not None:
            command += ["--objects", str(self.storage.objects)]
        for entry in self.egress.tcp.entries:
            command += ["--allowed-tcp", entry.text]
        for entry in self.egress.http.entries:
            command += ["--allowed-http", entry.text]
        return [*command, "--keep-objects"] if self.keep_objects else command

    def _wake_workers(self) -> None:
        if self.workers is not None:
            self.workers.wake()

    # --------------------------------------------------------------------------- reload
    def reload(self) -> None:
        """Make what runs match the workflows folder (safe to call at any time)."""
        with self._lock:
            scanned = (
                [load_file(path) for path in workflow_paths([self.workflows_folder])]
                if self.workflows_folder.is_dir()
                else []
            )
            digests = {w.path: digest(w.path) for w in scanned}
            for loaded in scanned:
                self._check_egress(loaded, digests[loaded.path])
            self._egress_checked = {  # only the files as they are now
                key: found
                for key, found in self._egress_checked.items()
                if digests.get(key[0]) == key[1]
            }
            unchanged = {
                path for path, content in digests.items() if self._digests.get(path) == content
            }
            running = {
                workflow_id: reconcile.Running(
                    workflow_id,
                    entry.loaded.path,
                    entry.loaded.receiver,
                    entry.listener is not None,
                )
                for workflow_id, entry in self.running.items()
                if entry.loaded.receiver is not None
            }
            plan = reconcile.plan(running, scanned, unchanged)
            self._apply(plan, unchanged)
            self._digests = digests
            try:
                listeners_file.write(self.data, self.rows)
            except OSError as exc:  # a full disk: what runs runs; `status` shows it later
                log.error("cannot write the listener table: %s", exc.strerror or exc)
            if (
                self.workers is not None
            ):  # a changed or removed destination lets its associations go
                self.workers.connections.associations.retain(self._destinations())

    def _check_egress(self, loaded: LoadedWorkflow, content: str) -> None:
        """The egress check, remembered per file content: the folder is rescanned every
        second, and a name that only CIDR entries could allow costs a DNS lookup."""
        key = (loaded.path, content)
        problems = self._egress_checked.get(key)
        if problems is None:
            problems = self._egress_checked[key] = egress_problems(loaded, self.egress)
        for problem in problems:
            loaded.sink.error(*problem)

    def _destinations(self) -> set[Destination]:
        return {
            destination(entry.setting)
            for running in self.running.values()
            for entry in running.loaded.entries
            if isinstance(entry.setting, DicomSenderSetting)
        }

    def _apply(self, plan: reconcile.Plan, unchanged: set[Path]) -> None:
        for workflow_id in plan.stop:
            entry = self.running.pop(workflow_id)
            self._stop_listener(entry)
            log.info(
                "workflow %s (%s) stopped: its file is gone or no longer defines it",
                entry.loaded.name,
                entry.loaded.path,
            )
        for loaded in plan.restart:
            self._stop_listener(self.running.pop(loaded.workflow_id or ""))
            self._start(loaded, "replaced (listener restarted)")
        for loaded in plan.update:
            entry = self.running[loaded.workflow_id or ""]
            if entry.listener is not None and loaded.receiver is not None:
                if loaded.receiver.disabled:
                    self._stop_listener(entry)
                    entry.listener, entry.state = None, ListenerState.DISABLED
                else:
                    entry.listener.update(loaded.receiver)
            entry.loaded = loaded
            self.known[loaded.workflow_id or ""] = loaded
            log.info(
                "workflow %s (%s) replaced: the new version applies from the next message",
                loaded.name,
                loaded.path,
            )
        for loaded in plan.start:
            self._start(loaded, "loaded")
        self.problems = []
        for loaded, reason in plan.refused:
            log.error("workflow file %s refused: %s", loaded.path, reason)
            self.problems.append(self._problem(loaded, ListenerState.REFUSED, reason))
        for loaded, kept in plan.invalid:
            if loaded.path not in unchanged:
                for issue in loaded.issues:
                    (log.error if issue.severity == "error" else log.warning)("%s", issue)
                if kept:
                    log.warning(
                        "workflow file %s has errors: its last good version keeps running",
                        loaded.path,
                    )
            if not kept:
                self.problems.append(
                    self._problem(loaded, ListenerState.INVALID, "see the errors above")
                )

    def _start(self, loaded: LoadedWorkflow, event: str) -> None:
        receiver, workflow_id = loaded.receiver, loaded.workflow_id or ""
        assert receiver is not None and self._ingest is not None
        self.known[workflow_id] = loaded
        if receiver.disabled:
            self.running[workflow_id] = _Workflow(loaded, None, ListenerState.DISABLED)
            log.info(
                "workflow %s (%s) %s: disabled, not listening", loaded.name, loaded.path, event
            )
            return
        refusal = self._cleartext_refusal(receiver.port, receiver.use_ssl)
        if refusal:
            log.error("workflow %s (%s) refused: %s", loaded.name, loaded.path, refusal)
            self.running[workflow_id] = _Workflow(loaded, None, ListenerState.REFUSED, refusal)
            return
        listener = RECEIVERS[type(receiver)](
            workflow_id, receiver, self.host, self._ingest, loaded.path.parent
        )
        if self.handoff is not None:
            listener.share(self.handoff)
        try:
            listener.start()
        except ReceiverError as exc:
            log.error("workflow %s (%s): %s", loaded.name, loaded.path, exc)
            self.running[workflow_id] = _Workflow(loaded, None, ListenerState.FAILED, str(exc))
            return
        self.running[workflow_id] = _Workflow(loaded, listener, ListenerState.LISTENING)
        log.info("workflow %s (%s) %s", loaded.name, loaded.path, event)

    def _cleartext_refusal(self, port: int, tls: bool) -> str:
        """Why a listener may not start: cleartext on a non-loopback address, unless the
        operator allowed its port; "" when it may."""
        if tls or is_loopback(self.host) or self.allow_cleartext.allows(port):
            return ""
        return (
            f"cleartext on {self.host}:{port} (not loopback): set UseSsl with a "
            f"certificate, or allow it with --allow-cleartext {port or '*'}"
        )

    @staticmethod
    def _stop_listener(entry: _Workflow) -> None:
        if entry.listener is not None:
            entry.listener.stop()
            entry.listener = None

    def _row(self, entry: _Workflow) -> ListenerRow:
        loaded = entry.loaded
        receiver = loaded.receiver
        assert receiver is not None
        port = entry.listener.port if entry.listener is not None else receiver.port
        return ListenerRow(
            loaded.name,
            loaded.workflow_id or "",
            str(loaded.path),
            port,
            *receiver.identity(),
            entry.state,
            entry.detail,
        )

    @staticmethod
    def _problem(loaded: LoadedWorkflow, state: ListenerState, detail: str) -> ListenerRow:
        receiver = loaded.receiver
        return ListenerRow(
            loaded.name,
            loaded.workflow_id or "",
            str(loaded.path),
            receiver.port if receiver else 0,
            *(receiver.identity() if receiver else ("", "")),
            state,
            detail,
        )

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let in-flight stores finish, let workers finish their messages."""
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
        for collector in self._collectors:
            with contextlib.suppress(KeyError):  # never registered (a failed start)
                metrics.REGISTRY.unregister(collector)
        with self._lock:
            if self.pacing is not None:  # held answers go out now, before the listeners stop
                self.pacing.stop()
                self.pacing = None
            for entry in self.running.values():
                if entry.listener is not None:
                    entry.listener.stop(grace_seconds)
                    entry.listener = None
            if self.children is not None:
                self.children.stop()
                self.children = None
            if self.workers is not None:
                self.workers.stop()
                self.workers = None
            if self.queue is not None:
                self.queue.close()
                self.queue = None
            listeners_file.remove(self.data)


def _raise_descriptor_limit() -> None:
    """Every connection costs a descriptor (a silent one costs nothing else): lift the soft
    limit to the hard one, as servers do, so that a flood of connections does not starve
    the spool and the queue of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
