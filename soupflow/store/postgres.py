"""The PostgreSQL queue backend: one queue shared by several soupflow nodes.

Upstream: store.open_queue (`soupflow run --queue postgresql://...`). The verbs and their
statements are the SQLite backend's (`store.sql`); what is PostgreSQL's own:

- connections come from a psycopg pool; every change is one transaction. A connection the
  server dropped (a restart, a failover) fails the one statement that meets it and is
  replaced (the caller's usual retry applies: a sender hears a failure status, a worker
  tries again); checking each connection before use would cost a round trip per commit;
- a lease is `UPDATE ... WHERE request_id = (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`:
  concurrent workers on any node skip each other's rows and never share a message;
- a transaction that makes messages ready sends `NOTIFY soupflow_queued`; `watch` listens
  on its own connection and wakes idle workers (they still poll, should it drop);
- the schema is created and migrated under a transaction-level advisory lock, so nodes that
  start together do not race; its version is kept in `soupflow_schema`;
- an acknowledgement must be durable: a server with `synchronous_commit = off` is refused.
  Leases and renewals (losing one costs a message run again) commit with
  `synchronous_commit = off` for themselves only.

Tables live in the connection's schema (`search_path`): `?options=-csearch_path%3Dname` in
the URL puts them in a schema of their own.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from soupflow.store.queue import Message, QueueError, State
from soupflow.store.sql import ROW_WINDOW_START, Connection, Cursor, Row, SqlQueue, execute_script

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHANNEL = "soupflow_queued"
_MIGRATION_LOCK = 0x50F7F10  # pg_advisory_xact_lock key: one migrating node at a time
_CONNECT_SECONDS = 10.0
_LEASE_TRIES = 5
_ANY_READY = "SELECT 1 FROM messages WHERE state = ? AND next_attempt_at <= ? LIMIT 1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    request_id text PRIMARY KEY,
    workflow_id text NOT NULL,
    object_path text NOT NULL,
    byte_count bigint NOT NULL,
    sop_class_uid text NOT NULL,
    sop_instance_uid text NOT NULL,
    transfer_syntax_uid text NOT NULL,
    calling_aet text NOT NULL,
    called_aet text NOT NULL,
    peer_address text NOT NULL,
    peer_port integer NOT NULL,
    client_cert_sha256 text NOT NULL DEFAULT '',
    client_cert_subject text NOT NULL DEFAULT '',
    transport text NOT NULL DEFAULT '',
    details text NOT NULL DEFAULT '',
    received_at double precision NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    lease_expiries integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    lease_owner text,
    lease_expires_at double precision,
    reason text,
    failed_activity text,
    updated_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (state, next_attempt_at, received_at);
CREATE INDEX IF NOT EXISTS messages_workflow ON messages (workflow_id, state);
CREATE INDEX IF NOT EXISTS messages_instance ON messages (workflow_id, sop_instance_uid, received_at);
CREATE INDEX IF NOT EXISTS messages_finished ON messages (state, updated_at);
CREATE TABLE IF NOT EXISTS activity_outcomes (
    request_id text NOT NULL,
    activity_id text NOT NULL,
    succeeded integer NOT NULL,
    detail text NOT NULL,
    at double precision NOT NULL,
    PRIMARY KEY (request_id, activity_id)
);
CREATE TABLE IF NOT EXISTS duplicates (
    workflow_id text PRIMARY KEY,
    count bigint NOT NULL,
    last_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    workflow_id text NOT NULL,
    delivery_id text NOT NULL,
    sop_instance_uid text NOT NULL,
    sha256 text NOT NULL,
    request_id text NOT NULL,
    PRIMARY KEY (workflow_id, delivery_id, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_request ON deliveries (request_id)
"""
# Each step takes the schema from version N - 1 to N (index 0: from 1 to 2).
_MIGRATIONS: tuple[str, ...] = ()


def is_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def describe(url: str) -> str:
    """The server and database of a URL, without its password (for logs and errors)."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "PostgreSQL (an unreadable URL)"
    host = parts.get("host") or "localhost"
    return f"PostgreSQL {host}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"


@functools.lru_cache(maxsize=256)
def _dialect(sql: str) -> str:
    return sql.replace("?", "%s")


class _Connection:
    """A psycopg connection with the `?` placeholders `store.sql` writes."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self.connection.execute(_dialect(sql), parameters)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(_dialect(sql), rows)


