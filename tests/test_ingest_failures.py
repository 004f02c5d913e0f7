"""Nothing is acknowledged that could be lost; bad peers never take the listener down."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from bench.scu import associate_request, read_pdu
from soupflow.dicom.acceptor import ReceivedObject
from soupflow.dicom.status import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from soupflow.ingest import Ingest
from soupflow.store.queue import Arrival, Origin, QueueError
from soupflow.store.spool import Spool
from soupflow.store.sqlite import DATABASE_FILE, SqliteQueue
from tests.dicom import (
    DEADLINE_SECONDS,
    Receiving,
    associate,
    receiving,
    sample_file,
    send_files,
    soupflow,
    unavailable,
    wait_for,
)

CT = sample_file("CT_small.dcm")


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def nothing_left(running: Receiving) -> None:
    assert running.queue.messages() == []
    left = [path for path in running.spool.root.rglob("*") if path.is_file()]
    assert left == []  # rglob of a missing folder finds nothing


def test_unwritable_spool_answers_out_of_resources_and_keeps_serving(tmp_path: Path) -> None:
    with receiving(tmp_path / "data") as running:
        running.spool.root.parent.mkdir(parents=True, exist_ok=True)
        running.spool.root.write_text("not a folder")  # even root cannot create files under a file
        assert send_files(running.port, [CT]) == [OUT_OF_RESOURCES]
        assert running.queue.messages() == []
        running.spool.root.unlink()
        assert send_files(running.port, [CT]) == [SUCCESS]
        assert len(running.queue.messages()) == 1


def test_locked_queue_answers_out_of_resources_and_leaves_no_object(tmp_path: Path) -> None:
    with receiving(tmp_path / "data", busy_timeout=0.2) as running:
        locker = sqlite3.connect(running.data / DATABASE_FILE, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            assert send_files(running.port, [CT]) == [OUT_OF_RESOURCES]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        nothing_left(running)
        assert send_files(running.port, [CT]) == [SUCCESS]


@contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_filesystem_answers_out_of_resources_and_keeps_serving(tmp_path: Path) -> None:
    big = tmp_path / "big.dcm"
    dataset = dcmread(CT)
    dataset.PixelData = os.urandom(1_500_000)
    dataset.Rows, dataset.Columns = 750, 1000
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = (
        "1.2.826.0.1.3680043.8.498.1"
    )
    dataset.save_as(big)
    with small_filesystem(tmp_path / "data", "1m") as data, receiving(data) as running:
        assert send_files(running.port, [big]) == [OUT_OF_RESOURCES]
        nothing_left(running)
        assert send_files(running.port, [CT]) == [SUCCESS]
        assert len(running.queue.messages()) == 1


def test_truncated_dataset_cannot_be_understood(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(CT.read_bytes()[:-1000])
    with receiving(tmp_path / "data") as running:
        assert send_files(running.port, [truncated, CT]) == [CANNOT_UNDERSTAND, SUCCESS]
        assert len(running.queue.messages()) == 1


@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "SC_rgb_rle.dcm", "rtdose_1frame.dcm", "693_J2KI.dcm"]
)
def test_a_dataset_cut_inside_encapsulated_pixel_data_cannot_be_understood(
    tmp_path: Path, name: str
) -> None:
    source = sample_file(name)
    meta = dcmread(source, stop_before_pixels=True).file_meta
    truncated = tmp_path / name
    raw = source.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2 + 64])  # well into the pixel data
    with receiving(tmp_path / "data", AcceptedCallingAETs="*") as running:
        assert send_files(running.port, [truncated]) == [CANNOT_UNDERSTAND], meta.TransferSyntaxUID
        assert running.queue.messages() == []


def test_dataset_that_is_not_what_the_request_says_is_refused(tmp_path: Path) -> None:
    mismatched = tmp_path / "mismatched.dcm"
    dataset = dcmread(CT)
    dataset.file_meta.MediaStorageSOPInstanceUID = (
        "1.2.826.0.1.3680043.8.498.2"  # what the request will say
    )
    dataset.save_as(mismatched)
    with receiving(tmp_path / "data") as running:
        assert send_files(running.port, [mismatched]) == [DATA_SET_DOES_NOT_MATCH_SOP_CLASS]
        nothing_left(running)


def wait_until_closed(connection: socket.socket) -> None:
    """Return once the listener closes the connection; AssertionError if it stays open."""
    connection.settimeout(DEADLINE_SECONDS)
    try:
        while connection.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(
            f"the listener kept the connection open for {DEADLINE_SECONDS} s"
        ) from None


@pytest.mark.parametrize(
    "garbage",
    [
        os.urandom(2048),
        b"\x01\x00\x00\x00\x01\x00\x00\x01",  # the start of an A-ASSOCIATE-RQ that never comes
        b"\x04\x00\xff\xff\xff\xff",  # a P-DATA PDU claiming 4 GB
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_garbage_on_the_port_leaves_the_listener_serving(tmp_path: Path, garbage: bytes) -> None:
    with receiving(tmp_path / "data", AssociationTimeoutSeconds=2) as running:
        with socket.create_connection(
            ("127.0.0.1", running.port), timeout=DEADLINE_SECONDS
        ) as connection:
            connection.sendall(garbage)
            wait_until_closed(connection)
        assert send_files(running.port, [CT]) == [SUCCESS]


def test_a_peer_that_stops_mid_pdu_is_dropped_and_others_are_served(tmp_path: Path) -> None:
    with receiving(tmp_path / "data", AssociationTimeoutSeconds=2) as running:
        assoc = associate(running.port, "MODALITY01")
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        raw.sendall(b"\x04\x00\x00\x00\x40\x00\x00\x00\x3c\x01")  # a P-DATA header, then silence
        wait_for(lambda: not running.listener.active_associations, "the listener to drop the peer")  # type: ignore[union-attr]
        assoc.abort()
        assert send_files(running.port, [CT]) == [SUCCESS]


def test_idle_peers_are_dropped_after_the_association_timeout(tmp_path: Path) -> None:
    with receiving(tmp_path / "data", AssociationTimeoutSeconds=1) as running:
        with socket.create_connection(
            ("127.0.0.1", running.port), timeout=DEADLINE_SECONDS
        ) as silent:
            wait_until_closed(silent)  # never sent an A-ASSOCIATE-RQ
        idle = associate(running.port, "MODALITY01")
        assert idle.is_established
        wait_for(
            lambda: idle.is_aborted or not idle.is_established, "the idle association to be dropped"
        )
        assert send_files(running.port, [CT]) == [SUCCESS]


def test_500_silent_connections_hold_no_thread_and_a_real_store_gets_through(
    tmp_path: Path,
) -> None:
    with receiving(tmp_path / "data", MaxAssociations=1, AssociationTimeoutSeconds=60) as running:
        silent = [
            socket.create_connection(("127.0.0.1", running.port), timeout=DEADLINE_SECONDS)
            for _ in range(500)
        ]
        try:
            assert send_files(running.port, [CT]) == [SUCCESS]
            wait_for(  # once the store's own thread is done, none of the 500 holds one
                lambda: running.listener.active_associations == 0, "no thread for the silent"
            )
        finally:
            for connection in silent:
                connection.close()
        assert send_files(running.port, [CT]) == [SUCCESS]


def test_past_the_connection_limit_a_sender_hears_a_transient_rejection_at_once(
    tmp_path: Path,
) -> None:
    """MaxAssociations 1: two peers that trickle their requests hold both connection slots;
    a third, whole request is answered A-ASSOCIATE-RJ (rejected-transient, local limit
    exceeded) without waiting for them; once they are gone, a sender is served again."""
    request = associate_request("MODALITY01", "SOUPFLOW", [(1, CT_IMAGE_STORAGE, EXPLICIT)])
    with receiving(tmp_path / "data", MaxAssociations=1, AssociationTimeoutSeconds=60) as running:
        slow = [
            socket.create_connection(("127.0.0.1", running.port), timeout=DEADLINE_SECONDS)
            for _ in range(2)
        ]
        for connection in slow:
            connection.sendall(request[:1])
        wait_for(lambda: running.listener.active_associations == 2, "both connections served")
        with socket.create_connection(
            ("127.0.0.1", running.port), timeout=DEADLINE_SECONDS
        ) as third:
            third.sendall(request)
            answer = third.recv(10)
        assert answer[0] == 0x03  # A-ASSOCIATE-RJ
        assert (answer[7], answer[8], answer[9]) == (2, 3, 2)  # transient, provider, limit
        for connection in slow:
            connection.close()
        wait_for(lambda: running.listener.active_associations == 0, "the slow ones to go")
        assert send_files(running.port, [CT]) == [SUCCESS]


class Trickle:
    """Sends `data` a byte at a time in a thread (bounded), until the peer stops taking it."""

    def __init__(self, connection: socket.socket, data: bytes, every_seconds: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._send, args=(connection, data, every_seconds))
        self.thread.start()

    def _send(self, connection: socket.socket, data: bytes, every_seconds: float) -> None:
        for byte in data:
            if self.stop.wait(every_seconds):
                return
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=DEADLINE_SECONDS)


def test_a_peer_trickling_its_association_request_is_dropped_after_the_timeout(
    tmp_path: Path,
) -> None:
    request = associate_request("MODALITY01", "SOUPFLOW", [(1, CT_IMAGE_STORAGE, EXPLICIT)])
    with receiving(tmp_path / "data", AssociationTimeoutSeconds=1) as running:
        with socket.create_connection(("127.0.0.1", running.port), timeout=60) as slow:
            trickle = Trickle(slow, request * 4, every_seconds=0.2)  # each byte well in time
            try:
                wait_until_closed(slow)  # the whole request was not in within 1 s
            finally:
                trickle.close()
        assert send_files(running.port, [CT]) == [SUCCESS]


def test_a_peer_that_keeps_sending_after_release_is_dropped(tmp_path: Path) -> None:
    contexts = [(1, CT_IMAGE_STORAGE, EXPLICIT)]
    with receiving(tmp_path / "data", AssociationTimeoutSeconds=1) as running:
        with socket.create_connection(("127.0.0.1", running.port), timeout=60) as peer:
            peer.sendall(associate_request("MODALITY01", "SOUPFLOW", contexts))
            assert read_pdu(peer)[0] == 0x02  # A-ASSOCIATE-AC
            peer.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
            assert read_pdu(peer)[0] == 0x06  # A-RELEASE-RP
            trickle = Trickle(peer, bytes(400), every_seconds=0.2)  # and it never closes
            try:
                wait_until_closed(peer)
            finally:
                trickle.close()
        # the association's thread counts itself out just after it closed the socket
        wait_for(lambda: running.listener.active_associations == 0, "the association to end")


def test_status_and_dead_list_work_on_a_full_disk(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "data", "2m") as data:
        with receiving(data, AcceptedCallingAETs="*") as running:
            assert send_files(running.port, [CT]) == [SUCCESS]
        filler = data / "filler"
        with filler.open("wb") as stream, contextlib.suppress(OSError):
            for _ in range(64):  # bounded: 2 MB of tmpfs fills in at most 64 writes of 64 KiB
                stream.write(bytes(65536))
                stream.flush()
        status = soupflow("status", "--json", "--data", str(data))
        assert status.returncode == 0, status.stderr
        [row] = json.loads(status.stdout)
        assert row["counts"]["queued"] == 1
        listed = soupflow("dead", "list", "--data", str(data))
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr


class _LostReply(SqliteQueue):
    """The queue commits, then the reply is lost (a shared server's connection dropped)."""

    def enqueue(self, arrival: Arrival, dedupe_seconds: float = 0, delivery: Any = None) -> bool:
        super().enqueue(arrival, dedupe_seconds, delivery)
        raise QueueError("server closed the connection unexpectedly")


class _Refused(SqliteQueue):
    """The queue refuses the write (nothing committed)."""

    def enqueue(self, arrival: Arrival, dedupe_seconds: float = 0, delivery: Any = None) -> bool:
        raise QueueError("database is locked")


@pytest.mark.parametrize(
    ("queue_class", "expected", "kept"),
    [(_LostReply, SUCCESS, True), (_Refused, OUT_OF_RESOURCES, False)],
    ids=["committed, reply lost", "not committed"],
)
def test_a_failed_enqueue_is_answered_by_what_the_queue_holds(
    tmp_path: Path, queue_class: type[SqliteQueue], expected: int, kept: bool
) -> None:
    data = tmp_path / "data"
    spool, queue = Spool(data), queue_class(data)
    spool.clear_incoming()
    incoming = spool.incoming / "received.dcm"
    shutil.copyfile(CT, incoming)
    dataset = dcmread(CT, stop_before_pixels=True)
    received = ReceivedObject(
        path=incoming,
        sop_class_uid=str(dataset.SOPClassUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        transfer_syntax_uid=EXPLICIT,
    )
    origin = Origin(peer_address="127.0.0.1", peer_port=4000, calling_aet="MODALITY01")
    try:
        assert Ingest(spool, queue).store("workflow-1", origin, received) == expected
        messages = queue.messages()
        assert len(messages) == (1 if kept else 0)
        assert list(spool.root.glob("??/*.dcm")) == (
            [spool.root / messages[0].arrival.object_path] if kept else []
        )
    finally:
        queue.close()
