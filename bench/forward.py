"""Delivery speed: routers forwarding what dcmtk's storescu sends, side by side in one run.

    python -m bench.forward [--runs N] [--smoke] [--scenarios direct,orthanc,...]

Each run sends the same CT-sized instances (bench.data.images) with storescu (TCP_NODELAY=1)
and is timed from the first byte sent to the last file written at the destination (dcmtk
storescp; for STOW-RS, Orthanc's DICOMweb plugin). Paths: storescu -> storescp directly; Orthanc's classic Lua autorouter
(`OnStoredInstance`: `Delete(SendToModality(instanceId, 'dest'))`); soupflow with one
`DicomSenderSetting` (default 2 workers); soupflow's ingest alone (`--workers 0`, timed to
the last acknowledgement) for the ratio; soupflow fanning out to three storescp
destinations; STOW-RS to an Orthanc archive from soupflow's STOW-RS sender and from Orthanc's
own DICOMweb client (what an Orthanc user would do: a Lua `OnStoredInstance` that POSTs
`/dicom-web/servers/dest/stow` for the instance, then deletes it). The sustained scenario runs four storescu associations in a loop for a fixed
time into soupflow forwarding to storescp, samples the backlog (queued + processing) every
half second, and draws it (a PNG). Medians of the runs; every process is fresh per run.
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
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw

from bench.data import images
from bench.ingest import NODELAY, free_port, soupflow_run, wait_ready
from soupflow.store.queue import Queue, State
from soupflow.store.sqlite import SqliteQueue

_RECEIVER_ID = "c0000000-0000-4000-8000-000000000001"
_DEADLINE_SECONDS = 600.0
SCENARIOS = (
    "direct",
    "orthanc",
    "soupflow",
    "soupflow worker process",
    "soupflow converting",
    "ingest only",
    "fan-out",
    "stow orthanc",
    "stow orthanc series",
    "stow soupflow",
    "sustained",
)
_ROUTES = SCENARIOS[:-1]  # the ones timed as a rate
# Smoke mode: direct, an Orthanc route, soupflow in-process and in a worker process, fan-out,
# and both STOW-RS harnesses (Orthanc's Lua job and soupflow's sender).
SMOKE_ROUTES = (
    "direct",
    "orthanc",
    "soupflow worker process",
    "fan-out",
    "stow orthanc series",
    "stow soupflow",
)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _count(folder: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(folder) if entry.is_file())
    except FileNotFoundError:
        return 0


@contextmanager
def process(argv: list[str], log: Path, port: int | None = None) -> Iterator[int]:
    """A process, up (answering C-ECHO on `port` when given), stopped at the end; its pid."""
    with log.open("wb") as output:
        child = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=NODELAY)
    try:
        if port is not None:
            wait_ready(port, child, log)
        yield child.pid
    finally:
        child.terminate()
        child.wait(timeout=60)


@contextmanager
def destination(folder: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp writing into `folder`/out: (port, out)."""
    storescp = shutil.which("storescp")
    assert storescp is not None, "dcmtk's storescp is the destination of every scenario"
    port, out = free_port(), folder / "out"
    out.mkdir(parents=True)
    with process([storescp, "-aet", "DEST", "-od", str(out), str(port)], folder / "scp.log", port):
        yield port, out


def storescu(port: int, files: list[Path], associations: int = 1) -> list[subprocess.Popen[bytes]]:
    program = shutil.which("storescu")
    assert program is not None, "dcmtk's storescu sends in every scenario"
    shares = [files[index::associations] for index in range(associations)]
    return [
        subprocess.Popen(
            [program, "-aec", "ROUTER", "127.0.0.1", str(port), *map(str, share)],
            env=NODELAY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
        if share
    ]


def _finish(senders: list[subprocess.Popen[bytes]]) -> None:
    for sender in senders:
        _, errors = sender.communicate(timeout=_DEADLINE_SECONDS)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {errors.decode(errors='replace')[-500:]}")


def _wait_files(outs: list[Path], count: int, log: Path | None = None) -> None:
    deadline = time.monotonic() + _DEADLINE_SECONDS
    while any(_count(out) < count for out in outs):
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1500:] if log else ""
            raise RuntimeError(f"{[_count(out) for out in outs]} of {count} delivered\n{tail}")
        time.sleep(0.005)


