"""Workflow files: bytes -> positions-aware JSON -> schema -> model -> checks -> issues.

Upstream: cli (validate, fmt, diff), later the watcher. Downstream: jsonpos, schema, model,
checks. No sockets, no threads. Every problem of a file is found in one pass and reported as
a ConfigIssue with its line and column; nothing here raises for bad input.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
from jsonschema.exceptions import ValidationError as SchemaError
from pydantic import TypeAdapter

from soupflow.workflow import checks, model, schema
from soupflow.workflow import types as field_types
from soupflow.workflow.issues import ConfigIssue, IssueSink
from soupflow.workflow.jsonpos import JsonSyntaxError, Position, parse, pointer_join

WORKFLOW_SUFFIXES = (".json", ".hl7workflow", ".soupworkflow")
_TEMPORARY_SUFFIXES = (".tmp", ".swp", "~")
_SETTING_ADAPTER: TypeAdapter[Any] = TypeAdapter(model.AnySetting)


def is_workflow_file(path: Path) -> bool:
    """Extensions read: .json, .hl7Workflow, .soupworkflow; never hidden or temporary files."""
    name = path.name.lower()
    if name.startswith(".") or name.endswith(_TEMPORARY_SUFFIXES):
        return False
    return name.endswith(WORKFLOW_SUFFIXES)


@dataclass
class Entry:
    """One setting of a file: where it is, its raw JSON, and its model when it is valid."""

    pointer: str
    raw: dict[str, Any]
    setting: model.Setting | None
    # Pointers (relative to this setting) of invalid values left out so that the rest of a
    # setting with schema errors can still be checked; their defaults stand in for them.
    repaired: frozenset[str] = frozenset()

    @property
    def type_name(self) -> str:
        """The `$type` before the comma: `HL7Soup.Functions.Settings.Senders.HttpSenderSetting`."""
        value = self.raw.get("$type")
        return value.split(",")[0].strip() if isinstance(value, str) else ""

    @property
    def id(self) -> str | None:
        value = self.raw.get("Id")
        return field_types.normalize_reference(value) if isinstance(value, str) else None

    @property
    def kind(self) -> str:
        """receiver, sender, filter, transformer, or unknown (known even when invalid)."""
        if self.setting is not None:
            return self.setting.KIND
        for cls in model.SETTING_CLASSES:
            if self.type_name == cls.TYPE_NAME:
                return cls.KIND
        if ".Receivers." in self.type_name:
            return "receiver"
        if ".Senders." in self.type_name:
            return "sender"
        return "unknown"

    @property
    def label(self) -> str:
        """How messages name this setting: `HttpSenderSetting "Notify"`."""
        class_name = self.type_name.rsplit(".", 1)[-1] or "setting"
        name = self.raw.get("Name")
        return f'{class_name} "{name}"' if isinstance(name, str) and name else class_name


@dataclass
class LoadedWorkflow:
    """A workflow file as read: the raw document, its settings, and every issue found."""

    path: Path
    sink: IssueSink
    document: Any = None
    bare: bool = False
    entries: list[Entry] = field(default_factory=list)

    @property
    def issues(self) -> list[ConfigIssue]:
        return sorted(self.sink.issues)

    @property
    def valid(self) -> bool:
        return not self.sink.has_errors

    @property
    def receiver(self) -> model.ReceiverSetting | None:
        for entry in self.entries:
            if isinstance(entry.setting, model.ReceiverSetting):
                return entry.setting
        return None

    @property
    def workflow_id(self) -> str | None:
        """The workflow's identity: `WorkflowId`, else the receiver's `Id`."""
        if isinstance(self.document, dict) and not self.bare:
            declared = self.document.get("WorkflowId")
            if isinstance(declared, str) and field_types.normalize_reference(declared):
                return field_types.normalize_reference(declared)
        receiver = self.receiver
        return field_types.normalize_reference(receiver.id) if receiver else None

    @property
    def name(self) -> str:
        if isinstance(self.document, dict):
            for key in ("Name", "WorkflowPatternName"):
                value = self.document.get(key)
                if isinstance(value, str) and value:
                    return value
        receiver = self.receiver
        return (receiver.workflow_pattern_name or receiver.name) if receiver else self.path.name

    def setting(self, setting_id: str | None) -> Entry | None:
        for entry in self.entries:
            if setting_id is not None and entry.id == setting_id:
                return entry
        return None


# ------------------------------------------------------------------------------------ loading
def load_text(text: str, path: Path, display: str | None = None) -> LoadedWorkflow:
    sink = IssueSink(display or str(path))
    loaded = LoadedWorkflow(path, sink)
    try:
        sink.parsed = parse(text)
    except JsonSyntaxError as exc:
        hint = "the file may be truncated or still being written; JSON has no comments"
        if not text.strip():
            message, hint = "the file is empty", "a workflow file is a JSON object"
        else:
            message = f"not valid JSON: {exc.message}"
        sink.add("error", "", message, hint, position=exc.position)
        return loaded
    document = loaded.document = sink.parsed.value
    for pointer in sink.parsed.duplicate_keys:
        sink.error(
            pointer,
            "this key appears twice in the object",
            "JSON keeps only the last one; remove one",
            at_key=True,
        )
    if not isinstance(document, dict):
        sink.error(
            "", "a workflow file is a JSON object", "wrap the settings in a workflow file object"
        )
        return loaded
    loaded.bare = "$type" in document
    schema_errors = list(_validator().iter_errors(document))
    for error in schema_errors:
        _report_schema_error(error, sink)
    _report_unknown_fields(document, model.root_classes(document), "", sink)
    loaded.entries = _entries(loaded)
    if not schema_errors:
        _report_model_disagreement(document, sink)
    checks.check_workflow(loaded)
    return loaded


def load_file(path: Path) -> LoadedWorkflow:
    try:
        data = path.read_bytes()
    except OSError as exc:
        sink = IssueSink(str(path))
        sink.error("", f"cannot read the file: {exc.strerror}")
        return LoadedWorkflow(path, sink)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        sink = IssueSink(str(path))
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        sink.add(
            "error",
            "",
            f"not UTF-8: byte 0x{data[exc.start]:02X} cannot be decoded",
            "save the file as UTF-8",
            position=Position(line, column),
        )
        return LoadedWorkflow(path, sink)
    return load_text(text, path)


def workflow_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, and the workflow files inside folders named."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file() and is_workflow_file(p)))
        else:
            found.append(path)
    return found


def load_paths(paths: Iterable[Path]) -> list[LoadedWorkflow]:
    """Load every file and check them together (WorkflowId and port unique across them)."""
    workflows = [load_file(path) for path in workflow_paths(paths)]
    checks.check_folder(workflows)
    return workflows


def _entries(loaded: LoadedWorkflow) -> list[Entry]:
    document = loaded.document
    if loaded.bare:
        return [Entry("", document, *_validated(document))]
    pattern = document.get("WorkflowPattern")
    if not isinstance(pattern, list):
        return []
    return [
        Entry(pointer_join("/WorkflowPattern", index), item, *_validated(item))
        for index, item in enumerate(pattern)
        if isinstance(item, dict)
    ]


def _validated(raw: dict[str, Any]) -> tuple[model.Setting | None, frozenset[str]]:
    """The setting's model; for an invalid one, the model of what is left without the
    invalid values (None when even that fails, e.g. an unknown `$type`)."""
    candidate = copy.deepcopy(raw)
    repaired: set[str] = set()
    for _ in range(_MAX_REPAIRS):
        try:
            setting: model.Setting = _SETTING_ADAPTER.validate_python(candidate)
        except pydantic.ValidationError as exc:
            removed = {_remove(candidate, problem["loc"][1:]) for problem in exc.errors()}
            removed.discard(None)
            if not removed:
                return None, frozenset(repaired)
            repaired |= {pointer for pointer in removed if pointer is not None}
            continue
        return setting, frozenset(repaired)
    return None, frozenset(repaired)


_MAX_REPAIRS = 20
_PROTECTED = frozenset({"$type", "Id"})


def _remove(value: Any, location: tuple[Any, ...]) -> str | None:
    """Delete the deepest existing object member on a pydantic error's path (skipping the
    union tags pydantic puts in it); return its pointer, or None when nothing can go."""
    pointer, parent, key = "", None, None
    for part in location:
        if isinstance(value, dict) and isinstance(part, str) and part in value:
            parent, key = value, part
            pointer, value = pointer_join(pointer, part), value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            pointer, value = pointer_join(pointer, part), value[part]
    if parent is None or key is None or (key in _PROTECTED and pointer.count("/") == 1):
        return None
    del parent[key]
    return pointer[: pointer.rindex("/")] + "/" + key.replace("~", "~0").replace("/", "~1")


def _report_model_disagreement(document: dict[str, Any], sink: IssueSink) -> None:
    """The schema accepted the document; the model must too. Say so loudly if not."""
    try:
        model.parse_document(document)
    except pydantic.ValidationError as exc:
        for problem in exc.errors():
            pointer = "".join(
                f"/{part}"
                for part in problem["loc"]
                if not isinstance(part, str) or "[" not in part
            )
            sink.error(
                pointer, problem["msg"], "the schema and the model disagree here: please report it"
            )


# ----------------------------------------------------------------------------- schema errors
@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema.workflow_schema())


_JSON_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "an object",
    "array": "a list",
    "null": "null",
}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


@cache
def _unions() -> dict[str, tuple[str, tuple[type[Any], ...]]]:
    """The `$type` pattern of each polymorphic place -> (what it holds, its classes)."""
    places: dict[str, tuple[str, tuple[type[Any], ...]]] = {}
    for label, classes in (
        ("setting", model.SETTING_CLASSES),
        ("filter item", model.FILTER_ITEM_CLASSES),
        ("transformer action", model.ACTION_CLASSES),
    ):
        members = [(cls.TYPE_NAME, cls.__name__) for cls in classes]
        pattern = field_types.polymorphic_schema(members)["properties"]["$type"]["pattern"]
        places[pattern] = (label, classes)
    return places


def _unsupported_type(
    type_value: str, label: str, classes: tuple[type[Any], ...]
) -> tuple[str, str]:
    type_name = type_value.split(",", maxsplit=1)[0].strip()
    short = type_name.rsplit(".", 1)[-1]
    if label == "setting":
        for family, kind in ((".Receivers.", "receiver"), (".Senders.", "sender")):
            if family in type_name:
                label = kind
                classes = tuple(cls for cls in classes if getattr(cls, "KIND", "") == kind)
    supported = ", ".join(cls.__name__ for cls in classes)
    same_class = [cls for cls in classes if cls.__name__ == short]
    if same_class:
        return (
            f"$type {type_name!r} has the wrong namespace",
            f'write "{same_class[0].TYPE_NAME}, HL7SoupWorkflow"',
        )
    return f"{label} type {short} is not run by soupflow; supported: {supported}", ""


def _describe(error: SchemaError) -> tuple[str, str]:
    """A user's sentence and hint for one schema error."""
    instance: Any = error.instance
    expected: Any = error.validator_value
    keyword = str(error.validator)
    if keyword == "required":
        missing = next((name for name in expected if name not in instance), "?")
        return f'missing required field "{missing}"', ""
    if keyword == "type":
        wanted = [expected] if isinstance(expected, str) else list(expected)
        hint = ""
        if isinstance(instance, str) and "integer" in wanted:
            hint = "write numbers without quotes"
        elif isinstance(instance, str) and "boolean" in wanted:
            hint = "write true or false without quotes"
        return _expected(wanted, instance), hint
    if keyword == "enum":
        values = list(expected)
        half = len(values) // 2
        numbers, labels = values[:half], values[half:]
        if (
            len(values) % 2 == 0
            and all(isinstance(n, int) for n in numbers)
            and all(isinstance(n, str) for n in labels)
        ):
            choices = ", ".join(
                f"{number} {name}" for number, name in zip(numbers, labels, strict=True)
            )
        else:
            choices = ", ".join(_show(value) for value in values)
        return f"{_show(instance)} is not one of: {choices}", ""
    if keyword == "pattern":
        if expected in _unions():
            label, classes = _unions()[expected]
            return _unsupported_type(instance, label, classes)
        if error.path and error.path[-1] == "$type":
            type_name = instance.split(",")[0].strip()
            return (
                f"$type {type_name!r} does not belong here",
                "see the schema for what this field holds",
            )
        if expected == field_types.GUID_PATTERN:
            return f"{_show(instance)} is not a GUID", "a GUID is 8-4-4-4-12 hex digits"
        if expected == field_types.REFERENCE_PATTERN:
            return (
                f"{_show(instance)} is not a GUID",
                'link a setting by its Id; use "" or the all-zero GUID for none',
            )
        return f"{_show(instance)} does not match {expected}", ""
    if keyword in ("minimum", "exclusiveMinimum"):
        return f"{_show(instance)} is below the minimum {expected}", ""
    if keyword in ("maximum", "exclusiveMaximum"):
        return f"{_show(instance)} is above the maximum {expected}", ""
    if keyword in ("anyOf", "oneOf") and error.context:
        pattern_errors = [sub for sub in error.context if sub.validator != "type"]
        if pattern_errors:
            return _describe(pattern_errors[0])
        alternatives: list[str] = []
        for sub in error.context:
            value: Any = sub.validator_value
            alternatives.extend([value] if isinstance(value, str) else value)
        return _expected(alternatives, instance), ""
    return error.message, ""


