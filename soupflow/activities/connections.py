"""Connections kept open between messages, per destination. Upstream: runtime.workers (owns
one `Connections` and closes idle ones); downstream: the senders that reuse connections (MLLP
with `KeepConnectionOpen`, the DICOM sender's associations).

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
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import httpx

from soupflow.activities.egress import checked_client
from soupflow.dicom.negotiation import Proposal
from soupflow.dicom.requestor import Association, AssociationLostError, Destination
from soupflow.network import Egress
from soupflow.tls import ClientTls

# PS3.8 9.3.2.2: context ids are odd numbers 1-255, so at most 128 contexts per association.
_MAX_PROPOSALS = 128

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


class Shared(Protocol):
    """Associations counted across the worker processes of one runtime, which decides: so
    that `MaxAssociations` holds for the destination, not for each process
    (handoff.Served)."""

    def take(self, key: str, limit: int, seconds: float) -> bool:
        """One more association to `key` may open (False: none came free in `seconds`)."""

    def give(self, key: str) -> None:
        """One association to `key` closed."""


def shared_key(destination: Destination) -> str:
    """What names a destination across processes, and in the runtime's log: the AE at its
    address, as whom and how it is called (not the timeout: the same PACS, the same limit)."""
    secured = f" over TLS ({destination.tls_server_name})" if destination.tls_server_name else ""
    return (
        f"{destination.remote_aet} at {destination.host}:{destination.port} "
        f"from {destination.our_aet}{secured}"
    )


@dataclass
class _Destination:
    """The associations of one destination: how many are open, which of them are idle."""

    open: int = 0
    idle: list[tuple[Association, float]] = field(default_factory=list)  # (it, close after)
    proposals: dict[Proposal, None] = field(default_factory=dict)  # every one asked for, in order
    contended: bool = False  # another process waits for one: none is kept idle


class AssociationPool:
    """DICOM associations by destination, reused while messages keep coming.

    `take` gives an open association that proposed what the message needs (most recently
    used first), else opens one, proposing what this message needs and what earlier ones to
    the same destination needed (so one association soon serves a whole study's SOP
    classes). At most `limit` are open per destination: a caller beyond it waits for one to
    come back, or replaces an idle one that lacks its contexts. `give` keeps an association
    for `keep_seconds`; `discard` aborts a broken one. With `shared` (in a worker process)
    each new association also waits its turn among the runtime's processes, and while
    another process waits for one (`contend`), associations are released when their message
    is done instead of kept.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._destinations: dict[Destination, _Destination] = {}
        self._changed = threading.Condition()
        self.shared: Shared | None = None

    def take(
        self, destination: Destination, needs: list[Proposal], limit: int
    ) -> tuple[Association, bool]:
        """(an association whose proposals include `needs`, whether it was used before)."""
        deadline = time.monotonic() + destination.timeout_seconds
        closing: list[Association] = []
        with self._changed:
            entry = self._destinations.setdefault(destination, _Destination())
            for proposal in needs:
                entry.proposals.setdefault(proposal)
            while True:
                found = self._usable(entry, needs, closing)
                if found is not None:
                    break
                if entry.idle:
                    # An idle association lacks our contexts: release it first, then open one
                    # that has them (a PACS that serves one association at a time would
                    # otherwise never answer the second).
                    replaced, _ = entry.idle.pop(0)
                    closing.append(replaced)
                    entry.open -= 1
                if entry.open < limit:
                    entry.open += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssociationLostError(
                        f"no association to {destination} came free within "
                        f"{destination.timeout_seconds:g} s ({limit} open: MaxAssociations)"
                    )
                self._changed.wait(remaining)
            others = [proposal for proposal in entry.proposals if proposal not in needs]
            proposals = [*needs, *others[-(_MAX_PROPOSALS - len(needs)) :]]
        for association in closing:
            association.release()
        self._give_back(closing)
        if found is not None:
            return found, True
        shared = self.shared
        if shared is not None and not shared.take(
            shared_key(destination), limit, max(0.0, deadline - time.monotonic())
        ):
            with self._changed:
                entry.open -= 1  # never opened: nothing to give back
                self._changed.notify_all()
            raise AssociationLostError(
                f"no association to {destination} came free within "
                f"{destination.timeout_seconds:g} s ({limit} open across the worker "
                "processes: MaxAssociations)"
            )
        try:
            return Association.open(destination, proposals), False
        except BaseException:
            self._forget(destination)
            raise

    def give(self, association: Association, keep_seconds: float) -> None:
        """The caller is done with it: kept for `keep_seconds` (0: released now)."""
        with self._changed:
            entry = self._destinations[association.destination]
            keep = keep_seconds > 0 and not association.closed and not entry.contended
            if keep:
                entry.idle.append((association, self._clock() + keep_seconds))
                self._changed.notify_all()
        if not keep:
            association.release()
            self._forget(association.destination)

    def contend(self, key: str, contended: bool) -> None:
        """Another worker process waits for an association to `key` (or no longer does):
        from now on those given back are released, not kept (`release_idle_to` releases
        the ones kept idle now)."""
        with self._changed:
            for destination, entry in self._destinations.items():
                if shared_key(destination) == key:
                    entry.contended = contended

    def release_idle_to(self, key: str) -> int:
        return self._release_idle(lambda destination, until: shared_key(destination) == key)

    def discard(self, association: Association) -> None:
        """It broke (abort, timeout, reset): never used again."""
        association.abort()
        self._forget(association.destination)

    def close_idle(self) -> int:
        """Release the associations idle past their keep time; how many."""
        now = self._clock()
        return self._release_idle(lambda destination, until: until <= now)

    def retain(self, destinations: set[Destination]) -> int:
        """Release the idle associations to destinations no workflow sends to any more."""
        return self._release_idle(lambda destination, until: destination not in destinations)

    def close_all(self) -> None:
        self._release_idle(lambda destination, until: True)

    @staticmethod
    def _usable(
        entry: _Destination, needs: list[Proposal], closing: list[Association]
    ) -> Association | None:
        """An idle association that proposed `needs` and is still open (most recent first);
        the ones the peer closed meanwhile go to `closing`."""
        for index in range(len(entry.idle) - 1, -1, -1):
            association, _ = entry.idle[index]
            if not association.still_open():
                del entry.idle[index]
                entry.open -= 1
                closing.append(association)
            elif all(proposal in association.proposed for proposal in needs):
                del entry.idle[index]
                return association
        return None

    def _release_idle(self, expired: Callable[[Destination, float], bool]) -> int:
        doomed: list[Association] = []
        with self._changed:
            for destination, entry in self._destinations.items():
                keep = [(a, until) for a, until in entry.idle if not expired(destination, until)]
                doomed += [a for a, until in entry.idle if expired(destination, until)]
                entry.open -= len(entry.idle) - len(keep)
                entry.idle = keep
            self._changed.notify_all()
        for association in doomed:
            association.release()
        self._give_back(doomed)
        return len(doomed)

    def _forget(self, destination: Destination) -> None:
        """One association to `destination` is closed (released, aborted, never opened)."""
        with self._changed:
            self._destinations[destination].open -= 1
            self._changed.notify_all()
        if self.shared is not None:
            self.shared.give(shared_key(destination))

    def _give_back(self, closed: list[Association]) -> None:
        """Tell the runtime, once they are released (not before: its next grant could open
        one while these are still open), and outside the lock."""
        if self.shared is not None:
            for association in closed:
                self.shared.give(shared_key(association.destination))


class Connections:
    """The pools one set of workers shares, and the operator's egress allowlists every new
    connection is checked against."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, egress: Egress | None = None
    ) -> None:
        self.sockets: Pool[tuple[str, int], socket.socket] = Pool(_close_socket, clock)
        self.associations = AssociationPool(clock)
        self.egress = egress or Egress()
        self._http: dict[ClientTls, httpx.Client] = {}
        self._http_lock = threading.Lock()

    def http_client(self, settings: ClientTls) -> httpx.Client:
        """An HTTP client for one sender TLS setting (kept: it pools its connections)."""
        with self._http_lock:
            found = self._http.get(settings)
            if found is None:
                found = self._http[settings] = checked_client(self.egress.http, settings)
            return found

    def close_idle(self) -> int:
        return self.sockets.close_idle() + self.associations.close_idle()

    def close_all(self) -> None:
        self.sockets.close_all()
        self.associations.close_all()
        with self._http_lock:
            clients, self._http = list(self._http.values()), {}
        for each in clients:
            each.close()
