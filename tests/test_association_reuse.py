"""Associations kept open and reused by the DICOM sender, against real SCPs on loopback: a
pynetdicom SCP that counts associations and can abort one, and dcmtk's storescp."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.data import images, large_instance
from bench.ingest import free_port
from soupflow.dicom import requestor
from soupflow.dicom.part10 import dataset_offset
from soupflow.dicom.requestor import Destination
from soupflow.store.queue import FINAL_STATES, State
from soupflow.store.sqlite import SqliteQueue
from tests import documents, test_dicom_sender
from tests.dicom import (
    NODELAY,
    RuntimeProcess,
    require_tool,
    sample_file,
    send_files,
    storescu_send,
    wait_for,
)
from tests.test_dicom_sender import storescp

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@dataclass
class Counting:
    port: int = 0
    established: int = 0
    released: int = 0
    aborted: int = 0
    associated: int = 0  # associations open now (until their A-RELEASE-RQ or abort)
    most_associated: int = 0
    stored: list[str] = field(default_factory=list)
    abort_on: set[int] = field(default_factory=set)  # abort at these store numbers (1-based)
    hold_after: int | None = None  # stores after this many wait for `gate` (a stalled PACS)
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def counting_scp() -> Iterator[Counting]:
    """A pynetdicom Storage SCP for CT and MR that counts associations and stores."""
    seen = Counting()

    def on_store(event: Any) -> int:
        if seen.hold_after is not None and len(seen.stored) >= seen.hold_after:
            seen.gate.wait(timeout=30)
        with seen.lock:
            number = len(seen.stored) + 1
            if number in seen.abort_on:
                seen.abort_on.discard(number)
                event.assoc.abort()
                return 0xA700
            seen.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def count(name: str) -> Any:
        def handler(event: Any) -> None:
            with seen.lock:
                setattr(seen, name, getattr(seen, name) + 1)

        return handler

    def associations(change: int) -> Any:
        def handler(event: Any) -> None:
            with seen.lock:
                seen.associated += change
                seen.most_associated = max(seen.most_associated, seen.associated)

        return handler

    def on_acse(event: Any) -> None:  # the A-RELEASE-RQ, before our answer lets another start
        if isinstance(event.primitive, A_RELEASE) and event.primitive.result is None:
            associations(-1)(event)

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    for sop_class in (CT, MR):
        ae.add_supported_context(sop_class, UNCOMPRESSED)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_ESTABLISHED, count("established")),
            (evt.EVT_RELEASED, count("released")),
            (evt.EVT_ABORTED, count("aborted")),
            (evt.EVT_ESTABLISHED, associations(1)),
            (evt.EVT_ACSE_RECV, on_acse),
            (evt.EVT_ABORTED, associations(-1)),
        ],
    )
    seen.port = server.server_address[1]
    try:
        yield seen
    finally:
        server.shutdown()


def forwarding(port: int, **fields: Any) -> dict[str, Any]:
    return test_dicom_sender.forwarding(port, **{"RetryInitialSeconds": 0, **fields})


def start(tmp_path: Path, document: dict[str, Any], *options: str) -> RuntimeProcess:
    workflows = tmp_path / "workflows"
    workflows.mkdir(exist_ok=True)
    documents.write(workflows / "forward.json", document)
    return RuntimeProcess(workflows, tmp_path / "data", *options)


def all_final(data: Path, count: int) -> list[Any]:
    queue = SqliteQueue(data)
    try:
        return wait_for(
            lambda: (
                m
                if len(m := queue.messages(limit=10_000)) == count
                and all(x.state in FINAL_STATES for x in m)
                else None
            ),
            f"{count} messages to finish",
            seconds=120,
        )
    finally:
        queue.close()


def test_many_messages_travel_over_one_association_and_it_is_released_when_idle(
    tmp_path: Path,
) -> None:
    files = images(tmp_path / "send", 20, 64, 64)
    with counting_scp() as pacs:
        runtime = start(
            tmp_path, forwarding(pacs.port, KeepAssociationOpenSeconds=2), "--workers", "1"
        )
        assert send_files(runtime.port, files) == [0] * 20
        messages = all_final(tmp_path / "data", 20)
        assert {m.state for m in messages} == {State.COMPLETED}
        assert (pacs.established, len(pacs.stored)) == (1, 20)
        wait_for(lambda: pacs.released == 1, "the idle association to be released")
        assert pacs.aborted == 0
        runtime.terminate()


def test_without_keeping_associations_each_message_has_its_own(tmp_path: Path) -> None:
    files = images(tmp_path / "send", 5, 64, 64)
    with counting_scp() as pacs:
        runtime = start(
            tmp_path, forwarding(pacs.port, KeepAssociationOpenSeconds=0), "--workers", "1"
        )
        assert send_files(runtime.port, files) == [0] * 5
        all_final(tmp_path / "data", 5)
        assert (pacs.established, pacs.released, len(pacs.stored)) == (5, 5, 5)
        runtime.terminate()


def test_max_associations_holds_across_worker_processes(tmp_path: Path) -> None:
    """Two worker processes with two workers each, to a PACS that takes one association
    (`MaxAssociations` 1): the second process waits its turn instead of opening its own, and
    then every message is delivered on its first attempt."""
    files = images(tmp_path / "send", 12, 64, 64)
    with counting_scp() as pacs:
        pacs.hold_after = 0  # every store waits for the gate: the first association stays busy
        document = forwarding(
            pacs.port, MaxAssociations=1, KeepAssociationOpenSeconds=30, TimeoutSeconds=60
        )
        runtime = start(tmp_path, document, "--processes", "2", "--workers", "2")
        assert send_files(runtime.port, files) == [0] * 12
        wait_for(
            lambda: "waiting for one" in runtime.log_text(),
            "the other worker process to wait for the association",
        )
        assert pacs.most_associated == 1
        pacs.gate.set()
        messages = all_final(tmp_path / "data", 12)
        assert {(m.state, m.attempts) for m in messages} == {(State.COMPLETED, 1)}
        assert sorted(pacs.stored) == sorted(m.arrival.sop_instance_uid for m in messages)
        assert pacs.most_associated == 1
        assert runtime.terminate() == 0


def _connected_to(pid: int, port: int) -> bool:
    """Whether process `pid` has a TCP connection to `port` on loopback (/proc)."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(descriptor)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
            return True
    return False


