"""HL7 v2 reports over MLLP, and forwarding to Orthanc by C-STORE and DICOMweb STOW-RS."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from soupflow.activities.connections import Connections, Pool
from soupflow.pipeline.run import Ending
from soupflow.store.queue import State
from soupflow.store.sqlite import SqliteQueue
from tests import documents
from tests.dicom import RuntimeProcess, dataset_bytes, sample_file, send_files, wait_for
from tests.documents import RECEIVER_ID
from tests.http_peer import HttpPeer
from tests.peers import MllpPeer, Orthanc
from tests.test_dicom_sender import SENDER_ID, forwarding, run_until_final
from tests.test_pipeline import run

EXAMPLE = documents.REPO / "workflows" / "sr-to-oru.json"


def oru_example(port: int, **fields: Any) -> dict[str, Any]:
    """The repository's SR -> ORU^R01 example, sending to `port`, listening on a free port."""
    document: dict[str, Any] = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    for setting in document["WorkflowPattern"]:
        if "MLLPSenderSetting" in setting["$type"]:
            setting.update({"Port": port, **fields})
        if "DicomReceiverSetting" in setting["$type"]:
            setting["Port"] = 0
    return document


def test_an_sr_becomes_an_oru_r01_whose_obx_segments_hold_the_report(tmp_path: Path) -> None:
    peer = MllpPeer()
    try:
        [message], _ = run_until_final(
            tmp_path, oru_example(peer.port), [sample_file("test-SR.dcm")]
        )
    finally:
        peer.close()
    assert message.state == State.COMPLETED
    [oru] = peer.messages
    segments = oru.strip("\r").split("\r")
    assert segments[0].split("|")[8] == "ORU^R01^ORU_R01"
    assert segments[0].split("|")[9] == message.request_id
    pid = segments[1].split("|")
    assert pid[5] == "Test^S R"
    report = dcmread(sample_file("test-SR.dcm"))
    assert segments[2].split("|")[4] == f"^{report.StudyDescription}"
    observations = [segment.split("|") for segment in segments[3:]]
    assert [obx[1] for obx in observations] == [
        str(n) for n in range(1, len(report.ContentSequence) + 1)
    ]

    def lines(text: str) -> str:
        return text.replace("\r\n", "\n").replace("\r", "\n")

    texts = [lines(item.TextValue) for item in report.ContentSequence if item.ValueType == "TEXT"]
    values = [obx[5].replace("\\.br\\", "\n") for obx in observations]
    assert texts and all(text in values for text in texts)


def test_a_negative_ack_is_dead_with_the_ack_text_in_the_record(tmp_path: Path) -> None:
    peer = MllpPeer(ack="AE", text="unknown patient")
    try:
        [message], runtime = run_until_final(
            tmp_path, oru_example(peer.port), [sample_file("test-SR.dcm")]
        )
    finally:
        peer.close()
    assert message.state == State.DEAD
    assert message.reason is not None and message.reason.startswith(
        "negative ACK AE from 127.0.0.1:"
    )
    assert "ACK text: unknown patient" in message.reason
    assert "unknown patient" not in runtime.log_text()


def test_no_ack_in_time_is_retried(tmp_path: Path) -> None:
    peer = MllpPeer(ack=None)
    try:
        [message], _ = run_until_final(
            tmp_path,
            oru_example(peer.port, TimeoutSeconds=1, RetryInitialSeconds=0, RetryMaxAttempts=2),
            [sample_file("test-SR.dcm")],
        )
    finally:
        peer.close()
    assert (message.state, message.attempts) == (State.DEAD, 2)
    assert "no ACK from 127.0.0.1" in (message.reason or "") and "gave up after 2 attempts" in (
        message.reason or ""
    )
    assert len(peer.messages) == 2


def study(folder: Path, count: int) -> list[Path]:
    """A mixed CT and MR study of `count` instances: one study, two series, new UIDs."""
    folder.mkdir(parents=True)
    study_uid, series = generate_uid(), {"CT": generate_uid(), "MR": generate_uid()}
    paths = []
    for number in range(count):
        modality = "CT" if number % 2 == 0 else "MR"
        dataset = dcmread(sample_file("CT_small.dcm" if modality == "CT" else "MR_small.dcm"))
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series[modality]
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number + 1
        path = folder / f"{number:02d}.dcm"
        dataset.save_as(path)
        paths.append(path)
    return paths


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


def stow(base_url: str) -> dict[str, Any]:
    sender = {
        "$type": "Soupflow.Senders.StowRsSenderSetting, Soupflow",
        "Id": SENDER_ID,
        "Name": "DICOMweb",
        "BaseUrl": base_url,
        "MessageTemplate": f"${{{RECEIVER_ID} inbound}}",
    }
    return documents.workflow(sender, Port=0, AcceptedCallingAETs="*")


