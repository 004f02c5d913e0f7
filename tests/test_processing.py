"""Processing with real peers: `soupflow run`, dcmtk's storescu, a loopback HTTP server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from soupflow.store.queue import FINAL_STATES, Message, State
from soupflow.store.sqlite import SqliteQueue
from tests import documents
from tests.dicom import NODELAY, RuntimeProcess, require_tool, sample_file, send_files, wait_for
from tests.documents import (
    RECEIVER_ID,
    VARIABLES_ID,
    action,
    file_writer,
    filter_host,
    filter_item,
    http_sender,
    transformer,
)
from tests.http_peer import HttpPeer

CT_ONLY, SR_ONLY = "aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"
MESSAGE_SCHEMA = json.loads(
    (documents.REPO / "schemas" / "dicom-message.schema.json").read_text(encoding="utf-8")
)


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    server = HttpPeer()
    yield server
    server.close()


def start(tmp_path: Path, document: dict[str, Any]) -> tuple[RuntimeProcess, Path]:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir(exist_ok=True)
    documents.write(workflows / "workflow.json", document)
    return RuntimeProcess(workflows, data), data


def final_messages(data: Path, count: int) -> list[Message]:
    queue = SqliteQueue(data)
    try:
        return wait_for(
            lambda: (
                m
                if len(m := queue.messages()) == count and all(x.state in FINAL_STATES for x in m)
                else None
            ),
            f"{count} messages to finish",
        )
    finally:
        queue.close()


def routing_workflow(url: str) -> dict[str, Any]:
    modality = action(
        "CreateVariable",
        VariableName="Modality",
        FromPath="CommonFields/Modality",
        FromSetting=RECEIVER_ID,
    )
    study = action(
        "CreateVariable",
        VariableName="StudyUID",
        FromPath="CommonFields/StudyInstanceUID",
        FromSetting=RECEIVER_ID,
    )
    return documents.workflow(
        file_writer(
            FilePathToWrite="out/${Modality}/${StudyUID}/${SOPInstanceUID}.dcm", Filters=CT_ONLY
        ),
        http_sender(
            Server=url,
            ContentType="application/json",
            MessageType=11,
            MessageTemplate=f"${{{RECEIVER_ID} inbound}}",
            Filters=SR_ONLY,
        ),
        filter_host(
            CT_ONLY, filter_item("StringMessageFilter", Path="CommonFields/Modality", Value="CT")
        ),
        filter_host(
            SR_ONLY, filter_item("StringMessageFilter", Path="CommonFields/Modality", Value="SR")
        ),
        transformer(VARIABLES_ID, modality, study),
        Port=0,
        AcceptedCallingAETs="*",
        VariableTransformers=VARIABLES_ID,
    )


def test_a_mixed_study_lands_exactly_where_its_filters_say(tmp_path: Path, peer: HttpPeer) -> None:
    storescu = require_tool("storescu")
    runtime, data = start(tmp_path, routing_workflow(peer.url))
    try:
        files = [sample_file(name) for name in ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm")]
        subprocess.run(
            [storescu, "127.0.0.1", str(runtime.port), *map(str, files)],
            env=NODELAY,
            timeout=60,
            check=True,
            capture_output=True,
        )
        messages = final_messages(data, 3)
    finally:
        assert runtime.terminate() == 0
    assert {m.state for m in messages} == {State.COMPLETED}
    written = [p.relative_to(data / "out") for p in (data / "out").rglob("*.dcm")]
    assert written == [
        Path(
            "CT/1.3.6.1.4.1.5962.1.2.1.20040119072730.12322/1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322.dcm"
        )
    ]
    [request] = peer.requests
    posted = json.loads(request.body)
    jsonschema.validate(posted, MESSAGE_SCHEMA)
    assert posted["CommonFields"]["Modality"] == "SR"
    assert posted["Report"]["Title"] == "Diagnosis"
    [sr] = [m for m in messages if m.arrival.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.33"]
    assert (
        request.headers["X-Soupflow-Request-Id"]
        == sr.request_id
        == posted["Association"]["RequestId"]
    )
    assert not list((data / "objects").rglob("*.dcm")), (
        "completed objects are removed from the spool"
    )


def retry_workflow(url: str) -> dict[str, Any]:
    return documents.workflow(
        file_writer(
            FilePathToWrite="out/log.txt", MessageType=13, MessageTemplate="${SOPInstanceUID}"
        ),
        http_sender(Server=url, MessageTemplate="ping", RetryInitialSeconds=0, RetryMaxAttempts=5),
        Port=0,
        AcceptedCallingAETs="*",
    )


def run_against(tmp_path: Path, statuses: list[int]) -> tuple[Message, HttpPeer, Path]:
    """One CT instance through `retry_workflow`, the HTTP peer answering `statuses` first."""
    peer = HttpPeer(statuses=statuses)
    runtime, data = start(tmp_path, retry_workflow(peer.url))
    try:
        assert send_files(runtime.port, [sample_file("CT_small.dcm")]) == [0]
        [message] = final_messages(data, 1)
    finally:
        runtime.terminate()
        peer.close()
    return message, peer, data


def test_a_503_is_retried_and_an_activity_that_succeeded_never_runs_again(tmp_path: Path) -> None:
    message, peer, data = run_against(tmp_path, [503, 503])
    assert (message.state, message.attempts) == (State.COMPLETED, 3)
    assert (data / "out" / "log.txt").read_text().splitlines() == [
        "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    ]
    assert len(peer.requests) == 3
    assert {r.headers["X-Soupflow-Request-Id"] for r in peer.requests} == {message.request_id}


def test_a_400_is_dead_at_once_with_the_status_in_the_reason(tmp_path: Path) -> None:
    message, peer, _ = run_against(tmp_path, [400])
    assert (message.state, message.attempts, message.failed_activity) == (
        State.DEAD,
        1,
        documents.HTTP_ID,
    )
    assert message.reason is not None and "HTTP 400 Bad Request" in message.reason
    assert len(peer.requests) == 1


def test_a_worker_killed_mid_activity_completes_the_message_after_restart(tmp_path: Path) -> None:
    peer = HttpPeer(hold_first=True)
    runtime, data = start(tmp_path, retry_workflow(peer.url))
    try:
        assert send_files(runtime.port, [sample_file("CT_small.dcm")]) == [0]
        assert peer.got_request.wait(30)
        runtime.kill()
        peer.release()
        again = RuntimeProcess(tmp_path / "workflows", data)
        try:
            [message] = final_messages(data, 1)
        finally:
            again.terminate()
    finally:
        peer.close()
    assert message.state == State.COMPLETED
    assert len(peer.requests) == 2
    assert (data / "out" / "log.txt").read_text().count("\n") == 1, "the file writer ran once"