def soupflow_command(
    folder: Path,
    port: int,
    targets: list[int],
    workers: int,
    stow_url: str | None = None,
    filtered: bool = False,
    processes: int = 0,
) -> list[str]:
    """`soupflow run` with one workflow forwarding by C-STORE to each of `targets` (or by
    STOW-RS to `stow_url`); `filtered`: the receiver's filter reads CommonFields/Modality,
    so each message's DICOM message is built."""
    senders: list[dict[str, object]] = [
        {
            "$type": "HL7Soup.Functions.Settings.Senders.DicomSenderSetting, HL7SoupWorkflow",
            "Id": f"c0000000-0000-4000-8000-{number + 2:012d}",
            "Name": f"PACS {number + 1}",
            "RemoteHost": "127.0.0.1",
            "RemotePort": target,
            "RemoteAET": "DEST",
            "OurAET": "SOUPFLOW",
        }
        for number, target in enumerate(targets)
    ]
    if stow_url is not None:
        senders = [
            {
                "$type": "Soupflow.Senders.StowRsSenderSetting, Soupflow",
                "Id": "c0000000-0000-4000-8000-000000000009",
                "Name": "DICOMweb archive",
                "BaseUrl": stow_url,
            }
        ]
    only_ct: dict[str, object] = {
        "$type": "HL7Soup.Functions.Settings.Filters.FilterHostSetting, HL7SoupWorkflow",
        "Id": "c0000000-0000-4000-8000-000000000010",
        "Name": "Only CT",
        "Filters": [
            {
                "$type": "HL7Soup.MessageFilters.StringMessageFilter, HL7SoupWorkflow",
                "Path": "CommonFields/Modality",
                "Value": "CT",
            }
        ],
    }
    receiver = {
        "$type": "HL7Soup.Functions.Settings.Receivers.DicomReceiverSetting, HL7SoupWorkflow",
        "Id": _RECEIVER_ID,
        "Port": port,
        "OurAET": "ROUTER",
        "AcceptedCallingAETs": "*",
        "MaxAssociations": 16,
        "Activities": [sender["Id"] for sender in senders],
        **({"Filters": only_ct["Id"]} if filtered else {}),
    }
    if filtered:
        senders.append(only_ct)
    workflows = folder / "workflows"
    workflows.mkdir()
    document = {
        "Name": "forward",
        "WorkflowId": _RECEIVER_ID,
        "WorkflowPattern": [receiver, *senders],
    }
    (workflows / "forward.json").write_text(json.dumps(document), encoding="utf-8")
    options = ("--workers", str(workers), "--processes", str(processes))
    return soupflow_run(workflows, folder / "data", *options)


