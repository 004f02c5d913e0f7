"""A real PostgreSQL server for tests and benchmarks: a throwaway cluster of Debian's
PostgreSQL in a temporary folder, on a free loopback port, with a password of its own.

It is what `pg_virtualenv` makes, made here instead because pg_virtualenv run as root keeps
its cluster in the one system-wide place (`/etc/postgresql/<version>/regress`), so two of
them (parallel test workers, a benchmark beside the tests) cannot run at once. As root the
server runs as the `postgres` user, as Debian's own scripts do. Each user of the cluster
gets a schema of its own (`database`), so they never see each other's tables. Like
pg_virtualenv, it turns fsync off unless `settings` say otherwise (`fsync=on`, for
benchmarks that compare durable commits).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

import psycopg

from bench.ingest import free_port

_START_SECONDS = 60


class UnavailableError(Exception):
    """PostgreSQL cannot be started here (the reason says why)."""


def _binaries() -> Path:
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise UnavailableError(
            "PostgreSQL is not installed (make test installs postgresql as root)"
        )
    return versions[-1]


class PostgresCluster:
    def __init__(self, *settings: str) -> None:
        binaries = _binaries()
        self._as: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise UnavailableError("runuser is missing: cannot run PostgreSQL as postgres")
            self._as = [runuser, "-u", "postgres", "--"]
        self.folder = Path(tempfile.mkdtemp(prefix="soupflow-postgres-"))
        self.data = self.folder / "data"
        password = secrets.token_hex(16)
        password_file = self.folder / "password"
        password_file.write_text(password)
        if self._as:
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        self._run(
            binaries / "initdb",
            "-D", str(self.data),
            "-U", "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--no-sync",
        )  # fmt: skip
        port = free_port()
        options = " ".join(
            f"-c {setting}"
            for setting in (
                "fsync=off",
                "listen_addresses=127.0.0.1",
                f"port={port}",
                f"unix_socket_directories={self.folder}",
                "max_connections=200",
                *settings,
            )
        )
        self._pg_ctl, self._options = binaries / "pg_ctl", options
        self.start()
        self.url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"

    def start(self) -> None:
        self._run(
            self._pg_ctl,
            "-D", str(self.data),
            "-l", str(self.folder / "server.log"),
            "-o", self._options,
            "-w", "-t", str(_START_SECONDS),
            "start",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server at once (its clients' connections break), keeping its data."""
        self._run(self._pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def _run(self, program: Path, *arguments: str) -> None:
        result = subprocess.run(
            [*self._as, str(program), *arguments],
            capture_output=True,
            text=True,
            timeout=_START_SECONDS + 30,
            check=False,
        )
        if result.returncode != 0:
            log = self.folder / "server.log"
            detail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise RuntimeError(
                f"{program.name} failed ({result.returncode}): {result.stderr[-800:]}{detail}"
            )

    def database(self) -> str:
        """A URL whose tables live in a new, empty schema."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}".encode())
        return f"{self.url}?options={quote(f'-csearch_path={schema}')}"

    def execute(self, url: str, sql: str) -> None:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(sql.encode())

    def close(self) -> None:
        """Stop the server at once and delete its folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
