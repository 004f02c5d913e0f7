"""STOW-RS connections served by worker processes (`run --processes`): the runtime accepts
each one and hands it to whichever process serves the fewest, and the limits a listener
counts across its connections hold across the processes, a dead worker process included."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import h11
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from bench.certs import Issued
from soupflow.store.sqlite import SqliteQueue
from tests import documents
from tests.certs import Pki
from tests.dicom import DEADLINE_SECONDS, RuntimeProcess, sample_file, wait_for
from tests.documents import RECEIVER_ID
from tests.test_metrics import admin_url, get, samples, value
from tests.test_stow_receiver import multipart, related, stow_receiver
from tests.test_tls import storescu_tls

CT, MR = sample_file("CT_small.dcm"), sample_file("MR_small.dcm")


def with_a_worker_process(tmp_path: Path, **fields: object) -> RuntimeProcess:
    """A STOW-RS receiver (ingest only) in a runtime with one worker process that takes
    connections."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    document = {
        "Name": "Deliveries",
        "WorkflowId": RECEIVER_ID,
        "WorkflowPattern": [stow_receiver(Activities=[], **fields)],
    }
    documents.write(workflows / "stow.json", document)
    runtime = RuntimeProcess(workflows, tmp_path / "data", "--workers", "0", "--processes", "1")
    wait_for(lambda: "takes connections" in runtime.log_text(), "the worker process")
    return runtime


def receiving_part(runtime: RuntimeProcess) -> None:
    """Until a request's part is being received (its headers read, its body on the way)."""
    wait_for(lambda: list((runtime.data / "incoming").glob("*.part")), "a part being received")


class Client:
    """One keep-alive HTTP/1.1 connection, written to by hand (a body can stop halfway)."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        plain = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS)
        self.socket = context.wrap_socket(plain, server_hostname="localhost") if context else plain
        self.http = h11.Connection(h11.CLIENT)

    def head(self, instance: Path) -> bytes:
        """Send a request's head; the body to send after it."""
        body, boundary = multipart(instance.read_bytes())
        request = h11.Request(
            method="POST",
            target="/dicom-web/studies",
            headers=[
                ("Host", "127.0.0.1"),
                ("Content-Type", related(boundary)),
                ("Content-Length", str(len(body))),
            ],
        )
        self.socket.sendall(self.http.send(request))
        return body

    def finish(self, body: bytes) -> int:
        self.socket.sendall(
            self.http.send(h11.Data(data=body)) + self.http.send(h11.EndOfMessage())
        )
        return self.answer()

    def post(self, instance: Path) -> int:
        return self.finish(self.head(instance))

    def answer(self) -> int:
        """The response's status (its body read); 0 when the connection closed instead."""
        status = 0
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = self.socket.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return status
                self.http.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
                    self.http.start_next_cycle()
                return status

    def close(self) -> None:
        self.socket.close()


def received_by_the_worker_process(data: Path) -> float:
    """What its report says it committed (it writes one every second)."""
    total = 0.0
    for path in (data / "worker-metrics").glob("*.json"):
        for _, name, _, count in json.loads(path.read_text()):
            if name == "soupflow_instances_received_total":
                total += count
    return total


def active(runtime: RuntimeProcess) -> float:
    """The connections the runtime counts for the workflow, wherever they are served."""
    code, text = get(admin_url(runtime.data) + "metrics")
    assert code == 200
    return value(samples(text), "soupflow_associations_active", workflow=RECEIVER_ID)


def messages(data: Path) -> int:
    return len(certificates(data))


def certificates(data: Path) -> list[str]:
    """The client certificate fingerprint of each queued message."""
    queue = SqliteQueue(data)
    try:
        return [message.arrival.origin.client_cert_sha256 for message in queue.messages()]
    finally:
        queue.close()


def presenting(pki: Pki, certificate: Issued) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.path))
    context.load_cert_chain(str(certificate.certificate), str(certificate.key))
    return context


