"""`soupflow fmt`: canonical layout, idempotent, never loses a field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from soupflow.cli import main
from soupflow.workflow.fmt import format_document
from tests import documents


@pytest.mark.parametrize("name", ["SenderExample.hl7workflow", "SenderExamplePart2.hl7workflow"])
def test_fmt_of_an_exported_file_changes_only_layout_and_is_idempotent(
    tmp_path: Path, capsys: Any, name: str
) -> None:
    path = tmp_path / name
    shutil.copy(documents.FIXTURES / name, path)
    original = path.read_text(encoding="utf-8")
    assert main(["fmt", "--check", str(path)]) == 1
    assert path.read_text(encoding="utf-8") == original
    assert main(["fmt", str(path)]) == 0
    formatted = path.read_text(encoding="utf-8")
    assert json.loads(formatted) == json.loads(original)
    assert formatted.endswith("}\n")
    assert main(["fmt", "--check", str(path)]) == 0
    assert main(["fmt", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == formatted
    assert f"would reformat {path}" in capsys.readouterr().out


def test_known_fields_come_first_and_unknown_ones_are_kept_after_them() -> None:
    writer = {
        "Zeta": 1,
        "FilePathToWrite": "out/x",
        "$type": documents.file_writer()["$type"],
        "Custom": {"b": 1, "a": 2},
        "Id": documents.FILE_WRITER_ID,
    }
    text = format_document(documents.workflow(writer))
    keys = list(json.loads(text)["WorkflowPattern"][1])
    assert keys == ["$type", "Id", "FilePathToWrite", "Zeta", "Custom"]
    assert json.loads(text)["WorkflowPattern"][1]["Custom"] == {"b": 1, "a": 2}
    assert list(json.loads(text)) == ["Name", "WorkflowId", "WorkflowPattern"]


def test_layout_is_two_space_indent_with_characters_as_they_are() -> None:
    text = format_document({"Name": "Ünïcode 検査", "WorkflowPattern": []})
    assert text == '{\n  "Name": "Ünïcode 検査",\n  "WorkflowPattern": []\n}\n'


def test_a_bom_and_crlf_are_normalized(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_bytes(b'\xef\xbb\xbf{"Name": "x",\r\n "WorkflowPattern": []}\r\n')
    assert main(["fmt", str(path)]) == 0
    assert path.read_bytes() == b'{\n  "Name": "x",\n  "WorkflowPattern": []\n}\n'


@pytest.mark.parametrize(
    ("text", "reason"),
    [('{"Name": "x",', "not valid JSON"), ('{"Name": "x", "Name": "y"}', "key appears twice")],
)
def test_a_file_fmt_cannot_keep_whole_is_left_unchanged(
    tmp_path: Path, capsys: Any, text: str, reason: str
) -> None:
    path = tmp_path / "w.json"
    path.write_text(text, encoding="utf-8")
    assert main(["fmt", str(path)]) == 1
    assert path.read_text(encoding="utf-8") == text
    assert reason in capsys.readouterr().err


def test_fmt_of_a_folder_formats_only_workflow_files(tmp_path: Path) -> None:
    (tmp_path / "w.soupworkflow").write_text('{"Name":"x","WorkflowPattern":[]}', encoding="utf-8")
    (tmp_path / "notes.txt").write_text('{"Name":"x"}', encoding="utf-8")
    (tmp_path / ".hidden.json").write_text('{"Name":"x"}', encoding="utf-8")
    assert main(["fmt", str(tmp_path)]) == 0
    assert (tmp_path / "w.soupworkflow").read_text(encoding="utf-8").startswith("{\n")
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == '{"Name":"x"}'
    assert (tmp_path / ".hidden.json").read_text(encoding="utf-8") == '{"Name":"x"}'
