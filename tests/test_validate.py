"""`soupflow validate`: one precise line per problem, with the right line and column."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from soupflow.cli import main
from tests import documents
from tests.documents import position_of


def validate(capsys: Any, *arguments: str) -> tuple[int, list[str]]:
    status = main(["validate", *arguments])
    return status, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("name", ["SenderExample.hl7workflow", "SenderExamplePart2.hl7workflow"])
def test_public_example_reports_exactly_its_directory_scan_receiver(capsys: Any, name: str) -> None:
    status, lines = validate(capsys, str(documents.FIXTURES / name))
    assert status == 1
    assert len(lines) == 1
    assert lines[0].endswith(
        "/WorkflowPattern/0/$type: error: receiver type DirectoryScanReceiverSetting is not run "
        "by soupflow; supported: DicomReceiverSetting, StowRsReceiverSetting"
    )
    assert lines[0].startswith(f"{documents.FIXTURES / name}:8:16:")


@pytest.mark.parametrize("name", ["SenderExample.hl7workflow", "SenderExamplePart2.hl7workflow"])
def test_every_sender_action_and_filter_of_the_public_examples_parses(
    tmp_path: Path, capsys: Any, name: str
) -> None:
    path = tmp_path / name
    documents.write(path, documents.with_dicom_receiver(documents.fixture(name)))
    status, lines = validate(capsys, "--strict", str(path))
    assert (status, lines) == (0, [])


def test_repository_examples_load_cleanly(capsys: Any) -> None:
    status, lines = validate(capsys, "--strict", str(documents.REPO / "workflows"))
    assert (status, lines) == (0, [])
    assert len(list((documents.REPO / "workflows").glob("*.json"))) >= 2


def _broken_file(folder: Path) -> str:
    """A file with the acceptance list's problems (the duplicate port is tested below)."""
    broken = documents.workflow(
        documents.http_sender(Sever="http://typo"),
        documents.transformer(documents.VARIABLES_ID, documents.action("BeginConditional")),
        Port="104x",
        OurAET="THIS_AE_TITLE_IS_TOO_LONG",
        Filters="99999999-9999-4999-8999-999999999999",
        VariableTransformers=documents.VARIABLES_ID,
    )
    return documents.write(folder / "broken.json", broken)


def _object_start(text: str, needle: str) -> tuple[int, int]:
    """Where the JSON object containing `needle` opens."""
    offset = text.rindex("{", 0, text.index(needle))
    return position_of(text, text[offset : offset + 40])


def test_hand_broken_file_yields_one_precise_line_per_problem(tmp_path: Path, capsys: Any) -> None:
    text = _broken_file(tmp_path)
    status, lines = validate(capsys, str(tmp_path))
    broken = str(tmp_path / "broken.json")
    expected = {
        (
            *position_of(text, '"104x"'),
            "/WorkflowPattern/0/Port",
            'error: expected an integer, got a string "104x" (write numbers without quotes)',
        ),
        (
            *position_of(text, '"THIS_AE_TITLE_IS_TOO_LONG"'),
            "/WorkflowPattern/0/OurAET",
            "error: AE title 'THIS_AE_TITLE_IS_TOO_LONG' has 25 characters; at most 16 are allowed"
            " (an AE title has 1-16 characters, no backslash and no control characters, PS3.5 6.2)",
        ),
        (
            *position_of(text, '"99999999-9999-4999-8999-999999999999"'),
            "/WorkflowPattern/0/Filters",
            "error: links to 99999999-9999-4999-8999-999999999999, which is not in this file"
            " (no setting in this file has Id 99999999-9999-4999-8999-999999999999)",
        ),
        (
            *position_of(text, '"Sever"'),
            "/WorkflowPattern/1/Sever",
            'warning: unknown field "Sever" in HttpSenderSetting is ignored (did you mean "Server"?)',
        ),
        (
            *_object_start(text, "BeginConditional"),
            "/WorkflowPattern/2/Transformers/0",
            "error: BeginConditional is never closed by an EndConditional",
        ),
    }
    assert sorted(lines) == sorted(
        f"{broken}:{line}:{column}: {pointer}: {message}"
        for line, column, pointer, message in expected
    )
    assert status == 1


