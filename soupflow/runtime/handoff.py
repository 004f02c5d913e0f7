"""Connections the runtime accepted, served in its worker processes (`run --processes N`).

Upstream: supervisor and processes (the runtime's side, `Handoff`; the worker process's
side, `Served`). Downstream: receivers (each kind serves handed connections as its own).

One interpreter serves its connections under one interpreter lock: over several
connections at once, ingest (STOW-RS, and DICOM over TLS above all) is bound by it long
before the cores or the disk are. So the runtime stays the only process that binds, accepts
and decides (who may connect, how many at once, with which certificate), and each
connection it accepts goes to whichever process serves the fewest now: itself (on a tie,
so that one connection costs nothing more) or one of its worker processes. It goes over a Unix socket (SCM_RIGHTS), with the
receiver's settings as the runtime holds them at that moment. The worker process serves it
as the runtime would, TLS handshake included, and through the same ingest. For what is
counted across a listener's connections (`MaxAssociations`, `MaxConcurrentRequests`, a
delivery being received) it asks the runtime, which answers from the listener's own counts.
When the connection ends it says so, so that the runtime's connection counts, limits and
`status` stay whole. On a listener's stop the runtime tells its worker processes (`stop`:
close the STOW-RS connections between requests), and when the grace is over, `abort`
(DICOM associations are aborted, as the runtime aborts its own). A worker process that dies
takes its connections with it (their senders see them close before an answer: nothing they
were told is stored is lost); the runtime ends their counts and releases what they held.

The same socket keeps a DICOM sender's `MaxAssociations` for the destination, not for each
process: a worker process asks the runtime before it opens an association (`take`) and says
when one closes (`give`). The runtime grants in the order asked; while one waits, every
worker process is told (`contended`) to release that destination's associations when their
message is done instead of keeping them, so that none waits behind associations another
keeps idle. A worker process that dies gives back what it held.

The messages are JSON, one per SOCK_SEQPACKET datagram: `serve` (with the connection's
descriptor), `ready`, `done`, `admit`/`admitted`, `release`, `stop`, `abort`;
`take`/`granted`, `give`, `cancel`, `contended`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soupflow.receivers.base import Receiver

if TYPE_CHECKING:
    from soupflow.activities.connections import AssociationPool
    from soupflow.ingest import Ingest

log = logging.getLogger(__name__)

_MESSAGE_BYTES = 64 * 1024  # a receiver's settings fit many times (a larger one: served here)
_ADMIT_SECONDS = 10.0  # a runtime that does not answer: not admitted
_STOP_SECONDS = 10.0  # as a listener's grace
_ABORT_SECONDS = 5.0
_SAY_EVERY_SECONDS = 60.0  # a destination whose associations are contended says so this often


# ---------------------------------------------------------------------- the runtime's side
@dataclass
class _Connection:
    listener: Receiver
    ended: Callable[[], None]
    held: list[str] = field(default_factory=list)


@dataclass
class _Child:
    boot: str
    control: socket.socket
    connections: dict[int, _Connection] = field(default_factory=dict)


@dataclass
class _Waiting:
    child: _Child
    id: int
    limit: int


@dataclass
class _Senders:
    """One destination's associations across the worker processes."""

    held: Counter[str] = field(default_factory=Counter)  # by worker process
    waiting: list[_Waiting] = field(default_factory=list)  # in the order asked
    contended: bool = False  # what the worker processes were last told


