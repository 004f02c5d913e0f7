"""Paths into messages: JSON slash paths, `jmespath:` expressions, HL7 v2 paths. Pure.

Upstream: workflow.checks (parse only), pipeline (read and write).
- JSON slash path (workflow-files.md 2.5): keys separated by `/`, `[n]` a 1-based list index,
  no index = the first item: `Tags/ReferencedSeriesSequence[1]/SeriesInstanceUID`.
- `jmespath:<expression>`: a JMESPath expression instead.
- HL7 v2 path: `SEG[rep]-field[rep].component.subcomponent`, 1-based: `PID-5.1`, `OBX[2]-5`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jmespath
import jmespath.exceptions
import jmespath.parser

from soupflow.workflow.types import (
    CSV_PATH_TYPES,
    HL7_PATH_TYPES,
    JSON_PATH_TYPES,
    XML_PATH_TYPES,
    Direction,
    MessageType,
    PathType,
)

JMESPATH_PREFIX = "jmespath:"
_STEP = re.compile(r"^([^\[\]]+)(?:\[(\d+)\])?$")
_HL7 = re.compile(
    r"^(?P<segment>[A-Z][A-Z0-9]{2})(?:\[(?P<segment_rep>\d+)\])?"
    r"(?:-(?P<field>\d+)(?:\[(?P<field_rep>\d+)\])?"
    r"(?:\.(?P<component>\d+)(?:\.(?P<subcomponent>\d+))?)?)?$"
)


class PathError(ValueError):
    pass


# What a path reads, by family.
JSON, HL7, TEXT, XML, CSV, NONE = "json", "hl7", "text", "xml", "csv", "none"
_MESSAGE_FAMILIES = {
    MessageType.HL7V2: HL7,
    MessageType.JSON: JSON,
    MessageType.DICOM: JSON,  # the DICOM message is read as JSON
    MessageType.XML: XML,
    MessageType.CSV: CSV,
}


def family(
    path_type: PathType | None, direction: Direction, message_type: MessageType | None
) -> str:
    """How a path is read: its explicit type, else the type of the message it reads."""
    if direction == Direction.Variable or path_type == PathType.TextWithVariables:
        return TEXT
    for types, name in (
        (HL7_PATH_TYPES, HL7),
        (JSON_PATH_TYPES, JSON),
        (XML_PATH_TYPES, XML),
        (CSV_PATH_TYPES, CSV),
    ):
        if path_type in types:
            return name
    return _MESSAGE_FAMILIES.get(message_type, NONE) if message_type is not None else JSON


@dataclass(frozen=True)
class JsonStep:
    key: str
    index: int | None  # 1-based; None = the first item of a list


@dataclass(frozen=True)
class SlashPath:
    steps: tuple[JsonStep, ...]


@dataclass(frozen=True)
class JmesPath:
    expression: jmespath.parser.ParsedResult


def parse_json_path(path: str) -> SlashPath | JmesPath:
    if path.startswith(JMESPATH_PREFIX):
        expression = path[len(JMESPATH_PREFIX) :]
        try:
            return JmesPath(jmespath.compile(expression))
        except jmespath.exceptions.JMESPathError as exc:
            detail = str(exc).splitlines()[0]
            raise PathError(f"JMESPath expression does not parse: {detail}") from None
    text = path.strip().removeprefix("/")
    if not text:
        return SlashPath(())
    steps = []
    for step in text.split("/"):
        match = _STEP.match(step)
        if not match:
            if not step:
                raise PathError(f"empty step in JSON path {path!r} (two '/' in a row?)")
            raise PathError(f"step {step!r} of JSON path {path!r} is not `Key` or `Key[n]`")
        index = int(match.group(2)) if match.group(2) is not None else None
        if index == 0:
            raise PathError(f"index [0] in JSON path {path!r}: indexes count from 1")
        steps.append(JsonStep(match.group(1), index))
    return SlashPath(tuple(steps))


@dataclass(frozen=True)
class Hl7Path:
    segment: str
    segment_repeat: int  # 1-based
    field: int | None
    field_repeat: int
    component: int | None
    subcomponent: int | None


def parse_hl7_path(path: str) -> Hl7Path:
    match = _HL7.match(path.strip())
    if not match:
        raise PathError(f"{path!r} is not an HL7 v2 path like PID-5.1 or OBX[2]-5")
    numbers = {
        name: int(value) if value is not None else None
        for name, value in match.groupdict().items()
        if name != "segment"
    }
    if any(value == 0 for value in numbers.values()):
        raise PathError(f"HL7 path {path!r} has a 0: segments, fields and components count from 1")
    return Hl7Path(
        segment=match.group("segment"),
        segment_repeat=numbers["segment_rep"] or 1,
        field=numbers["field"],
        field_repeat=numbers["field_rep"] or 1,
        component=numbers["component"],
        subcomponent=numbers["subcomponent"],
    )
