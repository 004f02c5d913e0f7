"""What every receiver kind is to the runtime. Upstream: runtime.supervisor. Downstream: the
receiver modules, each a front door that turns network input into `ingest.Ingest.store`."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from soupflow.ingest import Ingest


class ReceiverError(Exception):
    """A receiver could not start (port in use, not permitted, bad address)."""


class Admission(Protocol):
    """What a listener counts across its connections, whichever process serves them: a
    slot is "association" (one of `MaxAssociations`), "request" (one of
    `MaxConcurrentRequests`) or "delivery:<id>" (a delivery being received)."""

    def admit(self, slot: str) -> bool:
        """Take the slot; False when it is not free."""
        ...

    def release(self, slot: str) -> None:
        """Give a taken slot back."""
        ...


class Sharing(Protocol):
    """Worker processes that may serve a listener's connections (runtime.handoff)."""

    def share(self, listener: Receiver) -> None: ...

    def unshare(self, listener: Receiver) -> None:
        """The listener stops: worker processes take no new requests for it and close its
        idle connections."""
        ...

    def abort(self, listener: Receiver) -> None:
        """Its grace is over: worker processes end what they still serve of it."""
        ...

    def offer(
        self, listener: Receiver, connection: socket.socket, ended: Callable[[], None]
    ) -> bool:
        """True when a worker process took the connection (`ended` is called when it is
        done with it); False: serve it here."""
        ...


class Receiver(Admission, Protocol):
    """One workflow's front door. `restart_key(setting)` names the fields it cannot take
    while running; any other change goes through `update`. In a worker process the same
    class serves the connections its runtime hands over (`from_settings`, `serve_handed`);
    its admissions (`admit`, `release`) count them wherever they are served."""

    workflow_id: str
    folder: Path

    def __init__(
        self, workflow_id: str, receiver: Any, host: str, ingest: Ingest, folder: Path
    ) -> None:
        """`folder`: the workflow file's, which relative certificate paths start from."""

    @staticmethod
    def restart_key(receiver: Any) -> tuple[object, ...]:
        """The fields that restart the listener when they change."""

    @property
    def active_connections(self) -> int:
        """Connections served now (for `soupflow_associations_active`)."""

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when the setting's port is 0)."""

    def start(self) -> None:
        """Bind and serve; ReceiverError when it cannot."""

    def update(self, receiver: Any) -> None:
        """Take a new setting with the same restart key; applies to the next connection."""

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; let work in progress finish for up to `grace_seconds`."""

    def share(self, sharing: Sharing) -> None:
        """Let worker processes serve some of its connections (called before `start`)."""

    @classmethod
    def from_settings(
        cls, workflow_id: str, settings: dict[str, Any], folder: Path, ingest: Ingest
    ) -> Receiver:
        """The listener a worker process serves handed connections with (`settings`)."""

    def settings(self) -> dict[str, Any]:
        """Its receiver setting as JSON (what a worker process builds its listener from)."""

    def serve_handed(self, connection: socket.socket, admission: Admission) -> None:
        """Serve a connection another process accepted, in this thread, until it ends."""

    def stop_handed(self) -> None:
        """Take no new requests on its handed connections; close those between requests."""

    def abort_handed(self) -> None:
        """End its handed connections (the runtime's grace for them is over)."""
