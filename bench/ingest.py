"""DICOM ingest speed: soupflow's durable ingest beside a bare pynetdicom SCP, Orthanc and dcmtk.

    python -m bench.ingest [--runs N] [--smoke] [--receivers a,b] [--scenarios text,...]

Every receiver runs as its own process on a free loopback port, fresh for each run, and the
runs alternate receivers. dcmtk's storescu sends (TCP_NODELAY=1 in its environment, as in the
issue's figures, except in the Nagle scenario), over one association or four in parallel.
soupflow runs `soupflow run --workers 0`: each instance fsynced and queued before Success
(the others do not fsync). Reported: instances per second (MB/s for the large instance), the
ratio to soupflow, and each receiver's peak RSS (VmHWM); ACK latency percentiles at a fixed
send rate (bench.scu, one association); and soupflow end to end, C-STORE to a file written
by a workflow, beside its ingest alone. Receivers that are not installed are reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.data import images, large_instance
from bench.scu import StoreClient
from soupflow.cli import default_processes

NODELAY = {**os.environ, "TCP_NODELAY": "1"}
NAGLE = {name: value for name, value in os.environ.items() if name != "TCP_NODELAY"}
RECEIVERS = ("soupflow", "pynetdicom", "orthanc", "dcmtk")
_READY_SECONDS = 30.0
_E2E_SECONDS = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Scenario:
    name: str
    files: list[Path]
    associations: int = 1
    unit: str = "inst/s"
    nagle: bool = False  # storescu without TCP_NODELAY=1: Nagle's algorithm on at the sender

    @property
    def megabytes(self) -> float:
        return sum(path.stat().st_size for path in self.files) / 1e6


@dataclass
class Result:
    rates: dict[str, list[float]] = field(default_factory=dict)
    peaks: dict[str, list[int]] = field(default_factory=dict)


_RECEIVER_ID = "b0000000-0000-4000-8000-000000000001"
_WRITER_ID = "b0000000-0000-4000-8000-000000000002"


def _soupflow(
    folder: Path, port: int, workers: int = 0, processes: int = 0, options: tuple[str, ...] = ()
) -> list[str]:
    """`soupflow run`; with workers, a workflow that writes each message's JSON to a file."""
    workflows = folder / "workflows"
    workflows.mkdir()
    receiver = {
        "$type": "HL7Soup.Functions.Settings.Receivers.DicomReceiverSetting, HL7SoupWorkflow",
        "Id": _RECEIVER_ID,
        "Port": port,
        "AcceptedCallingAETs": "*",
        "MaxAssociations": 16,
        "Activities": [_WRITER_ID] if workers else [],
    }
    writer = {
        "$type": "HL7Soup.Functions.Settings.Senders.FileWriterSenderSetting, HL7SoupWorkflow",
        "Id": _WRITER_ID,
        "Name": "Message JSON",
        "FilePathToWrite": str(folder / "out" / "${SOPInstanceUID}.json"),
        "MessageType": 11,
        "MessageTemplate": "${" + _RECEIVER_ID + " inbound}",
    }
    document = {
        "Name": "bench",
        "WorkflowId": _RECEIVER_ID,
        "WorkflowPattern": [receiver, writer] if workers else [receiver],
    }
    (workflows / "bench.json").write_text(json.dumps(document), encoding="utf-8")
    counts = ("--workers", str(workers), "--processes", str(processes))
    return soupflow_run(workflows, folder / "data", *counts, *options)


def soupflow_run(workflows: Path, data: Path, *options: str) -> list[str]:
    """The `soupflow run` command line, as an operator types it."""
    return [
        sys.executable,
        "-m",
        "soupflow",
        "run",
        "--workflows",
        str(workflows),
        "--data",
        str(data),
        *options,
    ]


def _orthanc(folder: Path, port: int) -> list[str] | None:
    program = shutil.which("Orthanc")
    if program is None:
        return None
    config = folder / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "StorageDirectory": str(folder / "storage"),
                "IndexDirectory": str(folder / "index"),
                "HttpPort": free_port(),
                "DicomPort": port,
                "RemoteAccessAllowed": False,
                "DicomCheckCalledAet": False,
                "Plugins": [],
                "DicomThreadsCount": 4,
            }
        )
    )
    return [program, str(config)]


