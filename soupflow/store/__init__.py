"""Where received objects and their queue live. Upstream: ingest, runtime, admin.

spool     object files: incoming/ -> objects/, fsynced
queue     the Queue protocol, its states and records (every backend implements it)
sql       what the SQL backends share: statements, group commit, the verbs
sqlite    the embedded backend: one SQLite database in the data folder
postgres  the shared backend: a PostgreSQL database several nodes use at once
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from soupflow.store.postgres import PostgresQueue, is_url
from soupflow.store.queue import Queue, QueueError
from soupflow.store.spool import Spool
from soupflow.store.sqlite import DATABASE_FILE, SqliteQueue


class NoDataError(Exception):
    """The data folder has no queue: nothing was ever received there."""


def open_queue(
    data: Path, queue: str = "", *, create: bool = True, read_only: bool = False
) -> Queue:
    """The queue (the one place a backend is chosen): the PostgreSQL database at `queue`
    (`--queue postgresql://...`), else the SQLite file in the data folder. Without `create`,
    a folder that has no queue yet is a NoDataError rather than a new, empty queue;
    `read_only` opens it for reading only (it works on a full disk)."""
    if queue:
        if not is_url(queue):
            raise QueueError(
                f"--queue {queue!r}: expected a postgresql:// URL, or nothing for the SQLite "
                "file in the data folder"
            )
        return PostgresQueue(queue, read_only=read_only, create=create and not read_only)
    if (not create or read_only) and not (data / DATABASE_FILE).is_file():
        raise NoDataError(
            f"no queue in {data}: start `soupflow run --data {data}` first, or pass --data"
        )
    return SqliteQueue(data, read_only=read_only)


@dataclass(frozen=True)
class Storage:
    """Where a node keeps what it receives: its data folder (always its own: incoming files,
    listeners.json, the SQLite queue by default), the queue (`--queue`: a PostgreSQL URL
    several nodes share, or "" for SQLite in the data folder) and the objects folder
    (`--objects`: default `<data>/objects`; a shared mount lets any node deliver)."""

    data: Path
    queue: str = ""
    objects: Path | None = None
    # A queue already open (the runtime's), lent to operators' requests instead of a new one
    # each time (with PostgreSQL, a connection and a pool per dashboard refresh).
    lent: Queue | None = field(default=None, compare=False, repr=False)

    def open_queue(self, *, create: bool = True, read_only: bool = False) -> Queue:
        return open_queue(self.data, self.queue, create=create, read_only=read_only)

    @contextmanager
    def using(self, *, create: bool = True, read_only: bool = False) -> Iterator[Queue]:
        """The lent queue, else one opened for the block and closed after it."""
        if self.lent is not None:
            yield self.lent
            return
        queue = self.open_queue(create=create, read_only=read_only)
        try:
            yield queue
        finally:
            queue.close()

    def spool(self, node: str = "") -> Spool:
        """The spool; `node` names this node's incoming folder in a shared objects folder."""
        return Spool(self.data, self.objects, node)