class PostgresQueue(SqlQueue):
    _LEASE_LOCK = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self, url: str, *, read_only: bool = False, create: bool = True, pool_size: int = 12
    ) -> None:
        """The queue in the database at `url`. `read_only` (operators' reads) and not
        `create` never make the tables: a database without them is a QueueError."""
        super().__init__()
        self.url = url
        self._where = describe(url)
        self._wakers: list[Callable[[], None]] = []
        self._closing = threading.Event()
        self._listener: threading.Thread | None = None
        try:
            with psycopg.connect(
                url, autocommit=True, row_factory=dict_row, connect_timeout=int(_CONNECT_SECONDS)
            ) as connection:
                self._check_durable(connection, warn=create and not read_only)
                if read_only or not create:
                    self._check_version(connection)
                else:
                    self._migrate(connection)
            self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                kwargs={
                    "autocommit": True,
                    "row_factory": dict_row,
                    "connect_timeout": int(_CONNECT_SECONDS / 2),
                },
                name="soupflow-queue",
                open=False,
                timeout=_CONNECT_SECONDS / 2,  # a server that is down fails a store in seconds
            )
            self._pool.open(wait=True, timeout=_CONNECT_SECONDS)
        except psycopg.Error as exc:
            raise QueueError(f"cannot open the queue in {self._where}: {_first_line(exc)}") from exc

    def __str__(self) -> str:
        return self._where

    # ------------------------------------------------------------------------- opening
    def _check_durable(self, connection: psycopg.Connection[Any], warn: bool) -> None:
        setting = connection.execute("SHOW synchronous_commit").fetchone()
        if setting is not None and setting["synchronous_commit"] == "off":
            raise QueueError(
                f"{self._where} has synchronous_commit = off: a committed enqueue could be "
                "lost in a crash after the sender heard Success. Set synchronous_commit to on "
                "(for this database: ALTER DATABASE ... SET synchronous_commit = on)"
            )
        fsync = connection.execute("SHOW fsync").fetchone()
        if warn and fsync is not None and fsync["fsync"] == "off":
            log.warning("%s has fsync = off: a power loss can lose what was acknowledged", self)

    def _check_version(self, connection: psycopg.Connection[Any]) -> None:
        found = connection.execute("SELECT to_regclass('soupflow_schema') AS t").fetchone()
        if found is None or found["t"] is None:
            raise QueueError(
                f"no soupflow queue in {self._where}: start `soupflow run --queue ...` first"
            )
        self._refuse_newer(_version(connection))

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"the queue in {self._where} has schema version {version}, written by a newer "
                f"soupflow; this one reads up to version {SCHEMA_VERSION}: upgrade soupflow "
                "on every node"
            )

    def _migrate(self, connection: psycopg.Connection[Any]) -> None:
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            connection.execute("CREATE TABLE IF NOT EXISTS soupflow_schema (version integer)")
            version = _version(connection)
            self._refuse_newer(version)
            db = _Connection(connection)
            if version == 0:
                execute_script(db, _SCHEMA)
                connection.execute("INSERT INTO soupflow_schema (version) VALUES (1)")
                version = 1
            for script in _MIGRATIONS[version - 1 :]:
                execute_script(db, script)
            connection.execute("UPDATE soupflow_schema SET version = %s", (SCHEMA_VERSION,))

    @property
    def schema_version(self) -> int:
        with self._connection() as connection:
            return _version(connection)

    # ------------------------------------------------------------------------ plumbing
    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as connection:
                yield connection
        except psycopg.Error as exc:
            raise QueueError(f"queue in {self._where}: {_first_line(exc)}") from exc

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[Connection]:
        with self._connection() as connection, connection.transaction():
            if not durable:
                connection.execute("SET LOCAL synchronous_commit = off")
            yield _Connection(connection)

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Row]:
        with self._connection() as connection:
            return connection.execute(_dialect(sql), parameters).fetchall()

    def lease(self, owner: str, now: float, lease_seconds: float) -> Message | None:
        """As SQLite's, with one caveat of PostgreSQL's own: a `LIMIT 1 ... FOR UPDATE`
        that meets a row another transaction just took returns nothing rather than the next
        row (READ COMMITTED re-checks the row it locked). So an empty answer is asked again,
        a bounded number of times, while ready rows remain."""
        for _ in range(_LEASE_TRIES):
            message = super().lease(owner, now, lease_seconds)
            if message is not None or not self._read(_ANY_READY, (State.QUEUED.value, now)):
                return message
        return None

    def _insert(self, db: Connection, row: tuple[Any, ...]) -> bool:
        """With a deduplication window, two nodes receiving one instance at the same moment
        would each see no earlier arrival (READ COMMITTED): a transaction-level advisory
        lock on (workflow, SOPInstanceUID) makes the second wait for the first and see it."""
        if row[ROW_WINDOW_START] != float("inf"):
            db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"{row[1]}\n{row[5]}",))
        return super()._insert(db, row)

    def _queued(self, db: Connection) -> None:
        db.execute(f"NOTIFY {CHANNEL}")

    def watch(self, wake: Callable[[], None]) -> bool:
        self._wakers.append(wake)
        if self._listener is None:
            self._listener = threading.Thread(
                target=self._listen, name="soupflow-queue-notify", daemon=True
            )
            self._listener.start()
        return True

    def _listen(self) -> None:
        """LISTEN on a connection of its own; reconnect (every 2 s) when it drops."""
        while not self._closing.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=int(_CONNECT_SECONDS)
                ) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    while not self._closing.is_set():
                        for _ in connection.notifies(timeout=1.0):
                            for wake in self._wakers:
                                wake()
            except psycopg.Error as exc:
                log.warning(
                    "no queue notifications from %s (workers poll meanwhile): %s",
                    self,
                    _first_line(exc),
                )
                self._closing.wait(2.0)

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._pool.close()


def _version(connection: psycopg.Connection[Any]) -> int:
    row = connection.execute("SELECT max(version) AS version FROM soupflow_schema").fetchone()
    return int(row["version"]) if row is not None and row["version"] is not None else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
