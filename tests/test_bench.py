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
    rows = [line for line in lines[2:] if "not installed" not in line]
    assert len(lines) == 2 + 4 * 4
    assert all("soupflow" in line for line in lines[2::4])
    assert rows, "at least soupflow itself was measured"
