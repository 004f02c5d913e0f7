"""Back-pressure on intake (runtime.pacing): answers held while a workflow's workers are
behind, never while its destination is down. A real SQLite queue; then `soupflow run` with
dcmtk's storescu and a real, slow HTTP destination."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from soupflow.runtime import pacing
from soupflow.runtime.pacing import Pacing
from soupflow.store.queue import Queue, State
from soupflow.store.sqlite import SqliteQueue
from tests import documents, records
from tests.dicom import DEADLINE_SECONDS, RuntimeProcess, sample_file, storescu_send, wait_for
from tests.http_peer import HttpPeer
from tests.test_metrics import admin_url, get, samples, value

T0 = 1_000_000.0
LIMIT = 3
CT = sample_file("CT_small.dcm")
HTTP_ID = "99999999-0000-4000-8000-0000000000b7"


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    return SqliteQueue(tmp_path / "data")


def _enqueue(queue: Queue, count: int, workflow_id: str = "w") -> list[str]:
    ids = [f"{workflow_id}-{number:03d}" for number in range(count)]
    for request_id in ids:
        queue.enqueue(
            records.arrival(request_id=request_id, workflow_id=workflow_id, received_at=T0)
        )
    return ids


def _deliver(queue: Queue, count: int, at: float) -> None:
    for _ in range(count):
        message = queue.lease("worker", at, 60)
        assert message is not None
        queue.finish(message.request_id, "worker", State.COMPLETED, at)


def _pacing(queue: Queue, now: float) -> Pacing:
    return Pacing(queue, LIMIT, clock=lambda: now)


def test_a_backlog_over_the_limit_while_workers_deliver_holds_answers_until_it_drains(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pacing, "HOLD_SECONDS", DEADLINE_SECONDS)  # only a release ends it
    _enqueue(queue, LIMIT + 3)
    _deliver(queue, 1, T0 + 1)  # LIMIT + 2 due, one delivered a moment ago
    paced = _pacing(queue, T0 + 1.5)
    paced.sample()
    assert paced.over() == {"w"}
    assert paced.hold("other") == 0.0  # another workflow's answers are not held
    held: list[float] = []
    answer = threading.Thread(target=lambda: held.append(paced.hold("w")))
    answer.start()
    answer.join(timeout=0.3)
    assert answer.is_alive(), "the answer is held while the backlog is over the limit"
    _deliver(queue, 2, T0 + 1.5)  # back to LIMIT due
    paced.sample()
    answer.join(timeout=DEADLINE_SECONDS)
    assert not answer.is_alive() and held and held[0] > 0
    assert paced.over() == set()


def test_a_destination_that_is_down_never_holds_intake(queue: Queue) -> None:
    ids = _enqueue(queue, LIMIT + 5)
    for _ in ids[:3]:  # tried and failed: waiting out their retry delay
        message = queue.lease("worker", T0 + 1, 60)
        assert message is not None
        queue.retry(message.request_id, "worker", T0 + 1, T0 + 600, "connection refused", "a1")
    paced = _pacing(queue, T0 + 2)
    paced.sample()
    assert paced.over() == set(), "LIMIT + 2 due, but nothing finished: not delivering"


def test_workers_that_finished_nothing_lately_do_not_hold_intake(queue: Queue) -> None:
    _enqueue(queue, LIMIT + 5)
    _deliver(queue, 1, T0 + 1)
    paced = _pacing(queue, T0 + 1 + pacing.WINDOW_SECONDS + 1)  # that delivery is old
    paced.sample()
    assert paced.over() == set()


def test_a_held_answer_waits_no_longer_than_the_hold_limit(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pacing, "HOLD_SECONDS", 0.05)
    _enqueue(queue, LIMIT + 3)
    _deliver(queue, 1, T0 + 1)
    paced = _pacing(queue, T0 + 1)
    paced.sample()
    assert paced.hold("w") > 0
    assert paced.over() == {"w"}, "still over: the answer went out at the hold limit"


def test_a_queue_that_cannot_be_read_holds_nothing(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    _enqueue(queue, LIMIT + 3)
    _deliver(queue, 1, T0 + 1)
    paced = _pacing(queue, T0 + 1)
    paced.sample()
    assert paced.over() == {"w"}
    queue.close()
    paced.sample()
    paced.sample()
    assert paced.over() == set()
    warnings = [r for r in caplog.records if "intake pacing cannot read the queue" in r.message]
    assert len(warnings) == 1


def test_stopping_releases_held_answers(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacing, "HOLD_SECONDS", DEADLINE_SECONDS)
    _enqueue(queue, LIMIT + 3)
    _deliver(queue, 1, T0 + 1)
    paced = _pacing(queue, T0 + 1)
    paced.sample()
    answer = threading.Thread(target=paced.hold, args=("w",))
    answer.start()
    paced.stop()
    answer.join(timeout=DEADLINE_SECONDS)
    assert not answer.is_alive()


def _run_forwarding(tmp_path: Path, peer: HttpPeer, *options: str) -> RuntimeProcess:
    sender = documents.http_sender(HTTP_ID, Server=peer.url, RetryInitialSeconds=30)
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    documents.write(
        workflows / "w.json", documents.workflow(sender, Port=0, AcceptedCallingAETs="STORESCU")
    )
    return RuntimeProcess(workflows, data, "--workers", "1", *options)


def _held_seconds(runtime: RuntimeProcess) -> float:
    _, text = get(admin_url(runtime.data) + "metrics")
    return value(
        samples(text), "soupflow_intake_held_seconds_total", workflow=documents.RECEIVER_ID
    )


def test_a_sender_faster_than_delivery_is_paced_and_everything_arrives(tmp_path: Path) -> None:
    peer = HttpPeer(answer_after=0.05)  # a destination that takes 50 ms a message
    runtime = _run_forwarding(tmp_path, peer, "--backlog-limit", str(LIMIT))
    try:
        # once the workers deliver (a worker process takes a second to start), 120 sent at
        # full speed take longer than a delivery and a sample or two
        storescu_send(runtime.port, CT)
        wait_for(lambda: peer.requests, "the first delivery")
        storescu_send(runtime.port, *[CT] * 120)
        wait_for(lambda: len(peer.requests) == 121, "all 121 delivered")
        # a worker process serving the association reports its counts each second
        wait_for(lambda: _held_seconds(runtime) > 0, "the held seconds counted")
        assert f"over the backlog limit of {LIMIT}" in runtime.log_text()
    finally:
        runtime.kill()
        peer.close()


def test_a_destination_answering_503_does_not_slow_the_sender(tmp_path: Path) -> None:
    peer = HttpPeer(statuses=[503] * 30)  # every first attempt fails: all wait for a retry
    runtime = _run_forwarding(tmp_path, peer, "--backlog-limit", str(LIMIT))
    try:
        storescu_send(runtime.port, *[CT] * 30)
        wait_for(lambda: len(peer.requests) == 30, "30 first attempts")
        assert _held_seconds(runtime) == 0
        assert "over the backlog limit" not in runtime.log_text()
    finally:
        runtime.kill()
        peer.close()
