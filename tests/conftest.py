"""Fixtures that own what tests start: a `soupflow run` left behind by a failed test (or a
failed start) is killed here, so it never holds its ports into the next test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dicom import RuntimeProcess


@pytest.fixture(autouse=True)
def _no_runtime_left_behind() -> Iterator[None]:
    yield
    while RuntimeProcess.started:
        RuntimeProcess.started.pop().kill()