def test_connections_spread_over_the_processes_and_share_one_request_limit(
    tmp_path: Path,
) -> None:
    runtime = with_a_worker_process(tmp_path, MaxConcurrentRequests=1)
    port = runtime.ports[RECEIVER_ID]
    first, second, third = Client(port), Client(port), Client(port)
    try:
        # The first connection stays in the runtime (a tie), and its request holds the one
        # slot while its body is on the way.
        body = first.head(CT)
        first.socket.sendall(first.http.send(h11.Data(data=body[: len(body) // 2])))
        receiving_part(runtime)  # the request holds the slot
        # The second goes to the worker process, which asks the runtime for the slot.
        assert second.post(MR) == 503
        assert first.finish(body[len(body) // 2 :]) == 200
        second.close()  # the runtime counts it until the worker process says it is done
        wait_for(lambda: active(runtime) == 1, "the runtime to count 1 connection")
        assert third.post(MR) == 200  # the worker process's again (fewer than the runtime)
        wait_for(lambda: received_by_the_worker_process(runtime.data) == 1, "its report")
        assert messages(runtime.data) == 2
    finally:
        for client in (first, second, third):
            client.close()
        assert runtime.terminate() == 0


def test_a_worker_process_killed_mid_request_stores_nothing_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    runtime = with_a_worker_process(tmp_path, MaxConcurrentRequests=1)
    port = runtime.ports[RECEIVER_ID]
    here, there = Client(port), Client(port)
    try:
        assert here.post(CT) == 200  # the runtime's; its connection stays open
        body = there.head(MR)  # the worker process's: it holds the slot, waiting for the body
        there.socket.sendall(there.http.send(h11.Data(data=body[: len(body) // 2])))
        receiving_part(runtime)  # handed over: killed before that, the runtime would serve it
        worker = wait_for(
            lambda: [line for line in runtime.log_text().splitlines() if " started (pid " in line],
            "the worker process's pid",
        )[0]
        os.kill(int(worker.rsplit("pid ", 1)[1].rstrip(")")), signal.SIGKILL)
        assert there.answer() == 0  # closed, never answered: its sender sends it again
        wait_for(
            lambda: "ended with 1 connections it was serving" in runtime.log_text(),
            "the runtime to end its connection",
        )
        assert here.post(CT) == 200  # the slot it held is free again
        assert messages(runtime.data) == 2  # nothing of the cut request
    finally:
        here.close()
        there.close()
        assert runtime.terminate() == 0


def test_a_handed_tls_connection_is_handshaken_and_checked_in_the_worker_process(
    tmp_path: Path, pki: Pki
) -> None:
    runtime = with_a_worker_process(
        tmp_path, **pki.listener(ClientCertificateThumbPrint=pki.client.sha256)
    )
    port = runtime.ports[RECEIVER_ID]
    here = Client(port, presenting(pki, pki.client))  # the runtime's
    try:
        assert here.post(CT) == 200
        there = Client(port, presenting(pki, pki.client))  # the worker process shakes hands
        assert there.post(MR) == 200
        there.close()
        wait_for(lambda: active(runtime) == 1, "the runtime to count 1 connection")
        other = pki.ca.issue("other modality", client=True)  # trusted, not on the list
        refused = Client(port, presenting(pki, other))  # the worker process's again
        assert refused.post(MR) == 403
        refused.close()
        wait_for(lambda: received_by_the_worker_process(runtime.data) == 1, "its report")
        assert certificates(runtime.data) == [pki.client.sha256] * 2
    finally:
        here.close()
        assert runtime.terminate() == 0


def test_removing_the_workflow_closes_the_idle_connections_of_both_processes(
    tmp_path: Path,
) -> None:
    """...and a workflow that comes back is served by the worker process as new."""
    runtime = with_a_worker_process(tmp_path)
    port = runtime.ports[RECEIVER_ID]
    here, there = Client(port), Client(port)
    workflow = tmp_path / "workflows" / "stow.json"
    document = workflow.read_bytes()
    try:
        assert here.post(CT) == 200
        assert there.post(MR) == 200  # the worker process's, kept alive between requests
        wait_for(lambda: received_by_the_worker_process(runtime.data) == 1, "its report")
        workflow.unlink()
        assert there.answer() == 0  # closed by the worker process, not left to time out
        assert here.answer() == 0
        runtime.refresh(  # the listeners file says so after the log does
            lambda rows: not any(row["state"] == "listening" for row in rows)
        )
        workflow.write_bytes(document)  # the same file again: a new listener
        runtime.refresh(lambda rows: any(row["state"] == "listening" for row in rows))
        port = runtime.ports[RECEIVER_ID]
        here.close()
        there.close()
        here, there = Client(port), Client(port)
        assert here.post(CT) == 200
        assert there.post(MR) == 200  # not the stopped one's 503
        wait_for(lambda: received_by_the_worker_process(runtime.data) == 2, "its report")
    finally:
        here.close()
        there.close()
        assert runtime.terminate() == 0


def dicom_with_a_worker_process(tmp_path: Path, **fields: object) -> RuntimeProcess:
    """A C-STORE listener (ingest only) in a runtime with one worker process."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    document = documents.workflow(Port=0, AcceptedCallingAETs="*", **fields)
    documents.write(workflows / "intake.json", document)
    runtime = RuntimeProcess(workflows, tmp_path / "data", "--workers", "0", "--processes", "1")
    wait_for(lambda: "takes connections" in runtime.log_text(), "the worker process")
    return runtime


def association(port: int, calling_aet: str, context: ssl.SSLContext | None = None) -> Any:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = DEADLINE_SECONDS
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    tls_args = (context, "localhost") if context is not None else None
    return ae.associate("127.0.0.1", port, ae_title="SOUPFLOW", tls_args=tls_args)


def test_associations_spread_over_the_processes_and_share_one_association_limit(
    tmp_path: Path,
) -> None:
    runtime = dicom_with_a_worker_process(tmp_path, MaxAssociations=2)
    port = runtime.ports[RECEIVER_ID]
    here = association(port, "HERE")  # the runtime's (a tie)
    there = association(port, "THERE")  # the worker process's: it asks the runtime to admit it
    assert here.is_established and there.is_established
    try:
        assert there.send_c_store(dcmread(CT)).Status == 0x0000
        third = association(port, "THIRD")  # the runtime's again: two are admitted already
        assert third.is_rejected
        wait_for(lambda: received_by_the_worker_process(runtime.data) == 1, "its report")
    finally:
        there.release()
        here.release()
    wait_for(lambda: active(runtime) == 0, "the worker process to say its association ended")
    fourth = association(port, "FOURTH")  # both slots were given back
    assert fourth.is_established
    fourth.release()
    assert messages(runtime.data) == 1
    assert runtime.terminate() == 0


def test_a_handed_tls_association_is_handshaken_in_the_worker_process(
    tmp_path: Path, pki: Pki
) -> None:
    runtime = dicom_with_a_worker_process(tmp_path, **pki.listener())
    port = runtime.ports[RECEIVER_ID]
    here = association(port, "HERE", presenting(pki, pki.client))
    assert here.is_established
    try:
        sent = storescu_tls(port, pki.client, pki.ca.path, CT)  # the worker process's
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: received_by_the_worker_process(runtime.data) == 1, "its report")
        assert certificates(runtime.data) == [pki.client.sha256]
    finally:
        here.release()
        assert runtime.terminate() == 0
