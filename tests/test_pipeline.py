"""One message through a workflow, in process: variables, mappings, loops, files, path safety."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from pydicom import dcmread

from soupflow.activities.connections import Connections
from soupflow.message.convert import Options, convert
from soupflow.pipeline.context import RunContext
from soupflow.pipeline.errors import PermanentError
from soupflow.pipeline.run import Result, run_message
from soupflow.runtime.workers import backoff_seconds
from soupflow.store.queue import Arrival
from soupflow.workflow.load import load_text
from tests import documents, records
from tests.dicom import sample_file
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

WRITER_2 = "77777777-7777-4777-8777-777777777777"


def arrival(path: Path) -> Arrival:
    dataset = dcmread(path, stop_before_pixels=True)
    return records.arrival(
        request_id="0f0e0d0c-0b0a-4909-8807-060504030201",
        workflow_id=RECEIVER_ID,
        object_path="x",
        byte_count=path.stat().st_size,
        sop_class_uid=str(dataset.SOPClassUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        peer_port=40000,
        received_at=1_790_000_000.0,
    )


def run(
    document: dict[str, Any],
    data: Path,
    sample: Path | None = None,
    done: frozenset[str] = frozenset(),
    connections: Connections | None = None,
) -> tuple[Result, list[str]]:
    loaded = load_text(json.dumps(document), Path("w.json"))
    assert loaded.valid, [str(issue) for issue in loaded.issues]
    path = sample or sample_file("CT_small.dcm")
    facts = arrival(path)
    context = RunContext(loaded, convert(path, facts, Options()), facts, path, data)
    recorded: list[str] = []
    with httpx.Client() as client:
        result = run_message(
            context,
            done,
            lambda activity, _: recorded.append(activity),
            client,
            connections or Connections(),
        )
    if result.unrecorded is not None:  # the caller writes the last success with the end
        recorded.append(result.unrecorded[0])
    return result, recorded


def variables(*actions: dict[str, Any]) -> dict[str, Any]:
    return transformer(VARIABLES_ID, *actions)


def from_message(name: str, path: str, **fields: Any) -> dict[str, Any]:
    return action(
        "CreateVariable", VariableName=name, FromPath=path, FromSetting=RECEIVER_ID, **fields
    )


def test_variables_from_the_message_name_files_and_fill_records(tmp_path: Path) -> None:
    writer = file_writer(
        FilePathToWrite="out/${Modality}/${Study}.csv",
        MessageType=5,
        MessageTemplate="${Modality},${Patient},${SOPInstanceUID}",
    )
    document = documents.workflow(
        writer,
        variables(
            from_message("Modality", "CommonFields/Modality", TextFormat="LowerCase"),
            from_message("Patient", "jmespath:CommonFields.PatientName"),
            from_message("Study", "CommonFields/StudyDate", Format="yyyy-MM-dd"),
        ),
        VariableTransformers=VARIABLES_ID,
    )
    result, recorded = run(document, tmp_path)
    assert (result.state, recorded) == ("completed", [documents.FILE_WRITER_ID])
    written = tmp_path / "out" / "ct" / "2004-01-19.csv"
    assert (
        written.read_text()
        == "ct,CompressedSamples^CT1,1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322\n"
    )


def test_dicom_file_writer_writes_the_received_object(tmp_path: Path) -> None:
    result, _ = run(
        documents.workflow(file_writer(FilePathToWrite="objects/${SOPInstanceUID}.dcm")), tmp_path
    )
    assert result.state == "completed"
    [written] = (tmp_path / "objects").iterdir()
    assert written.read_bytes() == sample_file("CT_small.dcm").read_bytes()


def test_records_append_and_a_full_file_moves_on(tmp_path: Path) -> None:
    writer = file_writer(
        FilePathToWrite="out/log.txt",
        MessageType=13,
        MessageTemplate="${Count}",
        MoveIntoDirectoryOnComplete=True,
        DirectoryToMoveInto="out/done",
        MaxRecordsPerFile=2,
    )
    for count in range(3):
        document = documents.workflow(
            writer,
            variables(
                action(
                    "CreateVariable",
                    VariableName="Count",
                    FromPath=str(count),
                    FromDirection=2,
                    FromType=7,
                )
            ),
            VariableTransformers=VARIABLES_ID,
        )
        assert run(document, tmp_path)[0].state == "completed"
    [full] = (tmp_path / "out" / "done").iterdir()
    assert full.read_text() == "0\n1\n"
    assert (tmp_path / "out" / "log.txt").read_text() == "2\n"
    # Output folders hold only what the workflow writes: the count is kept in the data folder.
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["done", "log.txt"]
    assert (tmp_path / "file-writer" / "records").is_dir()


def test_a_record_is_appended_in_place_and_never_shortens_the_file(tmp_path: Path) -> None:
    log = tmp_path / "out" / "log.txt"
    log.parent.mkdir()
    log.write_bytes(b"made by hand, no newline at the end")  # or a record torn by a crash
    inode = log.stat().st_ino
    writer = file_writer(FilePathToWrite="out/log.txt", MessageType=13, MessageTemplate="rec")
    for _ in range(2):
        assert run(documents.workflow(writer), tmp_path)[0].state == "completed"
    assert log.read_text() == "made by hand, no newline at the end\nrec\nrec\n"
    assert log.stat().st_ino == inode  # appended, not the whole file written again
    assert [p.name for p in log.parent.iterdir()] == ["log.txt"]  # no temporary file left


def test_the_writers_locks_stay_bounded_however_many_files_it_writes(tmp_path: Path) -> None:
    for number in range(100):
        writer = file_writer(FilePathToWrite=f"out/{number}.txt", MessageType=13)
        assert run(documents.workflow(writer), tmp_path)[0].state == "completed"
    assert len(list((tmp_path / "out").iterdir())) == 100
    locks = list((tmp_path / "file-writer" / "locks").iterdir())
    assert 0 < len(locks) <= 64


def test_for_each_over_the_report_builds_hl7_with_mappings_and_appended_lines(
    tmp_path: Path,
) -> None:
    writer = file_writer(
        FilePathToWrite="out/report.hl7",
        MessageType=1,
        MessageTemplate="MSH|^~\\&|SOUPFLOW|||||ORU^R01|${RequestId}|P|2.5.1\rPID|1\r",
        Transformers=VARIABLES_ID,
    )
    mapping = action(
        "CreateMapping",
        FromPath="CommonFields/PatientName",
        FromSetting=RECEIVER_ID,
        ToPath="PID-5",
        ToType=8,
    )
    loop = [
        action("ForEach", FromPath="Report/Items", FromSetting=RECEIVER_ID),
        from_message("ItemName", "Report/Items[1]/Name"),
        action(
            "AppendLine",
            FromPath="OBX|${ForEachIterator}|TX|${ItemName}",
            FromDirection=2,
            FromType=7,
        ),
        action("Next"),
    ]
    document = documents.workflow(writer, variables(mapping, *loop))
    result, _ = run(document, tmp_path, sample_file("test-SR.dcm"))
    assert result.state == "completed"
    segments = (tmp_path / "out" / "report.hl7").read_bytes().decode().strip().split("\r")
    report = dcmread(sample_file("test-SR.dcm"))
    names = [
        item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        for item in report.ContentSequence
    ]
    assert segments[1] == "PID|1||||Test^S R"
    assert segments[2:] == [f"OBX|{n}|TX|{name}" for n, name in enumerate(names, start=1)]


def test_mappings_into_a_json_message(tmp_path: Path) -> None:
    writer = file_writer(
        FilePathToWrite="out/x.json",
        MessageType=11,
        MessageTemplate='{"source": "soupflow"}',
        Transformers=VARIABLES_ID,
    )
    document = documents.workflow(
        writer,
        variables(
            action(
                "CreateMapping",
                FromPath="CommonFields/Modality",
                FromSetting=RECEIVER_ID,
                ToPath="study/modalities[2]",
                ToType=12,
            )
        ),
    )
    assert run(document, tmp_path)[0].state == "completed"
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {
        "source": "soupflow",
        "study": {"modalities": [{}, "CT"]},
    }


def test_conditional_blocks_follow_their_filters(tmp_path: Path) -> None:
    writer = file_writer(FilePathToWrite="out/x.txt", MessageType=13, MessageTemplate="[${Kind}]")
    conditional = [
        action(
            "BeginConditional",
            Filters=[filter_item("StringMessageFilter", Path="CommonFields/Modality", Value="MR")],
        ),
        action(
            "CreateVariable", VariableName="Kind", FromPath="magnetic", FromDirection=2, FromType=7
        ),
        action("EndConditional"),
    ]
    document = documents.workflow(
        writer, variables(*conditional), VariableTransformers=VARIABLES_ID
    )
    assert run(document, tmp_path)[0].state == "completed"
    assert (tmp_path / "out" / "x.txt").read_text() == "[]\n"


def test_a_false_receiver_filter_is_filtered_and_an_activity_filter_skips_only_it(
    tmp_path: Path,
) -> None:
    only_mr = filter_host(
        documents.FILTER_ID,
        filter_item("StringMessageFilter", Path="CommonFields/Modality", Value="MR"),
    )
    assert (
        run(documents.workflow(file_writer(), only_mr, Filters=documents.FILTER_ID), tmp_path)[
            0
        ].state
        == "filtered"
    )
    skipped = file_writer(Filters=documents.FILTER_ID)
    kept = file_writer(WRITER_2, Name="Kept", FilePathToWrite="kept/${SOPInstanceUID}.dcm")
    result, recorded = run(documents.workflow(skipped, kept, only_mr), tmp_path)
    assert (result.state, recorded) == ("completed", [WRITER_2])


def test_a_retry_skips_activities_that_succeeded_but_keeps_their_variables(tmp_path: Path) -> None:
    sets = transformer(
        VARIABLES_ID,
        action(
            "CreateVariable", VariableName="Tag", FromPath="from-first", FromDirection=2, FromType=7
        ),
    )
    first = file_writer(FilePathToWrite="first/${SOPInstanceUID}.dcm", Transformers=VARIABLES_ID)
    second = file_writer(
        WRITER_2,
        Name="Second",
        FilePathToWrite="second/${Tag}.txt",
        MessageType=13,
        MessageTemplate="x",
    )
    result, recorded = run(
        documents.workflow(first, second, sets),
        tmp_path,
        done=frozenset({documents.FILE_WRITER_ID}),
    )
    assert (result.state, recorded) == ("completed", [WRITER_2])
    assert not (tmp_path / "first").exists()
    assert (tmp_path / "second" / "from-first.txt").exists()


def named(folder: Path, patient_name: str) -> Path:
    dataset = dcmread(sample_file("CT_small.dcm"))
    dataset.PatientName = patient_name
    path = folder / "named.dcm"
    dataset.save_as(path)
    return path


@pytest.mark.parametrize(
    ("template", "patient_name"),
    [("out/${Name}.txt", "../../etc/x"), ("${Name}.txt", "/etc/soupflow-x"), ("out/${Name}", "..")],
)
def test_a_variable_cannot_lead_a_write_out_of_its_folder(
    tmp_path: Path, template: str, patient_name: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    writer = file_writer(FilePathToWrite=template, MessageType=13, MessageTemplate="x")
    document = documents.workflow(
        writer,
        variables(from_message("Name", "CommonFields/PatientName")),
        VariableTransformers=VARIABLES_ID,
    )
    result, recorded = run(document, data, named(tmp_path, patient_name))
    assert result.state == "failed"
    assert isinstance(result.error, PermanentError)
    assert "resolves outside its folder" in str(result.error)
    assert patient_name not in str(result.error)
    assert recorded == []
    assert not Path("/etc/soupflow-x.txt").exists()
    assert [p for p in tmp_path.rglob("*.txt")] == []


def test_a_template_that_does_not_parse_is_a_permanent_failure(tmp_path: Path) -> None:
    loaded_ok = documents.workflow(
        file_writer(FilePathToWrite="out/${SOPInstanceUID}.dcm", MessageTemplate="${broken")
    )
    loaded = load_text(json.dumps(loaded_ok), Path("w.json"))
    assert not loaded.valid  # validation already says so; the runtime refuses it the same way


def test_http_basic_and_oauth2_client_credentials(tmp_path: Path) -> None:
    peer = HttpPeer(bodies={"/token": b'{"access_token": "abc123", "expires_in": 3600}'})
    try:
        basic = http_sender(
            Server=peer.url,
            AuthenticationMode=1,
            UserName="router",
            Password="${env:SOUPFLOW_TEST_PASSWORD}",
            Headers=[{"Name": "X-Modality", "Value": "${Modality}"}],
        )
        oauth = http_sender(
            WRITER_2,
            Name="OAuth",
            Server=peer.url,
            AuthenticationMode=2,
            UserName="client-1",
            Password="secret",
            TokenUrl=peer.url.replace("/hook", "/token"),
            Scope="dicom",
        )
        os.environ["SOUPFLOW_TEST_PASSWORD"] = "s3cret"
        document = documents.workflow(
            basic,
            oauth,
            variables(from_message("Modality", "CommonFields/Modality")),
            VariableTransformers=VARIABLES_ID,
        )
        assert run(document, tmp_path)[0].state == "completed"
    finally:
        os.environ.pop("SOUPFLOW_TEST_PASSWORD", None)
        peer.close()
    first, token, second = peer.requests
    assert first.headers["Authorization"] == "Basic " + base64.b64encode(b"router:s3cret").decode()
    assert first.headers["X-Modality"] == "CT"
    assert parse_qs(token.body.decode()) == {
        "grant_type": ["client_credentials"],
        "client_id": ["client-1"],
        "client_secret": ["secret"],
        "scope": ["dicom"],
    }
    assert second.headers["Authorization"] == "Bearer abc123"
    assert {r.headers["X-Soupflow-Request-Id"] for r in (first, second)} == {
        "0f0e0d0c-0b0a-4909-8807-060504030201"
    }


@pytest.mark.parametrize(
    ("attempt", "low", "high"), [(1, 1.0, 2.0), (2, 2.0, 4.0), (4, 8.0, 16.0), (10, 300.0, 600.0)]
)
def test_backoff_doubles_with_jitter_up_to_its_cap(attempt: int, low: float, high: float) -> None:
    assert backoff_seconds(attempt, 2, 600, draw=lambda: 0.0) == low
    assert backoff_seconds(attempt, 2, 600, draw=lambda: 1.0) == high


def test_a_workflow_that_only_forwards_never_builds_the_dicom_message(tmp_path: Path) -> None:
    stow = {
        "$type": "Soupflow.Senders.StowRsSenderSetting, Soupflow",
        "Id": WRITER_2,
        "Name": "Archive",
        "BaseUrl": "http://archive.test/dicom-web",
        "MessageTemplate": f"${{{RECEIVER_ID} inbound}}",
    }
    json_writer = file_writer(
        FilePathToWrite="out/${SOPInstanceUID}.json",
        MessageType=11,
        MessageTemplate=f"${{{RECEIVER_ID} inbound}}",
    )
    builds: list[int] = []

    def build() -> dict[str, Any]:
        builds.append(1)
        return convert(path, facts, Options())

    path = sample_file("CT_small.dcm")
    facts = arrival(path)
    for document, expected in (
        (documents.workflow(stow), 0),  # the STOW-RS sender sends the object, not a message
        (documents.workflow(stow, json_writer), 1),  # the file writer writes the message
    ):
        builds.clear()
        loaded = load_text(json.dumps(document), Path("w.json"))
        context = RunContext(loaded, build, facts, path, tmp_path)
        stored = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
        with httpx.Client(transport=stored) as client:
            result = run_message(context, frozenset(), lambda *_: None, client, Connections())
        assert result.state == "completed"
        assert (len(builds), context.message_converted) == (expected, expected == 1)


def test_a_nul_character_in_a_path_is_dead_at_once_with_nothing_written(tmp_path: Path) -> None:
    document = documents.workflow(
        file_writer(FilePathToWrite="out/${Name}.txt", MessageType=13),
        variables(
            action(
                "CreateVariable",
                VariableName="Name",
                FromPath="a\u0000b",
                FromDirection=2,
                FromType=7,
            )
        ),
        VariableTransformers=VARIABLES_ID,
    )
    result, recorded = run(document, tmp_path)
    assert result.state == "failed" and isinstance(result.error, PermanentError)
    assert "NUL character" in str(result.error)
    assert recorded == [] and not (tmp_path / "out").exists()
