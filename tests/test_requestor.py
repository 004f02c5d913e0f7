"""soupflow's own SCU (`dicom.requestor`) against real acceptors on loopback: dcmtk's storescp,
soupflow's listener, and raw sockets that misbehave."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread

from soupflow.dicom import requestor, status
from soupflow.dicom.negotiation import Proposal
from soupflow.dicom.requestor import (
    Association,
    AssociationLostError,
    AssociationRejectedError,
    Destination,
    NoConnectionError,
)
from tests.dicom import dataset_bytes, receiving, sample_file

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def to(port: int, remote_aet: str = "SOUPFLOW", timeout: float = 10.0) -> Destination:
    return Destination("127.0.0.1", port, "MODALITY01", remote_aet, timeout)


def test_echo_answers_success_from_soupflows_listener(tmp_path: Path) -> None:
    with receiving(tmp_path / "data", AcceptedCallingAETs="MODALITY01") as running:
        ok, what = requestor.echo(to(running.port))
    assert ok and what == "C-ECHO status 0x0000 Success"


def test_a_caller_not_on_the_allow_list_is_rejected_permanently(tmp_path: Path) -> None:
    with (
        receiving(tmp_path / "data", AcceptedCallingAETs="OTHER") as running,
        pytest.raises(AssociationRejectedError) as raised,
    ):
        Association.open(to(running.port), [Proposal(CT, (EXPLICIT,))])
    assert not raised.value.transient
    assert raised.value.rejection.diagnostic == 0x03


def test_many_stores_travel_over_one_association_byte_exact(tmp_path: Path) -> None:
    source = sample_file("CT_small.dcm")
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    with receiving(tmp_path / "data", AcceptedCallingAETs="*") as running:
        association = Association.open(to(running.port), [Proposal(CT, (EXPLICIT,))])
        try:
            context_id = association.context_for(CT, (EXPLICIT,))
            assert context_id is not None
            codes = [association.c_store_file(context_id, CT, uid, source) for _ in range(3)]
        finally:
            association.release()
        stored = running.stored(uid)
    assert codes == [status.SUCCESS] * 3
    assert len(stored) == 3
    assert {dataset_bytes(path) for path in stored} == {dataset_bytes(source)}


def test_nothing_listening_is_no_connection_and_transient() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(NoConnectionError) as raised:
            Association.open(to(port), [Proposal(CT, (EXPLICIT,))])
    assert raised.value.transient


@contextmanager
def trickling_acceptor(byte_every_seconds: float) -> Iterator[int]:
    """Accepts one connection and answers its A-ASSOCIATE-RQ one byte at a time (bounded)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            for byte in b"\x02\x00\x00\x00\x10\x00" + bytes(64):  # an endless-looking AC
                if stop.wait(byte_every_seconds):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(timeout=30)


def test_a_peer_that_trickles_its_answer_cannot_hold_the_association_past_the_timeout() -> None:
    with (
        trickling_acceptor(0.2) as port,
        pytest.raises(AssociationLostError, match="within 1 s") as raised,
    ):
        Association.open(to(port, timeout=1.0), [Proposal(CT, (EXPLICIT,))])
    assert raised.value.transient
