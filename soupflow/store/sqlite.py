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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from soupflow.store.queue import (
    MAX_LEASE_EXPIRIES,
    ActivityOutcome,
    Arrival,
    Delivery,
    LeaseLostError,
    Message,
    Origin,
    QueueError,
    State,
    WorkflowCounts,
)

DATABASE_FILE = "queue.sqlite3"
SCHEMA_VERSION = 3
_ARRIVAL_COLUMNS = (
    "request_id",
    "workflow_id",
    "object_path",
    "byte_count",
    "sop_class_uid",
    "sop_instance_uid",
    "transfer_syntax_uid",
    "received_at",
)
_ORIGIN_COLUMNS = (
    "calling_aet",
    "called_aet",
    "peer_address",
    "peer_port",
    "client_cert_sha256",
    "client_cert_subject",
    "transport",
    "details",
)
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
)

_COLUMNS = (*_ARRIVAL_COLUMNS, *_ORIGIN_COLUMNS)
_INSERT_ARRIVAL = (
    f"INSERT INTO messages ({', '.join(_COLUMNS)}, state, next_attempt_at, updated_at) "
    f"SELECT {', '.join('?' for _ in _COLUMNS)}, ?, ?, ? WHERE NOT EXISTS ("
    "SELECT 1 FROM messages WHERE workflow_id = ? AND sop_instance_uid = ? AND received_at >= ?)"
)
_COUNT_DUPLICATE = (
    "INSERT INTO duplicates (workflow_id, count, last_at) VALUES (?, 1, ?) "
    "ON CONFLICT (workflow_id) DO UPDATE SET count = count + 1, last_at = excluded.last_at"
)


