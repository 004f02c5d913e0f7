"""Connections kept open between messages, per destination. Upstream: runtime.workers (owns
one `Connections` and closes idle ones); downstream: the senders that reuse connections (MLLP
with `KeepConnectionOpen`).

A connection is taken for one message and given back when that message is done with it; a
connection that failed is closed instead of given back. Idle connections are closed after
their keep time (`close_idle`, called by the workers between messages) and all of them at
stop, so a destination is never held open by a runtime that has nothing to send.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
C = TypeVar("C")


class Pool(Generic[K, C]):
    """Idle connections by key; `take` returns the most recently used one."""

    def __init__(
        self, close: Callable[[C], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._close = close
        self._clock = clock
        self._idle: dict[K, list[tuple[C, float]]] = {}  # (connection, close after)
        self._lock = threading.Lock()

    def take(self, key: K) -> C | None:
        with self._lock:
            idle = self._idle.get(key)
            if not idle:
                return None
            connection, _ = idle.pop()
            return connection

    def give(self, key: K, connection: C, keep_seconds: float) -> None:
        if keep_seconds <= 0:
            self._close(connection)
            return
        with self._lock:
            self._idle.setdefault(key, []).append((connection, self._clock() + keep_seconds))

    def close_idle(self) -> int:
        """Close the connections idle past their keep time; how many."""
        now = self._clock()
        expired: list[C] = []
        with self._lock:
            for key, idle in list(self._idle.items()):
                expired += [connection for connection, until in idle if until <= now]
                kept = [(connection, until) for connection, until in idle if until > now]
                if kept:
                    self._idle[key] = kept
                else:
                    del self._idle[key]
        for connection in expired:
            self._close(connection)
        return len(expired)

    def close_all(self) -> None:
        with self._lock:
            every = [connection for idle in self._idle.values() for connection, _ in idle]
            self._idle.clear()
        for connection in every:
            self._close(connection)


def _close_socket(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.close()


def still_open(connection: socket.socket) -> bool:
    """False when the peer closed an idle connection (or sent something unasked)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable  # an idle peer sends nothing; readable means EOF, reset or junk


class Connections:
    """The pools one set of workers shares."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.sockets: Pool[tuple[str, int], socket.socket] = Pool(_close_socket, clock)

    def close_idle(self) -> int:
        return self.sockets.close_idle()

    def close_all(self) -> None:
        self.sockets.close_all()
