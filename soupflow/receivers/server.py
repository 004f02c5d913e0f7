"""One listening socket, a thread per connection: what every receiver kind shares.

Upstream: receivers.dicom (C-STORE), receivers.stow (STOW-RS). Downstream: tls.

The accept loop keeps each new connection until its first bytes arrive: a silent connection
costs a descriptor, not a thread, and is closed at the timeout (or, past `_MAX_WAITING`, when
a newer one needs its place); one that closes unheard costs nothing more. A connection that
speaks gets its own thread, which does the TLS handshake (under the timeout, however the peer
trickles it; then the thumbprint check) and hands the connection to the receiver's `handle`.
Past `max_connections` served at once, `refuse` answers at once without a thread ("try again
later" in the receiver's protocol).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soupflow import tls
from soupflow.receivers.base import ReceiverError
from soupflow.workflow.model import ReceiverSetting

log = logging.getLogger(__name__)

_ACCEPT_RETRY_SECONDS = 0.1
# Connections that have not sent a byte yet, per listener: each costs only a descriptor.
_MAX_WAITING = 1000
_SILENT_REPORT_SECONDS = 60.0

Handle = Callable[[socket.socket, "tls.PeerCertificate | None"], None]
# Offered each connection about to be served: True when another process took it (the
# callable it was given is called when that process is done with it).
Hand = Callable[[socket.socket, Callable[[], None]], bool]


class _SilentCount:
    """Connections closed before they said anything, reported at most once a minute."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = self.evicted = 0
        self._reported = time.monotonic()

    def report(self) -> None:
        now = time.monotonic()
        if (self.closed or self.evicted) and now - self._reported >= _SILENT_REPORT_SECONDS:
            log.warning(
                "%s closed %d connections that sent nothing within its timeout and %d more "
                "to make room for new ones",
                self.name,
                self.closed,
                self.evicted,
            )
            self.closed = self.evicted = 0
            self._reported = now


@dataclass
class Limits:
    timeout_seconds: float  # for the first bytes, the TLS handshake
    max_connections: int  # served by a thread at once


class Server:
    """A bound socket and its accept loop; `name` ("workflow X") starts its log lines."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        limits: Limits,
        handle: Handle,
        refuse: Callable[[socket.socket], None],
        secure: tls.ServerContexts | None = None,
    ) -> None:
        self.name, self.host = name, host
        self.limits = limits
        self.handle, self.refuse = handle, refuse
        self.secure = secure
        self.fingerprints: frozenset[str] = (
            secure.settings.allowed_fingerprints if secure else frozenset()
        )
        self._requested_port = port
        self._socket: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Condition()
        self._connections = 0
        self.hand: Hand | None = None  # runtime.handoff: a worker process may serve it

    @property
    def port(self) -> int:
        if self._socket is None:
            return self._requested_port
        return int(self._socket.getsockname()[1])

    @property
    def active(self) -> int:
        """Connections served by a thread now (in the handshake or handled)."""
        with self._lock:
            return self._connections

    def start(self) -> None:
        host, port = self.host, self._requested_port
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self._socket = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise ReceiverError(_bind_problem(host, port, exc)) from exc
        self._wake = socket.socketpair()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"listener {self.name}", daemon=True
        )
        self._acceptor.start()

    def stop_accepting(self) -> None:
        if self._socket is None or self._wake is None or self._acceptor is None:
            return
        self._wake[1].send(b"x")
        self._acceptor.join()
        self._socket.close()
        for end in self._wake:
            end.close()
        self._socket = self._wake = self._acceptor = None

    def wait_idle(self, seconds: float) -> bool:
        """Wait (up to `seconds`) until no connection is served; whether none is."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._connections, timeout=seconds)

    # ------------------------------------------------------------------ the loop
    def _accept_loop(self) -> None:
        assert self._socket is not None and self._wake is not None
        server, wake = self._socket, self._wake[0]
        waiting: dict[socket.socket, float] = {}  # connection -> deadline, oldest first
        silent = _SilentCount(self.name)
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            try:
                while True:
                    wait = None
                    if waiting:
                        wait = max(0.0, next(iter(waiting.values())) - time.monotonic())
                    for key, _ in selector.select(wait):
                        if key.fileobj is wake:
                            return
                        if key.fileobj is server:
                            self._accept(server, selector, waiting, silent)
                        else:
                            connection = key.fileobj
                            assert isinstance(connection, socket.socket)
                            selector.unregister(connection)
                            del waiting[connection]
                            if _closed_unheard(connection):  # a scanner, or gave up
                                silent.closed += 1
                            else:
                                self._serve(connection)
                    now = time.monotonic()
                    while waiting and next(iter(waiting.values())) <= now:
                        _drop_oldest(selector, waiting)
                        silent.closed += 1
                    silent.report()
            finally:
                for connection in waiting:
                    connection.close()

    def _accept(
        self,
        server: socket.socket,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, float],
        silent: _SilentCount,
    ) -> None:
        try:
            connection, _ = server.accept()
        except OSError as exc:  # out of file descriptors, or the peer already left
            if waiting:  # the longest-silent connection gives its descriptor up
                _drop_oldest(selector, waiting)
                silent.evicted += 1
                return
            log.error("%s cannot accept a connection: %s", self.name, exc.strerror)
            time.sleep(_ACCEPT_RETRY_SECONDS)
            return
        if len(waiting) >= _MAX_WAITING:
            _drop_oldest(selector, waiting)
            silent.evicted += 1
        selector.register(connection, selectors.EVENT_READ)
        waiting[connection] = time.monotonic() + self.limits.timeout_seconds

    def _serve(self, connection: socket.socket) -> None:
        with self._lock:
            served = self._connections
            if served < self.limits.max_connections:
                self._connections += 1
        if served >= self.limits.max_connections:
            # Peers that trickle hold a thread each, up to their deadline; the next one
            # hears "try again later" instead of waiting for them.
            log.warning("%s refused a connection: %d connections open", self.name, served)
            self.refuse(connection)
            return
        if self.hand is not None and self.hand(connection, self._ended):
            return
        threading.Thread(
            target=self._run, args=(connection,), name=f"connection {self.name}", daemon=True
        ).start()

    def serve_handed(self, connection: socket.socket) -> None:
        """Serve, in this thread, a connection another process accepted (and counts)."""
        with self._lock:
            self._connections += 1
        self._run(connection)

    def _run(self, connection: socket.socket) -> None:
        try:
            served = self._secured(connection) if self.secure is not None else (connection, None)
            if served is not None:
                connection = served[0]
                self.handle(*served)
        except OSError:  # the peer left before we looked at it
            pass
        finally:
            connection.close()
            self._ended()

    def _ended(self) -> None:
        with self._lock:
            self._connections -= 1
            self._lock.notify_all()

    def _secured(
        self, connection: socket.socket
    ) -> tuple[socket.socket, tls.PeerCertificate | None] | None:
        """The TLS handshake and the thumbprint check; None (and one log line) when refused."""
        assert self.secure is not None
        where = peer(connection)
        address = where.rpartition(":")[0]
        context = self.secure.current(address)
        if self.secure.reload_error:
            log.error(
                "%s keeps its previous TLS certificate: %s", self.name, self.secure.reload_error
            )
        deadline = time.monotonic() + self.limits.timeout_seconds
        try:
            secured = tls.handshake(context, connection, deadline)
        except tls.HandshakeError as exc:
            naming = self.secure.refused(address, exc)
            log.warning(
                "%s: TLS handshake with %s failed: %s%s",
                self.name,
                where,
                exc,
                f" (the next handshake from {address} logs the certificate's sha256)"
                if naming
                else "",
            )
            return None
        self.secure.accepted(address)
        certificate = tls.peer_certificate(secured)
        allowed = self.fingerprints
        if allowed and (certificate is None or certificate.sha256 not in allowed):
            log.warning(
                "%s refused a TLS connection from %s: client certificate sha256 %s is not in "
                "ClientCertificateThumbPrint",
                self.name,
                where,
                certificate.sha256 if certificate else "(none)",
            )
            secured.close()
            return None
        return secured, certificate


