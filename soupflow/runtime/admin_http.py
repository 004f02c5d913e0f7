"""The operator's window over HTTP: `/metrics`, `/healthz`, `/readyz`. Upstream: cli (`run
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
from collections.abc import Callable
from pathlib import Path

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from soupflow import durable, metrics, tls
from soupflow.receivers.http11 import next_event
from soupflow.receivers.server import Limits, Server

log = logging.getLogger(__name__)

ADMIN_FILE = "admin.json"
DEFAULT_ADMIN = "127.0.0.1:8470"
_TIMEOUT_SECONDS = 10.0
_MAX_CONNECTIONS = 8

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
    def __init__(self, host: str, port: int, token: str, readiness: Readiness, data: Path) -> None:
        self.token = token
        self.readiness = readiness
        self.data = data
        self._server = Server(
            "admin endpoint",
            host,
            port,
            Limits(_TIMEOUT_SECONDS, _MAX_CONNECTIONS),
            self._serve,
            _close,
        )

    @property
    def url(self) -> str:
        host = self._server.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self._server.port}/"

    def start(self) -> None:
        self._server.start()
        durable.replace(
            self.data / ADMIN_FILE, json.dumps({"url": self.url}).encode("utf-8"), sync=False
        )
        log.info("admin endpoint at %s (metrics, healthz, readyz)", self.url)

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
                while not isinstance(next_event(http, connection), h11.EndOfMessage):
                    pass
                code, media, body = self._answer(event)
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

    def _answer(self, request: h11.Request) -> tuple[int, str, bytes]:
        if self.token:
            given = dict(request.headers).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                return 401, "application/json", b'{"error": "a bearer token is required"}'
        path = request.target.decode("latin-1").split("?", 1)[0]
        if request.method != b"GET":
            return 405, "application/json", b'{"error": "GET only"}'
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(metrics.REGISTRY)
        if path == "/healthz":
            return 200, "application/json", b'{"status": "ok"}'
        if path == "/readyz":
            problems = self.readiness()
            body = json.dumps({"ready": not problems, "problems": problems}).encode("utf-8")
            return (503 if problems else 200), "application/json", body
        return 404, "application/json", b'{"error": "no such resource"}'


def _close(connection: socket.socket) -> None:
    connection.close()
