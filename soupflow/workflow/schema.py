"""JSON Schema export of the workflow model. Upstream: cli (`soupflow schema`), load. Pure.

`schemas/workflow-file.schema.json` is generated from here and checked in; a test fails when
it drifts. The root accepts both shapes of a file: a workflow file, or a bare receiver
(an object with `$type`). Polymorphic places use `if $type == X then X` branches (see
`types.polymorphic_schema`) so that a validator's errors name the right branch.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from soupflow.workflow import model
from soupflow.workflow.types import polymorphic_schema

SCHEMA_ID = "https://soupflow.dev/schemas/workflow-file.schema.json"

_ALL_MODELS: tuple[type[model.FormatModel], ...] = (
    model.WorkflowFile,
    model.DicomMessageTypeOptions,
    model.HeaderSetting,
    *model.SETTING_CLASSES,
    *model.FILTER_ITEM_CLASSES,
    *model.ACTION_CLASSES,
)


def _strip_titles(node: Any) -> Any:
    """pydantic adds a `title` to every property; descriptions say more, titles are noise."""
    if isinstance(node, dict):
        return {
            key: _strip_titles(value)
            for key, value in node.items()
            if not (key == "title" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [_strip_titles(item) for item in node]
    return node


@cache
def workflow_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a workflow file."""
    _, top = models_json_schema(
        [(cls, "validation") for cls in _ALL_MODELS], ref_template="#/$defs/{model}"
    )
    definitions = _strip_titles(top["$defs"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "soupflow workflow file",
        "description": "An Integration Soup workflow file run by soupflow: a workflow file "
        "object (Name, WorkflowId, WorkflowPattern) or a bare receiver setting "
        "(DicomReceiverSetting or StowRsReceiverSetting).",
        "type": "object",
        "if": {"required": ["$type"]},
        "then": polymorphic_schema(
            [(cls.TYPE_NAME, cls.__name__) for cls in model.RECEIVER_CLASSES]
        ),
        "else": {"$ref": "#/$defs/WorkflowFile"},
        "$defs": definitions,
    }
