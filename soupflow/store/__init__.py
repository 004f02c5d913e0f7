"""Where received objects and their queue live. Upstream: ingest, runtime, admin.

spool    object files: incoming/ -> objects/, fsynced
queue    the Queue protocol, its states and records (every backend implements it)
sqlite   the embedded backend: one SQLite database in the data folder
"""

from __future__ import annotations

from pathlib import Path

from soupflow.store.queue import Queue
from soupflow.store.sqlite import DATABASE_FILE, SqliteQueue


class NoDataError(Exception):
    """The data folder has no queue: nothing was ever received there."""


def open_queue(data: Path, *, create: bool = True, read_only: bool = False) -> Queue:
    """The queue of a data folder (the one place a backend is chosen). Without `create`, a
    folder that has no queue yet is a NoDataError rather than a new, empty queue;
    `read_only` opens it for reading only (it works on a full disk)."""
    if (not create or read_only) and not (data / DATABASE_FILE).is_file():
        raise NoDataError(
            f"no queue in {data}: start `soupflow run --data {data}` first, or pass --data"
        )
    return SqliteQueue(data, read_only=read_only)
