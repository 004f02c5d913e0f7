"""The admin endpoint of `soupflow run`: Prometheus metrics after real stores (dcmtk's
storescu), a rejected association, a retry and a dead message; `/healthz`; `/readyz` going
503 when a listener cannot bind."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.data import images
from soupflow.store.sqlite import SqliteQueue
from tests import documents
from tests.certs import Pki
from tests.dicom import (
    RuntimeProcess,
    associate,
    sample_file,
    send_files,
    soupflow,
    storescu_send,
    wait_for,
)
from tests.documents import RECEIVER_ID
from tests.http_peer import HttpPeer

CT, MR = sample_file("CT_small.dcm"), sample_file("MR_small.dcm")
HTTP_ID = "99999999-0000-4000-8000-0000000000a1"


def admin_url(data: Path) -> str:
    wait_for((data / "admin.json").is_file, "admin.json")
    return str(json.loads((data / "admin.json").read_text())["url"])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict[Any, float], metric: str, **labels: str) -> float:
    return found.get((metric, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("processes", ["0", "1"], ids=["in-process", "worker-process"])
def test_metrics_count_stores_rejections_retries_and_dead_messages(
    tmp_path: Path, processes: str
) -> None:
    """With `--processes 1` the workers' counts (finished, latency, attempts) are the worker
    process's: the runtime's /metrics adds what its worker processes report."""
    peer = HttpPeer(statuses=[503, 200, 400])  # first: a retry then success; second: dead
    sender = documents.http_sender(
        HTTP_ID, Server=peer.url, RetryInitialSeconds=0, RetryMaxSeconds=1
    )
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    documents.write(
        workflows / "intake.json",
        documents.workflow(sender, Port=0, AcceptedCallingAETs="STORESCU"),
    )
    runtime = RuntimeProcess(workflows, data, "--workers", "1", "--processes", processes)
    try:
        storescu_send(runtime.port, CT)
        wait_for(lambda: len(peer.requests) == 2, "the retry and the success")
        storescu_send(runtime.port, MR)
        refused = associate(runtime.port, "INTRUDER")
        assert not refused.is_established
        queue = SqliteQueue(data)
        try:
            wait_for(
                lambda: sorted(m.state.value for m in queue.messages()) == ["completed", "dead"],
                "one completed, one dead",
            )
            byte_count = sum(m.arrival.byte_count for m in queue.messages())
        finally:
            queue.close()
        url = admin_url(data)
        assert get(url + "healthz")[0] == 200
        workflow = {"workflow": RECEIVER_ID}

        def scraped() -> tuple[str, dict[Any, float]] | None:
            code, text = get(url + "metrics")
            assert code == 200
            found = samples(text)  # a worker process reports its counts every second
            done = value(found, "soupflow_message_latency_seconds_count", **workflow) == 2
            return (text, found) if done else None

        text, found = wait_for(scraped, "the workers' counts")
        assert value(found, "soupflow_associations_total", result="accepted", **workflow) == 2
        assert value(found, "soupflow_associations_total", result="rejected", **workflow) == 1
        assert value(found, "soupflow_instances_received_total", **workflow) == 2
        assert value(found, "soupflow_received_bytes_total", **workflow) == byte_count
        assert value(found, "soupflow_messages_finished_total", state="completed", **workflow) == 1
        assert value(found, "soupflow_messages_finished_total", state="dead", **workflow) == 1
        attempts = {"activity": HTTP_ID, **workflow}
        assert (
            value(found, "soupflow_activity_attempts_total", outcome="transient", **attempts) == 1
        )
        assert value(found, "soupflow_activity_attempts_total", outcome="success", **attempts) == 1
        assert (
            value(found, "soupflow_activity_attempts_total", outcome="permanent", **attempts) == 1
        )
        assert value(found, "soupflow_activity_duration_seconds_count", **attempts) == 3
        assert value(found, "soupflow_store_commit_seconds_count") == 2
        assert value(found, "soupflow_message_latency_seconds_count", **workflow) == 2
        assert value(found, "soupflow_queue_dead_messages", **workflow) == 1
        assert value(found, "soupflow_queue_messages", state="completed", **workflow) == 1
        assert value(found, "soupflow_workflow_info", name="Intake", **workflow) == 1
        assert any(name == "soupflow_build_info" for name, _ in found)
        assert "CompressedSamples" not in text and "1.3.6.1.4.1" not in text  # no PHI, no UID
    finally:
        peer.close()
        assert runtime.terminate() == 0
    assert not (data / "admin.json").exists()


def test_a_killed_worker_process_keeps_its_counts_in_the_runtimes_metrics(
    tmp_path: Path,
) -> None:
    """A worker process killed with SIGKILL: what it reported stays in the totals (no
    counter goes down, which Prometheus would read as a restart), kept in one file for all
    the children that exited, beside its replacement's."""
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    writer = documents.file_writer(FilePathToWrite="out/${SOPInstanceUID}.dcm")
    documents.write(
        workflows / "intake.json", documents.workflow(writer, Port=0, AcceptedCallingAETs="*")
    )
    runtime = RuntimeProcess(workflows, data, "--processes", "1", "--workers", "1")
    completed = {"workflow": RECEIVER_ID, "state": "completed"}

    def finished() -> float:
        code, text = get(admin_url(data) + "metrics")
        assert code == 200
        return value(samples(text), "soupflow_messages_finished_total", **completed)

    def children() -> list[str]:
        return [line for line in runtime.log_text().splitlines() if " started (pid " in line]

    try:
        assert send_files(runtime.port, images(tmp_path / "first", 3, 16, 16)) == [0] * 3
        wait_for(lambda: finished() == 3, "3 finished in the worker process's report")
        first = wait_for(children, "the worker process")[0]
        os.kill(int(first.rsplit("pid ", 1)[1].rstrip(")")), signal.SIGKILL)
        wait_for(lambda: len(children()) == 2, "its replacement")
        assert finished() == 3
        assert send_files(runtime.port, images(tmp_path / "then", 2, 16, 16)) == [0] * 2
        wait_for(lambda: finished() == 5, "the replacement's 2 added to the 3")
        reports = sorted(path.name for path in (data / "worker-metrics").iterdir())
        replacement = children()[1].split("worker process ", 1)[1].split(" ", 1)[0]
        assert reports == sorted(["departed.json", f"{replacement}.json"])
    finally:
        assert runtime.terminate() == 0


