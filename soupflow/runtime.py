"""The running product: workflows folder -> listeners -> spool + queue -> workers.

Upstream: cli (`run`). Loads the folder, starts one listener per valid, enabled workflow and
the workers, and from then on reloads whenever the folder changes (`reload`, driven by
`watch`): a pure plan (`reconcile.plan`) applied in stop-before-start order. What listens is
written to `<data>/listeners.json` (ports included, so a port 0 can be found, and `status`
can show it). Every workflow ever loaded stays known to the workers, so messages queued for
a workflow that was deleted still complete with its last version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from soupflow import reconcile
from soupflow.listener import Ingest, Listener, ListenerError, parse_allow_list
from soupflow.store.spool import Spool
from soupflow.store.sqlite import SqliteQueue
from soupflow.worker import Workers
from soupflow.workflow.load import LoadedWorkflow, load_file, workflow_paths

log = logging.getLogger(__name__)

LISTENERS_FILE = "listeners.json"


@dataclass(frozen=True)
class ListenerRow:
    """One line of the listener table."""

    workflow: str
    workflow_id: str
    file: str
    port: int
    our_aet: str
    who_may_call: str
    state: str  # listening | disabled | failed | invalid | refused
    detail: str = ""


def who_may_call(allow_list: str) -> str:
    allowed = parse_allow_list(allow_list)
    if allowed is None:
        return "anyone"
    return ", ".join(sorted(allowed)) if allowed else "nobody (empty allow-list)"


@dataclass
class _Workflow:
    loaded: LoadedWorkflow
    listener: Listener | None
    state: str
    detail: str = ""


class Runtime:
    def __init__(
        self, workflows: Path, data: Path, host: str, workers: int = 2, keep_objects: bool = False
    ) -> None:
        self.workflows_folder = workflows
        self.data = data
        self.host = host
        self.worker_count = workers
        self.keep_objects = keep_objects
        self.known: dict[str, LoadedWorkflow] = {}
        self.running: dict[str, _Workflow] = {}
        self.problems: list[ListenerRow] = []
        self.queue: SqliteQueue | None = None
        self.workers: Workers | None = None
        self._ingest: Ingest | None = None
        self._digests: dict[Path, str] = {}
        self._lock = threading.Lock()

    @property
    def rows(self) -> list[ListenerRow]:
        rows = [self._row(entry) for entry in self.running.values()]
        return sorted(rows + self.problems, key=lambda row: row.file)

    def start(self) -> None:
        """Open the store, recover from a crash, load the folder, start the workers."""
        spool = Spool(self.data)
        spool.clear_incoming()
        sys.path.insert(
            0, str(self.workflows_folder.resolve())
        )  # where PythonCallable modules may live
        self.queue = SqliteQueue(self.data)
        recovered = self.queue.recover()
        if recovered:
            log.info("%d message(s) left processing by the last run are queued again", recovered)
        self._ingest = Ingest(spool, self.queue)
        self.reload()
        self.workers = Workers(
            self.queue,
            spool,
            self.data,
            self.known.get,
            self.worker_count,
            keep_objects=self.keep_objects,
        )
        self.workers.start()

    # --------------------------------------------------------------------------- reload
    def reload(self) -> None:
        """Make what runs match the workflows folder (safe to call at any time)."""
        with self._lock:
            scanned = (
                [load_file(path) for path in workflow_paths([self.workflows_folder])]
                if self.workflows_folder.is_dir()
                else []
            )
            digests = {w.path: _digest(w.path) for w in scanned}
            unchanged = {
                path for path, digest in digests.items() if self._digests.get(path) == digest
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
            self._write_listeners_file()

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
                    entry.listener, entry.state = None, "disabled"
                else:
                    entry.listener.update_policy(loaded.receiver)
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
            self.problems.append(self._problem(loaded, "refused", reason))
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
                self.problems.append(self._problem(loaded, "invalid", "see the errors above"))

    def _start(self, loaded: LoadedWorkflow, event: str) -> None:
        receiver, workflow_id = loaded.receiver, loaded.workflow_id or ""
        assert receiver is not None and self._ingest is not None
        self.known[workflow_id] = loaded
        if receiver.disabled:
            self.running[workflow_id] = _Workflow(loaded, None, "disabled")
            log.info(
                "workflow %s (%s) %s: disabled, not listening", loaded.name, loaded.path, event
            )
            return
        listener = Listener(workflow_id, receiver, self.host, self._ingest)
        try:
            listener.start()
        except ListenerError as exc:
            log.error("workflow %s (%s): %s", loaded.name, loaded.path, exc)
            self.running[workflow_id] = _Workflow(loaded, None, "failed", str(exc))
            return
        self.running[workflow_id] = _Workflow(loaded, listener, "listening")
        log.info("workflow %s (%s) %s", loaded.name, loaded.path, event)

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
            receiver.our_aet,
            who_may_call(receiver.accepted_calling_aets),
            entry.state,
            entry.detail,
        )

    @staticmethod
    def _problem(loaded: LoadedWorkflow, state: str, detail: str) -> ListenerRow:
        receiver = loaded.receiver
        return ListenerRow(
            loaded.name,
            loaded.workflow_id or "",
            str(loaded.path),
            receiver.port if receiver else 0,
            receiver.our_aet if receiver else "",
            who_may_call(receiver.accepted_calling_aets) if receiver else "",
            state,
            detail,
        )

    def _write_listeners_file(self) -> None:
        path = self.data / LISTENERS_FILE
        text = json.dumps([asdict(row) for row in self.rows], indent=2) + "\n"
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return  # the folder is rescanned every second: only real changes are written
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let in-flight stores finish, let workers finish their messages."""
        with self._lock:
            for entry in self.running.values():
                if entry.listener is not None:
                    entry.listener.stop(grace_seconds)
                    entry.listener = None
            if self.workers is not None:
                self.workers.stop()
                self.workers = None
            if self.queue is not None:
                self.queue.close()
                self.queue = None
            (self.data / LISTENERS_FILE).unlink(missing_ok=True)


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
