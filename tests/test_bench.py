"""The benchmark harnesses run (smoke mode), so they cannot rot. No timings are asserted."""

from __future__ import annotations

from bench import ingest, message


def test_message_benchmark_smoke() -> None:
    results = message.main(["--smoke"])
    assert [name for name, _, _ in results] == [
        "CT_small (CT header, 32 KB pixels)",
        "SR with 300 content items",
    ]
    assert all(ours > 0 and theirs > 0 for _, ours, theirs in results)


def test_ingest_benchmark_smoke() -> None:
    lines = ingest.main(["--smoke"])
    throughput, latency, end_to_end = "\n".join(lines).split("\n\n")
    rows = throughput.splitlines()[2:]
    assert len(rows) == 5 * len(ingest.RECEIVERS)
    assert all("soupflow" in line and ("inst/s" in line or "MB/s" in line) for line in rows[::4])
    assert [line.split(" | ")[0] for line in latency.splitlines()[2:]] == [
        f"| {receiver}" for receiver in ingest.RECEIVERS
    ]
    assert " ms | " in latency.splitlines()[2], "soupflow's ACK latency was measured"
    assert "msg/s" in end_to_end.splitlines()[-1]
