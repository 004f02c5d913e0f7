"""The running product: workflows folder -> listeners -> spool + queue. Upstream: cli (`run`).

Loads every workflow file, starts one listener per valid, enabled workflow and the workers
that process the queue, and writes what is listening to `<data>/listeners.json` (ports
included, so a port 0 can be found). Files with errors are reported and skipped; a port that
cannot be bound is reported for its workflow and the others run. Hot loading is not built
yet (see README, Status).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from soupflow.listener import Ingest, Listener, ListenerError, parse_allow_list
from soupflow.store.spool import Spool
from soupflow.store.sqlite import SqliteQueue
from soupflow.worker import Workers
from soupflow.workflow.issues import ConfigIssue
from soupflow.workflow.load import LoadedWorkflow, load_paths

log = logging.getLogger(__name__)

LISTENERS_FILE = "listeners.json"
INCOMING_FOLDER = "incoming"


@dataclass(frozen=True)
class ListenerRow:
    """One line of the listener table."""

    workflow: str
    workflow_id: str
    file: str
    port: int
    our_aet: str
    who_may_call: str
    state: str  # listening | disabled | failed | invalid
    detail: str = ""


def who_may_call(allow_list: str) -> str:
    allowed = parse_allow_list(allow_list)
    if allowed is None:
        return "anyone"
    return ", ".join(sorted(allowed)) if allowed else "nobody (empty allow-list)"


class Runtime:
    def __init__(
        self, workflows: Path, data: Path, host: str, workers: int = 2, keep_objects: bool = False
    ) -> None:
        self.workflows_folder = workflows
        self.data = data
        self.host = host
        self.worker_count = workers
        self.keep_objects = keep_objects
        self.loaded: dict[str, LoadedWorkflow] = {}
        self.workers: Workers | None = None
        self.listeners: list[Listener] = []
        self.rows: list[ListenerRow] = []
        self.issues: list[ConfigIssue] = []
        self.queue: SqliteQueue | None = None

    def start(self) -> None:
        """Open the store, recover from a crash, start the listeners."""
        self._prepare_incoming()
        self.queue = SqliteQueue(self.data)
        recovered = self.queue.recover()
        if recovered:
            log.info("%d message(s) left processing by the last run are queued again", recovered)
        spool = Spool(self.data)
        ingest = Ingest(spool, self.queue)
        for loaded in load_paths([self.workflows_folder]):
            self.issues.extend(loaded.issues)
            if loaded.valid and loaded.workflow_id:
                self.loaded[loaded.workflow_id] = loaded
            self.rows.append(self._start(loaded, ingest))
        self._write_listeners_file()
        self.workers = Workers(
            self.queue,
            spool,
            self.data,
            self.loaded.get,
            self.worker_count,
            keep_objects=self.keep_objects,
        )
        self.workers.start()

    def _prepare_incoming(self) -> None:
        """Receive into the data folder's filesystem, so spooling is a rename, not a copy.

        Files left there by a crash were never acknowledged to any sender: they go.
        """
        incoming = self.data / INCOMING_FOLDER
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(incoming)

    def _start(self, loaded: LoadedWorkflow, ingest: Ingest) -> ListenerRow:
        receiver, workflow_id = loaded.receiver, loaded.workflow_id or ""
        if receiver is None or not loaded.valid:
            return ListenerRow(
                loaded.name,
                workflow_id,
                str(loaded.path),
                0,
                "",
                "",
                "invalid",
                "see the errors above",
            )
        row = ListenerRow(
            loaded.name,
            workflow_id,
            str(loaded.path),
            receiver.port,
            receiver.our_aet,
            who_may_call(receiver.accepted_calling_aets),
            "disabled",
        )
        if receiver.disabled:
            return row
        listener = Listener(workflow_id, receiver, self.host, ingest)
        try:
            listener.start()
        except ListenerError as exc:
            log.error("workflow %s (%s): %s", loaded.name, loaded.path, exc)
            return ListenerRow(**{**asdict(row), "state": "failed", "detail": str(exc)})
        self.listeners.append(listener)
        return ListenerRow(**{**asdict(row), "port": listener.port, "state": "listening"})

    def _write_listeners_file(self) -> None:
        path = self.data / LISTENERS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(
            json.dumps([asdict(row) for row in self.rows], indent=2) + "\n", encoding="utf-8"
        )
        os.replace(temporary, path)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let in-flight stores finish, let workers finish their messages."""
        for listener in self.listeners:
            listener.stop(grace_seconds)
        self.listeners.clear()
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        if self.queue is not None:
            self.queue.close()
            self.queue = None
        (self.data / LISTENERS_FILE).unlink(missing_ok=True)