class Handoff:
    """The runtime's side: its worker processes, and the connections handed to each."""

    def __init__(self) -> None:
        self._children: dict[str, _Child] = {}
        self._listeners: list[Receiver] = []
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._senders: dict[str, _Senders] = {}  # by destination (connections.shared_key)
        self._starting: dict[str, _Child] = {}  # every child with a reader, ready or not
        self._said: dict[str, float] = {}  # when a destination's wait was last logged

    def channel(self, boot: str) -> socket.socket:
        """A new worker process's end of its control socket (the caller passes it on and
        closes it); connections go to the process once it says it is ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child = _Child(boot, ours)
        with self._lock:
            self._starting[boot] = child
        threading.Thread(
            target=self._read, args=(child,), name=f"handoff {boot}", daemon=True
        ).start()
        return theirs

    def share(self, listener: Receiver) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unshare(self, listener: Receiver) -> None:
        """The listener stopped: its worker processes close their connections of it that
        are between requests (the runtime waits for the rest as for its own)."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
            children = list(self._children.values())
        self._tell("stop", listener, children)

    def abort(self, listener: Receiver) -> None:
        """The listener's grace is over: its worker processes end its connections."""
        with self._lock:
            children = list(self._children.values())
        self._tell("abort", listener, children)

    @staticmethod
    def _tell(op: str, listener: Receiver, children: list[_Child]) -> None:
        for child in children:
            _send(child.control, {"op": op, "workflow": listener.workflow_id})

    def offer(
        self, listener: Receiver, connection: socket.socket, ended: Callable[[], None]
    ) -> bool:
        """Hand `connection` to the worker process serving the fewest connections, if it
        serves fewer than this one (`ended` is called when it is done); False: serve it
        here (also when that process's socket is full: it is not reading). The caller
        counts it as its own either way."""
        with self._lock:
            child = min(self._children.values(), key=lambda c: len(c.connections), default=None)
            if child is None:
                return False
            handed = sum(len(c.connections) for c in self._children.values())
            here = sum(shared.active_connections for shared in self._listeners) - handed - 1
            if len(child.connections) >= here:
                return False
            token = next(self._tokens)
            child.connections[token] = _Connection(listener, ended)
        header = {
            "op": "serve",
            "token": token,
            "workflow": listener.workflow_id,
            "folder": str(listener.folder),
            "receiver": listener.settings(),
        }
        data = json.dumps(header).encode()
        try:  # never waits: a worker process that is not reading is passed over
            if len(data) > _MESSAGE_BYTES:
                raise OSError("the receiver's settings are too large to hand over")
            socket.send_fds(child.control, [data], [connection.fileno()], socket.MSG_DONTWAIT)
        except OSError:  # the child is gone or not reading
            with self._lock:
                mine = child.connections.pop(token, None) is not None
            if mine:
                return False  # this process serves it after all
            connection.close()  # its end was counted with the child's other connections
            return True
        connection.close()  # the child has its own descriptor now
        return True

    def _read(self, child: _Child) -> None:
        control = child.control
        try:
            while message := _receive(control):
                if message.get("op") == "ready":
                    with self._lock:
                        self._children[child.boot] = child
                    log.info("worker process %s takes connections", child.boot)
                    continue
                self._answer(child, message)
        finally:
            self._gone(child)

    def _answer(self, child: _Child, message: dict[str, Any]) -> None:
        op, token, slot = message.get("op"), message.get("token"), str(message.get("slot"))
        if op in ("take", "give", "cancel"):
            self._sender(child, op, message)
            return
        if not isinstance(token, int):
            return
        with self._lock:
            connection = child.connections.get(token)
        if connection is None:
            if op == "admit":  # a connection this runtime no longer knows
                _send(child.control, {"op": "admitted", "id": message.get("id"), "ok": False})
            return
        if op == "admit":
            ok = connection.listener.admit(slot)
            if ok:
                connection.held.append(slot)
            _send(child.control, {"op": "admitted", "id": message.get("id"), "ok": ok})
        elif op == "release" and slot in connection.held:
            connection.held.remove(slot)
            connection.listener.release(slot)
        elif op == "done":
            with self._lock:
                child.connections.pop(token, None)
            _end(connection)

    # -------------------------------------------------- a DICOM sender's associations
    def _sender(self, child: _Child, op: str, message: dict[str, Any]) -> None:
        key, number, limit = str(message.get("key")), message.get("id"), message.get("limit")
        grants: list[_Waiting] = []
        with self._lock:
            senders = self._senders.setdefault(key, _Senders())
            if op == "take" and isinstance(number, int) and isinstance(limit, int):
                senders.waiting.append(_Waiting(child, number, limit))
            elif op == "cancel":
                senders.waiting = [w for w in senders.waiting if (w.child, w.id) != (child, number)]
            elif op == "give" and senders.held[child.boot] > 0:
                senders.held[child.boot] -= 1
            grants = self._grant(key, senders)
        self._granted(key, grants)

    def _grant(self, key: str, senders: _Senders) -> list[_Waiting]:
        """Who may open one now, in the order asked; the processes are told when someone
        starts or stops waiting (the caller holds the lock)."""
        granted: list[_Waiting] = []
        while senders.waiting and senders.held.total() < senders.waiting[0].limit:
            first = senders.waiting.pop(0)
            senders.held[first.child.boot] += 1
            granted.append(first)
        contended = bool(senders.waiting)
        if contended != senders.contended:  # every process: one that holds none now may soon
            senders.contended = contended
            for each in self._starting.values():
                _send(each.control, {"op": "contended", "key": key, "on": contended})
        if contended and time.monotonic() - self._said.get(key, float("-inf")) >= (
            _SAY_EVERY_SECONDS
        ):
            self._said[key] = time.monotonic()
            log.info(
                "%d associations to %s open across the worker processes (MaxAssociations "
                "%d), %d waiting for one: each is released when its message is done",
                senders.held.total(),
                key,
                senders.waiting[0].limit,
                len(senders.waiting),
            )
        if not senders.waiting and not senders.held.total():
            del self._senders[key]
        return granted

    def _granted(self, key: str, grants: list[_Waiting]) -> None:
        with self._lock:
            senders = self._senders.get(key)
            contended = senders is not None and senders.contended
        for waiting in grants:
            _send(
                waiting.child.control,
                {"op": "granted", "id": waiting.id, "key": key, "contended": contended},
            )

    def _gone(self, child: _Child) -> None:
        """The worker process exited (or closed its end): its connections are over, and the
        associations it held are free."""
        with self._lock:
            if self._children.get(child.boot) is child:
                del self._children[child.boot]
            if self._starting.get(child.boot) is child:
                del self._starting[child.boot]
            left = list(child.connections.values())
            child.connections.clear()
            freed: list[tuple[str, list[_Waiting]]] = []
            for key, senders in list(self._senders.items()):
                senders.waiting = [w for w in senders.waiting if w.child is not child]
                del senders.held[child.boot]
                freed.append((key, self._grant(key, senders)))
        for key, grants in freed:
            self._granted(key, grants)
        for connection in left:
            _end(connection)
        child.control.close()
        if left:
            log.warning(
                "worker process %s ended with %d connections it was serving", child.boot, len(left)
            )


