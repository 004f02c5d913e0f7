"""Real DICOM peers for the tests: listeners on port 0, pynetdicom and dcmtk senders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config

from bench.ingest import soupflow_run
from soupflow.ingest import Ingest
from soupflow.receivers.dicom import Listener
from soupflow.runtime.listeners_file import LISTENERS_FILE
from soupflow.store.spool import Spool
from soupflow.store.sqlite import SqliteQueue
from soupflow.workflow.model import DicomReceiverSetting
from tests import documents

NODELAY = {**os.environ, "TCP_NODELAY": "1"}  # Debian's dcmtk leaves Nagle on without it
DEADLINE_SECONDS = 30.0


def unavailable(reason: str) -> NoReturn:
    """A real peer or privilege a test needs is missing: a failure under CI=true (CI must run
    every real-peer test), a skip naming the reason elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The tool's path, or `unavailable`."""
    path = shutil.which(name)
    if path is None:
        unavailable(
            f"{name} is not installed (make test installs dcmtk, orthanc and orthanc-dicomweb as root)"
        )
    return path


def sample_file(name: str) -> Path:
    return Path(str(get_testdata_file(name)))


def receiver(**fields: Any) -> DicomReceiverSetting:
    return DicomReceiverSetting.model_validate(documents.receiver(Port=0, **fields))


def soupflow(*arguments: str) -> subprocess.CompletedProcess[str]:
    """A `soupflow` command as an operator types it (wide output, no exit check)."""
    return subprocess.run(
        [sys.executable, "-m", "soupflow", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "250"},
    )


def storescu_send(port: int, *paths: Path) -> None:
    """dcmtk's storescu sends the files over one association (raises if it fails)."""
    subprocess.run(
        [require_tool("storescu"), "127.0.0.1", str(port), *map(str, paths)],
        env=NODELAY,
        timeout=600,
        check=True,
        capture_output=True,
    )


def dataset_bytes(path: Path) -> bytes:
    """The bytes after a Part 10 file's meta group (what travels in a C-STORE)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part 10 file"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


class Receiving:
    """A listener with its spool and queue, in this process."""

    def __init__(
        self,
        data: Path,
        setting: DicomReceiverSetting,
        busy_timeout: float = 5.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.data = data
        self.spool = Spool(data)
        self.queue = SqliteQueue(data, busy_timeout_seconds=busy_timeout)
        self.listener = Listener(
            "workflow-1", setting, host, Ingest(self.spool, self.queue), data.parent
        )
        self.listener.start()

    @property
    def port(self) -> int:
        return self.listener.port

    def stored(self, sop_instance_uid: str) -> list[Path]:
        return [
            self.spool.root / message.arrival.object_path
            for message in self.queue.messages()
            if message.arrival.sop_instance_uid == sop_instance_uid
        ]

    def close(self) -> None:
        self.listener.stop(grace_seconds=2.0)
        self.queue.close()


@contextmanager
def receiving(
    data: Path, busy_timeout: float = 5.0, host: str = "127.0.0.1", **fields: Any
) -> Iterator[Receiving]:
    running = Receiving(data, receiver(**fields), busy_timeout, host)
    try:
        yield running
    finally:
        running.close()


@contextmanager
def chunked_send() -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes as they are (no decode, no re-encode)."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def send_files(
    port: int, paths: list[Path], calling_aet: str = "MODALITY01", called_aet: str = "SOUPFLOW"
) -> list[int]:
    """C-STORE each file over one association; the status of each (-1: no response)."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = DEADLINE_SECONDS
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    statuses = []
    with chunked_send():
        assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
        assert assoc.is_established, "association was not accepted"
        for path in paths:
            response = assoc.send_c_store(path)
            statuses.append(int(response.Status) if "Status" in response else -1)
        assoc.release()
    return statuses


def associate(port: int, calling_aet: str, called_aet: str = "SOUPFLOW") -> Any:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.network_timeout = DEADLINE_SECONDS
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title=called_aet)


