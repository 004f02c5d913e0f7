"""The STOW-RS receiver with real clients on loopback: curl (Content-Length, chunked,
Expect: 100-continue), Orthanc's DICOMweb client, soupflow's own STOW-RS sender; every
status of the table, and nothing half-stored."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from pydicom import dcmread

from bench.data import large_instance
from bench.ingest import peak_rss
from soupflow.ingest import Ingest
from soupflow.receivers.stow import StowListener
from soupflow.store.queue import State
from soupflow.store.spool import Spool
from soupflow.store.sqlite import SqliteQueue
from soupflow.workflow.load import load_text
from soupflow.workflow.model import StowRsReceiverSetting
from tests import documents
from tests.certs import Pki
from tests.dicom import (
    RuntimeProcess,
    dataset_bytes,
    sample_file,
    send_files,
    unavailable,
    wait_for,
)
from tests.documents import NS_SENDERS, RECEIVER_ID, type_of
from tests.peers import Orthanc
from tests.test_ingest_failures import small_filesystem
from tests.test_mllp_and_stow_senders import study

CT, MR = sample_file("CT_small.dcm"), sample_file("MR_small.dcm")
PHI = ("CompressedSamples", "1CT1")
WRITER_ID = "99999999-0000-4000-8000-0000000000f1"


def stow_receiver(**fields: Any) -> dict[str, Any]:
    return {
        "$type": "Soupflow.Receivers.StowRsReceiverSetting, Soupflow",
        "Id": RECEIVER_ID,
        "Name": "Deliveries",
        "WorkflowPatternName": "Deliveries",
        "Port": 0,
        "ServiceName": "dicom-web",
        "Activities": [WRITER_ID],
        **fields,
    }


def archive(path: str = "out/${SOPInstanceUID}.dcm") -> dict[str, Any]:
    return {
        "$type": type_of("FileWriterSenderSetting", NS_SENDERS),
        "Id": WRITER_ID,
        "Name": "Archive",
        "FilePathToWrite": path,
        "MessageType": 16,
    }


def running(
    tmp_path: Path, receiver: dict[str, Any], writer: dict[str, Any] | None = None
) -> RuntimeProcess:
    workflows = tmp_path / "workflows"
    workflows.mkdir(parents=True)
    document = {
        "Name": "Deliveries",
        "WorkflowId": RECEIVER_ID,
        "WorkflowPattern": [receiver, writer or archive()],
    }
    documents.write(workflows / "stow.json", document)
    return RuntimeProcess(workflows, tmp_path / "data")


def receiving_only(tmp_path: Path, data: Path) -> RuntimeProcess:
    """A STOW-RS receiver with no activity, and no workers: ingest alone."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    document = {
        "Name": "Deliveries",
        "WorkflowId": RECEIVER_ID,
        "WorkflowPattern": [stow_receiver(Activities=[])],
    }
    documents.write(workflows / "stow.json", document)
    return RuntimeProcess(workflows, data, "--workers", "0")


def multipart(*parts: bytes, boundary: str = "soupflow-test-boundary") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    return body + b"--" + boundary.encode() + b"--\r\n", boundary