def test_a_worker_process_killed_holding_the_association_frees_it_for_the_other(
    tmp_path: Path,
) -> None:
    files = images(tmp_path / "send", 8, 64, 64)
    with counting_scp() as pacs:
        pacs.hold_after = 0
        document = forwarding(
            pacs.port, MaxAssociations=1, KeepAssociationOpenSeconds=30, TimeoutSeconds=60
        )
        runtime = start(
            tmp_path, document, "--processes", "2", "--workers", "2", "--lease-seconds", "3"
        )
        assert send_files(runtime.port, files) == [0] * 8
        wait_for(lambda: "waiting for one" in runtime.log_text(), "a worker process to wait")
        children = [
            int(line.rsplit("pid ", 1)[1].rstrip(")"))
            for line in runtime.log_text().splitlines()
            if "started (pid" in line
        ]
        [holder] = [pid for pid in children if _connected_to(pid, pacs.port)]
        os.kill(holder, signal.SIGKILL)
        wait_for(lambda: pacs.established == 2, "the waiting worker process's association")
        pacs.gate.set()
        messages = all_final(tmp_path / "data", 8)
        assert {m.state for m in messages} == {State.COMPLETED}
        assert set(pacs.stored) == {m.arrival.sop_instance_uid for m in messages}
        assert runtime.terminate() == 0


