"""The queue's contract: one behaviour suite that every backend must pass. Time is stepped."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.postgres import PostgresCluster
from soupflow.store.postgres import PostgresQueue
from soupflow.store.queue import (
    MAX_LEASE_EXPIRIES,
    ActivityOutcome,
    Arrival,
    Flow,
    LeaseLostError,
    Queue,
    QueueError,
    State,
    owner_id,
)
from soupflow.store.sqlite import DATABASE_FILE, SqliteQueue
from soupflow.store.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from tests import records

LEASE = 30.0
T0 = 1_000_000.0


class Backend:
    """Where one backend keeps a test's queue, and how a test reaches under it."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.folder = tmp_path / "data"

    @property
    def location(self) -> str:
        return str(self.folder)

    def open(self) -> Queue:
        return open_location(self.location)

    def set_schema_version(self, version: int) -> None:
        database = sqlite3.connect(self.folder / DATABASE_FILE)
        database.execute(f"PRAGMA user_version={version}")
        database.close()


class Postgres(Backend):
    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        super().__init__(request, tmp_path)
        self.cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        self.url = self.cluster.database()

    @property
    def location(self) -> str:
        return self.url

    def set_schema_version(self, version: int) -> None:
        self.cluster.execute(self.url, f"UPDATE soupflow_schema SET version = {version}")


def open_location(location: str) -> Queue:
    """A backend's queue from its location alone (what a child process is given)."""
    return (
        PostgresQueue(location)
        if location.startswith("postgresql")
        else SqliteQueue(Path(location))
    )


BACKENDS: dict[str, type[Backend]] = {"sqlite": Backend, "postgresql": Postgres}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture
def opener(backend: Backend) -> Iterator[Callable[[], Queue]]:
    opened: list[Queue] = []

    def open_queue() -> Queue:
        queue = backend.open()
        opened.append(queue)
        return queue

    yield open_queue
    for queue in opened:
        queue.close()


@pytest.fixture
def queue(opener: Callable[[], Queue]) -> Queue:
    return opener()


def arrival(number: int, workflow_id: str = "workflow-a", received_at: float = T0) -> Arrival:
    return records.arrival(
        request_id=f"request-{number:03d}",
        workflow_id=workflow_id,
        object_path=f"re/request-{number:03d}.dcm",
        byte_count=1000 + number,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.3.{number}",
        peer_port=40000 + number,
        received_at=received_at + number,
    )


def test_an_enqueued_message_is_leased_once_oldest_first(queue: Queue) -> None:
    queue.enqueue(arrival(2))
    queue.enqueue(arrival(1))
    first = queue.lease("worker-1", T0 + 10, LEASE)
    assert first is not None
    assert (first.request_id, first.state, first.lease_owner) == (
        "request-001",
        State.PROCESSING,
        "worker-1",
    )
    assert first.lease_expires_at == T0 + 10 + LEASE
    assert first.arrival == arrival(1)
    second = queue.lease("worker-2", T0 + 10, LEASE)
    assert second is not None and second.request_id == "request-002"
    assert queue.lease("worker-3", T0 + 10, LEASE) is None


def test_a_committed_enqueue_survives_reopening(opener: Callable[[], Queue]) -> None:
    opener().enqueue(arrival(1))
    reopened = opener()
    assert [m.request_id for m in reopened.messages()] == ["request-001"]