def curl(
    url: str,
    body: bytes,
    folder: Path,
    content_type: str,
    *options: str,
) -> tuple[int, dict[str, Any]]:
    program = shutil.which("curl")
    if program is None:
        unavailable("curl is not installed")
    request, response = folder / f"{uuid.uuid4()}.body", folder / f"{uuid.uuid4()}.json"
    request.write_bytes(body)
    done = subprocess.run(
        [
            program,
            "-s",
            "-o",
            str(response),
            "-w",
            "%{http_code}",
            "-H",
            f"Content-Type: {content_type}",
            *options,
            "--data-binary",
            f"@{request}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    text = response.read_text() if response.exists() else ""
    return int(done.stdout or 0), json.loads(text) if text.startswith("{") else {}


def related(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def base_url(runtime: RuntimeProcess) -> str:
    return f"http://127.0.0.1:{runtime.ports[RECEIVER_ID]}/dicom-web"


def stored_uids(document: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in document.get("00081199", {}).get("Value", [])]


def failure_reasons(document: dict[str, Any]) -> list[int]:
    return [item["00081197"]["Value"][0] for item in document.get("00081198", {}).get("Value", [])]


def uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def final_messages(data: Path, count: int) -> list[Any]:
    queue = SqliteQueue(data)
    try:
        return list(
            wait_for(
                lambda: (
                    m
                    if len(m := queue.messages()) == count
                    and all(x.state in (State.COMPLETED, State.DEAD) for x in m)
                    else None
                ),
                "the messages to finish",
            )
        )
    finally:
        queue.close()


@pytest.mark.parametrize("transfer", ["Content-Length", "chunked"])
def test_curl_stores_two_instances_and_they_run_through_the_workflow(
    tmp_path: Path, transfer: str
) -> None:
    runtime = running(tmp_path, stow_receiver())
    try:
        body, boundary = multipart(CT.read_bytes(), MR.read_bytes())
        options = ["-H", "Transfer-Encoding: chunked"] if transfer == "chunked" else []
        code, document = curl(
            f"{base_url(runtime)}/studies", body, tmp_path, related(boundary), *options
        )
        assert code == 200, document
        assert sorted(stored_uids(document)) == sorted([uid(CT), uid(MR)])
        messages = final_messages(tmp_path / "data", 2)
        assert {m.state for m in messages} == {State.COMPLETED}
        assert {m.arrival.origin.transport for m in messages} == {"STOW-RS"}
        written = tmp_path / "data" / "out" / f"{uid(CT)}.dcm"
        assert dataset_bytes(written) == dataset_bytes(CT)
    finally:
        assert runtime.terminate() == 0
    assert not any(value in runtime.log_text() for value in PHI)


def test_every_status_of_the_table_and_nothing_half_stored(tmp_path: Path) -> None:
    runtime = running(
        tmp_path,
        stow_receiver(
            AuthenticationType=1, UserName="dicomly", Password="s3cret", MaxRequestBytes=2_000_000
        ),
    )
    url, auth = f"{base_url(runtime)}/studies", ["-u", "dicomly:s3cret"]
    ct_study = str(dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
    try:
        body, boundary = multipart(CT.read_bytes(), b"not a DICOM file at all")
        code, document = curl(url, body, tmp_path, related(boundary), *auth)
        assert code == 202 and stored_uids(document) == [uid(CT)]
        assert failure_reasons(document) == [0xC000]
        garbage, boundary = multipart(b"garbage")
        assert curl(url, garbage, tmp_path, related(boundary), *auth)[0] == 400
        mismatch, boundary = multipart(MR.read_bytes())
        code, document = curl(f"{url}/{ct_study}", mismatch, tmp_path, related(boundary), *auth)
        assert code == 409 and failure_reasons(document) == [0xA900]
        assert curl(url, body, tmp_path, "application/json", *auth)[0] == 415
        assert curl(url, body, tmp_path, related(boundary), "-u", "dicomly:wrong")[0] == 401
        large, boundary = multipart(bytes(3_000_000))
        assert curl(url, large, tmp_path, related(boundary), *auth)[0] == 413
        whole, boundary = multipart(MR.read_bytes())
        truncated = whole[: len(whole) // 2]
        assert curl(url, truncated, tmp_path, related(boundary), *auth)[0] == 400
        missing, _ = multipart(MR.read_bytes())
        assert curl(url, missing, tmp_path, "multipart/related", *auth)[0] == 400  # no boundary
    finally:
        assert runtime.terminate() == 0
    queue = SqliteQueue(tmp_path / "data")
    try:
        assert [m.arrival.sop_instance_uid for m in queue.messages()] == [uid(CT)]  # only it
    finally:
        queue.close()
    assert not list((tmp_path / "data" / "incoming").glob("*.part"))


def test_soupflows_stow_sender_delivers_to_a_soupflow_stow_receiver(tmp_path: Path) -> None:
    receiving = running(tmp_path / "b", stow_receiver())
    try:
        sender = {
            "$type": "Soupflow.Senders.StowRsSenderSetting, Soupflow",
            "Id": "99999999-0000-4000-8000-0000000000f2",
            "Name": "DICOMweb",
            "BaseUrl": base_url(receiving),
        }
        workflows, data = tmp_path / "a" / "workflows", tmp_path / "a" / "data"
        workflows.mkdir(parents=True)
        documents.write(
            workflows / "forward.json",
            documents.workflow(sender, Port=0, AcceptedCallingAETs="*"),
        )
        forwarding = RuntimeProcess(workflows, data)
        try:
            files = study(tmp_path / "study", 6)
            assert send_files(forwarding.port, files) == [0] * 6
            assert {m.state for m in final_messages(data, 6)} == {State.COMPLETED}
        finally:
            assert forwarding.terminate() == 0
        final_messages(tmp_path / "b" / "data", 6)
        for path in files:
            written = tmp_path / "b" / "data" / "out" / f"{uid(path)}.dcm"
            assert dataset_bytes(written) == dataset_bytes(path)
    finally:
        assert receiving.terminate() == 0


def test_orthanc_pushes_a_study_with_dicomly_headers_that_route_it(tmp_path: Path) -> None:
    receiving = running(
        tmp_path / "soupflow",
        stow_receiver(HeaderParameters={"X-Dicomly-Cert-Id": "SenderCertId"}),
        archive("out/${SenderCertId}/${SOPInstanceUID}.dcm"),
    )
    orthanc = Orthanc(
        tmp_path / "orthanc",
        DicomWeb={
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {
                "soupflow": {
                    "Url": base_url(receiving) + "/",
                    "HttpHeaders": {"X-Dicomly-Cert-Id": "scanner-7"},
                }
            },
        },
    )
    try:
        files = study(tmp_path / "study", 20)
        for path in files:
            orthanc.post("/instances", path.read_bytes())
        studies = orthanc.get("/studies")  # CT and MR samples: two patients, so two studies
        orthanc.post_json("/dicom-web/servers/soupflow/stow", {"Resources": studies})
        messages = final_messages(tmp_path / "soupflow" / "data", 20)
        assert {m.state for m in messages} == {State.COMPLETED}
        for path in files:
            written = tmp_path / "soupflow" / "data" / "out" / "scanner-7" / f"{uid(path)}.dcm"
            assert dataset_bytes(written) == dataset_bytes(path)
    finally:
        orthanc.stop()
        assert receiving.terminate() == 0


DICOMLY = {
    "X-Dicomly-Endpoint-Id": "endpoint-1",
    "X-Dicomly-Cert-Id": "scanner-7",
    "X-Dicomly-Request-Id": "delivery-0001",
}


def test_a_dicomly_delivery_routes_by_its_cert_id_and_a_replay_makes_no_second_message(
    tmp_path: Path,
) -> None:
    receiver = stow_receiver(
        HeaderParameters={
            "X-Dicomly-Cert-Id": "SenderCertId",
            "X-Dicomly-Request-Id": "DeliveryId",
        },
        DeduplicateHeader="X-Dicomly-Request-Id",
    )
    runtime = running(tmp_path, receiver, archive("out/${SenderCertId}/${SOPInstanceUID}.dcm"))
    url = f"{base_url(runtime)}/studies"
    headers = [option for name, value in DICOMLY.items() for option in ("-H", f"{name}: {value}")]
    try:
        body, boundary = multipart(CT.read_bytes())
        first = curl(url, body, tmp_path, related(boundary), *headers)
        replay = curl(url, body, tmp_path, related(boundary), *headers)
        assert first[0] == replay[0] == 200
        assert stored_uids(first[1]) == stored_uids(replay[1]) == [uid(CT)]
        assert len(final_messages(tmp_path / "data", 1)) == 1
        assert (tmp_path / "data" / "out" / "scanner-7" / f"{uid(CT)}.dcm").exists()
        changed = CT.read_bytes()[:-2] + b"\x00\x01"  # the same instance, other bytes
        other, boundary = multipart(changed)
        code, document = curl(url, other, tmp_path, related(boundary), *headers)
        assert code == 409 and failure_reasons(document) == [0x0110]
        assert len(final_messages(tmp_path / "data", 1)) == 1
    finally:
        assert runtime.terminate() == 0
    log = runtime.log_text()
    assert "delivery-0001" in log and not any(value in log for value in PHI)
    assert "Authorization" not in log


def test_a_client_that_stalls_is_disconnected_and_others_are_served(tmp_path: Path) -> None:
    runtime = running(tmp_path, stow_receiver(RequestTimeoutSeconds=1))
    port = runtime.ports[RECEIVER_ID]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
            stalled.sendall(
                b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                b'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n\r\n--b'
            )
            assert stalled.recv(65536) == b""  # closed, no 408
        body, boundary = multipart(CT.read_bytes())
        assert curl(f"{base_url(runtime)}/studies", body, tmp_path, related(boundary))[0] == 200
    finally:
        assert runtime.terminate() == 0


def test_stow_over_mutual_tls_with_a_thumbprint_list(tmp_path: Path, pki: Pki) -> None:
    receiver = stow_receiver(**pki.listener(ClientCertificateThumbPrint=pki.client.sha256))
    runtime = running(tmp_path, receiver)
    url = f"https://127.0.0.1:{runtime.ports[RECEIVER_ID]}/dicom-web/studies"
    body, boundary = multipart(CT.read_bytes())
    tls_options = ["--cacert", str(pki.ca.path)]
    try:
        with_cert = ["--cert", str(pki.client.certificate), "--key", str(pki.client.key)]
        assert curl(url, body, tmp_path, related(boundary), *tls_options, *with_cert)[0] == 200
        other = pki.ca.issue("other modality", client=True)
        wrong = ["--cert", str(other.certificate), "--key", str(other.key)]
        assert curl(url, body, tmp_path, related(boundary), *tls_options, *wrong)[0] == 403
        [message] = final_messages(tmp_path / "data", 1)
        assert message.arrival.origin.client_cert_sha256 == pki.client.sha256
    finally:
        assert runtime.terminate() == 0


def test_a_full_disk_answers_503_and_leaves_nothing_half_stored(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "data", "6m") as data:
        runtime = receiving_only(tmp_path, data)
        url = f"http://127.0.0.1:{runtime.ports[RECEIVER_ID]}/dicom-web/studies"
        try:
            big = tmp_path / "big.dcm"
            large_instance(big, 8_000_000)
            body, boundary = multipart(big.read_bytes())
            code, document = curl(url, body, tmp_path, related(boundary))
            assert code == 503, document
            assert not list((data / "incoming").glob("*.part"))
            small, boundary = multipart(CT.read_bytes())
            assert curl(url, small, tmp_path, related(boundary))[0] == 200  # it recovers
        finally:
            assert runtime.terminate() == 0


def test_a_1_gb_part_streams_through_in_bounded_memory(tmp_path: Path) -> None:
    runtime = receiving_only(tmp_path, tmp_path / "data")
    try:
        instance = large_instance(tmp_path / "large.dcm", 1 << 30)
        boundary = "soupflow-large"
        body = tmp_path / "body"
        with body.open("wb") as out, instance.open("rb") as source:
            out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            shutil.copyfileobj(source, out, 1 << 20)
            out.write(f"\r\n--{boundary}--\r\n".encode())
        instance.unlink()
        program = shutil.which("curl")
        assert program is not None
        done = subprocess.run(
            [
                program,
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-H",
                f"Content-Type: {related(boundary)}",
                "-T",
                str(body),  # streamed from the file, with its Content-Length
                f"{base_url(runtime)}/studies",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.stdout == "200", done.stderr
        peak = peak_rss(runtime.process.pid)
        assert peak < 200 * 2**20, f"peak RSS {peak / 2**20:.0f} MB"
    finally:
        assert runtime.terminate() == 0


def test_the_dicomweb_client_package_stores_to_soupflow(tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient  # noqa: PLC0415 (a dev-only peer)

    runtime = running(tmp_path, stow_receiver())
    try:
        client = DICOMwebClient(url=base_url(runtime))
        datasets = [dcmread(CT), dcmread(MR)]
        answer = client.store_instances(datasets)
        assert sorted(
            str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence
        ) == sorted([uid(CT), uid(MR)])
        study_uid = str(datasets[0].StudyInstanceUID)
        client.store_instances([dcmread(CT)], study_instance_uid=study_uid)  # /studies/{uid}
        assert len(final_messages(tmp_path / "data", 3)) == 3
    finally:
        assert runtime.terminate() == 0


def test_a_bare_stow_receiver_file_is_valid_by_the_published_schema_and_the_loader() -> None:
    schema = json.loads(
        (Path(__file__).parents[1] / "schemas" / "workflow-file.schema.json").read_text()
    )
    bare = stow_receiver(Activities=[], AuthenticationType=3, BearerToken="${env:TOKEN}")
    jsonschema.validate(bare, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**bare, "ServiceName": 7}, schema)
    loaded = load_text(json.dumps(bare), Path("bare.json"))
    assert loaded.valid, [str(issue) for issue in loaded.issues]
    assert loaded.receiver is not None and loaded.receiver.identity() == (
        "STOW-RS /dicom-web",
        "a bearer token",
    )


def test_stopping_closes_idle_keep_alive_connections_at_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    queue = SqliteQueue(data)
    receiver = StowRsReceiverSetting.model_validate(stow_receiver(Activities=[]))
    listener = StowListener("w", receiver, "127.0.0.1", Ingest(Spool(data), queue), tmp_path)
    listener.start()
    stopped = threading.Event()
    try:
        with httpx.Client(timeout=30) as client:  # keeps its connection open after the POST
            body, boundary = multipart(CT.read_bytes())
            answer = client.post(
                f"http://127.0.0.1:{listener.port}/dicom-web/studies",
                content=body,
                headers={"Content-Type": related(boundary)},
            )
            assert answer.status_code == 200
            stopper = threading.Thread(
                target=lambda: (listener.stop(grace_seconds=120), stopped.set())
            )
            stopper.start()
            # Well before the grace period: the idle connection does not hold the stop up.
            wait_for(stopped.is_set, "the listener to stop", seconds=60)
            stopper.join()
    finally:
        listener.stop()
        queue.close()