def tls_restart_key(receiver: ReceiverSetting) -> tuple[object, ...]:
    """The TLS fields that restart a listener when they change (a new thumbprint list and
    new certificate files on disk apply to the next connection instead)."""
    return (
        receiver.use_ssl,
        receiver.certificate_file,
        receiver.private_key_file,
        receiver.private_key_password,
        receiver.trusted_certificates_file,
        receiver.mutual_tls,
        receiver.tls_minimum_version,
    )


def server_contexts(receiver: ReceiverSetting, folder: Path) -> tls.ServerContexts | None:
    """The listener's TLS contexts (None for cleartext); ReceiverError when they fail."""
    if not receiver.use_ssl:
        return None
    try:
        return tls.ServerContexts(tls.listener_tls(receiver, receiver.mutual_tls, folder))
    except tls.TlsError as exc:
        raise ReceiverError(f"cannot start TLS: {exc}") from exc


class HandedContexts:
    """A listener's TLS contexts in a worker process: built from its setting at the first
    connection handed to it, then shared by the others (None for cleartext)."""

    def __init__(self, receiver: ReceiverSetting, folder: Path) -> None:
        self.receiver, self.folder = receiver, folder
        self._lock = threading.Lock()
        self._built = False
        self._contexts: tls.ServerContexts | None = None

    def get(self) -> tls.ServerContexts | None:
        with self._lock:
            if not self._built:
                self._contexts = server_contexts(self.receiver, self.folder)
                self._built = True
            return self._contexts


def peer(connection: socket.socket) -> str:
    try:
        address, port = connection.getpeername()[:2]
    except OSError:
        return "a peer that left"
    return f"{address}:{port}"


def _drop_oldest(selector: selectors.BaseSelector, waiting: dict[socket.socket, float]) -> None:
    connection = next(iter(waiting))
    del waiting[connection]
    selector.unregister(connection)
    connection.close()


def _closed_unheard(connection: socket.socket) -> bool:
    """The connection's first event was its end (it sent nothing): closed here, no thread."""
    try:
        ended = not connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:  # reset
        ended = True
    if ended:
        connection.close()
    return ended


def drain(connection: socket.socket) -> None:
    """Read what the peer sent without waiting (so that closing does not reset the connection
    before it reads our answer); bounded for a peer that floods."""
    connection.setblocking(False)
    try:
        for _ in range(16):
            if not connection.recv(65536):
                return
    except BlockingIOError:
        return


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if port < 1024 and exc.errno == 13:
        return f"cannot listen on {host}:{port}: ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port >= 1024"
    if exc.errno == 98:
        return f"cannot listen on {host}:{port}: the port is already in use by another program"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
