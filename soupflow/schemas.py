"""The JSON Schemas soupflow publishes in `schemas/`: generated, checked in, drift-tested.

Upstream: cli (`soupflow schema`), tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from soupflow.message.schema import message_schema
from soupflow.workflow.schema import workflow_schema

WORKFLOW_SCHEMA_FILE = "workflow-file.schema.json"
MESSAGE_SCHEMA_FILE = "dicom-message.schema.json"


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def generated_files() -> dict[str, str]:
    """File name -> text of every schema soupflow publishes."""
    return {
        WORKFLOW_SCHEMA_FILE: render(workflow_schema()),
        MESSAGE_SCHEMA_FILE: render(message_schema()),
    }


def stale_files(folder: Path) -> list[str]:
    """Names of published schemas that are missing from `folder` or differ from the code."""
    return [
        name
        for name, text in generated_files().items()
        if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text
    ]


def write_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in generated_files().items():
        (folder / name).write_text(text, encoding="utf-8")
    return sorted(generated_files())