def orthanc_command(
    folder: Path,
    port: int,
    target: int | None,
    http_port: int | None = None,
    stow_url: str | None = None,
    per_series: bool = False,
) -> list[str] | None:
    """Orthanc as a router: its Lua autorouter sends each stored instance to `target` by
    C-STORE, or to `stow_url` with its DICOMweb client (`per_series`: one STOW-RS job per
    series once it is stable, StableAge 1 s); with neither it is a plain archive with
    DICOMweb (the STOW-RS destination)."""
    program = shutil.which("Orthanc")
    if program is None or (
        (stow_url is not None or target is None) and not DICOMWEB_PLUGIN.exists()
    ):
        return None
    script = folder / "autorouter.lua"
    if stow_url is not None and per_series:
        script.write_text(
            "function OnStableSeries(seriesId, tags, metadata)\n"
            "  RestApiPost('/dicom-web/servers/dest/stow', '{\"Resources\":[\"' .. seriesId .. '\"]}')\n"
            "  Delete(seriesId)\n"
            "end\n",
            encoding="utf-8",
        )
    if stow_url is not None and not per_series:
        send = (
            "  RestApiPost('/dicom-web/servers/dest/stow', '{\"Resources\":[\"' .. instanceId .. '\"]}')\n"
            "  Delete(instanceId)\n"
        )
    else:
        send = "  Delete(SendToModality(instanceId, 'dest'))\n"
    if not per_series:
        script.write_text(
            f"function OnStoredInstance(instanceId, tags, metadata, origin)\n{send}end\n",
            encoding="utf-8",
        )
    config: dict[str, object] = {
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port or free_port(),
        "DicomPort": port,
        "DicomAet": "ROUTER",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "DicomThreadsCount": 4,
        "StableAge": 1,
    }
    if target is not None:
        config.update(DicomModalities={"dest": ["DEST", "127.0.0.1", target]})
    if stow_url is not None or target is None:
        dicomweb: dict[str, object] = {"Enable": True, "Root": "/dicom-web/"}
        if stow_url is not None:
            dicomweb["Servers"] = {"dest": [stow_url + "/"]}
        config.update(Plugins=[str(DICOMWEB_PLUGIN)], DicomWeb=dicomweb)
    if target is not None or stow_url is not None:
        config["LuaScripts"] = [str(script)]
    (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    return [program, str(folder / "orthanc.json")]


@contextmanager
def dicomweb_archive(folder: Path) -> Iterator[tuple[str, Callable[[], int]] | None]:
    """Orthanc with its DICOMweb plugin, the STOW-RS destination: (its DICOMweb base URL,
    how many instances it holds), or None when it is not installed."""
    folder.mkdir(parents=True)
    http_port = free_port()
    argv = orthanc_command(folder, free_port(), None, http_port)
    if argv is None:
        yield None
        return
    base = f"http://127.0.0.1:{http_port}"

    def count() -> int:
        try:
            with urllib.request.urlopen(f"{base}/statistics", timeout=10) as response:
                return int(json.loads(response.read())["CountInstances"])
        except OSError:
            return -1

    with process(argv, folder / "archive.log"):
        deadline = time.monotonic() + 30
        while count() < 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the DICOMweb archive did not answer")
            time.sleep(0.05)
        yield f"{base}/dicom-web", count


def stow_forwarding(kind: str, files: list[Path], work: Path) -> float | None:
    """Instances per second from the first byte sent to the last instance in the archive."""
    with tempfile.TemporaryDirectory(dir=work) as name, ExitStack() as stack:
        folder = Path(name)
        archive = stack.enter_context(dicomweb_archive(folder / "archive"))
        if archive is None:
            return None
        url, count = archive
        port = free_port()
        if kind.startswith("stow orthanc"):
            argv = orthanc_command(folder, port, None, stow_url=url, per_series="series" in kind)
            assert argv is not None
        else:
            argv = soupflow_command(folder, port, [], workers=2, stow_url=url)
        log = folder / "router.log"
        stack.enter_context(process(argv, log, port))
        start = time.perf_counter()
        _finish(storescu(port, files))
        deadline = time.monotonic() + _DEADLINE_SECONDS
        while count() < len(files):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count()} of {len(files)} stored\n{log.read_text()[-1500:]}")
            time.sleep(0.02)
        return len(files) / (time.perf_counter() - start)


def forwarding(kind: str, files: list[Path], work: Path, fan_out: int = 1) -> float | None:
    """Instances per second from the first byte sent to the last file at every destination."""
    if kind.startswith("stow"):
        return stow_forwarding(kind, files, work)
    with tempfile.TemporaryDirectory(dir=work) as name, ExitStack() as stack:
        folder = Path(name)
        targets = [stack.enter_context(destination(folder / f"dest{n}")) for n in range(fan_out)]
        outs = [out for _, out in targets]
        if kind == "direct":
            start = time.perf_counter()
            _finish(storescu(targets[0][0], files))
            _wait_files(outs, len(files))
            return len(files) / (time.perf_counter() - start)
        port = free_port()
        log = folder / "router.log"
        if kind == "orthanc":
            argv = orthanc_command(folder, port, targets[0][0])
            if argv is None:
                return None
        else:
            workers = 0 if kind == "ingest only" else 2
            argv = soupflow_command(
                folder,
                port,
                [p for p, _ in targets],
                workers,
                filtered=kind.endswith("converting"),
                processes=1 if kind.endswith("worker process") else 0,
            )
        stack.enter_context(process(argv, log, port))
        start = time.perf_counter()
        _finish(storescu(port, files))
        if kind == "ingest only":
            return len(files) / (time.perf_counter() - start)
        _wait_files(outs, len(files), log)
        return len(files) / (time.perf_counter() - start)


