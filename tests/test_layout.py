"""The house's seams, held by tests: the DICOM package stands alone, registries match the
model, and importing a module changes nothing for the rest of the process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from soupflow.activities import RUNNERS
from soupflow.receivers import RECEIVERS
from soupflow.workflow import model

PACKAGE = Path(__file__).resolve().parents[1] / "soupflow"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_dicom_package_imports_nothing_else_from_soupflow() -> None:
    leaks = {
        f"{path.name}: {name}"
        for path in sorted((PACKAGE / "dicom").glob("*.py"))
        for name in _imports(path)
        if name.startswith("soupflow") and not name.startswith("soupflow.dicom")
    }
    assert leaks == set()


def test_the_workflow_package_has_no_sockets_threads_or_runtime() -> None:
    forbidden = (
        "socket",
        "threading",
        "soupflow.runtime",
        "soupflow.pipeline",
        "soupflow.activities",
    )
    leaks = {
        f"{path.name}: {name}"
        for path in sorted((PACKAGE / "workflow").glob("*.py"))
        for name in _imports(path)
        if name.startswith(forbidden)
    }
    assert leaks == set()


def test_every_sender_class_has_a_runner_and_every_receiver_class_a_receiver() -> None:
    senders = {cls for cls in model.SETTING_CLASSES if issubclass(cls, model.SenderSetting)}
    receivers = {cls for cls in model.SETTING_CLASSES if cls.__name__.endswith("ReceiverSetting")}
    assert set(RUNNERS) == senders
    assert set(RECEIVERS) == receivers


def _fresh(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def test_importing_the_activities_leaves_pynetdicoms_settings_alone() -> None:
    code = (
        "from pynetdicom import _config; before = _config.STORE_SEND_CHUNKED_DATASET; "
        "import soupflow.activities, soupflow.runtime.supervisor; "
        "print(before == _config.STORE_SEND_CHUNKED_DATASET)"
    )
    assert _fresh(code) == "True"


def test_status_does_not_load_the_runtime_or_network_clients() -> None:
    code = (
        "import sys, soupflow.admin; "
        "print(sorted(m for m in ('soupflow.runtime.supervisor', 'soupflow.receivers', "
        "'httpx', 'pynetdicom') if m in sys.modules))"
    )
    assert _fresh(code) == "[]"
