"""The benchmark harnesses run (smoke mode), so they cannot rot. No timings are asserted."""

from __future__ import annotations

from pathlib import Path

from bench import forward, ingest, message, metrics, queue, soak, stow, tls
from bench.postgres import UnavailableError
from tests.dicom import unavailable


def test_message_benchmark_smoke() -> None:
    results = message.main(["--smoke"])
    assert [name for name, _, _ in results] == [
        "a CT series from CT_small (32 KB pixels)",
        "SR with 300 content items",
    ]
    assert all(ours > 0 and theirs > 0 for _, ours, theirs in results)


def test_ingest_benchmark_smoke() -> None:
    lines = ingest.main(["--smoke"])
    throughput, latency, end_to_end = "\n".join(lines).split("\n\n")
    rows = throughput.splitlines()[2:]
    assert len(rows) == 2 * len(ingest.RECEIVERS)  # smoke: the first scenario and the large one
    assert all("soupflow" in line and ("inst/s" in line or "MB/s" in line) for line in rows[::4])
    assert "MB/s" in rows[-4]
    assert [line.split(" | ")[0] for line in latency.splitlines()[2:]] == [
        f"| {receiver}" for receiver in ingest.RECEIVERS
    ]
    assert " ms | " in latency.splitlines()[2], "soupflow's ACK latency was measured"
    assert "msg/s" in end_to_end.splitlines()[-1]


def test_forwarding_benchmark_smoke(tmp_path: Path) -> None:
    chart = tmp_path / "backlog.png"
    lines = forward.main(["--smoke", "--chart", str(chart)])
    rates, sustained = "\n".join(lines).split("\n\n")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in rates.splitlines()[2:]}
    assert len(rows) == len(forward.SMOKE_ROUTES)  # smoke: one route of each harness kind
    for row in rows.values():
        assert float(row.split(" | ")[1].replace(",", "")) > 0, row
    assert "| empty after the last store |" in sustained
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_benchmark_smoke() -> None:
    lines = soak.main(["--smoke"])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert set(soak.ABUSERS) <= set(rows)
    assert rows["normal stores failed"].endswith("| 0 |")
    assert int(rows["normal stores (storescu)"].split(" | ")[-1].strip(" |").replace(",", "")) > 0


def test_tls_benchmark_smoke() -> None:
    rows = [line for line in tls.main(["--smoke"]) if line.startswith("| ") and "inst/s" in line]
    assert [row.split(" | ")[1] for row in rows] == list(tls.PATHS)


def test_stow_benchmark_smoke() -> None:
    lines = stow.main(["--smoke"])
    rows = [line for line in lines if line.startswith("| ") and "inst/s" in line]
    assert [row.split(" | ")[1] for row in rows] == list(stow.RECEIVERS)
    assert lines[-1].startswith("One instance of 20 MB to soupflow: ") and "peak RSS" in lines[-1]


def test_metrics_benchmark_smoke() -> None:
    rows = [line for line in metrics.main(["--smoke"]) if "inst/s" in line]
    assert [row.split(" | ")[1] for row in rows] == list(metrics.MODES)


def test_queue_benchmark_smoke() -> None:
    try:
        lines = queue.main(["--smoke"])
    except UnavailableError as exc:
        unavailable(str(exc))
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [
        "ingest, 1 association(s) (inst/s)",
        "ingest, 4 association(s) (inst/s)",
        "end to end, JSON file (msg/s)",
        "enqueues/s (4 threads)",
        "leases + finishes/s (2 workers)",
    ]
    for row in rows:
        assert float(row.split(" | ")[2].replace(",", "")) > 0, row
