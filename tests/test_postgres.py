"""What the PostgreSQL backend adds to the queue contract, against a real server
(a throwaway cluster, bench/postgres.py): durability refused when off, notifications, nodes migrating at once, clear
errors that never show the password, and `soupflow run`, `status` and `dead` on it."""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest

from bench.postgres import PostgresCluster, UnavailableError
from soupflow.store.postgres import SCHEMA_VERSION, PostgresQueue
from soupflow.store.queue import QueueError
from tests import documents, records
from tests.dicom import (
    RuntimeProcess,
    children,
    command_line,
    sample_file,
    soupflow,
    storescu_send,
    unavailable,
    wait_for,
)
from tests.test_metrics import admin_url, get


def test_a_server_with_synchronous_commit_off_is_refused(postgres_cluster: PostgresCluster) -> None:
    url = f"{postgres_cluster.url}?options={quote('-csynchronous_commit=off')}"
    with pytest.raises(QueueError, match="synchronous_commit = off"):
        PostgresQueue(url)


def test_an_unreachable_server_is_a_clear_error_without_the_password(
    postgres_cluster: PostgresCluster,
) -> None:
    url = postgres_cluster.url.rsplit("@", 1)[0] + "@127.0.0.1:1/nowhere"
    with pytest.raises(QueueError) as raised:
        PostgresQueue(url)
    message = str(raised.value)
    assert "127.0.0.1:1/nowhere" in message and "cannot open the queue" in message
    password = postgres_cluster.url.split(":")[2].split("@")[0]
    assert password not in message


