"""The operator's window over HTTP: the dashboard at `/`, `/metrics`, `/healthz`, `/readyz`. Upstream: cli (`run
--admin ADDR:PORT`), runtime.supervisor (what is ready). Downstream: receivers.server (the
accept loop, a thread per connection), metrics (the registry), h11.

On by default on loopback (`127.0.0.1:8470`; `--admin off` turns it off; port 0 picks a free
one); the address is written to `<data>/admin.json`. Off loopback it needs a token, sent as
`Authorization: Bearer`. `/healthz` answers 200 while the process serves; `/readyz` 200 only
when every enabled workflow's listener is up and the queue can be written, else 503 with a
JSON body saying what is wrong.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from soupflow import admin, durable, metrics, tls
from soupflow.receivers.http11 import next_event
from soupflow.receivers.server import Limits, Server
from soupflow.runtime import listeners_file
from soupflow.runtime.dashboard import PAGE
from soupflow.store import Storage
from soupflow.store.queue import State

log = logging.getLogger(__name__)

ADMIN_FILE = "admin.json"
DEFAULT_ADMIN = "127.0.0.1:8470"
_TIMEOUT_SECONDS = 10.0
_MAX_CONNECTIONS = 8
_MAX_BODY_BYTES = 64 * 1024
_MAX_DEAD = 200  # the dashboard's list; `soupflow dead list` has them all

Readiness = Callable[[], list[str]]  # what is wrong; empty when ready


def parse_address(text: str) -> tuple[str, int] | None:
    """`ADDR:PORT` (`[v6]:PORT`), or None for `off`; ValueError otherwise."""
    if text.strip().lower() == "off":
        return None
    host, _, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--admin takes ADDR:PORT or off, not {text!r}")
    return host, int(port)


class AdminServer:
    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        readiness: Readiness,
        storage: Storage,
        workflows: Path | None = None,
        secure: tls.ServerContexts | None = None,
        exposed: Collector | None = None,
    ) -> None:
        """`secure`: the endpoint speaks HTTPS only (`--admin-certificate`, ...); `exposed`:
        what `/metrics` shows (default: this process's registry)."""
        self.exposed = CollectorRegistry(auto_describe=False)
        self.exposed.register(exposed if exposed is not None else metrics.WithReports(list))
        self.token = token
        self.scheme = "https" if secure is not None else "http"
        self.readiness = readiness
        self.storage = storage
        self.data = storage.data
        self.workflows = workflows
        self._server = Server(
            "admin endpoint",
            host,
            port,
            Limits(_TIMEOUT_SECONDS, _MAX_CONNECTIONS),
            self._serve,
            _close,
            secure,
        )

    @property
    def url(self) -> str:
        host = self._server.host
        shown = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{shown}:{self._server.port}/"

    def start(self) -> None:
        self._server.start()
        try:
            durable.replace(
                self.data / ADMIN_FILE, json.dumps({"url": self.url}).encode("utf-8"), sync=False
            )
        except OSError as exc:  # a full disk: the endpoint serves, only the file is missing
            log.error("cannot write %s: %s", self.data / ADMIN_FILE, exc.strerror or exc)
        log.info("admin endpoint at %s (dashboard, metrics, healthz, readyz)", self.url)

    def stop(self) -> None:
        self._server.stop_accepting()
        (self.data / ADMIN_FILE).unlink(missing_ok=True)

    def _serve(self, connection: socket.socket, _: tls.PeerCertificate | None) -> None:
        http = h11.Connection(h11.SERVER)
        connection.settimeout(_TIMEOUT_SECONDS)
        while True:
            try:
                event = next_event(http, connection)
                if not isinstance(event, h11.Request):
                    return
                received = b""
                while not isinstance(part := next_event(http, connection), h11.EndOfMessage):
                    if not isinstance(part, h11.Data):
                        return
                    received += part.data
                    if len(received) > _MAX_BODY_BYTES:
                        return
                code, media, body = self._answer(event, received)
            except (OSError, h11.RemoteProtocolError):
                return
            headers = [("Content-Type", media), ("Content-Length", str(len(body)))]
            connection.sendall(
                http.send(h11.Response(status_code=code, headers=headers))
                + http.send(h11.Data(data=body))
                + http.send(h11.EndOfMessage())
            )
            if http.our_state is h11.MUST_CLOSE:
                return
            http.start_next_cycle()

    def _answer(self, request: h11.Request, received: bytes) -> tuple[int, str, bytes]:
        path = request.target.decode("latin-1").split("?", 1)[0]
        headers = {name.lower(): value for name, value in request.headers}
        if path == "/" and request.method == b"GET":  # the page; its API calls carry the token
            return 200, "text/html; charset=utf-8", PAGE.encode("utf-8")
        if self.token:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                return 401, "application/json", b'{"error": "a bearer token is required"}'
        if request.method == b"POST" and path in ("/api/dead/retry", "/api/dead/purge"):
            return self._act(path.rsplit("/", 1)[1], headers, received)
        if request.method != b"GET":
            return 405, "application/json", b'{"error": "GET only"}'
        if path == "/api/status":
            return 200, "application/json", json.dumps(self._status()).encode("utf-8")
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.exposed)
        if path == "/healthz":
            return 200, "application/json", b'{"status": "ok"}'
        if path == "/readyz":
            problems = self.readiness()
            body = json.dumps({"ready": not problems, "problems": problems}).encode("utf-8")
            return (503 if problems else 200), "application/json", body
        return 404, "application/json", b'{"error": "no such resource"}'

    def _status(self) -> dict[str, Any]:
        """What the dashboard shows: the workflows and the dead messages, as `status` and
        `dead list` show them (no PHI beyond those)."""
        rows = admin.status(self.storage, self.workflows)
        listeners = {row.workflow_id: row for row in listeners_file.read(self.data)}
        workflows = []
        for row in rows:
            listener = listeners.get(row.workflow_id)
            workflows.append(
                {
                    "workflow_id": row.workflow_id,
                    "name": row.workflow,
                    "port": row.port,
                    "state": row.state,
                    "who_may_call": listener.who_may_call if listener else "",
                    "received": sum(row.counts[state.value] for state in State),
                    **{state.value: row.counts[state.value] for state in State},
                    "oldest_pending_seconds": row.oldest_pending_seconds,
                }
            )
        dead = [
            {
                "request_id": message.request_id,
                "workflow": message.workflow_id,
                "calling_aet": message.calling_aet,
                "activity": message.activity,
                "attempts": message.attempts,
                "reason": message.reason,
            }
            for message in admin.dead_messages(self.storage, workflows=self.workflows)[:_MAX_DEAD]
        ]
        return {"time": time.time(), "workflows": workflows, "dead": dead}

    def _act(
        self, action: str, headers: dict[bytes, bytes], received: bytes
    ) -> tuple[int, str, bytes]:
        """Retry or purge dead messages: only from the page (a custom header, which a
        cross-site form cannot send), with a JSON body {"ids": [...]}."""
        if headers.get(b"x-soupflow-request") != b"dashboard":
            return 403, "application/json", b'{"error": "only the dashboard may do this"}'
        try:
            ids = [str(item) for item in json.loads(received)["ids"]]
        except (ValueError, KeyError, TypeError):
            return 400, "application/json", b'{"error": "a JSON body {\\"ids\\": [...]}"}'
        run = admin.retry_dead if action == "retry" else admin.purge_dead
        count = run(self.storage, ids, None)
        log.info("dashboard: %s %d dead message(s)", action, count)
        return 200, "application/json", json.dumps({action: count}).encode("utf-8")


def _close(connection: socket.socket) -> None:
    connection.close()