@pytest.mark.parametrize("how", ["C-STORE", "STOW-RS"])
def test_a_50_instance_study_reaches_orthanc_byte_for_byte(
    tmp_path: Path, orthanc: Orthanc, how: str
) -> None:
    files = study(tmp_path / "study", 50)
    document = (
        forwarding(orthanc.dicom_port, RemoteAET="ORTHANC")
        if how == "C-STORE"
        else stow(orthanc.dicomweb)
    )
    messages, _ = run_until_final(tmp_path, document, files)
    assert {m.state for m in messages} == {State.COMPLETED}
    for path in files:
        stored = orthanc.instance_file(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assert stored is not None
        (tmp_path / "stored.dcm").write_bytes(stored)
        assert dataset_bytes(tmp_path / "stored.dcm") == dataset_bytes(path)


def test_orthanc_down_while_instances_queue_then_back_receives_each_once(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    files = study(tmp_path / "study", 20)
    orthanc.stop()
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    documents.write(
        workflows / "forward.json",
        forwarding(
            orthanc.dicom_port,
            RemoteAET="ORTHANC",
            RetryInitialSeconds=1,
            RetryMaxSeconds=2,
            TimeoutSeconds=5,
        ),
    )
    runtime = RuntimeProcess(workflows, data)
    queue = SqliteQueue(data)
    try:
        assert send_files(runtime.port, files) == [0] * 20
        wait_for(
            lambda: len(m := queue.messages()) == 20 and all(x.attempts >= 1 for x in m),
            "every message to have failed once",
        )
        orthanc.start()
        wait_for(
            lambda: all(m.state == State.COMPLETED for m in queue.messages()),
            "every message to arrive",
            seconds=120,
        )
        for message in queue.messages():
            outcomes = queue.activity_outcomes(message.request_id)
            assert [(o.activity_id, o.succeeded) for o in outcomes] == [(SENDER_ID, True)]
    finally:
        queue.close()
        assert runtime.terminate() == 0
    assert orthanc.get("/statistics")["CountInstances"] == 20
    changes = orthanc.get("/changes?limit=1000")["Changes"]
    assert sum(1 for change in changes if change["ChangeType"] == "NewInstance") == 20


@pytest.mark.parametrize("status", [202, 409])
def test_stow_rs_failed_sop_sequence_makes_the_message_dead_with_its_reason(
    tmp_path: Path, status: int
) -> None:
    uid = str(dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True).SOPInstanceUID)
    failed = {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": [uid]},
                    "00081197": {"vr": "US", "Value": [0x0110]},
                }
            ],
        }
    }
    peer = HttpPeer(statuses=[status], bodies={"/hook/studies": json.dumps(failed).encode()})
    try:
        [message], _ = run_until_final(tmp_path, stow(peer.url), [sample_file("CT_small.dcm")])
    finally:
        peer.close()
    assert (message.state, message.attempts) == (State.DEAD, 1)
    assert "Failure Reason 0x0110" in (message.reason or "")
    [request] = peer.requests
    assert request.headers["Content-Type"].startswith(
        'multipart/related; type="application/dicom"; boundary='
    )
    assert dataset_bytes_of(request.body) == dataset_bytes(sample_file("CT_small.dcm"))


def dataset_bytes_of(multipart: bytes) -> bytes:
    """The one part's DICOM bytes, after its headers."""
    part = multipart.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "part.dcm"
        path.write_bytes(part)
        return dataset_bytes(path)


def mllp_workflow(port: int, **fields: Any) -> dict[str, Any]:
    sender = {
        "$type": documents.type_of("MLLPSenderSetting", documents.NS_SENDERS),
        "Id": SENDER_ID,
        "Name": "RIS",
        "Server": "127.0.0.1",
        "Port": port,
        "TimeoutSeconds": 10,
        "WaitForResponse": True,
        "MessageType": 1,
        "MessageTemplate": "MSH|^~\\&|SOUPFLOW|A|RIS|B|20260101||ORU^R01|${RequestId}|P|2.5.1\rPID|1\r",
        **fields,
    }
    return documents.workflow(sender, Port=0, AcceptedCallingAETs="*")


def test_keep_connection_open_sends_many_messages_over_one_connection(tmp_path: Path) -> None:
    peer = MllpPeer()
    connections = Connections()
    try:
        for _ in range(3):
            result, _ = run(
                mllp_workflow(peer.port, KeepConnectionOpen=True), tmp_path, connections=connections
            )
            assert result.state == Ending.COMPLETED
        assert (peer.connections, len(peer.messages)) == (1, 3)
        peer.drop_connections()  # the RIS restarts: the kept connection is gone
        wait_for(lambda: peer.closed == 1, "the RIS to close the kept connection")
        result, _ = run(
            mllp_workflow(peer.port, KeepConnectionOpen=True), tmp_path, connections=connections
        )
        assert result.state == Ending.COMPLETED
        assert (peer.connections, len(peer.messages)) == (2, 4)
    finally:
        connections.close_all()
        peer.close()


def test_without_keep_connection_open_each_message_has_its_own_connection(
    tmp_path: Path,
) -> None:
    peer = MllpPeer()
    connections = Connections()
    try:
        for _ in range(3):
            result, _ = run(mllp_workflow(peer.port), tmp_path, connections=connections)
            assert result.state == Ending.COMPLETED
        assert (peer.connections, len(peer.messages)) == (3, 3)
        assert connections.sockets.take(("127.0.0.1", peer.port)) is None
    finally:
        peer.close()


def test_idle_kept_connections_are_closed_after_their_keep_time() -> None:
    closed: list[str] = []
    now = [0.0]
    pool: Pool[str, str] = Pool(closed.append, clock=lambda: now[0])
    pool.give("ris", "connection-1", 60)
    now[0] = 59
    assert pool.close_idle() == 0
    now[0] = 61
    assert pool.close_idle() == 1
    assert (closed, pool.take("ris")) == (["connection-1"], None)
