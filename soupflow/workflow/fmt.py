"""Canonical layout of a workflow file, for diff-friendly review. Upstream: cli. Pure.

Layout only: the same JSON value comes out (every field kept, unknown ones too; arrays in
their order), with a stable key order, 2-space indent, UTF-8 characters as they are, LF line
ends and a final newline. Formatting a formatted file changes nothing.

Key order: at the root `$schema`, `Name`, `WorkflowId`, the metadata, then `WorkflowPattern`;
in a setting or item `$type`, `Id`, `Name`, then the fields in the order the schema documents
them, then fields soupflow does not know, in their original order (all of them, after
`$type`, `Id` and `Name`, for a `$type` soupflow does not run).
"""

from __future__ import annotations

import json
from typing import Any

from soupflow.workflow import model

_FIRST = ("$schema", "$type", "Id", "Name")
_ROOT_ORDER = ("$schema", "Name", "WorkflowId", "Comments", "Modified", "ImportedDate")


def format_document(document: Any) -> str:
    """The canonical text of a parsed workflow file."""
    if isinstance(document, dict):
        document = _ordered(document, model.root_classes(document))
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _ordered(value: Any, classes: tuple[type[model.FormatModel], ...]) -> Any:
    if isinstance(value, list):
        return [_ordered(item, classes) for item in value]
    if not isinstance(value, dict):
        return value
    cls = model.pick_class(value, classes) if classes else None
    nested = model.nested_fields(cls) if cls else {}
    first = _ROOT_ORDER if cls is model.WorkflowFile else _FIRST if classes else ()
    known = [name for name in model.known_fields_in_order(cls) if name not in first] if cls else []
    order = [*first, *known]
    keys = [key for key in order if key in value]
    keys += [key for key in value if key not in order]
    return {key: _ordered(value[key], nested.get(key, ())) for key in keys}