def sustained(
    files: list[Path], seconds: float, work: Path, processes: int = 0
) -> tuple[list[tuple[float, int]], float, int]:
    """Four storescu associations sending `files` over and over for `seconds` into soupflow
    forwarding to storescp: the backlog over time, the seconds from the last store to an
    empty queue, and the instances sent."""
    with tempfile.TemporaryDirectory(dir=work) as name, ExitStack() as stack:
        folder = Path(name)
        target, _ = stack.enter_context(destination(folder / "dest"))
        port = free_port()
        argv = soupflow_command(folder, port, [target], workers=2, processes=processes)
        log = folder / "router.log"
        stack.enter_context(process(argv, log, port))
        queue = SqliteQueue(folder / "data")
        stack.callback(queue.close)
        samples: list[tuple[float, int]] = []
        start = time.perf_counter()
        running: list[subprocess.Popen[bytes]] = []
        sent = 0
        next_sample = start
        while True:
            now = time.perf_counter()
            sending = now - start < seconds
            for sender in [s for s in running if s.poll() is not None]:
                running.remove(sender)
                _finish([sender])  # reads what it said, closes its pipe, checks its exit
            while sending and len(running) < 4:
                running += storescu(port, files)
                sent += len(files)
            if now >= next_sample:
                samples.append((now - start, _backlog(queue)))
                next_sample += 0.5
            if not sending and not running:
                break
            time.sleep(0.01)
        last_store = time.perf_counter()
        deadline = last_store + _DEADLINE_SECONDS
        while _backlog(queue) > 0 and time.perf_counter() < deadline:
            now = time.perf_counter()
            if now >= next_sample:
                samples.append((now - start, _backlog(queue)))
                next_sample += 0.5
            time.sleep(0.01)
        drained = time.perf_counter() - last_store
        samples.append((time.perf_counter() - start, _backlog(queue)))
        return samples, drained, sent


def _backlog(queue: Queue) -> int:
    return sum(
        entry.by_state.get(State.QUEUED, 0) + entry.by_state.get(State.PROCESSING, 0)
        for entry in queue.counts()
    )


def chart(samples: list[tuple[float, int]], sending_seconds: float, path: Path) -> None:
    """The backlog over time as a PNG (Pillow: already a dependency, for decompression)."""
    width, height, margin = 800, 360, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    last = max(time for time, _ in samples) or 1.0
    peak = max(1, *(count for _, count in samples))

    def point(time: float, count: int) -> tuple[float, float]:
        x = margin + (width - 2 * margin) * time / last
        y = height - margin - (height - 2 * margin) * count / peak
        return x, y

    draw.rectangle([point(0, peak), point(min(sending_seconds, last), 0)], fill=(235, 242, 255))
    draw.line([point(0, 0), point(last, 0)], fill="black")
    draw.line([point(0, 0), point(0, peak)], fill="black")
    draw.line([point(time, count) for time, count in samples], fill=(200, 40, 40), width=2)
    draw.text(
        (margin, 10),
        "soupflow backlog (queued + processing) under 4 storescu associations",
        fill="black",
    )
    draw.text(
        (margin, height - margin + 8),
        f"0 s ... {last:.0f} s (shaded: senders running)",
        fill="black",
    )
    draw.text((4, margin - 10), f"{peak}", fill="black")
    image.save(path)


