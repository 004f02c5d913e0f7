"""Worker processes: `soupflow work` on the queue a `soupflow run` receives into, and
`run --processes` starting, watching and restarting them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.data import images
from soupflow.runtime.processes import WorkerRuntime
from soupflow.store.queue import State
from soupflow.store.spool import Spool
from soupflow.store.sqlite import SqliteQueue
from soupflow.workflow.load import LoadedWorkflow
from tests import documents
from tests.dicom import (
    DEADLINE_SECONDS,
    RuntimeProcess,
    children,
    command_line,
    send_files,
    wait_for,
)
from tests.documents import file_writer
from tests.test_metrics import admin_url, get, samples, value


def workflows(tmp_path: Path) -> Path:
    folder = tmp_path / "workflows"
    folder.mkdir()
    writer = file_writer(FilePathToWrite="out/${SOPInstanceUID}.dcm")
    documents.write(
        folder / "intake.json", documents.workflow(writer, Port=0, AcceptedCallingAETs="*")
    )
    return folder


def states(data: Path) -> list[State]:
    queue = SqliteQueue(data)
    try:
        return [message.state for message in queue.messages()]
    finally:
        queue.close()


def ended(pid: int) -> bool:
    """`pid` has exited (gone, or a zombie its new parent has not reaped)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def test_a_worker_process_works_the_queue_a_runtime_fills(tmp_path: Path) -> None:
    folder, data = workflows(tmp_path), tmp_path / "data"
    runtime = RuntimeProcess(folder, data, "--workers", "0")  # receives and queues only
    files = images(tmp_path / "send", 10, 32, 32)
    assert send_files(runtime.port, files) == [0] * 10
    assert states(data) == [State.QUEUED] * 10
    worker = subprocess.Popen(
        [sys.executable, "-m", "soupflow", "work", "--workflows", str(folder), "--data", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: states(data) == [State.COMPLETED] * 10, "the worker process")
        assert len(list((data / "out").iterdir())) == 10
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=DEADLINE_SECONDS) == 0
        runtime.terminate()