def test_nodes_starting_together_create_the_schema_once(postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.database()
    opened: list[PostgresQueue] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def node() -> None:
        start.wait(timeout=30)
        try:
            opened.append(PostgresQueue(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        assert [queue.schema_version for queue in opened] == [SCHEMA_VERSION] * 4
    finally:
        for queue in opened:
            queue.close()


def test_an_enqueue_on_one_node_wakes_the_workers_of_another(
    postgres_cluster: PostgresCluster,
) -> None:
    url = postgres_cluster.database()
    receiving, delivering = PostgresQueue(url), PostgresQueue(url)
    woken = threading.Event()
    try:
        assert delivering.watch(woken.set)  # it can tell: its workers poll only as a fallback
        # the listener may not be listening yet: enqueue until a notification arrives (bounded)
        for number in range(50):
            receiving.enqueue(
                records.arrival(request_id=f"r{number}", sop_instance_uid=f"1.{number}")
            )
            if woken.wait(0.2):
                break
        assert woken.is_set()
    finally:
        receiving.close()
        delivering.close()


@pytest.mark.parametrize("processes", ["0", "1"], ids=["worker threads", "a worker process"])
def test_soupflow_run_receives_into_postgresql_and_status_and_dead_read_it(
    tmp_path: Path, postgres_cluster: PostgresCluster, processes: str
) -> None:
    url = postgres_cluster.database()
    workflows, data, objects = tmp_path / "workflows", tmp_path / "data", tmp_path / "shared"
    workflows.mkdir()
    documents.write(
        workflows / "intake.json",
        documents.workflow(
            documents.http_sender(Server="http://127.0.0.1:1/unreachable", RetryMaxAttempts=1),
            Port=0,
            AcceptedCallingAETs="*",
        ),
    )
    runtime = RuntimeProcess(
        workflows,
        data,
        "--queue",
        url,
        "--objects",
        str(objects),
        "--node-id",
        "node-a",
        "--processes",
        processes,
    )
    assert (objects / "incoming" / "node-a").is_dir()  # this node's own incoming folder
    password = url.split("@")[0].split(":")[2]
    if processes == "1":  # the queue's URL reaches the worker process, not by its command line

        def commands() -> list[str]:  # a child just forked has no command line until exec
            found = (command_line(child) for child in children(runtime.process.pid))
            return [command for command in found if "work" in command]

        command = wait_for(commands, "the worker process")[0]
        assert password not in command
    assert not (data / "queue.sqlite3").exists()
    storescu_send(runtime.port, sample_file("CT_small.dcm"))

    def dead() -> list[dict[str, object]]:
        shown = soupflow("status", "--data", str(data), "--queue", url, "--json")
        assert shown.returncode == 0, shown.stderr
        rows: list[dict[str, object]] = json.loads(shown.stdout)
        return [row for row in rows if dict(row["counts"]).get("dead")]  # type: ignore[call-overload]

    wait_for(dead, "the message to be dead in PostgreSQL's queue")
    listed = soupflow(
        "dead", "list", "--data", str(data), "--queue", url, "--workflows", str(workflows)
    )
    assert listed.returncode == 0 and "Notify" in listed.stdout, listed.stdout + listed.stderr
    assert list((objects).glob("??/*.dcm")), "the object is in the shared objects folder"
    purged = soupflow(
        "dead",
        "purge",
        "--all",
        "--yes",
        "--data",
        str(data),
        "--queue",
        url,
        "--objects",
        str(objects),
    )
    assert purged.returncode == 0 and "1 dead message(s) purged" in purged.stdout, (
        purged.stdout + purged.stderr
    )
    assert not list(objects.glob("??/*.dcm")), "purging deleted the object from the shared folder"
    runtime.terminate()
    assert url.split("@")[0].split(":")[2] not in runtime.log_text()  # no password in the log


def test_connections_the_server_dropped_are_replaced(postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.database()
    queue = PostgresQueue(url)
    try:
        queue.enqueue(records.arrival(request_id="before", sop_instance_uid="1.1"))
        postgres_cluster.execute(  # what a server restart or a failover does to them
            postgres_cluster.url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND application_name = '' AND backend_type = 'client backend'",
        )
        outcomes = []
        for number in range(3):  # at most one failure per dropped connection, then new ones
            try:
                queue.enqueue(
                    records.arrival(request_id=f"after-{number}", sop_instance_uid=f"2.{number}")
                )
                outcomes.append("ok")
            except QueueError as exc:
                assert "terminat" in str(exc) or "closed" in str(exc) or "connection" in str(exc)
                outcomes.append("failed")
        assert outcomes[-1] == "ok" and outcomes.count("failed") <= 1
        assert queue.get("before") is not None
    finally:
        queue.close()


def test_while_postgresql_is_down_stores_are_refused_and_readyz_says_why(tmp_path: Path) -> None:
    """Nothing is acknowledged that is not queued: a store while the server is down gets a
    failure status (the sender keeps its copy), `/readyz` is 503 so that a load balancer
    sends elsewhere, and both recover without a restart once the server is back."""
    try:
        cluster = PostgresCluster()  # its own: this test stops it
    except UnavailableError as exc:
        unavailable(str(exc))
    try:
        workflows, data = tmp_path / "workflows", tmp_path / "data"
        workflows.mkdir()
        documents.write(
            workflows / "intake.json", documents.workflow(Port=0, AcceptedCallingAETs="*")
        )
        runtime = RuntimeProcess(workflows, data, "--queue", cluster.url, "--workers", "0")
        ready = admin_url(data) + "readyz"
        assert get(ready)[0] == 200
        cluster.stop()
        _, body = wait_for(lambda: (r := get(ready))[0] == 503 and r, "/readyz 503")
        assert "queue cannot be written" in body
        with pytest.raises(subprocess.CalledProcessError):
            storescu_send(runtime.port, sample_file("CT_small.dcm"))
        assert "answered 0xA700" in runtime.log_text()
        cluster.start()
        wait_for(lambda: get(ready)[0] == 200, "/readyz 200 again")
        storescu_send(runtime.port, sample_file("CT_small.dcm"))  # raises unless Success
        queue = PostgresQueue(cluster.url)
        try:
            assert len(queue.messages()) == 1  # the refused store left nothing behind
        finally:
            queue.close()
        runtime.terminate()
    finally:
        cluster.close()


def test_one_instance_arriving_at_two_nodes_at_once_is_queued_once(
    postgres_cluster: PostgresCluster,
) -> None:
    url = postgres_cluster.database()
    nodes = [PostgresQueue(url), PostgresQueue(url)]
    start = threading.Barrier(2)
    queued: list[bool] = []

    def receive(node: int) -> None:
        for number in range(40):  # each round: both nodes get the same instance together
            start.wait(timeout=30)
            arrival = records.arrival(
                request_id=f"n{node}-{number}", sop_instance_uid=f"1.2.{number}"
            )
            queued.append(nodes[node].enqueue(arrival, dedupe_seconds=60))

    threads = [threading.Thread(target=receive, args=(n,)) for n in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        per_instance = Counter(m.arrival.sop_instance_uid for m in nodes[0].messages())
        assert set(per_instance.values()) == {1} and len(per_instance) == 40
        assert queued.count(True) == 40
    finally:
        for queue in nodes:
            queue.close()
