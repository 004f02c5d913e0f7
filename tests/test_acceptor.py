"""The acceptor's side of the upper layer: negotiation, fragments, aborts, shutdown.

Peers are pynetdicom (as a requestor) and raw sockets speaking PS3.8 bytes crafted with
pynetdicom's PDU codec and pydicom's encoder (bench.scu's wire helpers), never with the code
under test.
"""

from __future__ import annotations

import os
import socket
import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, build_role
from pynetdicom.dsutils import decode

from bench.scu import associate_request, pdv_pdu, read_pdu, store_command
from soupflow.dicom.acceptor import WRITE_BEHIND_BYTES, WriteBehind
from soupflow.dicom.status import SUCCESS
from tests.dicom import (
    DEADLINE_SECONDS,
    Receiving,
    chunked_send,
    dataset_bytes,
    receiving,
    sample_file,
    send_files,
    unavailable,
    wait_for,
)

CT = sample_file("CT_small.dcm")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.99999.1"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"


class RawPeer:
    """A requestor on a plain socket: what a buggy or hostile sender can do."""

    def __init__(
        self,
        port: int,
        application_context: str = "1.2.840.10008.3.1.1.1",
        host: str = "127.0.0.1",
        max_pdu: int = 16384,
        protocol_version: int = 0x0001,
    ) -> None:
        self.connection = socket.create_connection((host, port), timeout=DEADLINE_SECONDS)
        contexts = [(1, CT_IMAGE_STORAGE, ExplicitVRLittleEndian)]
        request = bytearray(
            associate_request("MODALITY01", "SOUPFLOW", contexts, max_pdu, application_context)
        )
        request[6:8] = protocol_version.to_bytes(2, "big")  # PS3.8 9.3.2
        self.connection.sendall(request)
        self.reply_type, self.reply = self.read_pdu()

    def read_pdu(self) -> tuple[int, bytes]:
        return read_pdu(self.connection)

    def read_command(self) -> tuple[Dataset, list[int]]:
        """A command sent in P-DATA fragments, and the length of each PDU that carried it."""
        command, lengths = b"", []
        for _ in range(100):
            pdu_type, body = self.read_pdu()
            assert pdu_type == 0x04
            lengths.append(len(body))
            item_length, _, control = struct.unpack(">IBB", body[:6])
            assert item_length == len(body) - 4  # one PDV per PDU
            command += body[6:]
            if control & 0x02:
                return decode(BytesIO(command), True, True), lengths
        raise AssertionError("no last fragment in 100 PDUs")

    def send_pdv(self, context_id: int, control: int, value: bytes) -> None:
        self.connection.sendall(pdv_pdu(context_id, control, value))

    def store_command(self, sop_instance_uid: str, command_field: int = 0x0001) -> bytes:
        return store_command(CT_IMAGE_STORAGE, sop_instance_uid, 7, command_field)

    def abort_reason(self) -> int:
        """The reason of the A-ABORT the listener sent before closing the connection."""
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x07, f"expected an A-ABORT, got PDU type 0x{pdu_type:02X}"
        try:
            trailing = self.connection.recv(1)
        except ConnectionResetError:
            trailing = b""
        assert trailing == b"", "the connection stayed open after the A-ABORT"
        assert body[2] == 0x02, "the source is the service provider"
        return body[3]

    def close(self) -> None:
        self.connection.close()


def nothing_received(running: Receiving) -> bool:
    incoming = running.spool.incoming
    return not any(incoming.iterdir()) and running.queue.messages() == []


def test_tiny_pdus_both_ways_carry_the_object_byte_identical(tmp_path: Path) -> None:
    """A 64-byte maximum PDU on each side: the command, the dataset and the response all
    travel in many fragments, and what is stored is what was sent."""
    with receiving(tmp_path / "data", MaxPduSize=64) as running:
        ae = AE(ae_title="MODALITY01")
        ae.maximum_pdu_size = 64
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = DEADLINE_SECONDS
        ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
        with chunked_send():
            assoc = ae.associate("127.0.0.1", running.port, ae_title="SOUPFLOW")
            assert assoc.is_established
            assert assoc.acceptor.maximum_length == 64
            status = assoc.send_c_store(CT)
            assoc.release()
        assert status.Status == SUCCESS
        (stored,) = running.stored(str(dcmread(CT).SOPInstanceUID))
        assert dataset_bytes(stored) == dataset_bytes(CT)