def test_readyz_is_503_naming_a_listener_that_cannot_bind(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        runtime = RuntimeProcess(workflows, data)
        try:
            url = admin_url(data)
            assert get(url + "readyz")[0] == 200
            busy = documents.workflow(Port=taken.getsockname()[1])
            busy["WorkflowId"] = busy["WorkflowPattern"][0]["Id"] = (
                "22222222-2222-4222-8222-222222222222"
            )
            documents.write(workflows / "busy.json", busy)
            runtime.refresh(lambda rows: len(rows) == 2)
            code, body = get(url + "readyz")
            assert code == 503
            [problem] = json.loads(body)["problems"]
            assert "busy.json" in problem and "failed" in problem and "already in use" in problem
        finally:
            assert runtime.terminate() == 0


def test_readyz_is_503_while_another_process_holds_the_queue_locked(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    runtime = RuntimeProcess(workflows, data, "--workers", "0")
    url = admin_url(data) + "readyz"
    assert get(url)[0] == 200
    holder = sqlite3.connect(data / "queue.sqlite3", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # what a stuck `soupflow dead retry` would hold
        code, body = get(url)
        assert code == 503
        [problem] = json.loads(body)["problems"]
        assert "queue cannot be written" in problem and "locked" in problem
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert get(url)[0] == 200
    assert runtime.terminate() == 0


def test_the_admin_endpoint_speaks_https_with_a_certificate_and_can_require_clients(
    tmp_path: Path, pki: Pki
) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0, AcceptedCallingAETs="*"))
    runtime = RuntimeProcess(
        workflows,
        data,
        "--admin-certificate", str(pki.server.certificate),
        "--admin-private-key", str(pki.server.key),
        "--admin-trusted-certificates", str(pki.ca.path),
    )  # fmt: skip
    url = admin_url(data)
    assert url.startswith("https://127.0.0.1:")
    trusted = ssl.create_default_context(cafile=str(pki.ca.path))
    trusted.load_cert_chain(str(pki.client.certificate), str(pki.client.key))
    with httpx.Client(verify=trusted) as client:
        assert client.get(url + "healthz").status_code == 200
        assert "soupflow_build_info" in client.get(url + "metrics").text
    anonymous = ssl.create_default_context(cafile=str(pki.ca.path))  # no client certificate
    with httpx.Client(verify=anonymous) as client, pytest.raises(httpx.TransportError):
        client.get(url + "healthz")
    with httpx.Client() as client, pytest.raises(httpx.TransportError):  # cleartext HTTP
        client.get(url.replace("https://", "http://") + "healthz")
    assert "TLS handshake" in runtime.log_text()
    runtime.terminate()


def test_a_bad_admin_certificate_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    result = soupflow(
        "run", "--workflows", str(workflows), "--data", str(tmp_path / "data"),
        "--admin-certificate", str(broken),
    )  # fmt: skip
    assert result.returncode != 0
    assert "admin endpoint's TLS" in result.stderr and str(broken) in result.stderr
