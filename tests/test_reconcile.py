"""Hot loading decided purely: `reconcile.plan` on plain values, no sockets, no threads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from soupflow.runtime import reconcile
from soupflow.runtime.reconcile import Running
from soupflow.workflow.load import LoadedWorkflow, load_text
from tests import documents

A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"


def loaded(name: str, workflow_id: str = A, **receiver: Any) -> LoadedWorkflow:
    document = documents.workflow(**{"Port": 11112, **receiver})
    document["WorkflowId"] = workflow_id
    result = load_text(json.dumps(document), Path(name))
    assert result.valid, [str(issue) for issue in result.issues]
    return result


def running(workflow: LoadedWorkflow, listening: bool = True) -> dict[str, Running]:
    assert workflow.workflow_id is not None and workflow.receiver is not None
    return {
        workflow.workflow_id: Running(
            workflow.workflow_id, workflow.path, workflow.receiver, listening
        )
    }


def test_a_new_file_starts() -> None:
    new = loaded("a.json")
    plan = reconcile.plan({}, [new])
    assert (plan.start, plan.stop, plan.restart, plan.update) == ([new], [], [], [])


def test_an_unchanged_file_changes_nothing() -> None:
    current = loaded("a.json")
    plan = reconcile.plan(running(current), [current], {current.path})
    assert (plan.start, plan.stop, plan.restart, plan.update) == ([], [], [], [])


def test_a_new_allow_list_updates_without_a_restart() -> None:
    current = loaded("a.json")
    changed = loaded("a.json", AcceptedCallingAETs="CT2")
    plan = reconcile.plan(running(current), [changed])
    assert (plan.update, plan.restart) == ([changed], [])


def test_a_listener_field_restarts_the_listener() -> None:
    current = loaded("a.json")
    for field, value in (
        ("Port", 11113),
        ("OurAET", "OTHER"),
        ("MaxAssociations", 3),
        ("AssociationTimeoutSeconds", 5),
    ):
        changed = loaded("a.json", **{field: value})
        plan = reconcile.plan(running(current), [changed])
        assert (plan.restart, plan.update) == ([changed], []), field


def test_a_deleted_file_stops_its_workflow() -> None:
    current = loaded("a.json")
    plan = reconcile.plan(running(current), [])
    assert plan.stop == [A]


def test_disabling_stops_listening_and_keeps_the_definition() -> None:
    current = loaded("a.json")
    disabled = loaded("a.json", Disabled=True)
    plan = reconcile.plan(running(current), [disabled])
    assert (plan.stop, plan.update) == ([A], [disabled])


def test_an_invalid_file_keeps_the_last_good_version_running() -> None:
    current = loaded("a.json")
    broken = load_text("{not json", Path("a.json"))
    plan = reconcile.plan(running(current), [broken])
    assert plan.invalid == [(broken, True)]
    assert plan.stop == []


def test_an_invalid_new_file_runs_nothing() -> None:
    broken = load_text("{not json", Path("b.json"))
    plan = reconcile.plan({}, [broken])
    assert (plan.invalid, plan.start) == ([(broken, False)], [])


def test_a_file_claiming_a_running_port_is_refused_naming_the_other_file() -> None:
    current = loaded("a.json")
    rival = loaded("b.json", workflow_id=B)
    plan = reconcile.plan(running(current), [current, rival], {current.path})
    [(refused, reason)] = plan.refused
    assert refused is rival and "port 11112" in reason and "a.json" in reason
    assert plan.start == []


def test_a_file_claiming_a_running_workflow_id_is_refused() -> None:
    current = loaded("a.json")
    copy = loaded("b.json", Port=11113)
    plan = reconcile.plan(running(current), [current, copy], {current.path})
    [(refused, reason)] = plan.refused
    assert refused is copy and f"WorkflowId {A}" in reason


def test_a_failed_listener_is_restarted_by_its_next_version() -> None:
    current = loaded("a.json")
    plan = reconcile.plan(running(current, listening=False), [current])
    assert plan.restart == [current]
