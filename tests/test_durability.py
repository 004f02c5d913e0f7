"""`soupflow run` as its own process: kill -9 mid-transfer loses nothing acknowledged; a 1 GB
instance is received with bounded memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydicom import dcmread

from bench.data import images, large_instance
from soupflow.store.spool import Spool
from soupflow.store.sqlite import SqliteQueue
from tests import documents
from tests.dicom import (
    CutSender,
    RuntimeProcess,
    storescu_send,
    wait_for,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def workflows_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "workflows"
    folder.mkdir()
    documents.write(folder / "intake.json", documents.workflow(Port=0, AcceptedCallingAETs="*"))
    return folder


def many_instances(folder: Path, count: int) -> list[Path]:
    """`count` CT instances (CT_small's header, 128 x 128 pixels), each with its own UID."""
    return images(folder, count, 128, 128)


def test_kill_9_during_a_transfer_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    data, workflows = tmp_path / "data", workflows_folder(tmp_path)
    runtime = RuntimeProcess(workflows, data, "--workers", "0")  # ingest only: every object stays
    files = many_instances(tmp_path / "send", 200)
    sender = CutSender(runtime.port, files)
    wait_for(lambda: len(sender.acknowledged) >= 60, "60 acknowledged stores")
    runtime.kill()
    sender.join()
    acknowledged = sender.acknowledged
    assert 60 <= len(acknowledged) < 200, "the kill did not land during the transfer"

    restarted = RuntimeProcess(workflows, data, "--workers", "0")
    assert restarted.terminate() == 0
    queue, spool = SqliteQueue(data), Spool(data)
    messages = queue.messages(limit=1000)
    queued = {message.arrival.sop_instance_uid for message in messages}
    assert set(acknowledged) <= queued
    for message in messages:
        stored = spool.root / message.arrival.object_path
        assert stored.stat().st_size == message.arrival.byte_count
        assert str(dcmread(stored).SOPInstanceUID) == message.arrival.sop_instance_uid
    queue.close()


def digest_after(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        stream.seek(offset)
        while block := stream.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_a_1_gb_instance_is_received_with_peak_rss_under_200_mb(tmp_path: Path) -> None:
    source = tmp_path / "big.dcm"
    large_instance(source, 1 << 30)
    data = tmp_path / "data"
    runtime = RuntimeProcess(workflows_folder(tmp_path), data, "--workers", "0")
    try:
        storescu_send(runtime.port, source)
        peak = runtime.peak_rss_bytes()
    finally:
        runtime.terminate()
    assert peak < 200 * 1024 * 1024, f"peak RSS {peak / 1e6:.0f} MB"
    queue = SqliteQueue(data)
    [message] = queue.messages()
    stored = Spool(data).root / message.arrival.object_path
    pixel_tail = 1 << 30
    assert digest_after(stored, stored.stat().st_size - pixel_tail) == digest_after(
        source, source.stat().st_size - pixel_tail
    )
    queue.close()