def command(
    receiver: str,
    folder: Path,
    port: int,
    workers: int = 0,
    processes: int = 0,
    options: tuple[str, ...] = (),
) -> list[str] | None:
    """The receiver's command line; `options` are added to soupflow's (`--queue URL`)."""
    if receiver == "soupflow":
        return _soupflow(folder, port, workers, processes, options)
    if receiver == "pynetdicom":
        return [sys.executable, "-m", "bench.bare_scp", str(port), str(folder / "out")]
    if receiver == "orthanc":
        return _orthanc(folder, port)
    storescp = shutil.which("storescp")
    if storescp is None:
        return None
    (folder / "out").mkdir()
    return [storescp, "-od", str(folder / "out"), str(port)]


def wait_ready(port: int, process: subprocess.Popen[bytes], log: Path | None = None) -> None:
    """Until the receiver answers C-ECHO and, when its command line asks for worker processes
    (`--processes N`), until `log` says that each of them is ready (their start-up, imports
    and workflows, is not timed as delivery)."""
    echoscu = shutil.which("echoscu")
    deadline = time.monotonic() + _READY_SECONDS
    expected = _worker_processes(process.args)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode}")
        if (
            echoscu
            and subprocess.run(
                [echoscu, "-aec", "SOUPFLOW", "127.0.0.1", str(port)],
                env=NODELAY,
                capture_output=True,
                check=False,
            ).returncode
            == 0
            and (not expected or (log is not None and _ready_processes(log) >= expected))
        ):
            return
        time.sleep(0.05)
    raise RuntimeError("receiver did not answer C-ECHO (or start its worker processes) in time")


def _worker_processes(argv: object) -> int:
    words = [str(word) for word in argv] if isinstance(argv, list) else []
    if "--processes" in words:
        return int(words[words.index("--processes") + 1])
    return default_processes() if "run" in words else 0


def _ready_processes(log: Path) -> int:
    lines = log.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if "worker process" in line and " ready: " in line)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def send(port: int, scenario: Scenario) -> float:
    """Seconds storescu took to send every file (in `associations` parallel processes)."""
    storescu = shutil.which("storescu")
    assert storescu is not None, "storescu (dcmtk) sends in every scenario"
    shares = [
        scenario.files[index :: scenario.associations] for index in range(scenario.associations)
    ]
    environment = NAGLE if scenario.nagle else NODELAY
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [storescu, "-aec", "SOUPFLOW", "127.0.0.1", str(port), *map(str, share)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for share in shares
        if share
    ]
    for sender in senders:
        errors, _ = sender.communicate(timeout=600)
        if sender.returncode != 0:
            raise RuntimeError(
                f"storescu failed ({_exit_meaning(sender.returncode)}): "
                f"{errors.decode(errors='replace')[-500:]}"
            )
    return time.perf_counter() - start


def _exit_meaning(code: int) -> str:
    """storescu exits with the high byte of the last failure status it was answered
    (167: 0xA7xx, out of resources), else with dcmtk's own codes (60-79: the network)."""
    return f"{code}: a C-STORE answered 0x{code:02X}xx" if code >= 0xA0 else str(code)


def measure(
    receiver: str, scenario: Scenario, work: Path, options: tuple[str, ...] = ()
) -> tuple[float, int] | None:
    """(rate, peak RSS) of one run, or None when the receiver is not installed."""
    with receiving(receiver, work, options=options) as running:
        if running is None:
            return None
        port, pid, log = running
        try:
            seconds = send(port, scenario)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{receiver}, {scenario.name}: {exc}\n{log.read_text(errors='replace')[-1500:]}"
            ) from None
        peak = peak_rss(pid)
    amount = scenario.megabytes if scenario.unit == "MB/s" else len(scenario.files)
    return amount / seconds, peak