def test_the_same_request_id_cannot_be_enqueued_twice(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    with pytest.raises(QueueError):
        queue.enqueue(arrival(1))


@pytest.mark.parametrize("state", [State.COMPLETED, State.FILTERED, State.DEAD])
def test_finishing_an_attempt(queue: Queue, state: State) -> None:
    queue.enqueue(arrival(1))
    queue.lease("worker-1", T0 + 1, LEASE)
    queue.finish(
        "request-001",
        "worker-1",
        state,
        T0 + 2,
        reason="why" if state == State.DEAD else None,
        failed_activity="a1" if state == State.DEAD else None,
    )
    message = queue.get("request-001")
    assert message is not None
    assert (message.state, message.attempts, message.lease_owner) == (state, 1, None)
    if state == State.DEAD:
        assert (message.reason, message.failed_activity) == ("why", "a1")
    assert queue.lease("worker-1", T0 + 1000, LEASE) is None


def test_a_retry_waits_for_its_next_attempt(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    queue.lease("worker-1", T0 + 1, LEASE)
    queue.retry(
        "request-001",
        "worker-1",
        T0 + 2,
        next_attempt_at=T0 + 60,
        reason="HTTP 503",
        failed_activity="a2",
    )
    message = queue.get("request-001")
    assert message is not None
    assert (message.state, message.attempts, message.next_attempt_at, message.reason) == (
        State.QUEUED,
        1,
        T0 + 60,
        "HTTP 503",
    )
    assert queue.lease("worker-1", T0 + 59, LEASE) is None
    again = queue.lease("worker-1", T0 + 60, LEASE)
    assert again is not None and again.attempts == 1


def test_an_expired_lease_makes_the_message_queued_again_and_the_old_owner_loses_it(
    queue: Queue,
) -> None:
    queue.enqueue(arrival(1))
    queue.lease("worker-1", T0 + 1, LEASE)
    assert queue.expire_leases(T0 + LEASE) == []
    [expired] = queue.expire_leases(T0 + 1 + LEASE + 1)
    assert (expired.state, expired.lease_expiries) == (State.QUEUED, 1)
    taken = queue.lease("worker-2", T0 + 100, LEASE)
    assert taken is not None and taken.lease_owner == "worker-2"
    with pytest.raises(LeaseLostError):
        queue.finish("request-001", "worker-1", State.COMPLETED, T0 + 101)
    with pytest.raises(LeaseLostError):
        queue.record_activity("request-001", "worker-1", ActivityOutcome("a1", True, "", T0 + 101))
    queue.renew("request-001", "worker-2", T0 + 120, LEASE)
    assert queue.expire_leases(T0 + 100 + LEASE + 1) == []


def test_activity_outcomes_outlive_attempts(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    queue.lease("worker-1", T0 + 1, LEASE)
    queue.record_activity(
        "request-001", "worker-1", ActivityOutcome("file-writer", True, "wrote", T0 + 2)
    )
    queue.record_activity(
        "request-001", "worker-1", ActivityOutcome("webhook", False, "HTTP 503", T0 + 3)
    )
    queue.retry("request-001", "worker-1", T0 + 4, T0 + 5, "HTTP 503", "webhook")
    queue.lease("worker-1", T0 + 5, LEASE)
    queue.record_activity(
        "request-001", "worker-1", ActivityOutcome("webhook", True, "HTTP 200", T0 + 6)
    )
    outcomes = {
        o.activity_id: (o.succeeded, o.detail) for o in queue.activity_outcomes("request-001")
    }
    assert outcomes == {"file-writer": (True, "wrote"), "webhook": (True, "HTTP 200")}


def test_recover_takes_back_only_this_nodes_earlier_leases(queue: Queue) -> None:
    for number in (1, 2, 3, 4):
        queue.enqueue(arrival(number))
    queue.lease(owner_id("node-a", "boot1", 1), T0 + 10, LEASE)
    queue.lease(owner_id("node-a", "boot1", 2), T0 + 10, LEASE)
    queue.lease(owner_id("node-b", "boot7", 1), T0 + 10, LEASE)  # another machine, still alive
    queue.lease(owner_id("node-ab", "boot3", 1), T0 + 10, LEASE)  # a name with node-a's prefix
    recovered = queue.recover("node-a", T0 + 20)
    assert sorted(m.request_id for m in recovered) == ["request-001", "request-002"]
    states = {m.request_id: m.state for m in queue.messages()}
    assert states == {
        "request-001": State.QUEUED,
        "request-002": State.QUEUED,
        "request-003": State.PROCESSING,
        "request-004": State.PROCESSING,
    }


def test_owners_of_two_processes_cannot_finish_each_others_messages(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    mine, theirs = owner_id("node-a", "boot1", 1), owner_id("node-a", "boot2", 1)
    assert mine != theirs
    queue.lease(mine, T0 + 1, LEASE)
    with pytest.raises(LeaseLostError):
        queue.finish("request-001", theirs, State.COMPLETED, T0 + 2)
    with pytest.raises(LeaseLostError):
        queue.renew("request-001", theirs, T0 + 2, LEASE)
    queue.finish("request-001", mine, State.COMPLETED, T0 + 3)


def test_a_renewed_lease_does_not_expire(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    start = T0 + 10
    assert queue.lease("worker-1", start, LEASE) is not None
    for step in range(1, 6):  # a long activity: renewed every third of the lease
        queue.renew("request-001", "worker-1", start + step * LEASE / 3, LEASE)
        assert queue.expire_leases(start + step * LEASE / 3 + LEASE / 2) == []
    message = queue.get("request-001")
    assert message is not None and message.state == State.PROCESSING


def test_a_message_whose_lease_expired_three_times_is_dead(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    now = T0 + 10
    for expiry in range(1, MAX_LEASE_EXPIRIES + 1):
        assert queue.lease("worker-1", now, LEASE) is not None
        now += LEASE + 1
        [message] = queue.expire_leases(now)
        assert message.lease_expiries == expiry
    assert message.state == State.DEAD
    assert message.reason is not None and "its worker was lost 3 times" in message.reason
    assert queue.lease("worker-1", now, LEASE) is None
    assert queue.revive(["request-001"], None, now) == 1
    revived = queue.get("request-001")
    assert revived is not None and (revived.state, revived.lease_expiries) == (State.QUEUED, 0)


def test_recovering_after_crashes_counts_as_expiries(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    for boot in range(MAX_LEASE_EXPIRIES):
        assert queue.lease(owner_id("node-a", f"boot{boot}", 1), T0 + 10, LEASE) is not None
        [message] = queue.recover("node-a", T0 + 10)
    assert message.state == State.DEAD


def test_a_resend_within_the_deduplication_window_is_not_queued_again(queue: Queue) -> None:
    assert queue.enqueue(arrival(1), dedupe_seconds=60)
    resend = records.arrival(
        **{**_fields(arrival(1)), "request_id": "resend", "received_at": T0 + 30}
    )
    assert not queue.enqueue(resend, dedupe_seconds=60)
    later = records.arrival(
        **{**_fields(arrival(1)), "request_id": "later", "received_at": T0 + 200}
    )
    assert queue.enqueue(later, dedupe_seconds=60)
    other = records.arrival(
        **{**_fields(arrival(1)), "request_id": "other", "workflow_id": "workflow-b"}
    )
    assert queue.enqueue(other, dedupe_seconds=60)  # another workflow: not a duplicate
    assert queue.enqueue(
        records.arrival(**{**_fields(arrival(1)), "request_id": "off", "received_at": T0 + 201})
    )  # no window: a resend is processed again
    assert sorted(m.request_id for m in queue.messages()) == [
        "later",
        "off",
        "other",
        "request-001",
    ]
    counts = {c.workflow_id: c for c in queue.counts()}
    assert (counts["workflow-a"].duplicates, counts["workflow-b"].duplicates) == (1, 0)


def _fields(message: Arrival) -> dict[str, object]:
    origin = message.origin
    return {
        "request_id": message.request_id,
        "workflow_id": message.workflow_id,
        "object_path": message.object_path,
        "byte_count": message.byte_count,
        "sop_class_uid": message.sop_class_uid,
        "sop_instance_uid": message.sop_instance_uid,
        "transfer_syntax_uid": message.transfer_syntax_uid,
        "received_at": message.received_at,
        "calling_aet": origin.calling_aet,
        "called_aet": origin.called_aet,
        "peer_address": origin.peer_address,
        "peer_port": origin.peer_port,
    }


def test_the_schema_version_is_read_and_a_newer_database_refused(
    opener: Callable[[], Queue], backend: Backend
) -> None:
    queue = opener()
    version = queue.schema_version
    assert version >= 1
    queue.close()
    backend.set_schema_version(version + 1)
    with pytest.raises(QueueError, match="newer soupflow"):
        opener()


def test_a_version_1_database_is_migrated_and_keeps_its_messages(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    database = sqlite3.connect(data / DATABASE_FILE)
    database.executescript(V1_SCHEMA)
    database.execute(
        "INSERT INTO messages VALUES ('r1', 'w', 'r1/r1.dcm', 10, '1.2', '1.2.3', '1.2.840.10008.1.2',"
        " 'A', 'B', '127.0.0.1', 1, 5.0, 'queued', 0, 5.0, NULL, NULL, NULL, NULL, 5.0)"
    )
    database.execute("PRAGMA user_version=1")
    database.commit()
    database.close()
    queue = SqliteQueue(data)
    try:
        assert queue.schema_version == SQLITE_SCHEMA_VERSION
        leased = queue.lease("worker-1", 10.0, LEASE)
        assert leased is not None and leased.request_id == "r1" and leased.lease_expiries == 0
        assert leased.arrival.origin.client_cert_sha256 == ""  # no certificate before TLS
    finally:
        queue.close()


# The schema soupflow 0.1 (queue version 1) wrote, as it shipped.
V1_SCHEMA = """
CREATE TABLE messages (
    request_id TEXT NOT NULL, workflow_id TEXT NOT NULL, object_path TEXT NOT NULL,
    byte_count INTEGER NOT NULL, sop_class_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL, calling_aet TEXT NOT NULL, called_aet TEXT NOT NULL,
    peer_address TEXT NOT NULL, peer_port INTEGER NOT NULL, received_at REAL NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
    lease_owner TEXT, lease_expires_at REAL, reason TEXT, failed_activity TEXT,
    updated_at REAL NOT NULL, PRIMARY KEY (request_id)
);
CREATE INDEX messages_ready ON messages (state, next_attempt_at);
CREATE INDEX messages_workflow ON messages (workflow_id, state);
CREATE TABLE activity_outcomes (
    request_id TEXT NOT NULL, activity_id TEXT NOT NULL, succeeded INTEGER NOT NULL,
    detail TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (request_id, activity_id)
);
"""


def test_counts_per_workflow_with_the_oldest_pending(queue: Queue) -> None:
    for number in (1, 2, 3):
        queue.enqueue(arrival(number))
    queue.enqueue(arrival(4, workflow_id="workflow-b"))
    queue.lease("worker-1", T0 + 10, LEASE)
    queue.finish("request-001", "worker-1", State.COMPLETED, T0 + 11)
    counts = {c.workflow_id: c for c in queue.counts()}
    assert counts["workflow-a"].by_state == {State.COMPLETED: 1, State.QUEUED: 2}
    assert counts["workflow-a"].oldest_pending_received_at == T0 + 2
    assert counts["workflow-b"].by_state == {State.QUEUED: 1}


def test_flow_counts_what_is_due_and_what_finished_lately_per_workflow(queue: Queue) -> None:
    for number in (1, 2, 3, 4):
        queue.enqueue(arrival(number))
    queue.enqueue(arrival(5, workflow_id="workflow-b"))
    queue.lease("worker-1", T0 + 10, LEASE)  # request-001: processing, not due
    queue.finish("request-001", "worker-1", State.COMPLETED, T0 + 11)
    queue.lease("worker-1", T0 + 12, LEASE)  # request-002 waits for a retry: not due
    queue.retry("request-002", "worker-1", T0 + 13, T0 + 60, "down", "a1")
    assert queue.flow(T0 + 20, since=T0 + 5) == {
        "workflow-a": Flow(ready=2, finished=1),
        "workflow-b": Flow(ready=1, finished=0),
    }
    assert queue.flow(T0 + 20, since=T0 + 12)["workflow-a"] == Flow(ready=2, finished=0)
    assert queue.flow(T0 + 60, since=T0 + 12)["workflow-a"] == Flow(ready=3, finished=0)
    assert queue.flow(T0 + 3, since=T0 + 11)["workflow-a"] == Flow(ready=1, finished=1)


def test_dead_messages_are_revived_or_purged_by_id_workflow_or_all(queue: Queue) -> None:
    for number, workflow in (
        (1, "workflow-a"),
        (2, "workflow-a"),
        (3, "workflow-b"),
        (4, "workflow-b"),
    ):
        queue.enqueue(arrival(number, workflow_id=workflow))
        queue.lease("w", T0 + 10, LEASE)
        queue.finish(
            f"request-{number:03d}",
            "w",
            State.DEAD,
            T0 + 11,
            reason="HTTP 400",
            failed_activity="a",
        )
    assert queue.revive(["request-001"], None, T0 + 20) == 1
    revived = queue.get("request-001")
    assert revived is not None and (revived.state, revived.attempts, revived.reason) == (
        State.QUEUED,
        0,
        None,
    )
    assert [m.request_id for m in queue.purge(None, "workflow-b")] == ["request-003", "request-004"]
    assert queue.get("request-003") is None
    assert queue.revive(None, None, T0 + 30) == 1
    assert queue.messages(state=State.DEAD) == []


def test_concurrent_workers_never_lease_the_same_message(queue: Queue) -> None:
    for number in range(60):
        queue.enqueue(arrival(number))
    taken: list[str] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        for _ in range(60):
            message = queue.lease(owner, T0 + 100, LEASE)
            if message is None:
                return
            with lock:
                taken.append(message.request_id)

    workers = [threading.Thread(target=work, args=(f"worker-{n}",)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(taken) == sorted(f"request-{n:03d}" for n in range(60))


def test_concurrent_enqueues_are_each_committed_and_a_bad_one_fails_alone(queue: Queue) -> None:
    """Associations enqueue at the same time (a backend may commit them together): every
    good arrival is committed, and a duplicate fails only its own caller."""
    queue.enqueue(arrival(0))
    failures: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def associate(first: int) -> None:
        start.wait(timeout=60)
        for number in range(first, first + 25):
            try:
                queue.enqueue(arrival(number % 200))  # 0 is already there: a duplicate
            except QueueError:
                with lock:
                    failures.append(number)

    threads = [threading.Thread(target=associate, args=(n * 25,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == [0]
    assert sorted(m.arrival.request_id for m in queue.messages()) == [
        f"request-{n:03d}" for n in range(200)
    ]


def test_concurrent_arrivals_and_finishes_each_commit_and_a_lost_lease_fails_alone(
    queue: Queue,
) -> None:
    """Associations enqueue while workers finish (a backend may commit both in one
    transaction): every arrival and every finish is committed, and the finish of a worker
    that lost its lease fails only that worker."""
    for number in range(40):
        queue.enqueue(arrival(number))
    leased = [queue.lease(f"worker-{n}", T0 + 1000, LEASE) for n in range(40)]
    assert [m.request_id if m else None for m in leased] == [f"request-{n:03d}" for n in range(40)]
    lost: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def associate(first: int) -> None:
        start.wait(timeout=60)
        for number in range(first, first + 20):
            queue.enqueue(arrival(number))

    def work(first: int) -> None:
        start.wait(timeout=60)
        for number in range(first, first + 10):
            owner = "someone-else" if number == 17 else f"worker-{number}"
            try:
                queue.finish(f"request-{number:03d}", owner, State.COMPLETED, T0 + 1001)
            except LeaseLostError:
                with lock:
                    lost.append(owner)

    threads = [threading.Thread(target=associate, args=(40 + n * 20,)) for n in range(4)]
    threads += [threading.Thread(target=work, args=(n * 10,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert lost == ["someone-else"]
    states = {m.arrival.request_id: m.state for m in queue.messages()}
    assert len(states) == 120
    assert [r for r, state in states.items() if state == State.PROCESSING] == ["request-017"]
    assert sum(state == State.COMPLETED for state in states.values()) == 39
    assert sum(state == State.QUEUED for state in states.values()) == 80


def test_the_last_outcome_is_written_with_the_end_of_the_attempt(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    queue.enqueue(arrival(2))
    queue.lease("worker-1", T0 + 10, LEASE)
    queue.finish(
        "request-001",
        "worker-1",
        State.COMPLETED,
        T0 + 11,
        outcomes=(ActivityOutcome("pacs", True, "C-STORE 0x0000 Success", T0 + 11),),
    )
    assert [(o.activity_id, o.detail) for o in queue.activity_outcomes("request-001")] == [
        ("pacs", "C-STORE 0x0000 Success")
    ]
    queue.lease("worker-1", T0 + 12, LEASE)
    queue.retry(
        "request-002",
        "worker-1",
        T0 + 13,
        T0 + 20,
        "HTTP 503",
        "webhook",
        outcomes=(ActivityOutcome("pacs", True, "C-STORE 0x0000 Success", T0 + 13),),
    )
    assert [o.activity_id for o in queue.activity_outcomes("request-002")] == ["pacs"]


def _lease_until_empty(location: str, owner: str, start: Any, taken: Any) -> None:
    """A child process: lease everything it can from the queue at `location`."""
    queue = open_location(location)
    start.wait(60)  # both children are ready: they lease at the same time
    mine = []
    for _ in range(400):
        message = queue.lease(owner, T0 + 1000, LEASE)
        if message is None:
            break
        mine.append(message.request_id)
    queue.close()
    taken.put(mine)


def test_two_processes_leasing_from_one_queue_never_share_a_message(
    queue: Queue, backend: Backend
) -> None:
    for number in range(300):
        queue.enqueue(arrival(number))
    context = multiprocessing.get_context("spawn")
    start, taken = context.Barrier(2), context.Queue()
    children = [
        context.Process(
            target=_lease_until_empty,
            args=(backend.location, owner_id("node-a", f"boot{n}", 1), start, taken),
        )
        for n in range(2)
    ]
    for child in children:
        child.start()
    results = [taken.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
    both = results[0] + results[1]  # (SQLite may let one process take them all)
    assert len(both) == len(set(both)), "a message was leased by both processes"
    assert sorted(both) == sorted(f"request-{n:03d}" for n in range(300))


def test_finished_messages_are_purged_after_the_retention_period(queue: Queue) -> None:
    for number in (1, 2, 3, 4):
        queue.enqueue(arrival(number))
    for state, at in ((State.COMPLETED, T0 + 10), (State.FILTERED, T0 + 20), (State.DEAD, T0 + 5)):
        message = queue.lease("w", at, LEASE)
        assert message is not None
        queue.record_activity(message.request_id, "w", ActivityOutcome("a", True, "", at))
        queue.finish(
            message.request_id, "w", state, at, reason="x" if state == State.DEAD else None
        )
    assert queue.purge_finished(before=T0 + 15) == 1  # the completed one only
    assert queue.get("request-001") is None
    assert queue.activity_outcomes("request-001") == []
    assert queue.purge_finished(before=T0 + 100) == 1  # the filtered one
    remaining = {m.request_id: m.state for m in queue.messages()}
    assert remaining == {"request-003": State.DEAD, "request-004": State.QUEUED}


def test_which_request_ids_have_a_queue_entry(queue: Queue) -> None:
    queue.enqueue(arrival(1))
    queue.enqueue(arrival(2))
    ids = ["request-001", "request-002", "request-404", *(f"x-{n}" for n in range(600))]
    assert queue.existing(ids) == {"request-001", "request-002"}
    assert queue.existing([]) == set()
