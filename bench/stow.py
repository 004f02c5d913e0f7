"""STOW-RS ingest: soupflow's STOW-RS receiver beside Orthanc's DICOMweb STOW-RS server.

    python -m bench.stow [--runs N] [--smoke]

The same client for both: K curl processes, each POSTing its share of the instances over one
keep-alive connection (K = 1 and 4), one POST per instance (`multipart/related;
type="application/dicom"`, one part), CT-sized instances (bench.data.images); `--client
httpx` uses httpx in K threads instead (a Python client that shares the two cores' interpreter
time with nothing but itself, yet costs more CPU per request than curl). soupflow runs
`--workers 0 --processes 0`: each instance fsynced and queued before the answer (Orthanc does not fsync);
"soupflow, 1 worker process" adds `--processes 1`, whose worker process serves some of the
connections (timed once it says it takes them). Then one large instance (1 GB; 20 MB in smoke mode)
POSTed to soupflow with its Content-Length, streamed from the file: MB/s and the
receiver's peak RSS. Medians of the runs; each receiver is a fresh process per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx

from bench.data import images, large_instance
from bench.ingest import NODELAY, free_port, peak_rss, soupflow_run

_RECEIVER_ID = "f0000000-0000-4000-8000-000000000001"
_BOUNDARY = "soupflow-bench"
_READY_SECONDS = 30.0
RECEIVERS = ("soupflow", "soupflow, 1 worker process", "orthanc")
_SHARING = "takes connections"  # a worker process's line: it serves some from now on


def _soupflow(folder: Path, port: int, *options: str) -> tuple[list[str], str]:
    workflows = folder / "workflows"
    workflows.mkdir()
    receiver = {
        "$type": "Soupflow.Receivers.StowRsReceiverSetting, Soupflow",
        "Id": _RECEIVER_ID,
        "Port": port,
        "ServiceName": "dicom-web",
    }
    document = {"Name": "bench", "WorkflowId": _RECEIVER_ID, "WorkflowPattern": [receiver]}
    (workflows / "bench.json").write_text(json.dumps(document), encoding="utf-8")
    command = soupflow_run(workflows, folder / "data", "--workers", "0", *options)
    return command, f"http://127.0.0.1:{port}/dicom-web"


def _orthanc(folder: Path, port: int) -> tuple[list[str], str] | None:
    program = shutil.which("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if program is None or not plugin.exists():
        return None
    config = {
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpThreadsCount": 8,
    }
    (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    return [program, str(folder / "orthanc.json")], f"http://127.0.0.1:{port}/dicom-web"


@contextmanager
def receiving(receiver: str, work: Path) -> Iterator[tuple[str, int] | None]:
    """A fresh receiver whose STOW-RS answers: (its base URL, pid), or None if absent."""
    with tempfile.TemporaryDirectory(dir=work) as name:
        folder, port = Path(name), free_port()
        sharing = receiver == "soupflow, 1 worker process"
        if receiver == "orthanc":
            made = _orthanc(folder, port)
        else:
            made = _soupflow(folder, port, "--processes", "1" if sharing else "0")
        if made is None:
            yield None
            return
        argv, base = made
        with (folder / "receiver.log").open("wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=NODELAY)
        try:
            deadline = time.monotonic() + _READY_SECONDS
            log_file = folder / "receiver.log"
            while not _answers(base) or (sharing and _SHARING not in log_file.read_text()):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (folder / "receiver.log").read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"{receiver} did not answer\n{tail}")
                time.sleep(0.05)
            yield base, process.pid
        finally:
            process.terminate()
            process.wait(timeout=60)


def _answers(base: str) -> bool:
    try:
        answer = httpx.post(
            f"{base}/studies",
            content=_body(b""),
            headers={"Content-Type": _media()},
            timeout=2,
        )
    except httpx.HTTPError:
        return False
    return answer.status_code < 500


def _media() -> str:
    return f'multipart/related; type="application/dicom"; boundary={_BOUNDARY}'


def _body(instance: bytes) -> bytes:
    head = f"--{_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + instance + f"\r\n--{_BOUNDARY}--\r\n".encode()


def send(base: str, files: list[Path], connections: int, client: str = "curl") -> float:
    """Instances per second: one POST each, over `connections` keep-alive connections."""
    bodies = [_body(path.read_bytes()) for path in files]
    if client == "curl":
        return _send_curl(base, bodies, connections, files[0].parent)
    shares = [bodies[index::connections] for index in range(connections)]
    errors: list[str] = []

    def post_all(share: list[bytes]) -> None:
        with httpx.Client(timeout=120) as http:
            for body in share:
                answer = http.post(
                    f"{base}/studies", content=body, headers={"Content-Type": _media()}
                )
                if answer.status_code != 200:
                    errors.append(f"HTTP {answer.status_code}: {answer.text[:200]}")
                    return

    threads = [threading.Thread(target=post_all, args=(share,)) for share in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(errors[0])
    return len(files) / (time.perf_counter() - start)


def _send_curl(base: str, bodies: list[bytes], connections: int, folder: Path) -> float:
    """`connections` curl processes, each sending its share as URLs of one invocation (curl
    keeps the connection alive between them); every answer must be 200."""
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl is not installed")
    configs = []
    for index in range(connections):
        blocks = []
        for number, body in enumerate(bodies[index::connections]):
            path = folder / f"body-{connections}-{index}-{number}.bin"
            if not path.exists():  # written once, for every run
                path.write_bytes(body)
            blocks.append(
                f'url = "{base}/studies"\ndata-binary = "@{path}"\n'
                f'header = "Content-Type: {_media().replace(chr(34), chr(92) + chr(34))}"\n'
                'output = "/dev/null"\nwrite-out = "%{http_code}\\n"\n'
            )
        config = folder / f"curl-{connections}-{index}.conf"
        config.write_text("next\n".join(blocks))
        configs.append(config)
    os.sync()  # the bodies' dirty pages are not written out while the receiver is timed
    start = time.perf_counter()
    senders = [
        subprocess.Popen([curl, "--silent", "--config", str(config)], stdout=subprocess.PIPE)
        for config in configs
    ]
    codes = [sender.communicate(timeout=600)[0].decode().split() for sender in senders]
    elapsed = time.perf_counter() - start
    wrong = [code for found in codes for code in found if code != "200"]
    if wrong or sum(map(len, codes)) != len(bodies):
        raise RuntimeError(f"curl: {sum(map(len, codes))} answers, not 200: {wrong[:5]}")
    return len(bodies) / elapsed


def large(path: Path, work: Path) -> tuple[float, int]:
    """(MB/s, soupflow's peak RSS) for one large instance streamed with its length."""
    body = work / "large.body"
    with body.open("wb") as out, path.open("rb") as source:
        out.write(f"--{_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        shutil.copyfileobj(source, out, 1 << 20)
        out.write(f"\r\n--{_BOUNDARY}--\r\n".encode())
    size = body.stat().st_size
    with receiving("soupflow", work) as running:
        assert running is not None
        base, pid = running
        start = time.perf_counter()
        with body.open("rb") as stream:
            answer = httpx.post(
                f"{base}/studies",
                content=stream,
                headers={"Content-Type": _media(), "Content-Length": str(size)},
                timeout=600,
            )
        seconds = time.perf_counter() - start
        if answer.status_code != 200:
            raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:200]}")
        peak = peak_rss(pid)
    body.unlink()
    return size / 1e6 / seconds, peak


