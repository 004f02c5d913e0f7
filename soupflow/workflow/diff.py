"""A reviewer's semantic diff of two workflow files. Upstream: cli (`soupflow diff`). Pure.

Settings are matched by `Id` and shown by name; links are shown as the name of the setting
they point to; enum numbers carry their names (`Comparer: 0 (Equals) -> 1 (Contains)`); a
field left out and the same field written with its default are the same; the order of
`WorkflowPattern` means nothing, the order of `Activities` does (shown as reordering). What
it reads about each field (its default, whether it links or is an enum) comes from the model
and its published schema.
"""

from __future__ import annotations

import difflib
import enum
import json
from collections.abc import Iterator
from functools import cache
from typing import Any

from pydantic_core import PydanticUndefined

from soupflow.workflow import model, schema
from soupflow.workflow.types import REFERENCE_PATTERN, normalize_reference

_MISSING = object()
_INDENT = "  "


def diff_documents(old: Any, new: Any) -> list[str]:
    """Lines describing what changed from `old` to `new` (parsed JSON); [] when nothing did."""
    names = {**_setting_names(old), **_setting_names(new)}
    differ = _Differ(names)
    lines: list[str] = []
    if (
        isinstance(old, dict)
        and isinstance(new, dict)
        and "$type" not in old
        and "$type" not in new
    ):
        root_old = {key: value for key, value in old.items() if key != "WorkflowPattern"}
        root_new = {key: value for key, value in new.items() if key != "WorkflowPattern"}
        lines += differ.object(root_old, root_new, model.WorkflowFile, 0)
    old_settings, new_settings = dict(_settings(old)), dict(_settings(new))
    for setting_id, raw in old_settings.items():
        if setting_id not in new_settings:
            lines.append(f"- {_label(raw)} removed")
    for setting_id, raw in new_settings.items():
        if setting_id not in old_settings:
            lines.append(f"+ {_label(raw)} added")
            continue
        classes = model.SETTING_CLASSES
        cls = model.pick_class(raw, classes) or model.pick_class(old_settings[setting_id], classes)
        changes = differ.object(old_settings[setting_id], raw, cls, 1)
        if changes:
            lines.append(f"~ {_label(raw)}")
            lines += changes
    return lines


def _settings(document: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(document, dict):
        return
    items = [document] if "$type" in document else document.get("WorkflowPattern", [])
    for index, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, dict):
            raw_id = item.get("Id")
            setting_id = normalize_reference(raw_id) if isinstance(raw_id, str) else None
            yield setting_id or f"#{index}", item


def _setting_names(document: Any) -> dict[str, str]:
    return {setting_id: _label(raw) for setting_id, raw in _settings(document)}


def _label(raw: dict[str, Any]) -> str:
    type_value = raw.get("$type")
    short = (
        type_value.split(",")[0].strip().rsplit(".", 1)[-1]
        if isinstance(type_value, str)
        else "item"
    )
    short = short.removesuffix("TransformerAction")
    for key in ("Name", "VariableName", "ToPath", "Path", "Comment"):
        value = raw.get(key)
        if isinstance(value, str) and value:
            return f'{short} "{value}"'
    return short


@cache
def _property_schema(cls: type[model.FormatModel], name: str) -> dict[str, Any]:
    definition = schema.workflow_schema()["$defs"].get(cls.__name__, {})
    found: dict[str, Any] = definition.get("properties", {}).get(name, {})
    return found


def _is_reference(node: dict[str, Any]) -> bool:
    return any(branch.get("pattern") == REFERENCE_PATTERN for branch in node.get("anyOf", []))


@cache
def _defaults(cls: type[model.FormatModel]) -> dict[str, Any]:
    defaults = {}
    for name, info in cls.model_fields.items():
        if info.default is not PydanticUndefined:
            value = info.default
            defaults[info.alias or name] = value.value if isinstance(value, enum.Enum) else value
    return defaults


