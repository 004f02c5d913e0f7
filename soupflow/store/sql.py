"""What the SQL backends share: the columns, the statements, the group commit, the verbs.

Upstream: store.sqlite, store.postgres. Every statement here is written once, with `?`
placeholders, in the SQL that SQLite and PostgreSQL both accept; a backend supplies its
connections (`_write`, `_read`), its schema and migrations, and the clause that makes a
lease skip rows another transaction holds (`_LEASE_LOCK`: PostgreSQL's `FOR UPDATE SKIP
LOCKED`; SQLite needs none, its writers are serialised).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar, cast

from soupflow.store.queue import (
    FINAL_STATES,
    MAX_LEASE_EXPIRIES,
    ActivityOutcome,
    Arrival,
    Delivery,
    Flow,
    LeaseLostError,
    Message,
    Origin,
    QueueError,
    State,
    WorkflowCounts,
)

ARRIVAL_COLUMNS = (
    "request_id",
    "workflow_id",
    "object_path",
    "byte_count",
    "sop_class_uid",
    "sop_instance_uid",
    "transfer_syntax_uid",
    "received_at",
)
ORIGIN_COLUMNS = (
    "calling_aet",
    "called_aet",
    "peer_address",
    "peer_port",
    "client_cert_sha256",
    "client_cert_subject",
    "transport",
    "details",
)
_COLUMNS = (*ARRIVAL_COLUMNS, *ORIGIN_COLUMNS)
_FINISHED = tuple(sorted(state.value for state in FINAL_STATES))
# An arrival row: the columns, state, next_attempt_at, updated_at, then the deduplication
# check's workflow, SOPInstanceUID and window start (inf: no window).
ROW_WINDOW_START = len(_COLUMNS) + 5
_INSERT_ARRIVAL = (
    f"INSERT INTO messages ({', '.join(_COLUMNS)}, state, next_attempt_at, updated_at) "
    f"SELECT {', '.join('?' for _ in _COLUMNS)}, ?, ?, ? WHERE NOT EXISTS ("
    "SELECT 1 FROM messages WHERE workflow_id = ? AND sop_instance_uid = ? AND received_at >= ?)"
)
_COUNT_DUPLICATE = (
    "INSERT INTO duplicates (workflow_id, count, last_at) VALUES (?, 1, ?) "
    "ON CONFLICT (workflow_id) DO UPDATE SET count = duplicates.count + 1, "
    "last_at = excluded.last_at"
)
_RECORD_OUTCOME = (
    "INSERT INTO activity_outcomes (request_id, activity_id, succeeded, detail, at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (request_id, activity_id) DO UPDATE SET "
    "succeeded = excluded.succeeded, detail = excluded.detail, at = excluded.at"
)
LEASES_EXPIRED_REASON = (
    f"its worker was lost {MAX_LEASE_EXPIRIES} times while processing it (it stopped or hung: "
    "a step that crashes or never returns?)"
)
Row = Mapping[str, Any]
_T = TypeVar("_T")


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the verbs need of a connection inside a transaction (sqlite3's own shape)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> Any: ...


class _Batch:
    """Changes committed together by one transaction (one fsync for all of them)."""

    def __init__(self) -> None:
        self.changes: list[Callable[[Connection], object]] = []
        self.done = threading.Event()
        self.results: dict[int, object] = {}  # by change index
        self.errors: dict[int, QueueError] = {}


class SqlQueue:
    """The queue's verbs over a SQL database; subclasses provide the connections."""

    _LEASE_LOCK = ""

    def __init__(self) -> None:
        self._batch_lock = threading.Lock()
        self._committer = threading.Lock()
        self._open_batch: _Batch | None = None

    # ----------------------------------------------------------- what a backend provides
    def _write(self, durable: bool = True) -> AbstractContextManager[Connection]:
        """One write transaction. Without `durable` its commit need not reach the disk before
        it returns: for changes a crash may lose without harm (a lost lease is a message run
        again)."""
        raise NotImplementedError

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Row]:
        raise NotImplementedError

    def _insert(self, db: Connection, row: tuple[Any, ...]) -> bool:
        """Insert one arrival row (`_insert`); a backend shared by several processes first
        serialises the arrivals of one instance that a deduplication window compares."""
        return _insert(db, row)

    def _queued(self, db: Connection) -> None:
        """Called in a transaction that made messages ready: a backend shared by several
        processes tells them (PostgreSQL: NOTIFY)."""

    def watch(self, wake: Callable[[], None]) -> bool:
        """Call `wake` when another process made a message ready, where the backend can tell
        (SQLite cannot: its workers poll)."""
        return False

    # ---------------------------------------------------------------------------- queue
    @staticmethod
    def _message(row: Row) -> Message:
        origin = Origin(**{name: row[name] for name in ORIGIN_COLUMNS})
        return Message(
            arrival=Arrival(**{name: row[name] for name in ARRIVAL_COLUMNS}, origin=origin),
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
    def _require_lease(db: Connection, request_id: str, owner: str) -> None:
        row = db.execute(
            "SELECT state, lease_owner FROM messages WHERE request_id = ?", (request_id,)
        ).fetchone()
        if row is None or row["state"] != State.PROCESSING or row["lease_owner"] != owner:
            raise LeaseLostError(f"message {request_id} is not leased by {owner}")

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
        return str(rows[0]["sha256"]) if rows else None

    def enqueue(
        self, arrival: Arrival, dedupe_seconds: float = 0, delivery: Delivery | None = None
    ) -> bool:
        """Commit the arrival (group-committed: `_together`); returns once it is durable.
        The duplicate check runs in the same transaction."""
        values = tuple(getattr(arrival, name) for name in ARRIVAL_COLUMNS)
        origin = tuple(getattr(arrival.origin, name) for name in ORIGIN_COLUMNS)
        window_start = arrival.received_at - dedupe_seconds if dedupe_seconds > 0 else float("inf")
        row = (
            *values,
            *origin,
            State.QUEUED.value,
            arrival.received_at,
            arrival.received_at,
            arrival.workflow_id,
            arrival.sop_instance_uid,
            window_start,
        )
        if delivery is not None:  # the delivery row, written after its message
            row = (*row, (delivery.delivery_id, delivery.sha256))

        def insert(db: Connection) -> bool:
            inserted = self._insert(db, row)
            self._queued(db)
            return inserted

        return self._together(insert)

    def _together(self, change: Callable[[Connection], _T]) -> _T:
        """Run `change` in a durable transaction; returns once it is committed.

        Group commit: the changes that come while a transaction is committing (arrivals from
        concurrent associations, the workers' finishes) join one batch, written by whichever
        of them came first in a single transaction: one fsync for all. Each caller still
        returns only after its own change is committed; when a batch fails, its changes are
        tried one by one, so one bad change (a lost lease, a bad row) fails only its own
        caller."""
        with self._batch_lock:
            batch, leader = self._open_batch, self._open_batch is None
            if batch is None:
                batch = self._open_batch = _Batch()
            index = len(batch.changes)
            batch.changes.append(change)
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
        return cast(_T, batch.results[index])

    def _commit(self, batch: _Batch) -> None:
        try:
            with self._write() as db:
                results = {index: change(db) for index, change in enumerate(batch.changes)}
            batch.results = results
            return
        except QueueError as exc:
            if len(batch.changes) == 1:
                batch.errors[0] = exc
                return
        for index, change in enumerate(batch.changes):
            try:
                with self._write() as db:
                    batch.results[index] = change(db)
            except QueueError as exc:
                batch.errors[index] = exc

    def lease(self, owner: str, now: float, lease_seconds: float) -> Message | None:
        with self._write(durable=False) as db:
            row = db.execute(
                "UPDATE messages SET state = ?, lease_owner = ?, lease_expires_at = ?, "
                "updated_at = ? WHERE request_id = ("
                "SELECT request_id FROM messages WHERE state = ? AND next_attempt_at <= ? "
                f"ORDER BY next_attempt_at, received_at LIMIT 1{self._LEASE_LOCK}) RETURNING *",
                (State.PROCESSING.value, owner, now + lease_seconds, now, State.QUEUED.value, now),
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
        def record(db: Connection) -> None:
            self._require_lease(db, request_id, owner)
            _record(db, request_id, (outcome,))

        self._together(record)

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
        if state not in FINAL_STATES:
            raise ValueError(f"an attempt cannot finish as {state}")

        def finished(db: Connection) -> None:
            self._require_lease(db, request_id, owner)
            _record(db, request_id, outcomes)
            db.execute(
                "UPDATE messages SET state = ?, attempts = attempts + 1, lease_owner = NULL, "
                "lease_expires_at = NULL, reason = ?, failed_activity = ?, updated_at = ? "
                "WHERE request_id = ?",
                (state.value, reason, failed_activity, now, request_id),
            )

        self._together(finished)

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

        def again(db: Connection) -> None:
            self._require_lease(db, request_id, owner)
            _record(db, request_id, outcomes)
            db.execute(
                "UPDATE messages SET state = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "lease_owner = NULL, lease_expires_at = NULL, reason = ?, failed_activity = ?, "
                "updated_at = ? WHERE request_id = ?",
                (State.QUEUED.value, next_attempt_at, reason, failed_activity, now, request_id),
            )

        self._together(again)

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
                    State.DEAD.value,
                    State.QUEUED.value,
                    MAX_LEASE_EXPIRIES,
                    LEASES_EXPIRED_REASON,
                    now,
                    State.PROCESSING.value,
                    *parameters,
                ),
            ).fetchall()
            if rows:
                self._queued(db)
            return [self._message(row) for row in rows]

    # ---------------------------------------------------------------------- operators
    def get(self, request_id: str) -> Message | None:
        rows = self._read("SELECT * FROM messages WHERE request_id = ?", (request_id,))
        return self._message(rows[0]) if rows else None

    def existing(self, request_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(request_ids), 500):
            chunk = request_ids[start : start + 500]
            rows = self._read(
                f"SELECT request_id FROM messages WHERE request_id IN ({_marks(chunk)})",
                tuple(chunk),
            )
            found.update(str(row["request_id"]) for row in rows)
        return found

    def messages(
        self, state: State | None = None, workflow_id: str | None = None, limit: int = 1000
    ) -> list[Message]:
        where, parameters = _where(state, workflow_id, None)
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

    def flow(self, now: float, since: float) -> dict[str, Flow]:
        ready = self._read(
            "SELECT workflow_id, COUNT(*) AS n FROM messages WHERE state = ? "
            "AND next_attempt_at <= ? GROUP BY workflow_id",
            (State.QUEUED.value, now),
        )
        finished = self._read(
            "SELECT workflow_id, COUNT(*) AS n FROM messages WHERE state IN (?, ?, ?) "
            "AND updated_at >= ? GROUP BY workflow_id",
            (*_FINISHED, since),
        )
        due = {row["workflow_id"]: int(row["n"]) for row in ready}
        done = {row["workflow_id"]: int(row["n"]) for row in finished}
        return {w: Flow(due.get(w, 0), done.get(w, 0)) for w in sorted(due.keys() | done.keys())}

    def revive(self, request_ids: list[str] | None, workflow_id: str | None, now: float) -> int:
        where, parameters = _where(State.DEAD, workflow_id, request_ids)
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE messages SET state = ?, attempts = 0, lease_expiries = 0, "
                f"next_attempt_at = ?, reason = NULL, failed_activity = NULL, updated_at = ? {where}",
                (State.QUEUED.value, now, now, *parameters),
            )
            if cursor.rowcount:
                self._queued(db)
            return cursor.rowcount

    def purge(self, request_ids: list[str] | None, workflow_id: str | None) -> list[Message]:
        where, parameters = _where(State.DEAD, workflow_id, request_ids)
        with self._write() as db:
            rows = db.execute(f"DELETE FROM messages {where} RETURNING *", parameters).fetchall()
            doomed = sorted((self._message(row) for row in rows), key=_received)
            _forget(db, [message.request_id for message in doomed])
            return doomed

    def purge_finished(self, before: float, limit: int = 10_000) -> int:
        with self._write() as db:
            rows = db.execute(
                "DELETE FROM messages WHERE request_id IN (SELECT request_id FROM messages "
                "WHERE state IN (?, ?) AND updated_at < ? LIMIT ?) RETURNING request_id",
                (State.COMPLETED.value, State.FILTERED.value, before, limit),
            ).fetchall()
            _forget(db, [row["request_id"] for row in rows])
            return len(rows)


