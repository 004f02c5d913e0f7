"""Worker processes: `soupflow work` on the queue a `soupflow run` receives into, and
`run --processes` starting, watching and restarting them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.data import images
from soupflow.store.queue import State
from soupflow.store.spool import Spool
from soupflow.store.sqlite import SqliteQueue
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
        assert (
            not Path(f"/proc/{child}").exists()
            or "zombie" in Path(f"/proc/{child}/status").read_text()
        )


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
