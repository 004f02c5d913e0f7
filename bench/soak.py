"""Soak: normal stores beside hostile peers for a long time; does the router stay whole?

    python -m bench.soak [--seconds 600] [--smoke]

One `soupflow run` (a workflow that writes each message's JSON and keeps its object) takes
dcmtk `storescu` associations of 10 small CT instances in a loop, while four abusers hit the
same port in loops of their own: random garbage, bursts of 50 silent connections, A-ASSOCIATE
requests trickled a byte at a time, and associations that stop halfway through a P-DATA
PDU. Reported: normal stores attempted and failed (expected 0), every abuser's count, and
the runtime's RSS, threads and open descriptors after the warm-up and at the end, once the
abusers stopped and the queue drained. Not run in CI (`make bench` does not run it either:
ten minutes); tests/test_bench.py runs it for a few seconds so that it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import CT_IMAGE_STORAGE, images
from bench.forward import process
from bench.ingest import NODELAY, free_port, soupflow_run
from bench.scu import associate_request
from soupflow.store.queue import State
from soupflow.store.sqlite import SqliteQueue

_RECEIVER_ID = "d0000000-0000-4000-8000-000000000001"
_WRITER_ID = "d0000000-0000-4000-8000-000000000002"
_EXPLICIT = "1.2.840.10008.1.2.1"
_SOCKET_SECONDS = 10.0
_DRAIN_SECONDS = 120.0


@dataclass(frozen=True)
class Sample:
    rss: int
    threads: int
    descriptors: int


def sample(pid: int) -> Sample:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return Sample(
        rss=int(fields["VmRSS"].split()[0]) * 1024,
        threads=int(fields["Threads"]),
        descriptors=len(os.listdir(f"/proc/{pid}/fd")),
    )


@dataclass
class Counts:
    stores: int = 0
    failed_stores: int = 0
    abuse: dict[str, int] = field(default_factory=dict)
    first_failure: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str) -> None:
        with self.lock:
            self.abuse[name] = self.abuse.get(name, 0) + 1


def _workflow(folder: Path, port: int) -> Path:
    workflows = folder / "workflows"
    workflows.mkdir(parents=True)
    receiver = {
        "$type": "HL7Soup.Functions.Settings.Receivers.DicomReceiverSetting, HL7SoupWorkflow",
        "Id": _RECEIVER_ID,
        "Port": port,
        "AcceptedCallingAETs": "*",
        "MaxAssociations": 8,
        "AssociationTimeoutSeconds": 3,
        "Activities": [_WRITER_ID],
    }
    writer = {
        "$type": "HL7Soup.Functions.Settings.Senders.FileWriterSenderSetting, HL7SoupWorkflow",
        "Id": _WRITER_ID,
        "Name": "Message JSON",
        "FilePathToWrite": str(folder / "out" / "${RequestId}.json"),  # one file per message
        "MessageType": 11,
        "MessageTemplate": "${" + _RECEIVER_ID + " inbound}",
    }
    document = {"Name": "soak", "WorkflowId": _RECEIVER_ID, "WorkflowPattern": [receiver, writer]}
    (workflows / "soak.json").write_text(json.dumps(document), encoding="utf-8")
    return workflows


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=_SOCKET_SECONDS)


def _until_closed(connection: socket.socket) -> None:
    try:
        while connection.recv(65536):
            pass
    except OSError:
        pass


def garbage(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(os.urandom(2048))
        _until_closed(connection)


def silent_burst(port: int) -> None:
    connections = [_connect(port) for _ in range(50)]
    time.sleep(1.0)
    for connection in connections:
        connection.close()


def trickle(port: int) -> None:
    request = associate_request("TRICKLE", "SOUPFLOW", [(1, CT_IMAGE_STORAGE, _EXPLICIT)])
    with _connect(port) as connection:
        try:
            for byte in request[:40]:
                connection.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:  # dropped at the negotiation deadline, as it should be
            return


def half_pdu(port: int) -> None:
    request = associate_request("HALF", "SOUPFLOW", [(1, CT_IMAGE_STORAGE, _EXPLICIT)])
    with _connect(port) as connection:
        connection.sendall(request)
        connection.recv(4096)  # the A-ASSOCIATE-AC
        connection.sendall(b"\x04\x00\x00\x00\x40\x00\x00\x00\x3c\x01\x02")  # then goes away


ABUSERS: dict[str, Callable[[int], None]] = {
    "garbage": garbage,
    "silent bursts of 50": silent_burst,
    "trickled requests": trickle,
    "half PDUs": half_pdu,
}


def _loop(until: float, work: Callable[[], None], on_done: Callable[[], None]) -> None:
    while time.monotonic() < until:
        with contextlib.suppress(OSError):  # refused or reset: the listener defending itself
            work()
        on_done()


def _store(port: int, files: list[Path], counts: Counts | None = None) -> bool:
    """One storescu association sending `files`; whether every store succeeded (the first
    failure's output is kept in `counts`)."""
    storescu = shutil.which("storescu")
    assert storescu is not None, "dcmtk's storescu sends the normal stores"
    done = subprocess.run(
        [storescu, "-aec", "SOUPFLOW", "127.0.0.1", str(port), *map(str, files)],
        env=NODELAY,
        capture_output=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0 and counts is not None and not counts.first_failure:
        counts.first_failure = (done.stderr or done.stdout).decode(errors="replace")[-400:]
    return done.returncode == 0


def _store_loop(until: float, port: int, files: list[Path], counts: Counts) -> None:
    while time.monotonic() < until:
        stored = _store(port, files, counts)
        with counts.lock:
            counts.stores += len(files)
            if not stored:
                counts.failed_stores += len(files)


def _drained(data: Path) -> bool:
    queue = SqliteQueue(data)
    try:
        return not any(
            message.state in (State.QUEUED, State.PROCESSING) for message in queue.messages()
        )
    finally:
        queue.close()


def soak(seconds: float, work: Path) -> list[str]:
    port = free_port()
    workflows = _workflow(work, port)
    files = images(work / "images", 10, 128, 128)
    counts = Counts()
    data = work / "data"
    with process(soupflow_run(workflows, data), work / "soupflow.log", port) as pid:
        for _ in range(3 if seconds > 60 else 1):  # warm-up: imports, queue, first messages
            if not _store(port, files):
                raise RuntimeError("the warm-up stores failed: see soupflow.log")
        start = sample(pid)
        until = time.monotonic() + seconds
        threads = [
            threading.Thread(
                target=_loop,
                args=(until, lambda a=abuser: a(port), lambda n=name: counts.add(n)),
            )
            for name, abuser in ABUSERS.items()
        ]
        threads.append(threading.Thread(target=_store_loop, args=(until, port, files, counts)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 180)
        deadline = time.monotonic() + _DRAIN_SECONDS
        while not _drained(data) and time.monotonic() < deadline:
            time.sleep(0.5)
        if seconds > 60:  # past AssociationTimeoutSeconds: the last abusers' sockets are gone
            time.sleep(3.5)
        end = sample(pid)
        if counts.failed_stores:  # the runtime's side of it, for whoever reads the report
            shutil.copy(work / "soupflow.log", Path(tempfile.gettempdir()) / "soupflow-soak.log")
    return report(seconds, counts, start, end)


def report(seconds: float, counts: Counts, start: Sample, end: Sample) -> list[str]:
    lines = [
        f"Soak: {seconds:g} s of normal stores beside hostile peers",
        "",
        "| | after warm-up | at the end |",
        "|---|---:|---:|",
        f"| RSS | {start.rss / 2**20:.1f} MB | {end.rss / 2**20:.1f} MB |",
        f"| threads | {start.threads} | {end.threads} |",
        f"| open descriptors | {start.descriptors} | {end.descriptors} |",
        "",
        "| traffic | count |",
        "|---|---:|",
        f"| normal stores (storescu) | {counts.stores:,} |",
        f"| normal stores failed | {counts.failed_stores:,} |",
    ]
    lines += [f"| {name} | {count:,} |" for name, count in sorted(counts.abuse.items())]
    if counts.first_failure:
        lines += [
            "",
            "The first failed store said:",
            "",
            "    " + counts.first_failure.replace("\n", "\n    "),
        ]
    return lines


def main(arguments: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, to check it runs")
    options = parser.parse_args(arguments)
    seconds = 4.0 if options.smoke else options.seconds
    with tempfile.TemporaryDirectory(prefix="soupflow-soak-") as folder:
        lines = soak(seconds, Path(folder))
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
