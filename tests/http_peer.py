"""A real HTTP server on loopback for the HTTP sender's tests: scripted statuses, recorded requests."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOLD_SECONDS = 30.0


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpPeer:
    statuses: list[int] = field(default_factory=list)  # then 200 for ever
    hold_first: bool = False  # keep the first request waiting until `release()`
    bodies: dict[str, bytes] = field(default_factory=dict)  # response body by path
    requests: list[Received] = field(default_factory=list)
    tls: ssl.SSLContext | None = None  # the server context: https only
    answer_after: float = 0.0  # seconds each answer takes: a slow destination

    def __post_init__(self) -> None:
        self.got_request = threading.Event()
        self._release = threading.Event()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                received = Received(self.command, self.path, dict(self.headers), self._body())
                with peer._lock:
                    first = not peer.requests
                    peer.requests.append(received)
                    status = peer.statuses.pop(0) if peer.statuses else 200
                peer.got_request.set()
                if first and peer.hold_first:
                    peer._release.wait(HOLD_SECONDS)
                elif peer.answer_after:
                    peer._release.wait(peer.answer_after)
                body = peer.bodies.get(self.path, b'{"ok": true}')
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = b""
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

            do_POST = do_PUT = do_GET = do_DELETE = _handle  # noqa: N815 (http.server names them)

            def log_message(self, *_: Any) -> None:
                pass

        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}/hook"

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
