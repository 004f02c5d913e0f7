"""`soupflow run` as an operator sees it: the table, per-workflow failures, clean stop."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
from contextlib import suppress
from pathlib import Path

from bench.scu import associate_request, read_pdu
from soupflow.cli import printable
from tests import documents
from tests.dicom import RuntimeProcess, sample_file, send_files, wait_for

OTHER_ID = "66666666-6666-4666-8666-666666666666"


CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def test_a_port_in_use_fails_only_its_workflow(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        documents.write(workflows / "a-taken.json", documents.workflow(Port=taken))
        free = documents.workflow(Port=0, AcceptedCallingAETs="*")
        free["WorkflowId"] = free["WorkflowPattern"][0]["Id"] = OTHER_ID
        documents.write(workflows / "b-free.json", free)
        runtime = RuntimeProcess(workflows, tmp_path / "data")
        try:
            assert send_files(runtime.ports[OTHER_ID], [sample_file("CT_small.dcm")]) == [0]
        finally:
            assert runtime.terminate() == 0
    log = runtime.log.read_text()
    assert (
        f"cannot listen on 127.0.0.1:{taken}: the port is already in use by another program" in log
    )
    assert "listening" in log


def test_sigterm_stops_cleanly_and_a_public_cleartext_listener_is_refused(
    tmp_path: Path,
) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    runtime = RuntimeProcess(workflows, tmp_path / "data", "--host", "0.0.0.0")
    assert runtime.refresh() == []  # listening on nothing yet, waiting for files
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    [row] = runtime.refresh(bool)
    assert row["state"] == "refused" and "--allow-cleartext" in row["detail"]
    assert runtime.terminate() == 0
    log = runtime.log_text()
    assert "cleartext on 0.0.0.0" in log and "refused" in log
    assert "nothing listens yet (watching for files)" in log
    assert "stopping" in log


def test_sigterm_taken_by_a_thread_other_than_the_main_one_still_stops_it(
    tmp_path: Path,
) -> None:
    """The kernel hands a process's signal to any thread that does not block it (the main
    thread first, unless it already has one pending): the main thread must see it anyway."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    runtime = RuntimeProcess(workflows, tmp_path / "data")
    pid = runtime.process.pid
    tasks = Path(f"/proc/{pid}/task")

    def watcher_thread() -> int | None:
        """The file watcher's inotify thread, once the main thread sleeps: by then the main
        thread has started the watcher and is in its wait for a signal."""
        state = (tasks / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        for task in tasks.iterdir():
            with suppress(FileNotFoundError):  # a thread that has just ended
                if "notify" in (task / "comm").read_text() and state == "S":
                    return int(task.name)
        return None

    watcher = wait_for(watcher_thread, "the main thread waiting for a signal")
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.tgkill(pid, watcher, signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
    assert runtime.exit_status() == 0
    assert "stopping" in runtime.log_text()


def test_sigusr1_prints_where_every_thread_is_and_the_runtime_keeps_running(
    tmp_path: Path,
) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    runtime = RuntimeProcess(workflows, tmp_path / "data")
    runtime.process.send_signal(signal.SIGUSR1)
    log = wait_for(
        lambda: text if "soupflow/runtime/pacing.py" in (text := runtime.log_text()) else None,
        "the threads' stacks in the log",
    )
    assert "most recent call first" in log
    assert send_files(runtime.port, [sample_file("CT_small.dcm")]) == [0]
    assert runtime.terminate() == 0


def test_control_characters_from_the_network_never_reach_the_terminal_raw(
    tmp_path: Path,
) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0))  # MODALITY01 only
    runtime = RuntimeProcess(workflows, tmp_path / "data", "--workers", "0")
    request = bytearray(associate_request("X", "SOUPFLOW", [(1, CT, EXPLICIT)]))
    request[26:42] = b"EVIL\x1b[2J\x1b]0;\x07\x9b".ljust(16, b" ")  # calling AE, PS3.8 9.3.2
    with socket.create_connection(("127.0.0.1", runtime.port), timeout=30) as peer:
        peer.sendall(bytes(request))
        assert read_pdu(peer)[0] in (0x03, 0x07)  # A-ASSOCIATE-RJ, or A-ABORT: not a valid AE
    assert runtime.terminate() == 0
    log = runtime.log.read_bytes()
    assert b"association from 127.0.0.1" in log
    assert not [byte for byte in log if byte < 0x20 and byte not in b"\n"]  # no ESC, no BEL


def test_printable_escapes_control_characters() -> None:
    assert printable("a\x1b[2Jb\nc\x9bd") == "a\\x1b[2Jb\\x0ac\\x9bd"
    assert printable("Müller ^ 王") == "Müller ^ 王"


def test_json_logs_are_one_object_per_line_without_phi(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    runtime = RuntimeProcess(workflows, tmp_path / "data", "--log-format", "json")
    assert send_files(runtime.port, [sample_file("CT_small.dcm")]) == [0]
    assert runtime.terminate() == 0
    lines = runtime.log.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line parses
    assert {"time", "level", "logger", "event"} <= set(events[0])
    [listener] = [e for e in events if "listener" in e]
    assert listener["listener"]["state"] == "listening"
    [stored] = [e for e in events if e["event"].startswith("stored SOPInstanceUID")]
    assert stored["status"] == "0x0000" and stored["calling_aet"] == "MODALITY01"
    assert stored["workflow"] and stored["request_id"] and stored["sop_instance_uid"]
    [accepted] = [e for e in events if e.get("result") == "accepted"]
    assert accepted["peer"].startswith("127.0.0.1:")
    assert "CompressedSamples" not in runtime.log.read_text()


def test_quiet_stores_leaves_out_the_per_instance_lines(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    runtime = RuntimeProcess(workflows, tmp_path / "data", "--quiet-stores")
    assert send_files(runtime.port, [sample_file("CT_small.dcm")]) == [0]
    assert runtime.terminate() == 0
    log = runtime.log_text()
    assert "accepted association" in log and "stored SOPInstanceUID" not in log
