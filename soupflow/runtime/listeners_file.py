"""The listener table: what each workflow's receiver is doing, and `<data>/listeners.json`.

Upstream: runtime.supervisor (writes it after every reload), admin (`status` reads it without
importing the runtime), cli (prints the table). The file exists while a runtime runs, beside
`runtime.pid`: a runtime killed without stopping leaves both behind, and `read` sees that its
process is gone, so `status` never shows a dead runtime's listeners as listening.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from soupflow import durable

LISTENERS_FILE = "listeners.json"
PID_FILE = "runtime.pid"
NETWORK_FILE = "network.json"  # the allowlists and cleartext ports in force


class ListenerState(enum.StrEnum):
    LISTENING = "listening"
    DISABLED = "disabled"
    FAILED = "failed"  # valid, but its port could not be bound
    INVALID = "invalid"  # the file has errors and no good version runs
    REFUSED = "refused"  # claims the port or WorkflowId of a running workflow


@dataclass(frozen=True)
class ListenerRow:
    """One line of the listener table."""

    workflow: str
    workflow_id: str
    file: str
    port: int
    our_aet: str
    who_may_call: str
    state: ListenerState
    detail: str = ""


def write(data: Path, rows: list[ListenerRow]) -> None:
    """Replace the file when the table changed (the folder is rescanned every second)."""
    pid = str(os.getpid()).encode("ascii")
    pid_path = data / PID_FILE
    if not pid_path.is_file() or pid_path.read_bytes() != pid:
        durable.replace(pid_path, pid, sync=False)
    path = data / LISTENERS_FILE
    text = json.dumps([asdict(row) for row in rows], indent=2) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    durable.replace(path, text.encode("utf-8"), sync=False)  # rewritten at every start


def read(data: Path) -> list[ListenerRow]:
    """The table a running runtime wrote; empty when none runs (or it died without stopping)."""
    path = data / LISTENERS_FILE
    if not _alive(data):
        return []
    try:
        rows: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return [ListenerRow(**{**row, "state": ListenerState(row["state"])}) for row in rows]


def write_network(data: Path, network: dict[str, Any]) -> None:
    """What the operator allows on the network, for `status` (written at start)."""
    text = json.dumps(network, indent=2) + "\n"
    durable.replace(data / NETWORK_FILE, text.encode("utf-8"), sync=False)


def read_network(data: Path) -> dict[str, Any] | None:
    """The running runtime's network policy; None when none runs."""
    if not _alive(data):
        return None
    try:
        found: dict[str, Any] = json.loads((data / NETWORK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found


def remove(data: Path) -> None:
    for name in (LISTENERS_FILE, PID_FILE, NETWORK_FILE):
        (data / name).unlink(missing_ok=True)


def _alive(data: Path) -> bool:
    try:
        pid = int((data / PID_FILE).read_text(encoding="ascii"))
        os.kill(pid, 0)
    except (OSError, ValueError):  # no file, not a number, no such process
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:4]
    except (OSError, IndexError):
        return False