def test_negotiation_accepts_storage_as_proposed_and_rejects_other_services(tmp_path: Path) -> None:
    with receiving(tmp_path / "data") as running:
        ae = AE(ae_title="MODALITY01")
        ae.acse_timeout = ae.network_timeout = DEADLINE_SECONDS
        ae.add_requested_context(CT_IMAGE_STORAGE, [JPEGBaseline8Bit, ExplicitVRLittleEndian])
        ae.add_requested_context(PRIVATE_SOP_CLASS, ImplicitVRLittleEndian)
        ae.add_requested_context(MODALITY_WORKLIST_FIND)
        ae.add_requested_context("1.2.840.10008.1.1")
        role = build_role(CT_IMAGE_STORAGE, scu_role=True, scp_role=False)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="SOUPFLOW", ext_neg=[role])
        try:
            assert assoc.is_established
            accepted = {
                str(cx.abstract_syntax): str(cx.transfer_syntax[0])
                for cx in assoc.accepted_contexts
            }
            assert accepted == {
                CT_IMAGE_STORAGE: JPEGBaseline8Bit,  # the first one proposed
                PRIVATE_SOP_CLASS: ImplicitVRLittleEndian,
                "1.2.840.10008.1.1": ImplicitVRLittleEndian,
            }
            assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == [
                MODALITY_WORKLIST_FIND
            ]
            assert CT_IMAGE_STORAGE in assoc.acceptor.role_selection
            assert assoc.send_c_echo().Status == SUCCESS
        finally:
            assoc.release()


def test_a_wrong_application_context_is_rejected(tmp_path: Path) -> None:
    with receiving(tmp_path / "data") as running:
        peer = RawPeer(running.port, application_context="1.2.3.4")
        try:
            assert peer.reply_type == 0x03  # A-ASSOCIATE-RJ
            assert peer.reply[1:4] == bytes((0x01, 0x01, 0x02))  # permanent, user, app context
        finally:
            peer.close()


def test_an_unsupported_protocol_version_is_rejected(tmp_path: Path) -> None:
    with receiving(tmp_path / "data") as running:
        peer = RawPeer(running.port, protocol_version=0x0002)
        try:
            assert peer.reply_type == 0x03  # A-ASSOCIATE-RJ
            assert peer.reply[1:4] == bytes((0x01, 0x02, 0x02))  # permanent, ACSE, version
        finally:
            peer.close()


def test_abort_in_the_middle_of_a_dataset_leaves_nothing(tmp_path: Path) -> None:
    with receiving(tmp_path / "data") as running:
        peer = RawPeer(running.port)
        assert peer.reply_type == 0x02
        peer.send_pdv(1, 0x03, peer.store_command("1.2.826.0.1.3680043.8.498.7"))
        peer.send_pdv(1, 0x00, dataset_bytes(CT)[:4000])  # a dataset fragment, not the last
        wait_for(lambda: any(running.spool.incoming.iterdir()), "the dataset to be streamed")
        peer.connection.sendall(struct.pack(">BxI", 0x07, 4) + bytes((0, 0, 0, 0)))  # A-ABORT
        wait_for(lambda: running.listener.active_associations == 0, "the association to end")
        peer.close()
        assert nothing_received(running)
        assert send_files(running.port, [CT]) == [SUCCESS]


def test_a_pdv_on_a_context_that_was_not_accepted_is_aborted(tmp_path: Path) -> None:
    with receiving(tmp_path / "data") as running:
        peer = RawPeer(running.port)
        peer.send_pdv(99, 0x03, peer.store_command("1.2.826.0.1.3680043.8.498.7"))
        assert peer.abort_reason() == 0x06  # invalid PDU parameter
        peer.close()
        assert send_files(running.port, [CT]) == [SUCCESS]


def test_a_service_other_than_store_and_echo_is_aborted(tmp_path: Path) -> None:
    with receiving(tmp_path / "data") as running:
        peer = RawPeer(running.port)
        peer.send_pdv(
            1, 0x03, peer.store_command("1.2.826.0.1.3680043.8.498.7", command_field=0x0020)
        )
        assert peer.abort_reason() == 0x06  # invalid PDU parameter
        peer.close()
        assert nothing_received(running)


