"""`soupflow diff`: what a reviewer needs to see, by name, also through `git diff`."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from soupflow.cli import main
from soupflow.workflow.diff import diff_documents
from tests import documents
from tests.dicom import unavailable
from tests.documents import filter_host, filter_item

SECOND_WRITER = "55555555-5555-4555-8555-555555555555"


def base() -> dict[str, Any]:
    host = filter_host(
        documents.FILTER_ID,
        filter_item("StringMessageFilter", Path="CommonFields/Modality", Value="CT"),
    )
    return documents.workflow(documents.file_writer(), documents.http_sender(), host)


def test_enum_numbers_are_shown_with_their_names() -> None:
    new = base()
    new["WorkflowPattern"][3]["Filters"][0]["Comparer"] = 1
    new["WorkflowPattern"][2]["Method"] = "GET"
    assert diff_documents(base(), new) == [
        '~ HttpSenderSetting "Notify"',
        '  Method: 0 (POST) -> "GET"',
        '~ FilterHostSetting "Only CT"',
        "  Filters:",
        '    ~ [1] StringMessageFilter "CommonFields/Modality"',
        "      Comparer: 0 (Equals) -> 1 (Contains)",
    ]


def test_links_are_shown_by_the_name_of_what_they_point_to() -> None:
    new = base()
    new["WorkflowPattern"][0]["Filters"] = documents.FILTER_ID
    assert diff_documents(base(), new) == [
        '~ DicomReceiverSetting "Intake"',
        '  Filters: (none) -> FilterHostSetting "Only CT"',
    ]


def test_reordered_activities_are_shown_as_reordering() -> None:
    new = base()
    new["WorkflowPattern"][0]["Activities"].reverse()
    assert diff_documents(base(), new) == [
        '~ DicomReceiverSetting "Intake"',
        '  Activities reordered: FileWriterSenderSetting "Archive", HttpSenderSetting "Notify" -> HttpSenderSetting "Notify", FileWriterSenderSetting "Archive"',
    ]


def test_added_and_removed_settings_and_activities() -> None:
    new = base()
    new["WorkflowPattern"] = [s for s in new["WorkflowPattern"] if s["Id"] != documents.HTTP_ID]
    new["WorkflowPattern"].append(documents.file_writer(SECOND_WRITER, Name="Copy"))
    new["WorkflowPattern"][0]["Activities"] = [documents.FILE_WRITER_ID, SECOND_WRITER]
    assert diff_documents(base(), new) == [
        '- HttpSenderSetting "Notify" removed',
        '~ DicomReceiverSetting "Intake"',
        '  Activities: + FileWriterSenderSetting "Copy"',
        '  Activities: - HttpSenderSetting "Notify"',
        '+ FileWriterSenderSetting "Copy" added',
    ]


def test_defaults_written_out_order_and_layout_are_no_change(tmp_path: Path, capsys: Any) -> None:
    new = copy.deepcopy(base())
    new["WorkflowPattern"][0]["AssociationTimeoutSeconds"] = 30
    new["WorkflowPattern"][2]["Method"] = 0
    new["WorkflowPattern"].reverse()
    assert diff_documents(base(), new) == []
    old_path, new_path = tmp_path / "old.json", tmp_path / "new.json"
    documents.write(old_path, base())
    new_path.write_text(json.dumps(new), encoding="utf-8")
    assert main(["diff", str(old_path), str(new_path)]) == 0
    assert "no semantic changes" in capsys.readouterr().out


def test_diff_exits_1_when_files_differ(tmp_path: Path, capsys: Any) -> None:
    new = base()
    new["WorkflowPattern"][0]["Port"] = 4242
    documents.write(tmp_path / "old.json", base())
    documents.write(tmp_path / "new.json", new)
    assert main(["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    assert "  Port: 11112 -> 4242" in capsys.readouterr().out


def test_git_uses_it_as_a_diff_driver(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        unavailable("git is not installed")
    environment = {**os.environ, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "NO_COLOR": "1"}

    def git(*arguments: str) -> str:
        result = subprocess.run(
            ["git", *arguments],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout

    git("init", "-q")
    git("config", "diff.soupflow.command", f"{sys.executable} -m soupflow diff")
    (tmp_path / ".gitattributes").write_text("*.hl7Workflow diff=soupflow\n", encoding="utf-8")
    path = tmp_path / "intake.hl7Workflow"
    documents.write(path, base())
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "base")
    changed = base()
    changed["WorkflowPattern"][0]["AcceptedCallingAETs"] = "CT1, MR2"
    documents.write(path, changed)
    output = git("diff")
    assert "soupflow diff intake.hl7Workflow" in output
    assert '  AcceptedCallingAETs: "MODALITY01" -> "CT1, MR2"' in output