def _expected(wanted: list[str], instance: Any) -> str:
    names = " or ".join(dict.fromkeys(_JSON_TYPE_NAMES.get(name, name) for name in wanted))
    return f"expected {names}, got {_json_type(instance)} {_show(instance)}"


def _report_schema_error(error: SchemaError, sink: IssueSink) -> None:
    pointer = "".join(pointer_join("", part) for part in error.absolute_path)
    message, hint = _describe(error)
    if error.validator == "required":
        container = _container_label(error.instance)
        message = f"{container} is {message}" if container else message
    sink.error(pointer, message, hint)


def _container_label(value: Any) -> str:
    if not isinstance(value, dict):
        return ""
    type_value = value.get("$type")
    if not isinstance(type_value, str):
        return ""
    short = type_value.split(",")[0].strip().rsplit(".", 1)[-1]
    name = value.get("Name")
    return f'{short} "{name}"' if isinstance(name, str) and name else short


# ---------------------------------------------------------------------------- unknown fields
def _report_unknown_fields(
    value: Any, classes: tuple[type[model.FormatModel], ...], pointer: str, sink: IssueSink
) -> None:
    if isinstance(value, list):
        for index, item in enumerate(value):
            _report_unknown_fields(item, classes, pointer_join(pointer, index), sink)
        return
    if not isinstance(value, dict):
        return
    cls = model.pick_class(value, classes)
    if cls is None:
        return
    known = model.known_fields(cls)
    nested = model.nested_fields(cls)
    for key, child in value.items():
        member = pointer_join(pointer, key)
        if key in nested:
            _report_unknown_fields(child, nested[key], member, sink)
        elif key not in known and key not in model.IGNORED_FIELDS:
            sink.warning(
                member,
                f'unknown field "{key}" in {cls.__name__} is ignored',
                _did_you_mean(key, known),
                at_key=True,
            )


def _did_you_mean(key: str, known: frozenset[str]) -> str:
    by_lower = {name.lower(): name for name in known}
    if key.lower() in by_lower:
        return f'did you mean "{by_lower[key.lower()]}"? field names are case-sensitive'
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.7)
    if close:
        return f'did you mean "{by_lower[close[0]]}"?'
    return "check the spelling against the schema"
