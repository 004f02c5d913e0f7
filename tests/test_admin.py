"""The runtime operators live with, on a real running process: hot loading, refusals,
SIGTERM, status and dead messages, and logs without PHI."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from bench.ingest import free_port
from soupflow.store.queue import FINAL_STATES, State
from soupflow.store.sqlite import SqliteQueue
from tests import documents
from tests.dicom import (
    DEADLINE_SECONDS,
    CutSender,
    RuntimeProcess,
    associate,
    require_tool,
    sample_file,
    send_files,
    soupflow,
    wait_for,
)
from tests.documents import RECEIVER_ID, VARIABLES_ID, action, file_writer, http_sender, transformer
from tests.http_peer import HttpPeer
from tests.test_durability import many_instances

OTHER_ID = "88888888-8888-4888-8888-888888888888"
CT = sample_file("CT_small.dcm")


def place(folder: Path, name: str, document: dict[str, Any]) -> Path:
    """Write as an operator should: a hidden temporary name, then a rename."""
    temporary = folder / f".{name}.tmp"
    documents.write(temporary, document)
    target = folder / name
    os.replace(temporary, target)
    return target


def listening(rows: list[dict[str, Any]]) -> bool:
    return any(row["state"] == "listening" for row in rows)


def test_hot_loading_never_drops_a_good_workflow(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    runtime = RuntimeProcess(workflows, data)
    peer = HttpPeer(hold_first=True)
    try:
        assert runtime.refresh() == []
        first = documents.workflow(
            file_writer(FilePathToWrite="out/a/${SOPInstanceUID}.dcm"),
            Port=0,
            AcceptedCallingAETs="MODALITY01",
        )
        path = place(workflows, "intake.json", first)
        runtime.refresh(listening)
        port = runtime.port
        assert send_files(port, [CT]) == [0]
        wait_for(lambda: list((data / "out" / "a").glob("*.dcm")), "the first version's file")

        # a new allow-list applies to the next association; the open one goes on
        open_one = associate(port, "MODALITY01")
        assert open_one.is_established
        place(
            workflows,
            "intake.json",
            {
                **first,
                "WorkflowPattern": [
                    documents.receiver(
                        Port=0, AcceptedCallingAETs="CT2", Activities=[documents.FILE_WRITER_ID]
                    ),
                    first["WorkflowPattern"][1],
                ],
            },
        )
        wait_for(lambda: associate(port, "MODALITY01").is_rejected, "the new allow-list")
        assert open_one.send_c_echo().Status == 0
        open_one.release()

        # a changed activity: same listener (same port), the next message follows it
        changed = documents.workflow(
            file_writer(FilePathToWrite="out/b/${SOPInstanceUID}.dcm"),
            Port=0,
            AcceptedCallingAETs="MODALITY01",
        )
        place(workflows, "intake.json", changed)
        wait_for(
            lambda: runtime.log_text().count("replaced: the new version applies") >= 2,
            "the second replacement",
        )
        assert runtime.refresh(listening)[0]["port"] == port
        assert send_files(port, [CT]) == [0]
        wait_for(lambda: list((data / "out" / "b").glob("*.dcm")), "the new pipeline's file")

        # a broken file: the error with its line and column, the old version keeps accepting
        path.write_text('{\n  "Name": "intake",\n  "WorkflowPattern": [\n', encoding="utf-8")
        wait_for(
            lambda: f"{path}:4:1: /: error: not valid JSON" in runtime.log_text(), "the JSON error"
        )
        assert send_files(port, [CT]) == [0]

        # deleted: the port closes; a message already queued still completes with the last version
        slow = documents.workflow(
            http_sender(Server=peer.url), Port=0, AcceptedCallingAETs="MODALITY01"
        )
        place(workflows, "intake.json", slow)
        wait_for(
            lambda: runtime.log_text().count("replaced: the new version applies") >= 3,
            "the slow version",
        )
        assert send_files(port, [CT]) == [0]
        assert peer.got_request.wait(DEADLINE_SECONDS)
        path.unlink()
        wait_for(lambda: runtime.refresh() == [], "the workflow to stop")
        with pytest.raises(OSError):
            __import__("socket").create_connection(("127.0.0.1", port), timeout=5).close()
        peer.release()
        queue = SqliteQueue(data)
        try:
            wait_for(
                lambda: all(m.state == State.COMPLETED for m in queue.messages()),
                "every message to complete",
            )
        finally:
            queue.close()
    finally:
        peer.close()
        assert runtime.terminate() == 0


def test_a_second_file_on_a_running_port_is_refused_naming_the_first(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    port = free_port()
    place(workflows, "a.json", documents.workflow(Port=port, AcceptedCallingAETs="*"))
    runtime = RuntimeProcess(workflows, data)
    try:
        second = documents.workflow(Port=port)
        second["WorkflowId"] = second["WorkflowPattern"][0]["Id"] = OTHER_ID
        place(workflows, "b.json", second)
        wait_for(lambda: "refused" in runtime.log_text(), "the refusal")
        assert (
            f"workflow file {workflows / 'b.json'} refused: port {port} is already used by {workflows / 'a.json'}"
            in runtime.log_text()
        )
        assert send_files(port, [CT], calling_aet="ANYONE") == [0]
    finally:
        assert runtime.terminate() == 0


def test_a_privileged_port_is_a_clear_error_for_its_workflow_only(tmp_path: Path) -> None:
    setpriv = require_tool(
        "setpriv"
    )  # util-linux: runs the runtime without the right to bind ports < 1024
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    place(workflows, "a-privileged.json", documents.workflow(Port=80))
    other = documents.workflow(Port=0, AcceptedCallingAETs="*")
    other["WorkflowId"] = other["WorkflowPattern"][0]["Id"] = OTHER_ID
    place(workflows, "b-fine.json", other)
    drop = (
        setpriv,
        "--inh-caps=-net_bind_service",
        "--ambient-caps=-net_bind_service",
        "--bounding-set=-net_bind_service",
    )
    runtime = RuntimeProcess(workflows, data, launcher=drop)
    try:
        rows = {row["workflow_id"]: row for row in runtime.refresh(listening)}
        assert rows[RECEIVER_ID]["state"] == "failed"
        assert (
            "cannot listen on 127.0.0.1:80: ports below 1024 need root or CAP_NET_BIND_SERVICE"
            in rows[RECEIVER_ID]["detail"]
        )
        assert send_files(runtime.ports[OTHER_ID], [CT]) == [0]
    finally:
        assert runtime.terminate() == 0


def test_sigterm_during_a_transfer_exits_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    place(
        workflows,
        "intake.json",
        documents.workflow(
            file_writer(FilePathToWrite="out/${SOPInstanceUID}.dcm"),
            Port=0,
            AcceptedCallingAETs="*",
        ),
    )
    runtime = RuntimeProcess(workflows, data)
    files = many_instances(tmp_path / "send", 200)
    sender = CutSender(runtime.port, files)
    wait_for(lambda: len(sender.acknowledged) >= 50, "50 acknowledged stores")
    runtime.process.send_signal(signal.SIGTERM)
    assert runtime.process.wait(timeout=10) == 0
    sender.join()
    acknowledged = sender.acknowledged
    again = RuntimeProcess(workflows, data)
    try:
        wait_for(
            lambda: {p.stem for p in (data / "out").glob("*.dcm")} >= set(acknowledged),
            "every acknowledged instance to be written",
        )
    finally:
        assert again.terminate() == 0


def test_status_and_dead_messages_report_what_happened(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    peer = HttpPeer(statuses=[400])
    place(
        workflows,
        "hook.json",
        documents.workflow(
            http_sender(Server=peer.url, Name="Webhook"), Port=0, AcceptedCallingAETs="*"
        ),
    )
    runtime = RuntimeProcess(workflows, data)
    try:
        assert send_files(runtime.port, [CT, sample_file("MR_small.dcm")]) == [0, 0]
        queue = SqliteQueue(data)
        wait_for(
            lambda: len(m := queue.messages()) == 2 and all(x.state in FINAL_STATES for x in m),
            "both messages to finish",
        )
        [dead] = queue.messages(State.DEAD)
        queue.close()
        status = soupflow("status", "--json", "--data", str(data))
        assert status.returncode == 0, status.stderr
        [row] = json.loads(status.stdout)
        assert (row["workflow_id"], row["state"], row["port"]) == (
            RECEIVER_ID,
            "listening",
            runtime.port,
        )
        assert row["counts"] == {
            "queued": 0,
            "processing": 0,
            "completed": 1,
            "filtered": 0,
            "dead": 1,
            "duplicates": 0,
        }
        listed = soupflow("dead", "list", "--data", str(data), "--workflows", str(workflows))
        assert (
            dead.request_id in listed.stdout
            and 'HttpSenderSetting "Webhook"' in listed.stdout
            and "HTTP 400 Bad Request" in listed.stdout
        )
        shown = soupflow(
            "dead", "show", dead.request_id, "--data", str(data), "--workflows", str(workflows)
        )
        assert (
            f"SOPInstanceUID: {dead.arrival.sop_instance_uid}" in shown.stdout
            and "attempts: 1" in shown.stdout
        )
        assert (
            soupflow("dead", "purge", "--all", "--data", str(data)).returncode == 2
        )  # no --yes, no terminal: refused
        retried = soupflow("dead", "retry", dead.request_id, "--data", str(data))
        assert "1 dead message(s) queued again" in retried.stdout
        queue = SqliteQueue(data)
        wait_for(
            lambda: queue.get(dead.request_id).state == State.COMPLETED,
            "the retried message to complete",
        )  # type: ignore[union-attr]
        queue.close()
        assert len(peer.requests) == 3  # CT (400), MR (200), CT again (200)
    finally:
        peer.close()
        assert runtime.terminate() == 0
    assert (
        "0 dead message(s) purged"
        in soupflow("dead", "purge", "--all", "--yes", "--data", str(data)).stdout
    )


def test_a_full_run_logs_no_phi(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    peer = HttpPeer(statuses=[503, 400])
    name = action(
        "CreateVariable",
        VariableName="Name",
        FromPath="CommonFields/PatientName",
        FromSetting=RECEIVER_ID,
    )
    unsafe = documents.workflow(
        file_writer(
            FilePathToWrite="out/${Name}/../../../x.txt", MessageType=13, MessageTemplate="${Name}"
        ),
        transformer(VARIABLES_ID, name),
        Port=0,
        AcceptedCallingAETs="*",
        VariableTransformers=VARIABLES_ID,
    )
    hook = documents.workflow(
        http_sender(
            Server=peer.url + "?patient=${Patient}",
            RetryInitialSeconds=0,
            MessageTemplate=f"${{{OTHER_ID} inbound}}",
        ),
        file_writer(FilePathToWrite="out/${SOPInstanceUID}.dcm"),
        Port=0,
        AcceptedCallingAETs="*",
    )
    hook["WorkflowId"] = hook["WorkflowPattern"][0]["Id"] = OTHER_ID
    hook["WorkflowPattern"][0]["Activities"] = [documents.HTTP_ID, documents.FILE_WRITER_ID]
    hook["WorkflowPattern"][0]["VariableTransformers"] = (
        VARIABLES_ID  # a patient id in the URL's query
    )
    hook["WorkflowPattern"].append(
        transformer(
            VARIABLES_ID,
            action(
                "CreateVariable",
                VariableName="Patient",
                FromPath="CommonFields/PatientID",
                FromSetting=OTHER_ID,
            ),
        )
    )
    place(workflows, "unsafe.json", unsafe)
    place(workflows, "hook.json", hook)
    files = [sample_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm")]
    runtime = RuntimeProcess(workflows, data)
    try:
        for port in runtime.ports.values():
            assert send_files(port, files, calling_aet="MODALITY01") == [0, 0, 0]
        queue = SqliteQueue(data)
        wait_for(
            lambda: len(m := queue.messages()) == 6 and all(x.state in FINAL_STATES for x in m),
            "every message to finish",
        )
        queue.close()
        associate(runtime.port, "MODALITY01").release()
    finally:
        peer.close()
        assert runtime.terminate() == 0
    log = runtime.log_text()
    assert "dead" in log and "completed" in log and "retry" in log
    phi = set()
    for path in files:
        dataset = dcmread(path, stop_before_pixels=True)
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "OtherPatientIDs",
        ):
            value = str(dataset.get(keyword, "") or "")
            if len(value) >= 4:
                phi.update({value, value.replace("^", " ")})
    assert phi, "the test data has PHI to look for"
    assert [value for value in phi if value in log] == []


def test_status_shows_the_backlog_and_its_age(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    place(workflows, "intake.json", documents.workflow(Port=0, AcceptedCallingAETs="*"))
    runtime = RuntimeProcess(workflows, data, "--workers", "0")
    try:
        assert send_files(runtime.port, [CT, CT]) == [0, 0]
        status = soupflow("status", "--json", "--data", str(data))
        [row] = json.loads(status.stdout)
        assert row["counts"]["queued"] == 2
        assert 0 <= row["oldest_pending_seconds"] < DEADLINE_SECONDS
        table = soupflow("status", "--data", str(data)).stdout
        assert "Intake" in table and "listening" in table
    finally:
        assert runtime.terminate() == 0
    stopped = soupflow("status", "--json", "--data", str(data), "--workflows", str(workflows))
    [row] = json.loads(stopped.stdout)
    assert (row["state"], row["workflow"], row["counts"]["queued"]) == ("not running", "Intake", 2)
    missing = soupflow("status", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no queue in" in missing.stderr


def test_status_after_a_crash_does_not_show_the_dead_runtime_as_listening(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    place(workflows, "intake.json", documents.workflow(Port=0, AcceptedCallingAETs="*"))
    runtime = RuntimeProcess(workflows, data, "--workers", "0")
    assert send_files(runtime.port, [CT]) == [0]
    running = json.loads(soupflow("status", "--json", "--data", str(data)).stdout)
    assert [row["state"] for row in running] == ["listening"]
    runtime.kill()  # kill -9: listeners.json stays behind
    assert (data / "listeners.json").exists()
    [row] = json.loads(soupflow("status", "--json", "--data", str(data)).stdout)
    assert (row["state"], row["counts"]["queued"]) == ("not running", 1)
