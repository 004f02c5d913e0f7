"""The embedded queue backend: one SQLite database in WAL mode under the data folder.

Upstream: ingest, runtime.workers, admin. Every change is one transaction committed with
`synchronous=FULL`, so a committed enqueue survives a crash or power loss. One connection is
shared by the process's threads behind a lock; `BEGIN IMMEDIATE` keeps other processes (the
CLI's `dead retry`, other runtimes on the same folder) consistent with this one. A lease is
one `UPDATE ... RETURNING` statement, the shape a server database's `FOR UPDATE SKIP LOCKED`
takes too.

The schema carries its version (`PRAGMA user_version`): an older database is migrated at
open, a newer one (written by a later soupflow) is refused with a clear error.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from soupflow.store.queue import QueueError
from soupflow.store.sql import Connection, Row, SqlQueue, execute_script

DATABASE_FILE = "queue.sqlite3"
SCHEMA_VERSION = 4
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    request_id TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    object_path TEXT NOT NULL,
    byte_count INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    called_aet TEXT NOT NULL,
    peer_address TEXT NOT NULL,
    peer_port INTEGER NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires_at REAL,
    reason TEXT,
    failed_activity TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (request_id)
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS messages_workflow ON messages (workflow_id, state);
CREATE TABLE IF NOT EXISTS activity_outcomes (
    request_id TEXT NOT NULL,
    activity_id TEXT NOT NULL,
    succeeded INTEGER NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (request_id, activity_id)
);
"""
# Each step takes the schema from version N - 1 to N (index 0: from 1 to 2).
_MIGRATIONS = (
    """
ALTER TABLE messages ADD COLUMN lease_expiries INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS messages_instance ON messages (workflow_id, sop_instance_uid, received_at);
CREATE TABLE IF NOT EXISTS duplicates (
    workflow_id TEXT NOT NULL PRIMARY KEY,
    count INTEGER NOT NULL,
    last_at REAL NOT NULL
);
""",
    """
ALTER TABLE messages ADD COLUMN client_cert_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN client_cert_subject TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN transport TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN details TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS deliveries (
    workflow_id TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (workflow_id, delivery_id, sop_instance_uid)
);
""",
    """
CREATE INDEX IF NOT EXISTS messages_finished ON messages (state, updated_at);
""",
)


_FIRST_WAIT_SECONDS = 0.00005  # between tries for the write lock: then doubling, up to
_LONGEST_WAIT_SECONDS = 0.001


class SqliteQueue(SqlQueue):
    def __init__(
        self, data_folder: Path, busy_timeout_seconds: float = 5.0, *, read_only: bool = False
    ) -> None:
        """The queue in `data_folder`. `read_only` (operators' reads): no write at all, and
        when even a reader's shared-memory file cannot be made (a full disk) the database is
        read as it is on disk, so `status` still answers."""
        super().__init__()
        self.path = data_folder / DATABASE_FILE
        self._lock = threading.Lock()
        self._busy_timeout_seconds = busy_timeout_seconds
        try:
            if read_only:
                self._db = _read_only(self.path, busy_timeout_seconds)
            else:
                data_folder.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    self.path,
                    timeout=busy_timeout_seconds,
                    isolation_level=None,
                    check_same_thread=False,
                )
            self._db.row_factory = sqlite3.Row
            if read_only:
                (version,) = self._db.execute("PRAGMA user_version").fetchone()
                if version != SCHEMA_VERSION:
                    raise QueueError(
                        f"the queue database {self.path} has schema version {version}, this "
                        f"soupflow reads {SCHEMA_VERSION}: start `soupflow run` once to migrate it"
                    )
                return
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._write() as db:
                self._migrate(db)
        except (sqlite3.Error, OSError) as exc:
            raise QueueError(f"cannot open the queue database {self.path}: {exc}") from exc

    def __str__(self) -> str:
        return f"SQLite {self.path}"

    def _migrate(self, db: Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"the queue database {self.path} has schema version {version}, written by a "
                f"newer soupflow; this one reads up to version {SCHEMA_VERSION}: upgrade "
                "soupflow, or use another --data folder"
            )
        if version == 0:  # a new database: the first schema, then every migration
            execute_script(db, _SCHEMA)
            version = 1
        for script in _MIGRATIONS[version - 1 :]:
            execute_script(db, script)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0]["user_version"])

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[Connection]:
        """One write transaction. Without `durable` its commit is not fsynced; the next
        durable commit makes it durable anyway (the WAL is fsynced as a whole)."""
        with self._lock:
            try:
                if not durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")
                self._begin()
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                finally:
                    if not durable:
                        self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise QueueError(f"queue database {self.path}: {exc}") from exc

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, tried again every 50 us (doubling up to 1 ms) while another
        process writes. SQLite's own busy handler sleeps 1, 2, 5, 10 ms between tries: a
        C-STORE waiting behind a worker process's lease (0.1 ms) lost 1-3 ms each time."""
        self._db.execute("PRAGMA busy_timeout=0")
        try:
            deadline, wait = time.monotonic() + self._busy_timeout_seconds, _FIRST_WAIT_SECONDS
            while True:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                    if not busy or time.monotonic() >= deadline:
                        raise
                time.sleep(wait)
                wait = min(wait * 2, _LONGEST_WAIT_SECONDS)
        finally:
            self._db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_seconds * 1000)}")

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Row]:
        with self._lock:
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise QueueError(f"queue database {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _read_only(path: Path, busy_timeout_seconds: float) -> sqlite3.Connection:
    if not path.is_file():
        raise sqlite3.OperationalError("no such database")
    try:
        db = sqlite3.connect(
            f"{path.as_uri()}?mode=ro",
            uri=True,
            timeout=busy_timeout_seconds,
            isolation_level=None,
            check_same_thread=False,
        )
        db.execute("PRAGMA user_version").fetchone()
        return db
    except sqlite3.OperationalError:  # e.g. a full disk: no room for the -shm file
        return sqlite3.connect(
            f"{path.as_uri()}?immutable=1", uri=True, isolation_level=None, check_same_thread=False
        )
