"""Hot loading, decided purely: plan(running, scanned) -> Plan. Upstream: supervisor. No I/O.

runtime.md 3: a new valid file starts; a changed valid file replaces its old version (the
listener restarts only when a listener field changed: port, our AE title, timeouts, limits;
a new allow-list or EnforceOurAET applies to the next association without a restart; any
other change applies to messages processed from then on); an invalid file keeps its last
good version running; a deleted or disabled workflow stops listening; a file claiming a
running workflow's port or WorkflowId is refused, naming the other file (what runs wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from soupflow.receivers import RECEIVERS
from soupflow.workflow.load import LoadedWorkflow
from soupflow.workflow.model import ReceiverSetting


@dataclass(frozen=True)
class Running:
    """What the runtime runs for one workflow now."""

    workflow_id: str
    path: Path
    receiver: ReceiverSetting
    listening: bool


@dataclass
class Plan:
    stop: list[str] = field(default_factory=list)  # workflow ids whose listener stops
    restart: list[LoadedWorkflow] = field(default_factory=list)  # listener fields changed
    update: list[LoadedWorkflow] = field(default_factory=list)  # same listener, new definition
    start: list[LoadedWorkflow] = field(default_factory=list)
    refused: list[tuple[LoadedWorkflow, str]] = field(default_factory=list)
    # (file, whether its last good version keeps running)
    invalid: list[tuple[LoadedWorkflow, bool]] = field(default_factory=list)


def restart_key(receiver: ReceiverSetting) -> tuple[object, ...]:
    """Fields a running receiver cannot take without restarting (its kind's own rule)."""
    return (type(receiver), *RECEIVERS[type(receiver)].restart_key(receiver))


def plan(
    running: dict[str, Running], scanned: list[LoadedWorkflow], unchanged: set[Path] | None = None
) -> Plan:
    """What to do so that what runs matches the folder. `unchanged` files need no update."""
    result = Plan()
    same = unchanged or set()
    ids_by_path = {entry.path: workflow_id for workflow_id, entry in running.items()}
    claimed_ids: dict[str, Path] = {
        workflow_id: entry.path for workflow_id, entry in running.items()
    }
    claimed_ports: dict[int, tuple[str, Path]] = {
        entry.receiver.port: (workflow_id, entry.path)
        for workflow_id, entry in running.items()
        if entry.listening and entry.receiver.port
    }
    kept: set[str] = set()
    for loaded in sorted(scanned, key=lambda w: str(w.path)):
        previous = ids_by_path.get(loaded.path)
        receiver, workflow_id = loaded.receiver, loaded.workflow_id
        if not loaded.valid or receiver is None or workflow_id is None:
            result.invalid.append((loaded, previous is not None))
            if previous is not None:
                kept.add(previous)
            continue
        owner = claimed_ids.get(workflow_id)
        if owner is not None and owner != loaded.path:
            result.refused.append((loaded, f"WorkflowId {workflow_id} is already used by {owner}"))
            if previous is not None:
                kept.add(previous)
            continue
        port_owner = (
            claimed_ports.get(receiver.port) if receiver.port and not receiver.disabled else None
        )
        if port_owner is not None and port_owner[0] != workflow_id:
            result.refused.append(
                (loaded, f"port {receiver.port} is already used by {port_owner[1]}")
            )
            if previous is not None:
                kept.add(previous)
            continue
        kept.add(workflow_id)
        claimed_ids[workflow_id] = loaded.path
        if receiver.port and not receiver.disabled:
            claimed_ports[receiver.port] = (workflow_id, loaded.path)
        current = running.get(workflow_id)
        if current is None:
            result.start.append(loaded)
        elif receiver.disabled:
            if current.listening:
                result.stop.append(workflow_id)
            result.update.append(loaded)
        elif not current.listening or restart_key(receiver) != restart_key(current.receiver):
            result.restart.append(loaded)
        elif loaded.path not in same:
            result.update.append(loaded)
    result.stop.extend(
        workflow_id
        for workflow_id in running
        if workflow_id not in kept and workflow_id not in result.stop
    )
    return result