def main(arguments: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.stow", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few small instances, once")
    parser.add_argument("--client", choices=("curl", "httpx"), default="curl")
    options = parser.parse_args(arguments)
    report = partial(print, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="soupflow-stow-") as folder:
        work = Path(folder)
        if options.smoke:  # one connection: enough to keep the harness working
            files, runs, large_bytes = images(work / "ct", 8, 64, 64), 1, 20_000_000
            levels: tuple[int, ...] = (1,)
        else:
            files, runs, large_bytes = images(work / "ct", 300, 512, 512), options.runs, 1 << 30
            levels = (1, 4)
        rates: dict[tuple[str, int], list[float]] = {}
        for number in range(runs):
            order = RECEIVERS if number % 2 == 0 else tuple(reversed(RECEIVERS))
            for connections in levels:
                for receiver in order:
                    with receiving(receiver, work) as running:
                        if running is not None:
                            rate = send(running[0], files, connections, options.client)
                            rates.setdefault((receiver, connections), []).append(rate)
            report(f"run {number + 1} of {runs} done")
        big = large_instance(work / "large.dcm", large_bytes)
        throughput, peak = large(big, work)
    lines = [
        f"STOW-RS ingest: {len(files)} CT-sized instances, one POST each ({options.client})",
        "",
        "| connections | receiver | rate (median) | this / orthanc |",
        "|---:|---|---:|---:|",
    ]
    for connections in levels:
        theirs = rates.get(("orthanc", connections))
        for receiver in RECEIVERS:
            found = rates.get((receiver, connections))
            if not found:
                lines.append(f"| {connections} | {receiver} | not installed | |")
                continue
            rate = statistics.median(found)
            ratio = f"{rate / statistics.median(theirs):.2f}" if theirs else ""
            lines.append(f"| {connections} | {receiver} | {rate:,.0f} inst/s | {ratio} |")
    lines += [
        "",
        f"One instance of {large_bytes / 1e6:,.0f} MB to soupflow: {throughput:,.0f} MB/s, "
        f"peak RSS {peak / 2**20:.0f} MB",
    ]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
