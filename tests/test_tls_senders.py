"""soupflow's DICOM sender over TLS to real peers (dcmtk storescp +tls requiring a client
certificate, Orthanc with DicomTlsEnabled), and each certificate failure a dead message with
its reason; HTTPS with a client certificate to a loopback server that checks it."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from bench.ingest import free_port
from soupflow.store.queue import State
from tests import documents
from tests.certs import Authority, Issued, Pki
from tests.dicom import NODELAY, dataset_bytes, require_tool, sample_file, soupflow, wait_for
from tests.documents import NS_SENDERS, type_of
from tests.http_peer import HttpPeer
from tests.peers import MllpPeer, Orthanc
from tests.test_dicom_sender import SENDER_ID, forwarding, run_until_final
from tests.test_tls import PHI

CT = sample_file("CT_small.dcm")


def client_side(pki: Pki, **fields: Any) -> dict[str, Any]:
    return {
        "UseSsl": True,
        "TrustedCertificatesFile": str(pki.ca.path),
        "ClientCertificateFile": str(pki.client.certificate),
        "ClientPrivateKeyFile": str(pki.client.key),
        **fields,
    }


def _echo_tls(port: int, pki: Pki) -> bool:
    return (
        subprocess.run(
            [
                require_tool("echoscu"),
                "+tls",
                *pki.client.pair,
                "-pw",
                "+cf",
                str(pki.ca.path),
                "-aec",
                "PACS",
                "127.0.0.1",
                str(port),
            ],
            env=NODELAY,
            capture_output=True,
            timeout=10,
            check=False,
        ).returncode
        == 0
    )


@contextmanager
def storescp_tls(folder: Path, pki: Pki, server: Issued | None = None) -> Iterator[int]:
    """dcmtk's storescp speaking TLS only and requiring a client certificate (its default)."""
    port = free_port()
    folder.mkdir()
    served = server or pki.server
    peer = subprocess.Popen(
        [
            require_tool("storescp"),
            "+tls",
            *served.pair,
            "-pw",
            "+cf",
            str(pki.ca.path),
            "+B",  # bit-preserving: the file is what came over the wire
            "-aet",
            "PACS",
            "-od",
            str(folder),
            str(port),
        ],
        env=NODELAY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if server is None:
            wait_for(lambda: _echo_tls(port, pki), "storescp +tls to answer")
        else:
            wait_for(lambda: _listening(port), "storescp +tls to listen")
        yield port
    finally:
        peer.terminate()
        peer.wait(timeout=30)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_the_dicom_sender_delivers_over_mutual_tls_to_storescp_byte_exact(
    tmp_path: Path, pki: Pki
) -> None:
    with storescp_tls(tmp_path / "pacs", pki) as port:
        [message], _ = run_until_final(tmp_path, forwarding(port, **client_side(pki)), [CT])
    assert message.state == State.COMPLETED, message.reason
    [received] = (tmp_path / "pacs").iterdir()
    assert dataset_bytes(received) == dataset_bytes(CT)


def test_the_dicom_sender_delivers_over_tls_to_orthanc_byte_exact(tmp_path: Path, pki: Pki) -> None:
    orthanc = Orthanc(
        tmp_path / "orthanc",
        DicomTlsEnabled=True,
        DicomTlsCertificate=str(pki.server.certificate),
        DicomTlsPrivateKey=str(pki.server.key),
        DicomTlsTrustedCertificates=str(pki.ca.path),
        DicomTlsRemoteCertificateRequired=True,
    )
    try:
        [message], _ = run_until_final(
            tmp_path,
            forwarding(orthanc.dicom_port, RemoteAET="ORTHANC", **client_side(pki)),
            [CT],
        )
        assert message.state == State.COMPLETED, message.reason
        uid = str(dcmread(CT, stop_before_pixels=True).SOPInstanceUID)
        stored = orthanc.instance_file(uid)
        assert stored is not None
        (tmp_path / "stored.dcm").write_bytes(stored)
        assert dataset_bytes(tmp_path / "stored.dcm") == dataset_bytes(CT)
    finally:
        orthanc.stop()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired certificate", "certificate has expired"),
        ("wrong server name", "Hostname mismatch"),
        ("unknown CA", "is not accepted: "),
        ("no client certificate", "client certificate"),
    ],
)
def test_a_certificate_failure_is_a_dead_message_with_the_reason(
    tmp_path: Path, pki: Pki, case: str, reason: str
) -> None:
    server = pki.ca.issue("expired server", expired=True) if case == "expired certificate" else None
    fields = client_side(pki)
    if case == "wrong server name":
        fields["TlsServerName"] = "pacs.example.org"
    elif case == "unknown CA":
        fields["TrustedCertificatesFile"] = str(
            Authority(tmp_path / "other-ca", "unrelated CA").path
        )
    elif case == "no client certificate":
        del fields["ClientCertificateFile"], fields["ClientPrivateKeyFile"]
    with storescp_tls(tmp_path / "pacs", pki, server) as port:
        [message], runtime = run_until_final(tmp_path, forwarding(port, **fields), [CT])
    assert message.state == State.DEAD
    assert message.attempts == 1  # permanent: no retries
    assert reason in (message.reason or ""), message.reason
    assert not any(value in runtime.log_text() for value in PHI)