def _received(message: Message) -> float:
    return message.arrival.received_at


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


def _where(
    state: State | None, workflow_id: str | None, request_ids: list[str] | None
) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    parameters: list[Any] = []
    if state is not None:
        clauses.append("state = ?")
        parameters.append(state.value)
    if workflow_id is not None:
        clauses.append("workflow_id = ?")
        parameters.append(workflow_id)
    if request_ids is not None:
        clauses.append(f"request_id IN ({_marks(request_ids)})" if request_ids else "1 = 0")
        parameters.extend(request_ids)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(parameters)


def _forget(db: Connection, request_ids: list[str]) -> None:
    """Delete what belongs to messages that were deleted."""
    for start in range(0, len(request_ids), 500):
        chunk = tuple(request_ids[start : start + 500])
        for table in ("activity_outcomes", "deliveries"):
            db.execute(f"DELETE FROM {table} WHERE request_id IN ({_marks(chunk)})", chunk)


def execute_script(db: Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _insert(db: Connection, row: tuple[Any, ...]) -> bool:
    """Insert one arrival row (and its delivery, when it has one); False (and counted) when
    it is a duplicate in its window."""
    delivery = None
    if len(row) > len(_COLUMNS) + 6:
        *fields, delivery = row
        row = tuple(fields)
    if db.execute(_INSERT_ARRIVAL, row).rowcount:
        if delivery is not None:
            db.execute(
                "INSERT INTO deliveries (workflow_id, delivery_id, sop_instance_uid, sha256, "
                "request_id) VALUES (?, ?, ?, ?, ?)",
                (row[1], delivery[0], row[5], delivery[1], row[0]),
            )
        return True
    workflow_id, received_at = row[1], row[7]
    db.execute(_COUNT_DUPLICATE, (workflow_id, received_at))
    return False


def _record(db: Connection, request_id: str, outcomes: tuple[ActivityOutcome, ...]) -> None:
    if outcomes:
        db.executemany(
            _RECORD_OUTCOME,
            [(request_id, o.activity_id, int(o.succeeded), o.detail, o.at) for o in outcomes],
        )
