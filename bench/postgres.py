"""A real PostgreSQL server for tests and benchmarks: Debian's `pg_virtualenv` makes a
throwaway cluster (its own port, its own password) that lives as long as the command it
runs; here that command waits on its standard input, so the cluster lives until `close`.
Each user gets a schema of its own in it (`database`), so they never see each other's
tables. pg_virtualenv turns fsync off; `settings` (such as `fsync=on`, for benchmarks that
compare durable commits) are passed to the cluster."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
import uuid
from urllib.parse import quote

import psycopg

_START_SECONDS = 60.0
# The command pg_virtualenv runs: print where the cluster is, then wait for stdin to close.
_REPORT = 'echo "postgresql://$PGUSER:$PGPASSWORD@$PGHOST:$PGPORT/$PGDATABASE"; exec cat >/dev/null'


class UnavailableError(Exception):
    """PostgreSQL cannot be started here (the reason says why)."""


class PostgresCluster:
    def __init__(self, *settings: str) -> None:
        program = shutil.which("pg_virtualenv")
        if program is None:
            raise UnavailableError(
                "PostgreSQL is not installed (make test installs postgresql as root)"
            )
        if os.geteuid() != 0 and shutil.which("pg_ctlcluster") is None:
            raise UnavailableError("pg_virtualenv needs root or postgresql-common here")
        options = [part for setting in settings for part in ("-o", setting)]
        self.process = subprocess.Popen(
            [program, *options, "sh", "-c", _REPORT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.url = self._read_url()

    def _read_url(self) -> str:
        """The URL line among what pg_virtualenv prints first (bounded in lines and time)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + _START_SECONDS
        seen: list[str] = []
        for _ in range(100):
            ready, _, _ = select.select(
                [self.process.stdout], [], [], max(deadline - time.monotonic(), 0)
            )
            line = self.process.stdout.readline().strip() if ready else ""
            if line.startswith("postgresql://"):
                return line
            if not line:
                break
            seen.append(line)
        self.close()
        raise RuntimeError(f"pg_virtualenv did not start a cluster: {seen[-3:]!r}")

    def database(self) -> str:
        """A URL whose tables live in a new, empty schema."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")
        return f"{self.url}?options={quote(f'-csearch_path={schema}')}"

    def execute(self, url: str, sql: str) -> None:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(sql.encode())

    def close(self) -> None:
        """Stop the cluster: its command reads end of file, pg_virtualenv drops it."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