class Pacs:
    """dcmtk's storescp on a fixed port, which the test kills and starts again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        folder.mkdir()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        program = require_tool("storescp")
        self.process = subprocess.Popen(
            [program, "-aet", "PACS", "-od", str(self.folder), "-uf", str(self.port)],
            env=NODELAY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: requestor.echo(_to(self.port))[0], "storescp to answer")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def received(self) -> list[str]:
        return [
            str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            for path in self.folder.iterdir()
            if path.is_file() and path.stat().st_size > 0
        ]


def _to(port: int) -> Destination:
    return Destination("127.0.0.1", port, "ECHO", "PACS", 5.0)


def test_an_association_broken_mid_stream_is_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    files = images(tmp_path / "send", 60, 128, 128)
    uids = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    pacs = Pacs(tmp_path / "pacs")
    pacs.start()
    try:
        runtime = start(tmp_path, forwarding(pacs.port, RetryInitialSeconds=1), "--workers", "2")
        assert send_files(runtime.port, files) == [0] * 60
        wait_for(lambda: len(pacs.received()) >= 10, "forwarding to be under way")
        pacs.kill()  # the PACS dies with associations open (and maybe a store in flight)
        pacs.start()
        messages = all_final(tmp_path / "data", 60)
        runtime.terminate()
    finally:
        pacs.kill()
    assert {m.state for m in messages} == {State.COMPLETED}, [m.reason for m in messages]
    assert set(pacs.received()) == uids


def test_a_new_sop_class_while_an_association_is_open_gets_a_context_without_failing(
    tmp_path: Path,
) -> None:
    ct, mr = sample_file("CT_small.dcm"), sample_file("MR_small.dcm")
    with counting_scp() as pacs:
        runtime = start(tmp_path, forwarding(pacs.port), "--workers", "1")
        assert send_files(runtime.port, [ct]) == [0]
        all_final(tmp_path / "data", 1)
        assert send_files(runtime.port, [mr, ct, mr]) == [0, 0, 0]
        messages = all_final(tmp_path / "data", 4)
        assert {m.state for m in messages} == {State.COMPLETED}
        assert len(pacs.stored) == 4
        assert pacs.established == 2  # the second proposes CT and MR, and serves the rest
        runtime.terminate()


def test_forwarding_through_a_kept_association_is_byte_exact(tmp_path: Path) -> None:
    files = [
        sample_file("CT_small.dcm"),
        sample_file("MR_small.dcm"),
        *images(tmp_path / "s", 4, 64, 64),
    ]
    with storescp(tmp_path / "pacs", "+B") as port:
        runtime = start(tmp_path, forwarding(port), "--workers", "1")
        assert send_files(runtime.port, files) == [0] * len(files)
        all_final(tmp_path / "data", len(files))
        runtime.terminate()
        received = {
            str(dcmread(path, stop_before_pixels=True).SOPInstanceUID): path
            for path in (tmp_path / "pacs").iterdir()
        }
    for source in files:
        uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_digest(received[uid]) == _dataset_digest(source)


def _dataset_digest(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[dataset_offset(data[:65536]) :]).hexdigest()


def test_kill_9_during_forwarding_loses_nothing_acknowledged(tmp_path: Path) -> None:
    files = images(tmp_path / "send", 150, 128, 128)
    uids = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    with counting_scp() as pacs:
        pacs.hold_after = 20  # the 21st store stalls: the kill lands while it is in flight
        document = forwarding(pacs.port)
        runtime = start(tmp_path, document, "--workers", "2")
        for batch in (files[:75], files[75:]):  # all acknowledged
            assert send_files(runtime.port, batch) == [0] * len(batch)
        wait_for(lambda: len(pacs.stored) >= 20, "forwarding to be under way")
        runtime.kill()
        assert len(pacs.stored) < 150, "the kill did not land during forwarding"
        pacs.hold_after = None
        pacs.gate.set()
        restarted = RuntimeProcess(tmp_path / "workflows", tmp_path / "data", "--workers", "2")
        messages = all_final(tmp_path / "data", 150)
        restarted.terminate()
        assert {m.state for m in messages} == {State.COMPLETED}
        assert set(pacs.stored) == uids  # each reached the destination at least once
        duplicates = len(pacs.stored) - len(uids)
        assert duplicates <= 2  # at most the stores in flight when the process died


def test_a_1_gb_object_is_forwarded_with_bounded_memory(tmp_path: Path) -> None:
    source = large_instance(tmp_path / "big.dcm", 1 << 30)
    with storescp(tmp_path / "pacs", "--ignore") as port:
        runtime = start(tmp_path, forwarding(port, TimeoutSeconds=120), "--workers", "1")
        storescu_send(runtime.port, source)
        [message] = all_final(tmp_path / "data", 1)
        peak = runtime.peak_rss_bytes()
        runtime.terminate()
    assert message.state == State.COMPLETED
    assert peak < 200 * 1024 * 1024, f"peak RSS {peak / 1e6:.0f} MB"