class _Differ:
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def object(
        self,
        old: dict[str, Any],
        new: dict[str, Any],
        cls: type[model.FormatModel] | None,
        depth: int,
    ) -> list[str]:
        defaults = _defaults(cls) if cls else {}
        nested = model.nested_fields(cls) if cls else {}
        order = list(model.known_fields_in_order(cls)) if cls else []
        keys = [key for key in order if key in old or key in new]
        keys += [key for key in {**old, **new} if key not in keys]
        lines: list[str] = []
        pad = _INDENT * depth
        for key in keys:
            before = old.get(key, defaults.get(key, _MISSING))
            after = new.get(key, defaults.get(key, _MISSING))
            if _same(before, after):
                continue
            node = _property_schema(cls, key) if cls else {}
            if key in nested and isinstance(before, list) and isinstance(after, list):
                lines += self.items(key, before, after, nested[key], depth)
            elif key in nested and isinstance(before, dict) and isinstance(after, dict):
                lines.append(f"{pad}{key}:")
                lines += self.object(before, after, model.pick_class(after, nested[key]), depth + 1)
            elif (
                isinstance(before, list)
                and isinstance(after, list)
                and _is_reference(node.get("items", {}))
            ):
                lines += self.references(key, before, after, pad)
            else:
                lines.append(f"{pad}{key}: {self.show(before, node)} -> {self.show(after, node)}")
        return lines

    def items(
        self,
        key: str,
        old: list[Any],
        new: list[Any],
        classes: tuple[type[model.FormatModel], ...],
        depth: int,
    ) -> list[str]:
        """Lists of filter items or actions: matched by content, changes shown per item."""
        pad = _INDENT * depth
        lines = [f"{pad}{key}:"]
        matcher = difflib.SequenceMatcher(
            a=[_canonical(item) for item in old],
            b=[_canonical(item) for item in new],
            autojunk=False,
        )
        for tag, old_start, old_end, new_start, new_end in matcher.get_opcodes():
            if tag == "equal":
                continue
            pairs = max(old_end - old_start, new_end - new_start)
            for offset in range(pairs):
                before = old[old_start + offset] if old_start + offset < old_end else None
                after = new[new_start + offset] if new_start + offset < new_end else None
                if (
                    isinstance(before, dict)
                    and isinstance(after, dict)
                    and before.get("$type") == after.get("$type")
                ):
                    lines.append(f"{pad}{_INDENT}~ [{new_start + offset + 1}] {_label(after)}")
                    lines += self.object(before, after, model.pick_class(after, classes), depth + 2)
                    continue
                if before is not None:
                    lines.append(
                        f"{pad}{_INDENT}- [{old_start + offset + 1}] {_describe_item(before)}"
                    )
                if after is not None:
                    lines.append(
                        f"{pad}{_INDENT}+ [{new_start + offset + 1}] {_describe_item(after)}"
                    )
        return lines

    def references(self, key: str, old: list[Any], new: list[Any], pad: str) -> list[str]:
        """`Activities`: added, removed, and reordered, by name."""
        before = [self.reference(item) for item in old]
        after = [self.reference(item) for item in new]
        lines = [f"{pad}{key}: + {name}" for name in after if name not in before]
        lines += [f"{pad}{key}: - {name}" for name in before if name not in after]
        kept_before = [name for name in before if name in after]
        kept_after = [name for name in after if name in before]
        if kept_before != kept_after:
            lines.append(
                f"{pad}{key} reordered: {', '.join(kept_before)} -> {', '.join(kept_after)}"
            )
        return lines

    def reference(self, value: Any) -> str:
        if value is not None and not isinstance(value, str):
            return json.dumps(value)
        target = normalize_reference(value)
        if target is None:
            return "(none)"
        return self.names.get(target, f"{target} (not in the file)")

    def show(self, value: Any, node: dict[str, Any]) -> str:
        if value is _MISSING:
            return "(absent)"
        if _is_reference(node) and (value is None or isinstance(value, str)):
            return self.reference(value)
        choices = node.get("enum", [])
        half = len(choices) // 2
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and value in choices[:half]
        ):
            return f"{value:g} ({choices[half + choices[:half].index(value)]})"
        return json.dumps(value, ensure_ascii=False)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _same(before: Any, after: Any) -> bool:
    return (
        before is not _MISSING and after is not _MISSING and _canonical(before) == _canonical(after)
    )


def _describe_item(value: Any) -> str:
    return _label(value) if isinstance(value, dict) else json.dumps(value, ensure_ascii=False)