class _Batch:
    """Arrivals committed together by one transaction."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.done = threading.Event()
        self.errors: dict[int, QueueError] = {}  # by row index
        self.duplicates: set[int] = set()  # rows not inserted: a duplicate within the window


class SqliteQueue:
    def __init__(
        self, data_folder: Path, busy_timeout_seconds: float = 5.0, *, read_only: bool = False
    ) -> None:
        """The queue in `data_folder`. `read_only` (operators' reads): no write at all, and
        when even a reader's shared-memory file cannot be made (a full disk) the database is
        read as it is on disk, so `status` still answers."""
        self.path = data_folder / DATABASE_FILE
        self._lock = threading.Lock()
        self._batch_lock = threading.Lock()
        self._committer = threading.Lock()
        self._open_batch: _Batch | None = None
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

    def _migrate(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"the queue database {self.path} has schema version {version}, written by a "
                f"newer soupflow; this one reads up to version {SCHEMA_VERSION}: upgrade "
                "soupflow, or use another --data folder"
            )
        if version == 0:  # a new database: the first schema, then every migration
            _execute_script(db, _SCHEMA)
            version = 1
        for script in _MIGRATIONS[version - 1 :]:
            _execute_script(db, script)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    # ------------------------------------------------------------------------- plumbing
    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. Without `durable` its commit is not fsynced: for changes a
        crash may lose without harm (a lease lost is a message run again), which the next
        durable commit makes durable anyway (the WAL is fsynced as a whole)."""
        with self._lock:
            try:
                if not durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
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

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise QueueError(f"queue database {self.path}: {exc}") from exc

    @staticmethod
    def _message(row: sqlite3.Row) -> Message:
        origin = Origin(**{name: row[name] for name in _ORIGIN_COLUMNS})
        return Message(
            arrival=Arrival(**{name: row[name] for name in _ARRIVAL_COLUMNS}, origin=origin),
            state=State(row["state"]),
            attempts=row["attempts"],
            lease_expiries=row["lease_expiries"],
            next_attempt_at=row["next_attempt_at"],
            lease_owner=row["lease_owner"],
            lease_expires_at=row["lease_expires_at"],
            reason=row["reason"],
            failed_activity=row["failed_activity"],
            updated_at=row["updated_at"],
        )

    @staticmethod
    def _require_lease(db: sqlite3.Connection, request_id: str, owner: str) -> None:
        row = db.execute(
            "SELECT state, lease_owner FROM messages WHERE request_id = ?", (request_id,)
        ).fetchone()
        if row is None or row["state"] != State.PROCESSING or row["lease_owner"] != owner:
            raise LeaseLostError(f"message {request_id} is not leased by {owner}")

    # ---------------------------------------------------------------------------- queue
    def writable(self) -> str | None:
        try:
            with self._write(durable=False):
                pass
        except QueueError as exc:
            return str(exc)
        return None

    def delivered(self, workflow_id: str, delivery_id: str, sop_instance_uid: str) -> str | None:
        rows = self._read(
            "SELECT sha256 FROM deliveries WHERE workflow_id = ? AND delivery_id = ? "
            "AND sop_instance_uid = ?",
            (workflow_id, delivery_id, sop_instance_uid),
        )
        return str(rows[0][0]) if rows else None

    def enqueue(
        self, arrival: Arrival, dedupe_seconds: float = 0, delivery: Delivery | None = None
    ) -> bool:
        """Commit the arrival; returns once it is durable.

        Group commit: arrivals from concurrent associations that come while a transaction
        is committing join one batch, written by whichever of them came first in a single
        transaction (one WAL fsync for all). Each caller still returns only after its own
        row is committed; when a batch fails, its rows are tried one by one, so one bad
        row fails only its own caller. The duplicate check runs in the same transaction.
        """
        values = tuple(getattr(arrival, name) for name in _ARRIVAL_COLUMNS)
        origin = tuple(getattr(arrival.origin, name) for name in _ORIGIN_COLUMNS)
        window_start = arrival.received_at - dedupe_seconds if dedupe_seconds > 0 else float("inf")
        row = (
            *values,
            *origin,
            State.QUEUED,
            arrival.received_at,
            arrival.received_at,
            arrival.workflow_id,
            arrival.sop_instance_uid,
            window_start,
        )
        if delivery is not None:  # the delivery row, written after its message
            row = (*row, (delivery.delivery_id, delivery.sha256))
        with self._batch_lock:
            batch, leader = self._open_batch, self._open_batch is None
            if batch is None:
                batch = self._open_batch = _Batch()
            index = len(batch.rows)
            batch.rows.append(row)
        if leader:
            with self._committer:  # the previous batch commits; this one fills meanwhile
                with self._batch_lock:
                    self._open_batch = None
                try:
                    self._commit(batch)
                finally:
                    batch.done.set()
        else:
            batch.done.wait()
        error = batch.errors.get(index)
        if error is not None:
            raise error
        return index not in batch.duplicates

    def _commit(self, batch: _Batch) -> None:
        try:
            with self._write() as db:
                batch.duplicates = {
                    index for index, row in enumerate(batch.rows) if not _insert(db, row)
                }
            return
        except QueueError as exc:
            if len(batch.rows) == 1:
                batch.errors[0] = exc
                return
        for index, row in enumerate(batch.rows):
            try:
                with self._write() as db:
                    if not _insert(db, row):
                        batch.duplicates.add(index)
            except QueueError as exc:
                batch.errors[index] = exc

    def lease(self, owner: str, now: float, lease_seconds: float) -> Message | None:
        with self._write(durable=False) as db:
            row = db.execute(
                "UPDATE messages SET state = ?, lease_owner = ?, lease_expires_at = ?, "
                "updated_at = ? WHERE request_id = ("
                "SELECT request_id FROM messages WHERE state = ? AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, received_at LIMIT 1) RETURNING *",
                (State.PROCESSING, owner, now + lease_seconds, now, State.QUEUED, now),
            ).fetchone()
            return None if row is None else self._message(row)

    def renew(self, request_id: str, owner: str, now: float, lease_seconds: float) -> None:
        with self._write(durable=False) as db:
            self._require_lease(db, request_id, owner)
            db.execute(
                "UPDATE messages SET lease_expires_at = ?, updated_at = ? WHERE request_id = ?",
                (now + lease_seconds, now, request_id),
            )

    def record_activity(self, request_id: str, owner: str, outcome: ActivityOutcome) -> None:
        with self._write() as db:
            self._require_lease(db, request_id, owner)
            _record(db, request_id, (outcome,))

    def activity_outcomes(self, request_id: str) -> list[ActivityOutcome]:
        rows = self._read(
            "SELECT activity_id, succeeded, detail, at FROM activity_outcomes "
            "WHERE request_id = ? ORDER BY at",
            (request_id,),
        )
        return [
            ActivityOutcome(r["activity_id"], bool(r["succeeded"]), r["detail"], r["at"])
            for r in rows
        ]

    def finish(
        self,
        request_id: str,
        owner: str,
        state: State,
        now: float,
        reason: str | None = None,
        failed_activity: str | None = None,
        outcomes: tuple[ActivityOutcome, ...] = (),
    ) -> None:
        if state not in (State.COMPLETED, State.FILTERED, State.DEAD):
            raise ValueError(f"an attempt cannot finish as {state}")
        with self._write() as db:
            self._require_lease(db, request_id, owner)
            _record(db, request_id, outcomes)
            db.execute(
                "UPDATE messages SET state = ?, attempts = attempts + 1, lease_owner = NULL, "
                "lease_expires_at = NULL, reason = ?, failed_activity = ?, updated_at = ? "
                "WHERE request_id = ?",
                (state, reason, failed_activity, now, request_id),
            )

    def retry(
        self,
        request_id: str,
        owner: str,
        now: float,
        next_attempt_at: float,
        reason: str,
        failed_activity: str | None,
        outcomes: tuple[ActivityOutcome, ...] = (),
    ) -> None:
        with self._write() as db:
            self._require_lease(db, request_id, owner)
            _record(db, request_id, outcomes)
            db.execute(
                "UPDATE messages SET state = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "lease_owner = NULL, lease_expires_at = NULL, reason = ?, failed_activity = ?, "
                "updated_at = ? WHERE request_id = ?",
                (State.QUEUED, next_attempt_at, reason, failed_activity, now, request_id),
            )

    def expire_leases(self, now: float) -> list[Message]:
        return self._take_back("lease_expires_at < ?", (now,), now)

    def recover(self, node: str, now: float) -> list[Message]:
        prefix = f"{node}/"
        return self._take_back("substr(lease_owner, 1, ?) = ?", (len(prefix), prefix), now)

    def _take_back(self, where: str, parameters: tuple[Any, ...], now: float) -> list[Message]:
        """Leases whose worker is gone: queued again, or dead at the last allowed expiry."""
        with self._write() as db:
            rows = db.execute(
                "UPDATE messages SET lease_expiries = lease_expiries + 1, "
                "state = CASE WHEN lease_expiries + 1 >= ? THEN ? ELSE ? END, "
                "reason = CASE WHEN lease_expiries + 1 >= ? THEN ? ELSE reason END, "
                "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? "
                f"WHERE state = ? AND {where} RETURNING *",
                (
                    MAX_LEASE_EXPIRIES,
                    State.DEAD,
                    State.QUEUED,
                    MAX_LEASE_EXPIRIES,
                    LEASES_EXPIRED_REASON,
                    now,
                    State.PROCESSING,
                    *parameters,
                ),
            ).fetchall()
            return [self._message(row) for row in rows]

    # ---------------------------------------------------------------------- operators
    def get(self, request_id: str) -> Message | None:
        rows = self._read("SELECT * FROM messages WHERE request_id = ?", (request_id,))
        return self._message(rows[0]) if rows else None

    def messages(
        self, state: State | None = None, workflow_id: str | None = None, limit: int = 1000
    ) -> list[Message]:
        where, parameters = self._where(state, workflow_id, None)
        rows = self._read(
            f"SELECT * FROM messages {where} ORDER BY received_at LIMIT ?", (*parameters, limit)
        )
        return [self._message(row) for row in rows]

    def counts(self) -> list[WorkflowCounts]:
        rows = self._read(
            "SELECT workflow_id, state, COUNT(*) AS n, MIN(received_at) AS oldest "
            "FROM messages GROUP BY workflow_id, state ORDER BY workflow_id"
        )
        duplicates = {
            row["workflow_id"]: row["count"]
            for row in self._read("SELECT workflow_id, count FROM duplicates")
        }
        by_workflow: dict[str, dict[State, int]] = {w: {} for w in duplicates}
        oldest: dict[str, float | None] = dict.fromkeys(duplicates)
        for row in rows:
            by_workflow.setdefault(row["workflow_id"], {})[State(row["state"])] = row["n"]
            oldest.setdefault(row["workflow_id"], None)
            if row["state"] in (State.QUEUED, State.PROCESSING):
                current = oldest[row["workflow_id"]]
                oldest[row["workflow_id"]] = (
                    row["oldest"] if current is None else min(current, row["oldest"])
                )
        return [
            WorkflowCounts(w, states, oldest[w], duplicates.get(w, 0))
            for w, states in sorted(by_workflow.items())
        ]

    def revive(self, request_ids: list[str] | None, workflow_id: str | None, now: float) -> int:
        where, parameters = self._where(State.DEAD, workflow_id, request_ids)
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE messages SET state = ?, attempts = 0, lease_expiries = 0, "
                f"next_attempt_at = ?, reason = NULL, failed_activity = NULL, updated_at = ? {where}",
                (State.QUEUED, now, now, *parameters),
            )
            return cursor.rowcount

    def purge(self, request_ids: list[str] | None, workflow_id: str | None) -> list[Message]:
        where, parameters = self._where(State.DEAD, workflow_id, request_ids)
        with self._write() as db:
            rows = db.execute(f"SELECT * FROM messages {where}", parameters).fetchall()
            doomed = [self._message(row) for row in rows]
            for message in doomed:
                db.execute(
                    "DELETE FROM activity_outcomes WHERE request_id = ?", (message.request_id,)
                )
                db.execute("DELETE FROM messages WHERE request_id = ?", (message.request_id,))
            return doomed

    @staticmethod
    def _where(
        state: State | None, workflow_id: str | None, request_ids: list[str] | None
    ) -> tuple[str, tuple[Any, ...]]:
        clauses: list[str] = []
        parameters: list[Any] = []
        if state is not None:
            clauses.append("state = ?")
            parameters.append(state)
        if workflow_id is not None:
            clauses.append("workflow_id = ?")
            parameters.append(workflow_id)
        if request_ids is not None:
            clauses.append(f"request_id IN ({', '.join('?' for _ in request_ids)})")
            parameters.extend(request_ids)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(parameters)

    def close(self) -> None:
        with self._lock:
            self._db.close()


