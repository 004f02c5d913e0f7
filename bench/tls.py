"""TLS ingest: soupflow and Orthanc, each with and without TLS, side by side in one run.

    python -m bench.tls [--runs N] [--smoke]

dcmtk's storescu sends the same CT-sized instances (TCP_NODELAY=1) over one association and
over four, with `+tls` and a client certificate for the TLS runs (mutual TLS on both
receivers: soupflow `AuthenticationType` 2, Orthanc `DicomTlsRemoteCertificateRequired`).
Certificates are made for the run (bench.certs). soupflow runs `--workers 0 --processes 0` (ingest only,
each instance fsynced and queued before Success); "1 worker process" adds `--processes 1`,
whose worker process serves some of the associations (timed once it says it takes them).
Medians of the runs; every receiver is a fresh process per run. Reported: the rate, soupflow
TLS / soupflow cleartext (the goal: >= 0.8) in one process and with a worker process, and
soupflow / Orthanc for the same transport; dcmtk's storescp (no fsync, with and
without `+tls`) shows what TLS costs this machine's cores on their own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from bench.certs import Authority
from bench.data import images
from bench.ingest import NODELAY, free_port, soupflow_run

_RECEIVER_ID = "e0000000-0000-4000-8000-000000000001"
_READY_SECONDS = 30.0
SHARED = ", 1 worker process"  # `--processes 1`: it serves some of the associations
PATHS = (
    "soupflow",
    "soupflow TLS",
    f"soupflow{SHARED}",
    f"soupflow TLS{SHARED}",
    "orthanc",
    "orthanc TLS",
    "dcmtk",
    "dcmtk TLS",
)
_SHARING = "takes connections"  # a worker process's line: it serves some from now on


class Keys:
    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder)
        self.server = self.ca.issue("bench server")
        self.client = self.ca.issue("bench modality", client=True)

    def storescu_options(self) -> list[str]:
        return ["+tls", *map(str, self.client.pair), "-pw", "+cf", str(self.ca.path)]


def _soupflow(folder: Path, port: int, keys: Keys | None, *options: str) -> list[str]:
    workflows = folder / "workflows"
    workflows.mkdir()
    receiver: dict[str, object] = {
        "$type": "HL7Soup.Functions.Settings.Receivers.DicomReceiverSetting, HL7SoupWorkflow",
        "Id": _RECEIVER_ID,
        "Port": port,
        "AcceptedCallingAETs": "*",
        "MaxAssociations": 16,
    }
    if keys is not None:
        receiver |= {
            "UseSsl": True,
            "CertificateFile": str(keys.server.certificate),
            "PrivateKeyFile": str(keys.server.key),
            "AuthenticationType": 2,
            "TrustedCertificatesFile": str(keys.ca.path),
        }
    document = {"Name": "bench", "WorkflowId": _RECEIVER_ID, "WorkflowPattern": [receiver]}
    (workflows / "bench.json").write_text(json.dumps(document), encoding="utf-8")
    return soupflow_run(workflows, folder / "data", "--workers", "0", *options)


def _orthanc(folder: Path, port: int, keys: Keys | None) -> list[str] | None:
    program = shutil.which("Orthanc")
    if program is None:
        return None
    config: dict[str, object] = {
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": free_port(),
        "DicomPort": port,
        "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "DicomThreadsCount": 4,
    }
    if keys is not None:
        config |= {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(keys.server.certificate),
            "DicomTlsPrivateKey": str(keys.server.key),
            "DicomTlsTrustedCertificates": str(keys.ca.path),
            "DicomTlsRemoteCertificateRequired": True,
        }
    (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    return [program, str(folder / "orthanc.json")]


def _storescp(folder: Path, port: int, keys: Keys | None) -> list[str] | None:
    """dcmtk's storescp (it does not fsync): what this machine's cores allow a receiver."""
    program = shutil.which("storescp")
    if program is None:
        return None
    (folder / "out").mkdir()
    secured = ["+tls", *map(str, keys.server.pair), "-pw", "+cf", str(keys.ca.path)] if keys else []
    return [program, *secured, "-od", str(folder / "out"), str(port)]


def _echo(port: int, options: list[str]) -> bool:
    echoscu = shutil.which("echoscu")
    assert echoscu is not None, "dcmtk's echoscu checks that a receiver is up"
    done = subprocess.run(
        [echoscu, *options, "-aec", "SOUPFLOW", "127.0.0.1", str(port)],
        env=NODELAY,
        capture_output=True,
        check=False,
        timeout=30,
    )
    return done.returncode == 0


@contextmanager
def receiving(path: str, work: Path, keys: Keys) -> Iterator[int | None]:
    """A fresh receiver for `path` answering C-ECHO (over TLS for the TLS paths): its port."""
    secured = keys if " TLS" in path else None
    options = keys.storescu_options() if secured else []
    shared = path.endswith(SHARED)
    with tempfile.TemporaryDirectory(dir=work) as name:
        folder, port = Path(name), free_port()
        kind = path.split(maxsplit=1)[0].rstrip(",")
        if kind == "soupflow":
            argv: list[str] | None = _soupflow(
                folder, port, secured, "--processes", "1" if shared else "0"
            )
        else:
            argv = {"orthanc": _orthanc, "dcmtk": _storescp}[kind](folder, port, secured)
        if argv is None:
            yield None
            return
        with (folder / "receiver.log").open("wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=NODELAY)
        try:
            deadline = time.monotonic() + _READY_SECONDS
            log_file = folder / "receiver.log"
            while not _echo(port, options) or (shared and _SHARING not in log_file.read_text()):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (folder / "receiver.log").read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"{path} did not answer C-ECHO\n{tail}")
                time.sleep(0.05)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=60)


def send(port: int, files: list[Path], associations: int, options: list[str]) -> float:
    storescu = shutil.which("storescu")
    assert storescu is not None, "dcmtk's storescu sends in every run"
    shares = [files[index::associations] for index in range(associations)]
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [storescu, *options, "-aec", "SOUPFLOW", "127.0.0.1", str(port), *map(str, share)],
            env=NODELAY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
    ]
    for sender in senders:
        _, errors = sender.communicate(timeout=600)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {errors.decode(errors='replace')[-500:]}")
    return len(files) / (time.perf_counter() - start)


def measure(
    files: list[Path], runs: int, work: Path, levels: tuple[int, ...] = (1, 4)
) -> dict[tuple[str, int], list[float]]:
    keys = Keys(work / "keys")
    rates: dict[tuple[str, int], list[float]] = {}
    report = partial(print, file=sys.stderr)
    for number in range(runs):
        order = PATHS if number % 2 == 0 else tuple(reversed(PATHS))
        for associations in levels:
            for path in order:
                with receiving(path, work, keys) as port:
                    if port is None:
                        continue
                    options = keys.storescu_options() if " TLS" in path else []
                    rate = send(port, files, associations, options)
                rates.setdefault((path, associations), []).append(rate)
        report(f"run {number + 1} of {runs} done")
    return rates


def table(
    rates: dict[tuple[str, int], list[float]], count: int, levels: tuple[int, ...] = (1, 4)
) -> list[str]:
    lines = [
        f"TLS ingest: {count} CT-sized instances, storescu (+tls with a client certificate)",
        "",
        "| associations | path | rate (median) | soupflow TLS / this |",
        "|---:|---|---:|---:|",
    ]
    for associations in levels:
        for path in PATHS:
            ours = rates.get(
                (f"soupflow TLS{SHARED if path.endswith(SHARED) else ''}", associations)
            )
            found = rates.get((path, associations))
            if not found:
                lines.append(f"| {associations} | {path} | not installed | |")
                continue
            rate = statistics.median(found)
            ratio = f"{statistics.median(ours) / rate:.2f}" if ours else ""
            lines.append(f"| {associations} | {path} | {rate:,.0f} inst/s | {ratio} |")
    return lines


def main(arguments: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few small instances, once")
    options = parser.parse_args(arguments)
    with tempfile.TemporaryDirectory(prefix="soupflow-tls-") as folder:
        work = Path(folder)
        levels: tuple[int, ...] = (1, 4)
        if options.smoke:  # one association: enough to keep the harness working
            files, runs, levels = images(work / "ct", 8, 64, 64), 1, (1,)
        else:
            files, runs = images(work / "ct", 300, 512, 512), options.runs
        lines = table(measure(files, runs, work, levels), len(files), levels)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