def stow_to(base_url: str, **fields: Any) -> dict[str, Any]:
    sender = {
        "$type": "Soupflow.Senders.StowRsSenderSetting, Soupflow",
        "Id": SENDER_ID,
        "Name": "DICOMweb",
        "BaseUrl": base_url,
        "RetryMaxAttempts": 1,
        **fields,
    }
    return documents.workflow(sender, Port=0, AcceptedCallingAETs="*")


def _server_context(pki: Pki) -> ssl.SSLContext:
    """A loopback server's context that requires a client certificate from the test CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.certificate, pki.server.key)
    context.load_verify_locations(pki.ca.path)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_stow_rs_over_https_with_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    peer = HttpPeer(tls=_server_context(pki), bodies={"/dicom-web/studies": b"{}"})
    base = peer.url.removesuffix("/hook") + "/dicom-web"
    tls_fields = {
        "TrustedCertificatesFile": str(pki.ca.path),
        "ClientCertificateFile": str(pki.client.certificate),
        "ClientPrivateKeyFile": str(pki.client.key),
    }
    try:
        [message], _ = run_until_final(tmp_path / "with", stow_to(base, **tls_fields), [CT])
        assert message.state == State.COMPLETED, message.reason
        [request] = peer.requests
        assert request.path == "/dicom-web/studies" and dataset_bytes(CT) in request.body
        del tls_fields["ClientCertificateFile"], tls_fields["ClientPrivateKeyFile"]
        [refused], _ = run_until_final(tmp_path / "without", stow_to(base, **tls_fields), [CT])
        assert refused.state != State.COMPLETED and len(peer.requests) == 1
    finally:
        peer.close()


def test_mllp_over_tls_with_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    peer = MllpPeer(tls=_server_context(pki))
    sender = {
        "$type": type_of("MLLPSenderSetting", NS_SENDERS),
        "Id": SENDER_ID,
        "Name": "RIS",
        "Server": "127.0.0.1",
        "Port": peer.port,
        "UseSsl": True,
        "TrustedCertificatesFile": str(pki.ca.path),
        "ClientCertificateFile": str(pki.client.certificate),
        "ClientPrivateKeyFile": str(pki.client.key),
        "MessageTemplate": "MSH|^~\\&|SOUPFLOW|X|RIS|Y|20260101||ORU^R01|${SOPInstanceUID}|P|2.5.1",
    }
    try:
        [message], _ = run_until_final(
            tmp_path, documents.workflow(sender, Port=0, AcceptedCallingAETs="*"), [CT]
        )
    finally:
        peer.close()
    assert message.state == State.COMPLETED, message.reason
    assert len(peer.messages) == 1 and peer.messages[0].startswith("MSH|")


def test_soupflow_echo_tests_a_tls_link_with_the_senders_options(tmp_path: Path, pki: Pki) -> None:
    with storescp_tls(tmp_path / "pacs", pki) as port:
        base = ["echo", "127.0.0.1", str(port), "--called-aet", "PACS", "--tls", "--timeout", "5"]
        ok = soupflow(
            *base,
            "--trusted",
            str(pki.ca.path),
            "--client-cert",
            str(pki.client.certificate),
            "--client-key",
            str(pki.client.key),
        )
        assert ok.returncode == 0 and "C-ECHO status 0x0000" in ok.stdout, ok.stderr
        untrusted = soupflow(*base)  # the system store does not know the test CA
        assert untrusted.returncode == 1 and "is not accepted" in untrusted.stderr
