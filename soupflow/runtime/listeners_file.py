"""The listener table: what each workflow's receiver is doing, and `<data>/listeners.json`.

Upstream: runtime.supervisor (writes it after every reload), admin (`status` reads it without
importing the runtime), cli (prints the table). The file exists while a runtime runs.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from soupflow import durable

LISTENERS_FILE = "listeners.json"


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
    path = data / LISTENERS_FILE
    text = json.dumps([asdict(row) for row in rows], indent=2) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    durable.replace(path, text.encode("utf-8"), sync=False)  # rewritten at every start


def read(data: Path) -> list[ListenerRow]:
    """The table a running runtime wrote; empty when none runs."""
    path = data / LISTENERS_FILE
    try:
        rows: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return [ListenerRow(**{**row, "state": ListenerState(row["state"])}) for row in rows]


def remove(data: Path) -> None:
    (data / LISTENERS_FILE).unlink(missing_ok=True)