def main(arguments: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few small instances")
    parser.add_argument(
        "--scenarios", default="", help="comma-separated subset of: " + ", ".join(SCENARIOS)
    )
    parser.add_argument(
        "--chart", type=Path, default=Path("bench/backlog.png"), help="where the backlog chart goes"
    )
    args = parser.parse_args(arguments)
    wanted = [name for name in args.scenarios.split(",") if name] or list(SCENARIOS)
    report: Callable[..., None] = partial(print, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="soupflow-forward-") as name:
        work = Path(name)
        if args.smoke:
            files, runs, load_seconds = images(work / "ct", 6, 64, 64), 1, 1.5
            if (
                not args.scenarios
            ):  # one route of each kind of harness code: enough to keep it working
                wanted = [kind for kind in wanted if kind in SMOKE_ROUTES or kind == "sustained"]
        else:
            files, runs, load_seconds = images(work / "ct", 200, 512, 512), args.runs, 60.0
        rates: dict[str, list[float]] = {}
        for number in range(runs):
            order = [kind for kind in _ROUTES if kind in wanted]
            for kind in order if number % 2 == 0 else reversed(order):
                # Orthanc's per-instance STOW-RS runs at a few instances a second: fewer of them
                batch = files[: max(len(files) // 10, 2)] if kind == "stow orthanc" else files
                measured = forwarding(kind, batch, work, fan_out=3 if kind == "fan-out" else 1)
                if measured is not None:
                    rates.setdefault(kind, []).append(measured)
            report(f"run {number + 1} of {runs} done")
        lines = _table(rates, len(files))
        if "sustained" in wanted:
            samples, drained, sent = sustained(files, load_seconds, work)
            chart(samples, load_seconds, args.chart)
            peak = max(count for _, count in samples)
            lines += [
                "",
                "| sustained load (4 storescu associations, soupflow forwarding to storescp) | value |",
                "|---|---:|",
                f"| sending for | {load_seconds:.0f} s |",
                f"| instances sent | {sent} ({sent / load_seconds:,.0f} inst/s offered) |",
                f"| largest backlog (queued + processing) | {peak} |",
                f"| backlog at the end of sending | {_at(samples, load_seconds)} |",
                f"| empty after the last store | {drained:.1f} s |",
                f"| chart | {args.chart} |",
            ]
            report("sustained done")
    print("\n".join(lines))
    return lines


def _at(samples: list[tuple[float, int]], moment: float) -> int:
    before = [count for time, count in samples if time <= moment]
    return before[-1] if before else 0


def _table(rates: dict[str, list[float]], count: int) -> list[str]:
    names = {
        "direct": "storescu -> storescp directly (no router)",
        "orthanc": "Orthanc, Lua autorouter (SendToModality, then Delete)",
        "soupflow": "soupflow, one DicomSenderSetting (2 workers)",
        "soupflow worker process": "soupflow, the same with its workers in a worker process (`--processes 1`)",
        "soupflow converting": "soupflow, the same behind a filter on CommonFields/Modality",
        "ingest only": "soupflow ingest alone (--workers 0, to the last ACK)",
        "fan-out": "soupflow, three DicomSenderSettings (all three delivered)",
        "stow orthanc": "Orthanc, Lua: its DICOMweb client's STOW-RS per instance, then Delete",
        "stow orthanc series": "Orthanc, Lua: one STOW-RS job per stable series (StableAge 1 s)",
        "stow soupflow": "soupflow, one StowRsSenderSetting (2 workers)",
    }
    lines = [
        f"| path ({count} CT-sized instances, 1 association in) | inst/s (median) | soupflow / this |",
        "|---|---:|---:|",
    ]
    for kind, label in names.items():
        if kind not in rates:
            continue
        rate = statistics.median(rates[kind])
        ours_kind = "stow soupflow" if kind.startswith("stow") else "soupflow"
        ours = statistics.median(rates[ours_kind]) if ours_kind in rates else None
        ratio = f"{ours / rate:.2f}" if ours else ""
        lines.append(f"| {label} | {rate:,.0f} | {ratio} |")
    return lines


if __name__ == "__main__":
    main()
