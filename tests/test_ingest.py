"""Receiving: what is acknowledged is stored byte-exact and queued once; who may associate."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from bench.ingest import free_port
from bench.scu import RELEASE_REQUEST, associate_request, read_pdu
from soupflow.dicom import pdu
from soupflow.dicom.status import SUCCESS
from tests.dicom import (
    DEADLINE_SECONDS,
    NODELAY,
    associate,
    dataset_bytes,
    receiving,
    require_tool,
    sample_file,
    send_files,
    wait_for,
)

PRIVATE_SOP_CLASS = "1.3.6.1.4.1.99999.1.1"
VERIFICATION = "1.2.840.10008.1.1"


def private_sop_class_file(folder: Path) -> Path:
    dataset = dcmread(sample_file("CT_small.dcm"))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
    path = folder / "private.dcm"
    dataset.save_as(path)
    return path


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "private"]
)
def test_pynetdicom_send_is_stored_byte_identical_and_queued_once(
    tmp_path: Path, name: str
) -> None:
    source = private_sop_class_file(tmp_path) if name == "private" else sample_file(name)
    meta = dcmread(source, stop_before_pixels=True)
    with receiving(tmp_path / "data") as running:
        assert send_files(running.port, [source]) == [SUCCESS]
        [stored] = running.stored(str(meta.SOPInstanceUID))
        assert dataset_bytes(stored) == dataset_bytes(source)
        [message] = running.queue.messages()
        assert message.arrival.transfer_syntax_uid == meta.file_meta.TransferSyntaxUID
        assert message.arrival.sop_class_uid == meta.SOPClassUID
        assert message.arrival.byte_count == stored.stat().st_size
        assert dcmread(stored).file_meta.MediaStorageSOPInstanceUID == meta.SOPInstanceUID


@pytest.mark.parametrize(
    ("name", "propose", "prefer"),
    [
        ("CT_small.dcm", "-x=", "+x="),
        ("MR_small.dcm", "-x=", "+x="),
        ("SC_rgb_jpeg_dcmtk.dcm", "-xy", "+xy"),
    ],
)
def test_storescu_send_is_stored_exactly_as_dcmtk_storescp_receives_it(
    tmp_path: Path, name: str, propose: str, prefer: str
) -> None:
    storescu, storescp = require_tool("storescu"), require_tool("storescp")
    source = sample_file(name)
    reference = tmp_path / "storescp"
    reference.mkdir()
    port = free_port()
    peer = subprocess.Popen([storescp, prefer, "+B", "-od", str(reference), str(port)], env=NODELAY)
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    [require_tool("echoscu"), "127.0.0.1", str(port)],
                    env=NODELAY,
                    timeout=10,
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            ),
            "storescp to answer",
        )
        subprocess.run(
            [storescu, propose, "127.0.0.1", str(port), str(source)],
            env=NODELAY,
            timeout=60,
            check=True,
        )
        [expected] = wait_for(lambda: list(reference.glob("*")), "storescp to write the file")
        with receiving(tmp_path / "data") as running:
            subprocess.run(
                [
                    storescu,
                    propose,
                    "-aet",
                    "MODALITY01",
                    "-aec",
                    "SOUPFLOW",
                    "127.0.0.1",
                    str(running.port),
                    str(source),
                ],
                env=NODELAY,
                timeout=60,
                check=True,
            )
            [stored] = running.stored(str(dcmread(source, stop_before_pixels=True).SOPInstanceUID))
            assert dataset_bytes(stored) == dataset_bytes(expected)
            assert (
                dcmread(stored).file_meta.TransferSyntaxUID
                == dcmread(source).file_meta.TransferSyntaxUID
            )
            assert len(running.queue.messages()) == 1
    finally:
        peer.terminate()
        peer.wait(timeout=30)


def test_echoscu_gets_success(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu")
    with receiving(tmp_path / "data") as running:
        result = subprocess.run(
            [echoscu, "-aet", "MODALITY01", "127.0.0.1", str(running.port)],
            env=NODELAY,
            timeout=60,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def _rejection(
    port: int, calling_aet: str, called_aet: str = "SOUPFLOW"
) -> tuple[int, int, int] | None:
    """The receiver's answer to an A-ASSOCIATE-RQ for Verification: None when it accepts (the
    association is released at once), else the A-ASSOCIATE-RJ's (result, source, reason).
    Read off the wire: pynetdicom 3.0.4's requestor takes a rejection that arrives before
    its own thread has looked at the new connection for a failed connect, and aborts (seen
    under load in CI)."""
    request = associate_request(calling_aet, called_aet, [(1, VERIFICATION, "1.2.840.10008.1.2")])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS) as connection:
        connection.sendall(request)
        pdu_type, body = read_pdu(connection)
        if pdu_type == pdu.A_ASSOCIATE_AC_PDU:
            connection.sendall(RELEASE_REQUEST)
            assert read_pdu(connection)[0] == pdu.A_RELEASE_RP_PDU
            return None
        assert pdu_type == pdu.A_ASSOCIATE_RJ_PDU, f"answered with PDU type 0x{pdu_type:02X}"
        return body[1], body[2], body[3]


@pytest.mark.parametrize(
    ("allow_list", "calling_aet", "accepted"),
    [
        (" modality01 , CT2", "MODALITY01", True),
        (" modality01 , CT2", "ct2", True),
        (" modality01 , CT2", "OTHER", False),
        ("", "MODALITY01", False),
        ("*", "ANYONE", True),
        ("CT1, *", "ANYONE", True),
    ],
)
def test_calling_ae_allow_list(
    tmp_path: Path, allow_list: str, calling_aet: str, accepted: bool
) -> None:
    with receiving(tmp_path / "data", AcceptedCallingAETs=allow_list) as running:
        rejection = _rejection(running.port, calling_aet)
    assert rejection == (
        None if accepted else (0x01, 0x01, 0x03)
    )  # permanent, service user, calling AE


def test_enforce_our_aet_rejects_a_wrong_called_ae(tmp_path: Path) -> None:
    with receiving(tmp_path / "data", EnforceOurAET=True) as running:
        assert _rejection(running.port, "MODALITY01", "NOT_US") == (0x01, 0x01, 0x07)
        assert _rejection(running.port, "MODALITY01", "SOUPFLOW") is None
    with receiving(tmp_path / "data2") as running:
        assert _rejection(running.port, "MODALITY01", "NOT_US") is None


def test_max_associations_rejects_the_one_too_many(tmp_path: Path) -> None:
    with receiving(tmp_path / "data", MaxAssociations=1) as running:
        first = associate(running.port, "MODALITY01")
        assert first.is_established
        assert _rejection(running.port, "MODALITY01") == (
            0x02,
            0x03,
            0x02,
        )  # transient, local limit
        first.release()


def test_a_new_allow_list_applies_to_the_next_association_without_cutting_the_open_one(
    tmp_path: Path,
) -> None:
    with receiving(tmp_path / "data", AcceptedCallingAETs="MODALITY01") as running:
        open_one = associate(running.port, "MODALITY01")
        running.listener.update(
            running.listener.receiver.model_copy(update={"accepted_calling_aets": "CT2"})
        )
        assert _rejection(running.port, "MODALITY01") == (0x01, 0x01, 0x03)
        assert _rejection(running.port, "CT2") is None
        assert open_one.is_established
        assert open_one.send_c_echo().Status == SUCCESS
        open_one.release()


def test_a_rejection_is_logged_with_ae_titles_and_peer_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level("WARNING", logger="soupflow.receivers.dicom"),
        receiving(tmp_path / "data", AcceptedCallingAETs="CT1") as running,
    ):
        assert _rejection(running.port, "INTRUDER", "SOUPFLOW") == (0x01, 0x01, 0x03)
    [record] = [r for r in caplog.records if "rejected association" in r.getMessage()]
    assert record.getMessage().startswith("rejected association from 127.0.0.1:")
    assert "calling 'INTRUDER' called 'SOUPFLOW': calling AE not allowed" in record.getMessage()


def test_a_resend_within_the_deduplication_window_is_answered_success_and_queued_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = sample_file("CT_small.dcm")
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    with receiving(
        tmp_path / "data", AcceptedCallingAETs="*", DeduplicateWindowSeconds=3600
    ) as running:
        caplog.set_level("INFO")
        assert send_files(running.port, [source, source]) == [SUCCESS, SUCCESS]
        assert send_files(running.port, [source]) == [SUCCESS]
        assert len(running.stored(uid)) == 1
        [counts] = running.queue.counts()
        assert counts.duplicates == 2
    assert sum("is a duplicate within 3600 s" in r.getMessage() for r in caplog.records) == 2
    objects = [path for path in (tmp_path / "data" / "objects").rglob("*") if path.is_file()]
    assert len(objects) == 1  # the duplicates' files are not left in the spool


def test_without_a_deduplication_window_a_resend_is_queued_again(tmp_path: Path) -> None:
    source = sample_file("CT_small.dcm")
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    with receiving(tmp_path / "data", AcceptedCallingAETs="*") as running:
        assert send_files(running.port, [source, source]) == [SUCCESS, SUCCESS]
        assert len(running.stored(uid)) == 2


def test_a_deflated_object_from_storescu_is_sent_in_another_syntax_and_stored(
    tmp_path: Path,
) -> None:
    storescu = require_tool("storescu")
    source = sample_file("image_dfl.dcm")
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    with receiving(tmp_path / "data", AcceptedCallingAETs="*") as running:
        done = subprocess.run(
            [storescu, "-xd", "127.0.0.1", str(running.port), str(source)],
            env=NODELAY,
            timeout=60,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        [stored] = running.stored(uid)
        [message] = running.queue.messages()
    assert message.arrival.transfer_syntax_uid != "1.2.840.10008.1.2.1.99"
    assert dcmread(stored).SOPInstanceUID == uid