def test_a_port_used_twice_across_files_names_the_other_file(tmp_path: Path, capsys: Any) -> None:
    first = tmp_path / "a.json"
    second = tmp_path / "b.json"
    documents.write(first, documents.workflow())
    other = documents.workflow()
    other["WorkflowId"] = other["WorkflowPattern"][0]["Id"] = "33333333-3333-4333-8333-333333333333"
    text = documents.write(second, other)
    status, lines = validate(capsys, str(tmp_path))
    line, column = position_of(text, "11112")
    assert status == 1
    assert lines == [
        f"{second}:{line}:{column}: /WorkflowPattern/0/Port: error: port 11112 is already used by "
        f'workflow "Intake" in {first} (one workflow per port: choose another Port)'
    ]


def test_a_workflow_id_used_twice_across_files_is_refused_in_the_later_file(
    tmp_path: Path, capsys: Any
) -> None:
    documents.write(tmp_path / "a.json", documents.workflow())
    documents.write(tmp_path / "b.json", documents.workflow(Port=11113))
    status, lines = validate(capsys, str(tmp_path))
    assert status == 1
    assert len(lines) == 1
    assert f"{tmp_path / 'b.json'}:3:" in lines[0]
    assert (
        f"WorkflowId {documents.RECEIVER_ID} is already used by {tmp_path / 'a.json'}" in lines[0]
    )


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        (
            '{\n  "Name": "x",\n  "WorkflowPattern": [\n    {"$type": "a"',
            4,
            18,
            "not valid JSON: Expecting ',' delimiter",
        ),
        (
            '{\n  "Name": "x", // comment\n}',
            2,
            16,
            "not valid JSON: Expecting property name enclosed in double quotes",
        ),
        ("", 1, 1, "the file is empty"),
        ("[1, 2]", 1, 1, "a workflow file is a JSON object"),
    ],
)
def test_a_file_that_is_not_a_workflow_object_is_one_error_with_its_position(
    tmp_path: Path, capsys: Any, text: str, line: int, column: int, message: str
) -> None:
    path = tmp_path / "half-written.json"
    path.write_text(text, encoding="utf-8")
    status, lines = validate(capsys, str(path))
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}:{line}:{column}: /: error: {message}")


def test_a_typo_alone_is_a_warning_that_fails_only_with_strict(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "typo.json"
    documents.write(path, documents.workflow(documents.file_writer(MaxRecordPerFile=10)))
    status, lines = validate(capsys, str(path))
    assert status == 0
    assert len(lines) == 1
    assert (
        'warning: unknown field "MaxRecordPerFile" in FileWriterSenderSetting is ignored (did you mean "MaxRecordsPerFile"?)'
        in lines[0]
    )
    assert validate(capsys, "--strict", str(path))[0] == 1


def test_json_output_carries_every_field_of_an_issue(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "w.json"
    line, column = position_of(documents.write(path, documents.workflow(Port=70000)), "70000")
    assert main(["validate", "--json", str(path)]) == 1
    issues = json.loads(capsys.readouterr().out)
    assert issues == [
        {
            "file": str(path),
            "line": line,
            "column": column,
            "pointer": "/WorkflowPattern/0/Port",
            "message": "70000 is above the maximum 65535",
            "hint": "",
            "severity": "error",
        }
    ]


def test_the_console_script_prints_no_traceback_for_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.hl7Workflow"
    path.write_bytes(b'{"Name": "\xff\xfe"}')
    result = subprocess.run(
        [sys.executable, "-m", "soupflow", "validate", str(path), str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert (
        f"{path}:1:11: /: error: not UTF-8: byte 0xFF cannot be decoded (save the file as UTF-8)"
        in result.stdout
    )
    assert (
        f"{tmp_path / 'missing.json'}:1:1: /: error: cannot read the file: No such file or directory"
        in result.stdout
    )