def wait_for(predicate: Any, what: str, seconds: float = DEADLINE_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


class RuntimeProcess:
    """`soupflow run` in its own process, as an operator runs it. Every one started is
    killed after its test by `conftest.py`, whatever happened (a failed start included)."""

    started: ClassVar[list[RuntimeProcess]] = []

    def __init__(
        self,
        workflows: Path,
        data: Path,
        *options: str,
        launcher: tuple[str, ...] = (),
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        """`env`: variables added to the runtime's environment."""
        self.data = data
        self.log = data.parent / "runtime.log"
        (data / LISTENERS_FILE).unlink(missing_ok=True)
        command = [*launcher, *soupflow_run(workflows, data, *options)]
        with self.log.open("w") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # its worker processes with it: kill() kills them all
                # a free admin port: runtimes of other tests (or `make run`) may hold the default
                env={
                    "SOUPFLOW_ADMIN": "127.0.0.1:0",
                    **os.environ,
                    "COLUMNS": "200",
                    **(env or {}),
                },
            )
        self.ports: dict[str, int] = {}
        RuntimeProcess.started.append(self)
        if wait:
            try:
                self.refresh()
            except BaseException:
                self.kill()
                raise

    def refresh(self, predicate: Any = None) -> list[dict[str, Any]]:
        """The listener rows, once `predicate(rows)` holds (bounded wait)."""

        def ready() -> list[dict[str, Any]] | None:
            rows = self._listening()
            return rows if rows is not None and (predicate is None or predicate(rows)) else None

        found = wait_for(
            lambda: (rows,) if (rows := ready()) is not None else None, "the runtime's listeners"
        )
        rows: list[dict[str, Any]] = found[0]
        self.ports = {
            row["workflow_id"]: row["port"] for row in rows if row["state"] == "listening"
        }
        return rows

    def _listening(self) -> list[dict[str, Any]] | None:
        if self.process.poll() is not None:
            raise AssertionError(f"soupflow run exited: {self.log.read_text()}")
        path = self.data / LISTENERS_FILE
        try:
            rows: list[dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return rows

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8")

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def kill(self) -> None:
        """kill -9 of the runtime and its worker processes at once, as a crash would."""
        with suppress(ProcessLookupError):  # all of them gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=DEADLINE_SECONDS)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.exit_status()

    def exit_status(self) -> int:
        """Its exit status, once the SIGTERM sent to it has stopped it (killed, if it did not
        stop within the deadline: the assertion says so, with its threads' stacks)."""
        try:
            return self.process.wait(timeout=DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            words = self.last_words()
            self.kill()
            raise AssertionError(
                f"soupflow run did not stop within {DEADLINE_SECONDS} s of SIGTERM:\n{words}"
            ) from None

    def last_words(self) -> str:
        """The end of its log; while it runs, after its threads' stacks (SIGUSR1)."""
        if self.process.poll() is None:
            marks = self.log_text().count("most recent call first")
            self.process.send_signal(signal.SIGUSR1)
            with suppress(AssertionError):  # faulthandler writes at once, from C
                wait_for(
                    lambda: self.log_text().count("most recent call first") > marks,
                    "the stacks",
                    5,
                )
        return self.log.read_text(encoding="utf-8", errors="replace")[-20000:]


class CutSender:
    """Sends files over one association in a thread, recording each SOPInstanceUID that was
    answered Success, for tests that cut the receiver off mid-transfer. Short timeouts: the
    sender gives up soon after the receiver is gone, and what it saw by then is final."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.port, self.files = port, files
        self.acknowledged: list[str] = []
        self.thread = threading.Thread(target=self._send)
        self.thread.start()

    def _send(self) -> None:
        ae = AE(ae_title="MODALITY01")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(
            "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
        )  # CT, explicit VR LE
        with chunked_send():
            assoc = ae.associate("127.0.0.1", self.port)
            for path in self.files:
                if not assoc.is_established:
                    return
                response = assoc.send_c_store(path)
                if "Status" in response and response.Status == 0:
                    self.acknowledged.append(
                        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                    )
            assoc.release()

    def join(self) -> None:
        self.thread.join(timeout=DEADLINE_SECONDS)
        assert not self.thread.is_alive(), "the sender did not give up"


def command_line(pid: int) -> str:
    """A process's command line, its arguments NUL-separated ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    except OSError:  # gone already
        return ""


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid`."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:  # gone meanwhile
            continue
        if f"PPid:\t{pid}" in lines:
            found.append(int(status.parent.name))
    return found
