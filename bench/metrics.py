"""What the operator's window costs: soupflow's ingest with its admin endpoint on and scraped
twice a second, beside the same ingest with `--admin off`, in one run.

    python -m bench.metrics [--runs N] [--smoke]

dcmtk's storescu sends CT-sized instances (TCP_NODELAY=1) over one association and over
four into `soupflow run --workers 0`; the runs alternate the two modes, each a fresh process.
The goal (issue 17): at most 5% apart. The counters themselves are always on: what `off`
saves is the endpoint and the scrapes (each reads the queue's counts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import urllib.request
from functools import partial
from pathlib import Path

from bench.data import images
from bench.forward import process
from bench.ingest import Scenario, command, free_port, send

MODES = ("metrics on, scraped", "admin off")


def _scrape(data: Path, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        try:
            url = json.loads((data / "admin.json").read_text())["url"]
            with urllib.request.urlopen(url + "metrics", timeout=5) as answer:
                answer.read()
        except (OSError, ValueError, KeyError):
            continue


def measure(mode: str, files: list[Path], associations: int, work: Path) -> float:
    with tempfile.TemporaryDirectory(dir=work) as name:
        folder, port = Path(name), free_port()
        admin = "127.0.0.1:0" if mode == MODES[0] else "off"
        soupflow = command("soupflow", folder, port)
        assert soupflow is not None
        argv = [*soupflow, "--admin", admin]
        with process(argv, folder / "soupflow.log", port):
            stop = threading.Event()
            scraper = threading.Thread(target=_scrape, args=(folder / "data", stop))
            if mode == MODES[0]:
                scraper.start()
            try:
                return send(port, Scenario(mode, files, associations))
            finally:
                stop.set()
                if scraper.is_alive():
                    scraper.join()


def main(arguments: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few small instances, once")
    options = parser.parse_args(arguments)
    report = partial(print, file=sys.stderr)
    rates: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="soupflow-metrics-") as folder:
        work = Path(folder)
        levels: tuple[int, ...] = (1, 4)
        if options.smoke:
            files, runs, levels = images(work / "ct", 8, 64, 64), 1, (1,)
        else:
            files, runs = images(work / "ct", 300, 512, 512), options.runs
        for number in range(runs):
            order = MODES if number % 2 == 0 else tuple(reversed(MODES))
            for associations in levels:
                for mode in order:
                    seconds = measure(mode, files, associations, work)
                    rates.setdefault((mode, associations), []).append(len(files) / seconds)
            report(f"run {number + 1} of {runs} done")
    lines = [
        f"Metrics overhead: {len(files)} CT-sized instances into `soupflow run --workers 0`",
        "",
        "| associations | mode | rate (median) | on / off |",
        "|---:|---|---:|---:|",
    ]
    for associations in levels:
        on = statistics.median(rates[(MODES[0], associations)])
        off = statistics.median(rates[(MODES[1], associations)])
        lines.append(f"| {associations} | {MODES[0]} | {on:,.0f} inst/s | {on / off:.2f} |")
        lines.append(f"| {associations} | {MODES[1]} | {off:,.0f} inst/s | 1.00 |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
