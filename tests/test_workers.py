"""Workers with a stepped clock and an HTTP transport in process: retries, backoff, dead
messages, lease renewal and owner ids, without sleeping or a socket."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from soupflow.runtime.workers import SWEEP_GRACE_SECONDS, RetryPolicy, Workers
from soupflow.store.queue import Message, State
from soupflow.store.spool import Spool
from soupflow.store.sqlite import SqliteQueue
from soupflow.workflow import model
from soupflow.workflow.load import LoadedWorkflow, load_text
from tests import documents, records
from tests.dicom import sample_file
from tests.documents import RECEIVER_ID, http_sender

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self, data: Path, statuses: list[int], **sender: object) -> None:
        self.clock = Clock()
        self.statuses = statuses
        self.requests = 0
        self.queue = SqliteQueue(data)
        self.spool = Spool(data)
        document = documents.workflow(
            http_sender(Server="http://ris.test/hook", **sender), Port=0, AcceptedCallingAETs="*"
        )
        self.workflow: LoadedWorkflow = load_text(json.dumps(document), Path("w.json"))
        assert self.workflow.valid
        transport = httpx.MockTransport(self._answer)
        self.workers = Workers(
            self.queue,
            self.spool,
            data,
            {RECEIVER_ID: self.workflow}.get,
            count=0,
            owner_prefix="node-a/boot1",
            clock=self.clock,
            lease_seconds=60,
            http=httpx.Client(transport=transport),
        )
        source = sample_file("CT_small.dcm")
        target = self.spool.path("r1")
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
        dataset = dcmread(source, stop_before_pixels=True)
        self.queue.enqueue(
            records.arrival(
                request_id="r1",
                workflow_id=RECEIVER_ID,
                object_path=self.spool.relative("r1"),
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                received_at=T0,
            )
        )

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200)

    def lease(self) -> Message | None:
        return self.queue.lease(self.workers.owner(1), self.clock(), 60)

    def message(self) -> Message:
        message = self.queue.get("r1")
        assert message is not None
        return message


@pytest.fixture
def setup(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Setup]:
    """The webhook answers the statuses the test is parametrised with, then 200."""
    statuses = list(getattr(request, "param", []))
    made = Setup(tmp_path / "data", statuses, RetryInitialSeconds=10, RetryMaxSeconds=40)
    yield made
    made.workers.stop(timeout=1)
    made.queue.close()


@pytest.mark.parametrize("setup", [[503, 503]], indirect=True)
def test_a_transient_failure_waits_for_its_backoff_on_the_stepped_clock(setup: Setup) -> None:
    for attempt in (1, 2):
        message = setup.lease()
        assert message is not None
        setup.workers.process(message, setup.workers.owner(1))
        waiting = setup.message()
        assert (waiting.state, waiting.attempts) == (State.QUEUED, attempt)
        delay = waiting.next_attempt_at - setup.clock.now
        assert 10 * 2 ** (attempt - 1) / 2 <= delay <= 10 * 2 ** (attempt - 1)
        setup.clock.now = waiting.next_attempt_at - 0.001
        assert setup.lease() is None  # not before its time
        setup.clock.now = waiting.next_attempt_at
    message = setup.lease()
    assert message is not None
    setup.workers.process(message, setup.workers.owner(1))
    assert setup.message().state == State.COMPLETED
    assert setup.requests == 3
    [outcome] = setup.queue.activity_outcomes("r1")
    assert outcome.detail == "HTTP 200 OK"


@pytest.mark.parametrize("setup", [[400]], indirect=True)
def test_a_permanent_failure_is_dead_at_once(setup: Setup) -> None:
    message = setup.lease()
    assert message is not None
    setup.workers.process(message, setup.workers.owner(1))
    dead = setup.message()
    assert (dead.state, dead.attempts) == (State.DEAD, 1)
    assert dead.reason is not None and "HTTP 400" in dead.reason


def test_the_last_attempt_makes_the_message_dead(tmp_path: Path) -> None:
    setup = Setup(tmp_path / "data", [503] * 5, RetryMaxAttempts=3, RetryInitialSeconds=1)
    try:
        for _ in range(3):
            message = setup.lease()
            assert message is not None
            setup.workers.process(message, setup.workers.owner(1))
            setup.clock.now += 10
        dead = setup.message()
        assert (dead.state, dead.attempts) == (State.DEAD, 3)
        assert dead.reason is not None and "gave up after 3 attempts" in dead.reason
    finally:
        setup.workers.stop(timeout=1)
        setup.queue.close()


def test_held_leases_are_renewed(setup: Setup) -> None:
    message = setup.lease()
    assert message is not None and message.lease_expires_at == T0 + 60
    owner = setup.workers.owner(1)
    setup.workers._held[owner] = message.request_id  # what the worker loop records
    setup.clock.now += 50
    assert setup.workers.renew_leases() == 1
    assert setup.message().lease_expires_at == T0 + 50 + 60
    setup.clock.now += 70  # past the first lease: only a renewed one is still held
    assert setup.queue.expire_leases(T0 + 100) == []


def test_owner_ids_name_the_node_the_process_and_the_worker(setup: Setup) -> None:
    assert setup.workers.owner(1) == "node-a/boot1/worker-1"
    assert setup.workers.owner(2) == "node-a/boot1/worker-2"


def test_the_retry_defaults_are_the_formats() -> None:
    default = RetryPolicy.from_setting(None)
    sender = model.HttpSenderSetting.model_validate(http_sender(Server="http://x"))
    assert default == RetryPolicy.from_setting(sender) == RetryPolicy(10, 2, 600)


def test_housekeeping_deletes_finished_messages_past_retention_and_orphaned_objects(
    setup: Setup,
) -> None:
    leased = setup.lease()
    assert leased is not None
    setup.workers.process(leased, "node-a/boot1/worker-1")  # completed; its object removed
    kept = setup.spool.path("kept")  # a kept object (its message is queued)
    orphan = setup.spool.path("orphan")  # committed, then a crash before its enqueue
    fresh = setup.spool.path("fresh")  # being enqueued right now by another node
    for path in (kept, orphan, fresh):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"object")
    setup.queue.enqueue(records.arrival(request_id="kept", workflow_id=RECEIVER_ID))
    old = T0 - 2 * SWEEP_GRACE_SECONDS
    os.utime(kept, (old, old))
    os.utime(orphan, (old, old))
    os.utime(fresh, (T0, T0))

    assert setup.workers.housekeeping(T0 + 60) == (0, 1)  # r1 is young; the orphan goes
    assert kept.exists() and fresh.exists() and not orphan.exists()
    later = T0 + setup.workers.retention_seconds + 60
    assert setup.workers.housekeeping(later) == (1, 1)  # r1 past retention; fresh is old now
    assert setup.queue.get("r1") is None and setup.queue.get("kept") is not None
    assert kept.exists()
