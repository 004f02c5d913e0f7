"""DICOM ingest speed: soupflow's durable ingest beside a bare pynetdicom SCP, Orthanc and dcmtk.

    python -m bench.ingest [--runs N] [--smoke]

Every receiver runs as its own process on a free loopback port, fresh for each run, and the
runs alternate receivers. dcmtk's storescu sends (TCP_NODELAY=1 in its environment, as in the
issue's figures), over one association or four in parallel. soupflow runs `soupflow run
--workers 0`: each instance fsynced and queued before Success (the others do not fsync).
Reported: instances per second (MB/s for the large instance), the ratio to soupflow, and each
receiver's peak RSS (VmHWM). Receivers that are not installed are reported as such.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import images, large_instance

NODELAY = {**os.environ, "TCP_NODELAY": "1"}
RECEIVERS = ("soupflow", "pynetdicom", "orthanc", "dcmtk")
_READY_SECONDS = 30.0


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

    @property
    def megabytes(self) -> float:
        return sum(path.stat().st_size for path in self.files) / 1e6


@dataclass
class Result:
    rates: dict[str, list[float]] = field(default_factory=dict)
    peaks: dict[str, list[int]] = field(default_factory=dict)


def _soupflow(folder: Path, port: int) -> list[str]:
    workflows = folder / "workflows"
    workflows.mkdir()
    receiver = {
        "$type": "HL7Soup.Functions.Settings.Receivers.DicomReceiverSetting, HL7SoupWorkflow",
        "Id": "b0000000-0000-4000-8000-000000000001",
        "Port": port,
        "AcceptedCallingAETs": "*",
        "MaxAssociations": 16,
    }
    (workflows / "bench.json").write_text(json.dumps(receiver), encoding="utf-8")
    return [
        sys.executable,
        "-m",
        "soupflow",
        "run",
        "--workflows",
        str(workflows),
        "--data",
        str(folder / "data"),
        "--workers",
        "0",
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


def command(receiver: str, folder: Path, port: int) -> list[str] | None:
    if receiver == "soupflow":
        return _soupflow(folder, port)
    if receiver == "pynetdicom":
        return [sys.executable, "-m", "bench.bare_scp", str(port), str(folder / "out")]
    if receiver == "orthanc":
        return _orthanc(folder, port)
    storescp = shutil.which("storescp")
    if storescp is None:
        return None
    (folder / "out").mkdir()
    return [storescp, "-od", str(folder / "out"), str(port)]


def _ready(port: int, process: subprocess.Popen[bytes]) -> None:
    echoscu = shutil.which("echoscu")
    deadline = time.monotonic() + _READY_SECONDS
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
        ):
            return
        time.sleep(0.05)
    raise RuntimeError("receiver did not answer C-ECHO in time")


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
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [storescu, "-aec", "SOUPFLOW", "127.0.0.1", str(port), *map(str, share)],
            env=NODELAY,
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
                f"storescu failed ({sender.returncode}): {errors.decode(errors='replace')[-500:]}"
            )
    return time.perf_counter() - start


def measure(receiver: str, scenario: Scenario, work: Path) -> tuple[float, int] | None:
    """(rate, peak RSS) of one run, or None when the receiver is not installed."""
    with tempfile.TemporaryDirectory(dir=work) as folder:
        port = free_port()
        argv = command(receiver, Path(folder), port)
        if argv is None:
            return None
        log = Path(folder) / "receiver.log"
        with log.open("wb") as output:
            process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=NODELAY)
        try:
            _ready(port, process)
            try:
                seconds = send(port, scenario)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"{receiver}, {scenario.name}: {exc}\n{log.read_text(errors='replace')[-1500:]}"
                ) from None
            peak = peak_rss(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=60)
    amount = scenario.megabytes if scenario.unit == "MB/s" else len(scenario.files)
    return amount / seconds, peak


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
        help="only scenarios whose name contains one of these (comma-separated)",
    )
    args = parser.parse_args(arguments)
    receivers = tuple(name for name in RECEIVERS if name in args.receivers.split(","))
    with tempfile.TemporaryDirectory(prefix="soupflow-bench-") as folder:
        work = Path(folder)
        if args.smoke:
            ct, tiny, large_bytes, runs = (
                images(work / "ct", 4, 64, 64),
                images(work / "tiny", 4, 32, 32),
                4_000_000,
                1,
            )
        else:
            ct, tiny, large_bytes, runs = (
                images(work / "ct", 500, 512, 512),
                images(work / "tiny", 2000, 32, 32),
                300_000_000,
                args.runs,
            )
        scenarios = [
            Scenario("CT-sized, 1 association", ct),
            Scenario("CT-sized, 4 associations", ct, associations=4),
            Scenario("tiny, 1 association", tiny),
            Scenario(
                "one large instance", [large_instance(work / "large.dcm", large_bytes)], unit="MB/s"
            ),
        ]
        wanted = [name for name in args.scenarios.split(",") if name]
        scenarios = [s for s in scenarios if not wanted or any(w in s.name for w in wanted)]
        results = run(scenarios, runs, work, lambda line: print(line, file=sys.stderr), receivers)
        lines = table(scenarios, results, receivers)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