def test_run_with_processes_restarts_a_worker_process_that_dies(tmp_path: Path) -> None:
    folder, data = workflows(tmp_path), tmp_path / "data"
    runtime = RuntimeProcess(folder, data, "--processes", "1")
    started = wait_for(
        lambda: [line for line in runtime.log_text().splitlines() if "worker process" in line],
        "a worker process to start",
    )
    pid = int(started[0].rsplit("pid ", 1)[1].rstrip(")"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "starting another" in runtime.log_text(), "the worker process to be replaced")
    wait_for(lambda: runtime.log_text().count("started (pid") >= 2, "its replacement")
    replacement = runtime.log_text().split(" started (pid")[-2].rsplit("worker process ", 1)[1]
    wait_for(  # it says when it can work: its imports and workflows loaded
        lambda: f"worker process {replacement} ready: " in runtime.log_text(), "it to be ready"
    )
    files = images(tmp_path / "send", 10, 32, 32)
    assert send_files(runtime.port, files) == [0] * 10
    wait_for(lambda: states(data) == [State.COMPLETED] * 10, "every message")
    assert runtime.terminate() == 0
    children = [
        int(line.rsplit("pid ", 1)[1].rstrip(")"))
        for line in runtime.log_text().splitlines()
        if "started (pid" in line
    ]
    for child in children:  # none outlives the runtime
        assert ended(child)


def test_a_worker_process_runs_the_version_of_the_file_as_it_is_when_a_message_comes(
    tmp_path: Path,
) -> None:
    """Without waiting for its own file watcher (not running here): the runtime, whose
    watcher saw the change first, may already have received a message under it."""
    folder = workflows(tmp_path)
    path = folder / "intake.json"
    worker = WorkerRuntime(folder, tmp_path / "data", workers=0, node="n", boot="b")
    worker.reload()
    [workflow_id] = worker.known
    written = "out/${SOPInstanceUID}.dcm"
    assert written in json.dumps(_current(worker, workflow_id).document)
    for version, written in enumerate(["out/b/${SOPInstanceUID}.dcm", "out/cc/${X}.dcm"]):
        changed = documents.workflow(
            file_writer(FilePathToWrite=written), Port=0, AcceptedCallingAETs="*"
        )
        if version:  # an operator's editor: rewritten in place
            documents.write(path, changed)
        else:  # as an operator should: a new file renamed over the old one
            documents.write(folder / ".intake.json.tmp", changed)
            os.replace(folder / ".intake.json.tmp", path)
        assert written in json.dumps(_current(worker, workflow_id).document)
    path.write_text("{ half-written", encoding="utf-8")  # the last good version stays
    assert written in json.dumps(_current(worker, workflow_id).document)
    path.unlink()  # so it does once the file is gone (messages already queued complete)
    assert written in json.dumps(_current(worker, workflow_id).document)


def _current(worker: WorkerRuntime, workflow_id: str) -> LoadedWorkflow:
    loaded = worker.current(workflow_id)
    assert loaded is not None
    return loaded


def test_a_worker_process_whose_runtime_was_killed_stops(tmp_path: Path) -> None:
    runtime = RuntimeProcess(workflows(tmp_path), tmp_path / "data", "--processes", "1")
    wait_for(lambda: " ready: " in runtime.log_text(), "the worker process to be ready")
    [child] = children(runtime.process.pid)
    runtime.process.kill()  # the runtime alone: its worker process is not signalled
    runtime.process.wait(timeout=DEADLINE_SECONDS)
    wait_for(lambda: ended(child), "the worker process to stop")
    assert "its runtime exited" in runtime.log_text()


def test_a_worker_process_that_keeps_exiting_is_started_again_later_each_time(
    tmp_path: Path,
) -> None:
    """A crash loop is not a busy loop: early exits double the wait before the next start,
    and a monitoring system sees the exits and the processes running."""
    folder, data = workflows(tmp_path), tmp_path / "data"
    runtime = RuntimeProcess(folder, data, "--processes", "1")

    def started(count: int) -> int:
        every: list[int] = wait_for(
            lambda: found if len(found := pids(runtime)) >= count else None,
            f"worker process number {count}",
        )
        return every[count - 1]

    os.kill(started(1), signal.SIGKILL)
    wait_for(lambda: "starting another in 1 s" in runtime.log_text(), "a 1 s wait")
    os.kill(started(2), signal.SIGKILL)
    wait_for(lambda: "starting another in 2 s" in runtime.log_text(), "a 2 s wait")
    started(3)
    scraped = wait_for(
        lambda: found if value(found := scrape(runtime), "soupflow_worker_processes") else None,
        "the third worker process to count",
    )
    assert value(scraped, "soupflow_worker_process_exits_total") == 2
    assert runtime.terminate() == 0


def pids(runtime: RuntimeProcess) -> list[int]:
    return [
        int(line.rsplit("pid ", 1)[1].rstrip(")"))
        for line in runtime.log_text().splitlines()
        if "started (pid" in line
    ]


def scrape(runtime: RuntimeProcess) -> dict[Any, float]:
    code, text = get(admin_url(runtime.data) + "metrics")
    assert code == 200
    return samples(text)


def test_run_with_processes_sweeps_once_for_all_of_them(tmp_path: Path) -> None:
    """The retention purge and the orphan sweep (a listing of every object) run in the
    runtime, not again in each worker process."""
    folder, data = workflows(tmp_path), tmp_path / "data"
    orphan = Spool(data).path("orphan")  # committed, then a crash before its enqueue
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"object")
    os.utime(orphan, (1_000_000, 1_000_000))
    runtime = RuntimeProcess(folder, data, "--processes", "2")
    try:
        wait_for(lambda: "without a queue entry removed" in runtime.log_text(), "the sweep")
        assert not orphan.exists()

        def workers() -> list[str] | None:
            found = [command_line(child) for child in children(runtime.process.pid)]
            found = [line for line in found if "\0work\0" in line]
            return found if len(found) == 2 else None

        assert all("--no-housekeeping" in line for line in wait_for(workers, "2 workers"))
        assert runtime.log_text().count("without a queue entry removed") == 1
    finally:
        runtime.terminate()