def _end(connection: _Connection) -> None:
    for slot in connection.held:
        connection.listener.release(slot)
    connection.held.clear()
    connection.ended()


# ------------------------------------------------------------- the worker process's side
Build = Callable[[str, dict[str, Any], Path, "Ingest"], Receiver]  # receivers.handed


class _Remote:
    """A handed connection's admissions, decided by the runtime."""

    def __init__(self, served: Served, token: int) -> None:
        self.served, self.token = served, token

    def admit(self, slot: str) -> bool:
        return self.served.ask(self.token, slot)

    def release(self, slot: str) -> None:
        _send(self.served.control, {"op": "release", "token": self.token, "slot": slot})


class Served:
    """A worker process's side: the connections its runtime hands it."""

    def __init__(self, control: socket.socket, ingest: Ingest, build: Build) -> None:
        self.control = control
        self.ingest = ingest
        self.build = build
        self._listeners: dict[str, Receiver] = {}  # by workflow and settings
        self._answers: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._running: dict[int, Receiver] = {}  # by token: the connections served now
        self._reader: threading.Thread | None = None
        self._pool: AssociationPool | None = None

    def count_associations(self, pool: AssociationPool) -> None:
        """`pool`'s new associations wait their turn among the runtime's processes (before
        its workers start: every association it opens is counted)."""
        self._pool = pool
        pool.shared = self

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="handed connections", daemon=True)
        self._reader.start()
        _send(self.control, {"op": "ready"})

    def ask(self, token: int, slot: str) -> bool:
        message = {"op": "admit", "token": token, "slot": slot}
        return self._request(message, _ADMIT_SECONDS)

    def take(self, key: str, limit: int, seconds: float) -> bool:
        """Wait (at most `seconds`) for the runtime to let one more association to `key`
        open (connections.Shared); False also when the runtime is gone."""
        message = {"op": "take", "key": key, "limit": limit}
        return self._request(message, seconds, cancel={"op": "cancel", "key": key})

    def _request(
        self, message: dict[str, Any], seconds: float, cancel: dict[str, Any] | None = None
    ) -> bool:
        """Send `message` with an id of its own and wait (at most `seconds`) for the
        runtime's yes or no; when none came, `cancel` (with that id) says it is not wanted."""
        number = next(self._ids)
        answered, answer = threading.Event(), [False]
        with self._lock:
            self._answers[number] = (answered, answer)
        _send(self.control, {**message, "id": number})
        answered.wait(seconds)
        with self._lock:
            self._answers.pop(number, None)
        if not answered.is_set() and cancel is not None:  # else answered as it gave up
            _send(self.control, {**cancel, "id": number})
        return answer[0]

    def _answered(self, number: object, ok: bool) -> bool:
        """Give a waiting request its answer; False when nobody waits for it any more."""
        with self._lock:
            waiting = self._answers.pop(number, None) if isinstance(number, int) else None
            if waiting is not None:
                waiting[1][0] = ok
                waiting[0].set()
        return waiting is not None

    def give(self, key: str) -> None:
        _send(self.control, {"op": "give", "key": key})

    def _granted(self, message: dict[str, Any]) -> None:
        key = str(message.get("key"))
        if not self._answered(message.get("id"), True):  # it gave up waiting: not needed
            self.give(key)
        elif message.get("contended") and self._pool is not None:
            self._pool.contend(key, True)

    def _no_more_answers(self) -> None:
        """The runtime is gone: no request waits for it (each is a no)."""
        with self._lock:
            waiting, self._answers = list(self._answers.values()), {}
        for answered, _ in waiting:
            answered.set()

    def _read(self) -> None:
        try:
            self._read_until_gone()
        finally:
            self._no_more_answers()

    def _read_until_gone(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.control, _MESSAGE_BYTES, 1)
            except OSError:
                return
            if not data:
                for descriptor in fds:
                    socket.close(descriptor)
                return  # the runtime is gone: the process stops on its own
            message = json.loads(data)
            op = message.get("op")
            if op == "serve" and fds:
                self._serve(message, socket.socket(fileno=fds[0]))
            elif op == "admitted":
                self._answered(message.get("id"), bool(message.get("ok")))
            elif op in ("stop", "abort"):
                self._end(str(message.get("workflow")), abort=op == "abort")
            elif op == "granted":
                self._granted(message)
            elif op == "contended" and self._pool is not None:
                key, contended = str(message.get("key")), bool(message.get("on"))
                self._pool.contend(key, contended)
                if contended:  # each release waits for its A-RELEASE-RP: not in this reader
                    threading.Thread(
                        target=self._pool.release_idle_to,
                        args=(key,),
                        name="soupflow-contended",
                        daemon=True,
                    ).start()

    def _end(self, workflow_id: str, abort: bool) -> None:
        """The runtime stopped the workflow's listener: its listeners here are forgotten (one
        started again later is built anew) and each one serving a connection is told."""
        with self._lock:
            for key in [k for k, x in self._listeners.items() if x.workflow_id == workflow_id]:
                del self._listeners[key]
            serving = {id(x): x for x in self._running.values() if x.workflow_id == workflow_id}
        for listener in serving.values():
            (listener.abort_handed if abort else listener.stop_handed)()

    def _serve(self, message: dict[str, Any], connection: socket.socket) -> None:
        token = int(message["token"])
        workflow_id = str(message["workflow"])
        key = json.dumps([workflow_id, message["receiver"], message["folder"]], sort_keys=True)
        try:
            with self._lock:
                listener = self._listeners.get(key)
                if listener is None:
                    listener = self._listeners[key] = self.build(
                        workflow_id, message["receiver"], Path(message["folder"]), self.ingest
                    )
                self._running[token] = listener
        except Exception as exc:  # settings this version cannot read: the runtime's are newer
            log.error("cannot serve a connection of workflow %s: %s", workflow_id, exc)
            connection.close()
            _send(self.control, {"op": "done", "token": token})
            return
        threading.Thread(
            target=self._run,
            args=(listener, connection, token),
            name=f"connection workflow {workflow_id}",
            daemon=True,
        ).start()

    def _run(self, listener: Receiver, connection: socket.socket, token: int) -> None:
        try:
            listener.serve_handed(connection, _Remote(self, token))
        finally:
            _send(self.control, {"op": "done", "token": token})
            with self._lock:
                self._running.pop(token, None)
                self._lock.notify_all()

    def stop(self) -> None:
        """Close the connections between requests, wait for the others (bounded), then end
        what is left."""
        with self._lock:
            listeners = list({id(x): x for x in self._running.values()}.values())
        for listener in listeners:
            listener.stop_handed()
        if not self._idle(_STOP_SECONDS):
            for listener in listeners:
                listener.abort_handed()
            self._idle(_ABORT_SECONDS)
        with contextlib.suppress(OSError):
            self.control.shutdown(socket.SHUT_RDWR)
        if self._reader is not None:
            self._reader.join(timeout=_STOP_SECONDS)
        self.control.close()

    def _idle(self, seconds: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: not self._running, timeout=seconds)


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the other side is gone: its reader says so
        control.send(json.dumps(message).encode())


def _receive(control: socket.socket) -> dict[str, Any] | None:
    try:
        data = control.recv(_MESSAGE_BYTES)
    except OSError:
        return None
    if not data:
        return None
    message = json.loads(data)
    return message if isinstance(message, dict) else None