@contextmanager
def receiving(
    receiver: str,
    work: Path,
    workers: int = 0,
    processes: int = 0,
    options: tuple[str, ...] = (),
) -> Iterator[tuple[int, int, Path] | None]:
    """A fresh receiver process answering C-ECHO: (port, pid, its log), or None when it is
    not installed. Its folder is under `work` and goes with it."""
    with tempfile.TemporaryDirectory(dir=work) as name:
        folder, port = Path(name), free_port()
        argv = command(receiver, folder, port, workers, processes, options)
        if argv is None:
            yield None
            return
        log = folder / "receiver.log"
        with log.open("wb") as output:
            process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=NODELAY)
        try:
            wait_ready(port, process, log)
            yield port, process.pid, log
        finally:
            process.terminate()
            process.wait(timeout=60)


def ack_latency(receiver: str, files: list[Path], rate: float, work: Path) -> list[float] | None:
    """Each C-STORE's acknowledgement delay (seconds) at `rate` instances per second."""
    with receiving(receiver, work) as running:
        if running is None:
            return None
        client = StoreClient(running[0], files)
        delays = client.latencies(rate)
        client.release()
    return delays


def end_to_end(
    files: list[Path], work: Path, workers: int, processes: int = 0, options: tuple[str, ...] = ()
) -> float:
    """Messages per second from the first C-STORE to the last message's file written."""
    with receiving("soupflow", work, workers, processes, options) as running:
        assert running is not None
        port, _, log = running
        out = log.parent / "out"
        start = time.perf_counter()
        try:
            send(port, Scenario("end to end", files))
        except RuntimeError as exc:
            raise RuntimeError(f"end to end: {exc}\n{log.read_text()[-1500:]}") from None
        deadline = time.monotonic() + _E2E_SECONDS
        while _count(out) < len(files):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{_count(out)} of {len(files)} files written\n{log.read_text()[-1500:]}"
                )
            time.sleep(0.01)
        return len(files) / (time.perf_counter() - start)


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.json")) if folder.exists() else 0


def run(
    scenarios: list[Scenario],
    runs: int,
    work: Path,
    report: Callable[[str], None],
    receivers: tuple[str, ...] = RECEIVERS,
) -> dict[str, Result]:
    results = {scenario.name: Result() for scenario in scenarios}
    for number in range(runs):
        for scenario in scenarios:
            order = receivers if number % 2 == 0 else tuple(reversed(receivers))  # alternate
            for receiver in order:
                measured = measure(receiver, scenario, work)
                if measured is not None:
                    results[scenario.name].rates.setdefault(receiver, []).append(measured[0])
                    results[scenario.name].peaks.setdefault(receiver, []).append(measured[1])
        report(f"run {number + 1} of {runs} done")
    return results


def table(
    scenarios: list[Scenario], results: dict[str, Result], receivers: tuple[str, ...] = RECEIVERS
) -> list[str]:
    lines = [
        "| scenario | receiver | rate (median) | soupflow / receiver | peak RSS |",
        "|---|---|---:|---:|---:|",
    ]
    for scenario in scenarios:
        result = results[scenario.name]
        ours = statistics.median(result.rates["soupflow"]) if "soupflow" in result.rates else None
        for receiver in receivers:
            if receiver not in result.rates:
                lines.append(f"| {scenario.name} | {receiver} | not installed | | |")
                continue
            rate = statistics.median(result.rates[receiver])
            ratio = f"{ours / rate:.2f}" if ours else ""
            lines.append(
                f"| {scenario.name} | {receiver} | {rate:,.0f} {scenario.unit} | {ratio} | {max(result.peaks[receiver]) / 1e6:.0f} MB |"
            )
    return lines


def latency_table(
    files: list[Path], rate: float, runs: int, work: Path, receivers: tuple[str, ...]
) -> list[str]:
    """p50 and p99 of the ACK delay per receiver, over every instance of every run."""
    delays: dict[str, list[float]] = {}
    for number in range(runs):
        order = receivers if number % 2 == 0 else tuple(reversed(receivers))
        for receiver in order:
            measured = ack_latency(receiver, files, rate, work)
            if measured is not None:
                delays.setdefault(receiver, []).extend(measured)
    lines = [
        f"| receiver (tiny instances at {rate:.0f}/s, 1 association) | ACK p50 | ACK p99 | p99 / soupflow's p99 |",
        "|---|---:|---:|---:|",
    ]
    ours = _percentile(delays["soupflow"], 99) if "soupflow" in delays else None
    for receiver in receivers:
        if receiver not in delays:
            lines.append(f"| {receiver} | not installed | | |")
            continue
        p50, p99 = _percentile(delays[receiver], 50), _percentile(delays[receiver], 99)
        ratio = f"{p99 / ours:.2f}" if ours else ""
        lines.append(f"| {receiver} | {p50 * 1000:.2f} ms | {p99 * 1000:.2f} ms | {ratio} |")
    return lines


