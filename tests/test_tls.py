"""DICOM over TLS into a soupflow listener: dcmtk's storescu/echoscu +tls, mutual TLS, and
every refusal (another CA, TLS 1.1, cleartext, a wrong thumbprint), with certificates made
in the test."""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.scu import associate_request
from soupflow import tls
from soupflow.workflow.load import load_file
from tests import documents
from tests.certs import Issued, Pki
from tests.dicom import (
    DEADLINE_SECONDS,
    NODELAY,
    Receiving,
    receiving,
    require_tool,
    sample_file,
    wait_for,
)

CT = sample_file("CT_small.dcm")
EXPLICIT = "1.2.840.10008.1.2.1"
PHI = ("CompressedSamples", "1CT1")  # CT_small's patient name and id


def storescu_tls(
    port: int, client: Issued, trusted: Path, *files: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require_tool("storescu"),
            "+tls",
            *client.pair,
            "-pw",
            "+cf",
            str(trusted),
            "-aet",
            "MODALITY01",
            "-aec",
            "SOUPFLOW",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=NODELAY,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextmanager
def tls_listener(tmp_path: Path, pki: Pki, **fields: Any) -> Iterator[Receiving]:
    with receiving(tmp_path / "data", **pki.listener(**fields)) as running:
        yield running


def test_storescu_over_mutual_tls_stores_and_the_message_knows_the_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    with tls_listener(tmp_path, pki) as running:
        sent = storescu_tls(running.port, pki.client, pki.ca.path, CT)
        assert sent.returncode == 0, sent.stderr
        [message] = running.queue.messages()
        origin = message.arrival.origin
        assert origin.client_cert_sha256 == pki.client.sha256
        assert "CN=modality one" in origin.client_cert_subject
        assert running.stored(message.arrival.sop_instance_uid)[0].read_bytes()[132:] != b""
        echoed = subprocess.run(
            [
                require_tool("echoscu"),
                "+tls",
                *pki.client.pair,
                "-pw",
                "+cf",
                str(pki.ca.path),
                "-aet",
                "MODALITY01",
                "-aec",
                "SOUPFLOW",
                "127.0.0.1",
                str(running.port),
            ],
            env=NODELAY,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert echoed.returncode == 0, echoed.stderr


def _client(
    pki: Pki, issued: Issued | None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca.path)
    if issued is not None:
        context.load_cert_chain(issued.certificate, issued.key)
    if maximum is not None:
        with warnings.catch_warnings():  # an old version is the point of the test
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = maximum
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _python_handshake(port: int, context: ssl.SSLContext) -> str:
    """'accepted' when the server kept the connection after the handshake, else why not."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as secured:
                secured.sendall(b"\x01")  # TLS 1.3 reports a rejected client cert on read
                return "accepted" if secured.recv(1) != b"" else "closed"
        except (ssl.SSLError, ConnectionError) as exc:
            return type(exc).__name__


def _handshake_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]


@pytest.mark.parametrize("case", ["another CA", "TLS 1.1", "wrong thumbprint", "cleartext"])
def test_a_client_not_allowed_is_refused_and_others_still_store(
    tmp_path: Path, pki: Pki, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fields = {"ClientCertificateThumbPrint": "ab" * 32} if case == "wrong thumbprint" else {}
    with tls_listener(tmp_path, pki, **fields) as running:
        if case == "another CA":  # twice: the second refusal names the certificate
            for attempt in (1, 2):
                refused = storescu_tls(running.port, pki.stranger, pki.ca.path, CT)
                assert refused.returncode != 0
                wait_for(lambda n=attempt: len(_handshake_failures(caplog)) == n, "the refusal")
        elif case == "TLS 1.1":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old = ssl.TLSVersion.TLSv1_1
            outcome = _python_handshake(running.port, _client(pki, pki.client, old))
            assert outcome != "accepted"
        elif case == "wrong thumbprint":
            refused = storescu_tls(running.port, pki.client, pki.ca.path, CT)
            assert refused.returncode != 0
        else:
            with socket.create_connection(("127.0.0.1", running.port), timeout=60) as plain:
                plain.sendall(b"\x01\x00\x00\x00\x00\xcd" + bytes(205))  # an A-ASSOCIATE-RQ
                try:
                    answer = plain.recv(1024)
                except ConnectionResetError:
                    answer = b""
                assert answer[:1] != b"\x02"  # never an A-ASSOCIATE-AC
        assert running.queue.messages() == []
        if case != "wrong thumbprint":  # the listener keeps serving the allowed client
            allowed = storescu_tls(running.port, pki.client, pki.ca.path, CT)
            assert allowed.returncode == 0, allowed.stderr
    refusals = [r.getMessage() for r in caplog.records if "TLS" in r.getMessage()]
    assert refusals, "the refusal is logged"
    assert all("\n" not in line for line in refusals)  # one line each
    if case == "wrong thumbprint":
        assert f"sha256 {pki.client.sha256}" in refusals[-1]
    if case == "another CA":  # OpenSSL refused it unseen; its second handshake names it
        first, second = _handshake_failures(caplog)
        assert "the next handshake from 127.0.0.1 logs the certificate's sha256" in first
        assert f"client certificate sha256 {pki.stranger.sha256}" in second
    assert not any(value in caplog.text for value in PHI)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_refused_certificate_is_named_from_its_second_handshake_over_either_version(
    tmp_path: Path, pki: Pki, version: ssl.TLSVersion, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with tls_listener(tmp_path, pki) as running:
        for attempt in (1, 2):
            outcome = _python_handshake(running.port, _client(pki, pki.stranger, version))
            assert outcome != "accepted"
            wait_for(lambda n=attempt: len(_handshake_failures(caplog)) == n, "the refusal")
    first, second = _handshake_failures(caplog)
    assert "the next handshake from 127.0.0.1 logs the certificate's sha256" in first
    assert "client certificate sha256" not in first
    assert f"client certificate sha256 {pki.stranger.sha256}" in second


def test_a_silent_tls_client_does_not_stop_another_storing(tmp_path: Path, pki: Pki) -> None:
    with (
        tls_listener(tmp_path, pki, MaxAssociations=1) as running,
        socket.create_connection(("127.0.0.1", running.port), timeout=60),
        socket.create_connection(("127.0.0.1", running.port), timeout=60) as half,
    ):
        half.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        sent = storescu_tls(running.port, pki.client, pki.ca.path, CT)
        assert sent.returncode == 0, sent.stderr


def test_a_handshake_that_stalls_is_dropped_at_the_association_timeout(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        tls_listener(tmp_path, pki, AssociationTimeoutSeconds=1) as running,
        socket.create_connection(("127.0.0.1", running.port), timeout=60) as stalled,
    ):
        stalled.sendall(b"\x16\x03\x01")
        assert stalled.recv(1024) in (b"", b"\x15\x03\x03\x00\x02\x02\x32")  # closed


def test_a_renewed_certificate_applies_to_the_next_connection_without_a_restart(
    tmp_path: Path, pki: Pki
) -> None:
    with tls_listener(tmp_path, pki, AuthenticationType=0) as running:
        first = _served_certificate(running.port, pki)
        renewed = pki.ca.issue("soupflow server")  # same file names, new key and certificate
        assert renewed.certificate == pki.server.certificate
        second = _served_certificate(running.port, pki)
        assert first != second == renewed.sha256


def _served_certificate(port: int, pki: Pki) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS) as raw,
        _client(pki, None).wrap_socket(raw, server_hostname="127.0.0.1") as secured,
    ):
        der = secured.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def _listener_issues(folder: Path, **fields: Any) -> list[tuple[str, str]]:
    document = documents.workflow(Port=0, AcceptedCallingAETs="*", **fields)
    path = folder / "tls.json"
    documents.write(path, document)
    return [(issue.pointer, issue.message) for issue in load_file(path).issues]


def test_certificate_problems_are_validation_errors_at_their_field(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = pki.ca.issue("locked server", password="s3cret")
    other = pki.ca.issue("other server")
    cases = {
        "PrivateKeyPassword": (
            {"PrivateKeyFile": str(locked.key), "CertificateFile": str(locked.certificate)},
            "the password does not decrypt",
        ),
        "PrivateKeyFile": ({"PrivateKeyFile": str(other.key)}, "does not match the certificate"),
        "CertificateFile": ({"CertificateFile": str(tmp_path / "gone.pem")}, "does not exist"),
        "TrustedCertificatesFile": ({"TrustedCertificatesFile": ""}, "needs TrustedCertificates"),
        "ClientCertificateThumbPrint": (
            {"ClientCertificateThumbPrint": "ab:cd"},
            "is not a SHA-256 fingerprint",
        ),
    }
    for field, (change, message) in cases.items():
        fields = pki.listener(**change)
        if field == "PrivateKeyPassword":
            fields["PrivateKeyPassword"] = "wrong"
        issues = _listener_issues(tmp_path, **fields)
        assert any(
            pointer == f"/WorkflowPattern/0/{field}" and message in text for pointer, text in issues
        ), (field, issues)
    assert _listener_issues(tmp_path, **pki.listener()) == []
    encrypted = pki.listener(
        PrivateKeyFile=str(locked.key),
        CertificateFile=str(locked.certificate),
        PrivateKeyPassword="${env:SOUPFLOW_TEST_KEY_PASSWORD}",
    )
    monkeypatch.setenv("SOUPFLOW_TEST_KEY_PASSWORD", "s3cret")
    assert _listener_issues(tmp_path, **encrypted) == []


def test_relative_certificate_paths_start_at_the_workflow_files_folder(
    tmp_path: Path, pki: Pki
) -> None:
    folder = pki.ca.folder
    relative = pki.listener(
        CertificateFile=pki.server.certificate.name,
        PrivateKeyFile=pki.server.key.name,
        TrustedCertificatesFile="ca.pem",
    )
    assert _listener_issues(folder, **relative) == []
    assert _listener_issues(tmp_path, **relative) != []


def test_stopping_aborts_an_open_tls_association_from_its_own_thread(
    tmp_path: Path, pki: Pki
) -> None:
    """The listener's stop asks the association's thread to end it (one writer per TLS
    socket, and none here: over TLS the closed connection is the abort)."""
    request = associate_request("MODALITY01", "SOUPFLOW", [(1, "1.2.840.10008.1.1", EXPLICIT)])
    with (
        tls_listener(tmp_path, pki) as running,
        socket.create_connection(("127.0.0.1", running.port), timeout=DEADLINE_SECONDS) as raw,
        _client(pki, pki.client).wrap_socket(raw, server_hostname="127.0.0.1") as secured,
    ):
        secured.sendall(request)
        assert secured.recv(1)[:1] == b"\x02"  # A-ASSOCIATE-AC
        secured.recv(65536)
        running.listener.stop(grace_seconds=0.1)
        try:
            ended = secured.recv(1)
        except (ssl.SSLError, ConnectionError):
            ended = b""
        assert ended == b""
        assert running.listener.active_associations == 0


def test_the_offered_certificate_parser_takes_the_first_certificate_and_refuses_garbage(
    pki: Pki,
) -> None:
    """The Certificate message comes from the peer before OpenSSL has checked it."""
    der = ssl.PEM_cert_to_DER_cert(pki.stranger.certificate.read_text())
    entry = len(der).to_bytes(3, "big") + der
    tls12 = len(entry).to_bytes(3, "big") + entry
    tls13 = b"\x00" + len(entry + b"\x00\x00").to_bytes(3, "big") + entry + b"\x00\x00"
    for body, version in ((tls12, 0x0303), (tls13, 0x0304)):
        message = b"\x0b" + len(body).to_bytes(3, "big") + body
        assert tls.leaf_certificate(message, version) == der
        assert tls.leaf_certificate(message[: len(message) // 2], version) is None  # cut short
    empty = b"\x0b\x00\x00\x03\x00\x00\x00"  # a client that sent no certificate
    assert tls.leaf_certificate(empty, 0x0303) is None
    assert tls.leaf_certificate(b"", 0x0304) is None
    assert tls.leaf_certificate(b"\x0b\x00\x00\x01\xff", 0x0304) is None  # context too long
