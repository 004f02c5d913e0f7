"""Fixtures that own what tests start: a `soupflow run` left behind by a failed test (or a
failed start) is killed here, so it never holds its ports into the next test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.postgres import PostgresCluster, UnavailableError
from tests import reactor
from tests.certs import Pki
from tests.dicom import RuntimeProcess, unavailable

reactor.install()  # pynetdicom's SCU without its reactor race (tests/reactor.py)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the log of each runtime it started (a live one's
    thread stacks first): a failure seen only in CI can be read from CI's output."""
    report = yield
    if call.when == "call" and report.failed:
        for number, runtime in enumerate(RuntimeProcess.started, 1):
            report.sections.append(
                (f"soupflow run {number} (pid {runtime.process.pid})", runtime.last_words())
            )
    return report


@pytest.fixture(autouse=True)
def _no_runtime_left_behind() -> Iterator[None]:
    yield
    while RuntimeProcess.started:
        RuntimeProcess.started.pop().kill()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA with a server and a client certificate, and a stranger from another CA."""
    return Pki(tmp_path / "pki")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the whole run (per test worker)."""
    try:
        cluster = PostgresCluster()
    except UnavailableError as exc:
        unavailable(str(exc))
    yield cluster
    cluster.close()