def _percentile(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def end_to_end_table(files: list[Path], runs: int, work: Path, workers: int) -> list[str]:
    """soupflow C-STORE to file (a workflow writing each message's JSON) beside ingest alone."""
    through: list[float] = []
    two: list[float] = []
    ingest: list[float] = []
    for _ in range(runs):
        through.append(end_to_end(files, work, workers))
        two.append(end_to_end(files, work, workers, processes=2))
        measured = measure("soupflow", Scenario("ingest", files), work)
        assert measured is not None
        ingest.append(measured[0])
    both, alone = statistics.median(through), statistics.median(ingest)
    spread = statistics.median(two)
    return [
        "| soupflow, CT-sized, 1 association | rate (median) | ratio |",
        "|---|---:|---:|",
        f"| C-STORE to queue (`--workers 0`) | {alone:,.0f} inst/s | 1.00 |",
        f"| C-STORE to message JSON file ({workers} workers) | {both:,.0f} msg/s | {both / alone:.2f} |",
        f"| the same in 2 worker processes (`--processes 2`, {workers} workers each) | {spread:,.0f} msg/s | {spread / alone:.2f} |",
    ]


def main(arguments: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--smoke", action="store_true", help="a few small instances, to keep the harness working"
    )
    parser.add_argument(
        "--receivers",
        default=",".join(RECEIVERS),
        help="comma-separated subset of: " + ", ".join(RECEIVERS),
    )
    parser.add_argument(
        "--scenarios",
        default="",
        help="only scenarios whose name contains one of these (comma-separated); "
        "'latency' and 'end to end' name the other two tables",
    )
    args = parser.parse_args(arguments)
    receivers = tuple(name for name in RECEIVERS if name in args.receivers.split(","))
    wanted = [name for name in args.scenarios.split(",") if name]

    def chosen(name: str) -> bool:
        return not wanted or any(part in name for part in wanted)

    report = partial(print, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="soupflow-bench-") as folder:
        work = Path(folder)
        if args.smoke:
            count, tiny_count, large_bytes, runs, rate = 4, 4, 4_000_000, 1, 50.0
            ct = images(work / "ct", count, 64, 64)
        else:
            count, tiny_count, large_bytes, runs, rate = 500, 2000, 300_000_000, args.runs, 100.0
            ct = images(work / "ct", count, 512, 512)
        tiny = images(work / "tiny", tiny_count, 32, 32)
        nagle = tiny[: max(4, tiny_count // 25)]
        scenarios = [
            Scenario("CT-sized, 1 association", ct),
            Scenario("CT-sized, 4 associations", ct, associations=4),
            Scenario("tiny, 1 association", tiny),
            Scenario("tiny, 1 association, sender with Nagle on", nagle, nagle=True),
        ]
        if chosen("one large instance"):
            large = large_instance(work / "large.dcm", large_bytes)
            scenarios.append(Scenario("one large instance", [large], unit="MB/s"))
        scenarios = [scenario for scenario in scenarios if chosen(scenario.name)]
        if args.smoke:  # the two kinds of table row (inst/s, MB/s): enough to keep it working
            scenarios = [scenarios[0], scenarios[-1]]
        lines = table(scenarios, run(scenarios, runs, work, report, receivers), receivers)
        if chosen("latency"):
            lines += [
                "",
                *latency_table(tiny[: max(4, tiny_count // 8)], rate, runs, work, receivers),
            ]
            report("latency done")
        if chosen("end to end") and "soupflow" in receivers:
            lines += ["", *end_to_end_table(ct, runs, work, workers=2)]
            report("end to end done")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