LEASES_EXPIRED_REASON = (
    f"its worker stopped or hung {MAX_LEASE_EXPIRIES} times while processing it "
    "(a step that crashes or never returns?)"
)


def _execute_script(db: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _insert(db: sqlite3.Connection, row: tuple[Any, ...]) -> bool:
    """Insert one arrival row (and its delivery, when it has one); False (and counted) when
    it is a duplicate in its window."""
    delivery = None
    if len(row) > len(_COLUMNS) + 6:
        *fields, delivery = row
        row = tuple(fields)
    if db.execute(_INSERT_ARRIVAL, row).rowcount:
        if delivery is not None:
            db.execute(
                "INSERT INTO deliveries VALUES (?, ?, ?, ?, ?)",
                (row[1], delivery[0], row[5], delivery[1], row[0]),
            )
        return True
    workflow_id, received_at = row[1], row[7]
    db.execute(_COUNT_DUPLICATE, (workflow_id, received_at))
    return False


def _record(db: sqlite3.Connection, request_id: str, outcomes: tuple[ActivityOutcome, ...]) -> None:
    db.executemany(
        "INSERT OR REPLACE INTO activity_outcomes VALUES (?, ?, ?, ?, ?)",
        [(request_id, o.activity_id, int(o.succeeded), o.detail, o.at) for o in outcomes],
    )


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
