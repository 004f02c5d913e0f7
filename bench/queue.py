"""The queue backends side by side: PostgreSQL beside SQLite on the same machine, one run.

    python -m bench.queue [--runs N] [--smoke]

PostgreSQL is a throwaway cluster (bench.postgres) with `fsync=on`, so that both backends
make each acknowledgement durable; each run gets a schema of its own. Reported:

- ingest: dcmtk's storescu (TCP_NODELAY=1) sends CT-sized instances over one association
  and over four into `soupflow run --workers 0` (each fsynced and queued before Success),
  with the default queue (SQLite in the data folder) and with `--queue postgresql://...`;
- end to end: the same instances to a workflow that writes each message's JSON to a file;
- the queue alone, in process: enqueues per second from 4 threads (group-committed), and
  leases plus finishes per second from 2 workers draining no-op messages, so that the
  queue is shown not to be the bottleneck.

Medians of the runs; the ratio is PostgreSQL / SQLite (the goal for ingest: >= 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from bench.data import images
from bench.ingest import Scenario, end_to_end, measure
from bench.postgres import PostgresCluster
from soupflow.store.postgres import PostgresQueue
from soupflow.store.queue import Arrival, Origin, Queue, State
from soupflow.store.sqlite import SqliteQueue

BACKENDS = ("SQLite", "PostgreSQL")
_WORKERS = 2
_ENQUEUERS = 4


def _arrival(number: int) -> Arrival:
    return Arrival(
        request_id=f"bench-{number:06d}",
        workflow_id="bench",
        object_path=f"be/bench-{number:06d}.dcm",
        byte_count=1000,
        received_at=1_800_000_000.0 + number / 1000,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.3.{number}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        origin=Origin(peer_address="127.0.0.1", peer_port=40000, calling_aet="BENCH"),
    )


def queue_rates(queue: Queue, count: int) -> tuple[float, float]:
    """(enqueues/s from 4 threads, leases + finishes/s from 2 workers) on an empty queue."""
    shares = [range(n, count, _ENQUEUERS) for n in range(_ENQUEUERS)]
    enqueued = _timed(lambda share: [queue.enqueue(_arrival(n)) for n in share], shares)
    now = _arrival(count).received_at + 3600  # every message is ready

    def drain(owner: str) -> None:
        for _ in range(count):
            message = queue.lease(owner, now, 300)
            if message is None:
                return
            queue.finish(message.request_id, owner, State.COMPLETED, now)

    drained = _timed(drain, [f"bench/boot/worker-{n}" for n in range(_WORKERS)])
    return count / enqueued, count / drained


def _timed(target: Callable[..., object], arguments: Sequence[object]) -> float:
    threads = [threading.Thread(target=target, args=(argument,)) for argument in arguments]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return time.perf_counter() - start


def measure_all(
    files: list[Path], runs: int, work: Path, cluster: PostgresCluster, operations: int
) -> dict[str, dict[str, list[float]]]:
    """rates[row][backend]: each run's figure."""
    rates: dict[str, dict[str, list[float]]] = {}
    report = partial(print, file=sys.stderr)

    def add(row: str, backend: str, value: float) -> None:
        rates.setdefault(row, {}).setdefault(backend, []).append(value)

    for number in range(runs):
        order = BACKENDS if number % 2 == 0 else tuple(reversed(BACKENDS))
        for backend in order:
            options: tuple[str, ...] = ()
            if backend == "PostgreSQL":
                options = ("--queue", cluster.database())
            for associations in (1, 4):
                scenario = Scenario(f"{associations}", files, associations)
                measured = measure("soupflow", scenario, work, options)
                assert measured is not None
                add(f"ingest, {associations} association(s) (inst/s)", backend, measured[0])
            add("end to end, JSON file (msg/s)", backend, end_to_end(files, work, 2, 0, options))
            with tempfile.TemporaryDirectory(dir=work) as folder:
                queue: Queue = (
                    SqliteQueue(Path(folder))
                    if backend == "SQLite"
                    else PostgresQueue(cluster.database())
                )
                try:
                    enqueues, drains = queue_rates(queue, operations)
                finally:
                    queue.close()
            add(f"enqueues/s ({_ENQUEUERS} threads)", backend, enqueues)
            add(f"leases + finishes/s ({_WORKERS} workers)", backend, drains)
        report(f"run {number + 1} of {runs} done")
    return rates


def table(rates: dict[str, dict[str, list[float]]], count: int) -> list[str]:
    lines = [
        f"Queue backends: {count} CT-sized instances, storescu; PostgreSQL with fsync=on",
        "",
        "| measure | SQLite | PostgreSQL | PostgreSQL / SQLite |",
        "|---|---:|---:|---:|",
    ]
    for row, found in rates.items():
        sqlite, postgres = (statistics.median(found[b]) for b in BACKENDS)
        lines.append(f"| {row} | {sqlite:,.0f} | {postgres:,.0f} | {postgres / sqlite:.2f} |")
    return lines


def main(arguments: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few small instances, once")
    options = parser.parse_args(arguments)
    cluster = PostgresCluster("fsync=on")
    try:
        with tempfile.TemporaryDirectory(prefix="soupflow-queue-") as folder:
            work = Path(folder)
            if options.smoke:
                files, runs, operations = images(work / "ct", 8, 64, 64), 1, 50
            else:
                files, runs, operations = images(work / "ct", 300, 512, 512), options.runs, 2000
            lines = table(measure_all(files, runs, work, cluster, operations), len(files))
    finally:
        cluster.close()
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