def test_commands_split_over_pdus_both_ways(tmp_path: Path) -> None:
    """The request's command arrives in two fragments; the response is fragmented to the
    requestor's 40-byte maximum PDU length."""
    with receiving(tmp_path / "data") as running:
        peer = RawPeer(running.port, max_pdu=40)
        sop_instance_uid = str(dcmread(CT).SOPInstanceUID)
        command = peer.store_command(sop_instance_uid)
        peer.send_pdv(1, 0x01, command[:10])
        peer.send_pdv(1, 0x03, command[10:])
        data = dataset_bytes(CT)
        peer.send_pdv(1, 0x00, data[:100])
        peer.send_pdv(1, 0x02, data[100:])
        response, lengths = peer.read_command()
        peer.close()
        assert len(lengths) > 1 and max(lengths) <= 40
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (
            0x8001,
            7,
            SUCCESS,
        )
        (stored,) = running.stored(sop_instance_uid)
        assert dataset_bytes(stored) == data


def test_stop_aborts_an_association_left_open_after_the_grace_period(tmp_path: Path) -> None:
    with receiving(tmp_path / "data") as running:
        ae = AE(ae_title="MODALITY01")
        ae.acse_timeout = ae.network_timeout = DEADLINE_SECONDS
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", running.port, ae_title="SOUPFLOW")
        assert assoc.is_established
        running.listener.stop(grace_seconds=0.1)
        wait_for(lambda: assoc.is_aborted, "the open association to be aborted")
        assert running.listener.active_associations == 0


def test_ipv6_loopback_listener_receives(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        unavailable("this Python has no IPv6 support")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        unavailable(f"no IPv6 loopback here: {exc}")
    with receiving(tmp_path / "data", host="::1") as running:
        peer = RawPeer(running.port, host="::1")
        try:
            assert peer.reply_type == 0x02
        finally:
            peer.close()


@pytest.mark.parametrize("max_pdu", [0, 32768])
def test_the_advertised_maximum_pdu_is_the_receivers_setting(tmp_path: Path, max_pdu: int) -> None:
    with receiving(tmp_path / "data", MaxPduSize=max_pdu) as running:
        ae = AE(ae_title="MODALITY01")
        ae.acse_timeout = ae.network_timeout = DEADLINE_SECONDS
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", running.port, ae_title="SOUPFLOW")
        try:
            assert assoc.acceptor.maximum_length == max_pdu
        finally:
            assoc.release()


@pytest.mark.parametrize(
    ("pdu", "reason"),
    [
        (bytes((0x01, 0, 0, 0, 0, 2, 0, 1)), 0x02),  # a second A-ASSOCIATE-RQ: unexpected PDU
        (bytes((0x09, 0, 0, 0, 0, 0)), 0x01),  # PDU type 9 does not exist: unrecognized PDU
    ],
)
def test_a_pdu_out_of_place_is_aborted_with_its_reason(
    tmp_path: Path, pdu: bytes, reason: int
) -> None:
    with receiving(tmp_path / "data") as running:
        peer = RawPeer(running.port)
        assert peer.reply_type == 0x02
        peer.connection.sendall(pdu)
        assert peer.abort_reason() == reason
        peer.close()
        assert send_files(running.port, [CT]) == [SUCCESS]


def test_write_behind_hands_each_stretch_to_the_kernel_as_the_file_grows(tmp_path: Path) -> None:
    """A large object's bytes leave the process's buffer at each threshold (and the kernel is
    asked to write them back), so the final fsync has little left."""
    on_disk = set()
    piece = b"x" * 1000
    with (tmp_path / "large.part").open("wb", buffering=4 * WRITE_BEHIND_BYTES) as file:
        behind = WriteBehind(file)
        for _ in range(5 * WRITE_BEHIND_BYTES // 2 // len(piece)):
            file.write(piece)
            behind.wrote(len(piece))
            on_disk.add(os.fstat(file.fileno()).st_size)
    stretch = -(-WRITE_BEHIND_BYTES // len(piece)) * len(piece)  # whole pieces past it
    assert sorted(on_disk) == [0, stretch, 2 * stretch]  # nothing else left the 64 MB buffer
