"""Three `soupflow run` nodes as one router, with real parts on loopback: one PostgreSQL
queue (a throwaway cluster), one shared objects folder, haproxy in TCP mode in front (health check
on each node's `/readyz`), dcmtk's storescu sending over four associations, and a loopback
HTTP sink that records which node called it and when. One node is killed with SIGKILL mid-
receive and another mid-activity; both are started again."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydicom import dcmread

from bench.data import images
from bench.ingest import free_port
from bench.postgres import PostgresCluster
from soupflow.store.postgres import PostgresQueue
from soupflow.store.queue import State
from tests import documents
from tests.dicom import NODELAY, RuntimeProcess, require_tool, unavailable, wait_for

LEASE_SECONDS = 4.0
EXPIRE_EVERY_SECONDS = 5.0  # how often workers look for expired leases (runtime.workers)
HOLD_SECONDS = 0.05  # the sink holds each call, so that calls in flight can be caught
NODES = ("n1", "n2", "n3")


@dataclass
class Call:
    node: str
    uid: str
    start: float
    end: float | None = None


class Sink:
    """`POST /hook/{node}/{SOPInstanceUID}`: answered 200 after HOLD_SECONDS, recorded."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                _, _, node, uid = self.path.split("/", 3)
                call = Call(node, uid, time.monotonic())
                with sink.lock:
                    sink.calls.append(call)
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                time.sleep(HOLD_SECONDS)  # the destination's own work, not a wait in the test
                call.end = time.monotonic()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def in_flight(self, node: str) -> list[Call]:
        with self.lock:
            return [call for call in self.calls if call.node == node and call.end is None]

    def completed(self) -> list[Call]:
        with self.lock:
            return [call for call in self.calls if call.end is not None]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def haproxy_config(folder: Path, front: int, port: int, admin: int) -> Path:
    servers = "\n".join(
        f"    server {node} 127.0.0.{11 + n}:{port} check port {admin}"
        for n, node in enumerate(NODES)
    )
    config = folder / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 256
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
frontend dicom
    bind 127.0.0.1:{front}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter 300ms fall 1 rise 1
{servers}
"""
    )
    return config


class Sender:
    """One modality: storescu over one association, sent again (a new association) with
    what was not acknowledged when an association breaks, as a modality retries."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.port, self.remaining = port, list(files)
        self.acknowledged: list[Path] = []
        self.broken = 0  # associations that ended before every file was acknowledged
        self.thread = threading.Thread(target=self._send)
        self.thread.start()

    def _send(self) -> None:
        storescu = require_tool("storescu")
        for _ in range(8):  # bounded: each round sends what the last left
            if not self.remaining:
                return
            result = subprocess.run(
                [
                    storescu,
                    "-v",
                    "-to",
                    "20",
                    "-ta",
                    "20",
                    "-td",
                    "20",
                    "127.0.0.1",
                    str(self.port),
                    *map(str, self.remaining),
                ],
                env=NODELAY,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            done = acknowledged_files(result.stdout + result.stderr)
            self.acknowledged += [path for path in self.remaining if str(path) in done]
            self.remaining = [path for path in self.remaining if str(path) not in done]
            if self.remaining:
                self.broken += 1

    def join(self) -> None:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive()


def acknowledged_files(output: str) -> set[str]:
    """The files storescu -v reported answered Success."""
    done: set[str] = set()
    current = ""
    for line in output.splitlines():
        if match := re.match(r"I: Sending file: (.*)$", line):
            current = match.group(1)
        elif "Received Store Response (Success)" in line and current:
            done.add(current)
            current = ""
    return done


def test_three_nodes_share_one_queue_and_lose_nothing_when_one_is_killed(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        unavailable("haproxy is not installed (make test installs it as root)")
    url = postgres_cluster.database()
    sink = Sink()
    port, admin_port, front = free_port(), free_port(), free_port()
    workflows, objects = tmp_path / "workflows", tmp_path / "objects"
    workflows.mkdir()
    documents.write(
        workflows / "cluster.json",
        documents.workflow(
            documents.http_sender(
                Server=f"http://127.0.0.1:{sink.port}/hook/${{env:SOUPFLOW_NODE}}/${{SOPInstanceUID}}",
                RetryInitialSeconds=1,
            ),
            documents.file_writer(),
            Port=port,
            AcceptedCallingAETs="*",
            DeduplicateWindowSeconds=3600,  # a modality's resend after a broken association
        ),
    )

    def start(n: int) -> RuntimeProcess:
        node, host = NODES[n], f"127.0.0.{11 + n}"
        (tmp_path / node / "data").mkdir(parents=True, exist_ok=True)
        return RuntimeProcess(
            workflows,
            tmp_path / node / "data",
            "--host",
            host,
            "--queue",
            url,
            "--objects",
            str(objects),
            "--node-id",
            node,
            "--lease-seconds",
            str(LEASE_SECONDS),
            "--admin",
            f"{host}:{admin_port}",
            "--quiet-stores",
            env={"SOUPFLOW_NODE": node},
        )

    nodes = [start(n) for n in range(3)]
    proxy = subprocess.Popen(
        [haproxy, "-db", "-f", str(haproxy_config(tmp_path, front, port, admin_port))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        files = images(tmp_path / "tiny", 500, 8, 8) + images(tmp_path / "ct", 50, 512, 512)
        uid_of = {str(p): str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        watcher = PostgresQueue(url)
        senders = [Sender(front, files[n::4]) for n in range(4)]

        # mid-receive: n1 (haproxy's first choice, so it holds associations) dies
        wait_for(lambda: _received(watcher) >= 100, "100 stores received")
        nodes[0].kill()
        nodes[0] = start(0)

        # mid-activity: n2 dies while the sink holds one of its calls
        in_flight = wait_for(lambda: sink.in_flight("n2"), "a call from n2 in flight")
        killed_at = time.monotonic()
        nodes[1].kill()
        taken = {call.uid for call in in_flight}

        def taken_over() -> list[Call]:
            return [c for c in sink.completed() if c.uid in taken and c.node != "n2"]

        takeover = wait_for(taken_over, "n2's message delivered by another node", 60)
        taken_over_after = min(call.start for call in takeover) - killed_at
        nodes[1] = start(1)

        for sender in senders:
            sender.join()
        acknowledged = {uid_of[str(p)] for s in senders for p in s.acknowledged}
        assert sum(s.broken for s in senders) >= 1, "the kill mid-receive broke no association"

        def settled() -> bool:
            states = {m.state for m in watcher.messages(limit=10_000)}
            return not states & {State.QUEUED, State.PROCESSING}

        wait_for(settled, "every message to finish", 180)
        messages = watcher.messages(limit=10_000)
        watcher.close()
    finally:
        proxy.kill()
        proxy.wait(timeout=30)
        for node in nodes:
            node.kill()
        sink.close()

    # every acknowledged instance: completed exactly once in the queue, delivered at least once
    per_uid = Counter(m.arrival.sop_instance_uid for m in messages)
    assert len(acknowledged) == len(files)
    assert all(per_uid[uid] == 1 for uid in acknowledged), [
        u for u in acknowledged if per_uid[u] != 1
    ]
    assert {m.state for m in messages} == {State.COMPLETED}
    delivered = {call.uid for call in sink.completed()}
    assert acknowledged <= delivered
    # each node delivered some, and no two nodes ran one message at the same time
    assert {call.node for call in sink.completed()} == set(NODES)
    by_uid: dict[str, list[Call]] = {}
    for call in sink.calls:
        by_uid.setdefault(call.uid, []).append(call)
    for uid, calls in by_uid.items():
        for a in calls:
            for b in calls:
                if a is not b and a.node != b.node:
                    a_end = a.end if a.end is not None else float("inf")
                    b_end = b.end if b.end is not None else float("inf")
                    assert a_end <= b.start or b_end <= a.start, f"{uid}: {a} overlaps {b}"
    # the dead node's message went to another within the lease plus the expiry interval
    assert taken_over_after <= LEASE_SECONDS + EXPIRE_EVERY_SECONDS + 5


def _received(queue: PostgresQueue) -> int:
    return sum(sum(c.by_state.values()) for c in queue.counts())
