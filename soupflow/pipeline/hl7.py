"""HL7 v2 messages as text: read and write a value at an HL7 path. Upstream: pipeline. Pure.

Segments end with CR (LF and CRLF are read too); `MSH-1` is the field separator and `MSH-2`
the encoding characters (component, repetition, escape, subcomponent). Paths are 1-based:
`PID-5.1`, `OBX[2]-5`, `PID-3[2].1` (see `paths.parse_hl7_path`). Writing creates the
segment, field, repetition or component it needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from soupflow.workflow.paths import Hl7Path

_SEGMENT_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @classmethod
    def of(cls, text: str) -> Separators:
        if text.startswith("MSH") and len(text) >= 8:
            encoding = text[4:8]
            return cls(text[3], encoding[0], encoding[1], encoding[2], encoding[3])
        return cls()


def segments(text: str) -> list[str]:
    return [segment for segment in _SEGMENT_BREAK.split(text) if segment]


def _fields(segment: str, separators: Separators) -> list[str]:
    fields = segment.split(separators.field)
    if fields[0] == "MSH":  # MSH-1 is the separator itself, so MSH field n is at index n
        fields.insert(1, separators.field)
    return fields


def _join_fields(fields: list[str], separators: Separators) -> str:
    if fields[0] == "MSH":
        fields = [fields[0], *fields[2:]]
    return separators.field.join(fields)


def _find(all_segments: list[str], name: str, occurrence: int) -> int | None:
    seen = 0
    for index, segment in enumerate(all_segments):
        if segment[:3] == name:
            seen += 1
            if seen == occurrence:
                return index
    return None


def read(text: str, path: Hl7Path) -> str:
    """The value at `path`, "" when absent. A field or component left out reads whole."""
    separators = Separators.of(text)
    all_segments = segments(text)
    index = _find(all_segments, path.segment, path.segment_repeat)
    if index is None:
        return ""
    if path.field is None:
        return all_segments[index]
    fields = _fields(all_segments[index], separators)
    if path.field >= len(fields):
        return ""
    if path.segment == "MSH" and path.field in (1, 2):
        return fields[path.field]
    repetitions = fields[path.field].split(separators.repetition)
    if path.field_repeat > len(repetitions):
        return ""
    value = repetitions[path.field_repeat - 1]
    if path.component is None:
        return value
    components = value.split(separators.component)
    if path.component > len(components):
        return ""
    component = components[path.component - 1]
    if path.subcomponent is None:
        return component
    subcomponents = component.split(separators.subcomponent)
    return subcomponents[path.subcomponent - 1] if path.subcomponent <= len(subcomponents) else ""


def _set(parts: list[str], position: int, value: str) -> list[str]:
    """`parts` with item `position` (1-based) set, padding with empty items."""
    parts = parts + [""] * (position - len(parts))
    parts[position - 1] = value
    return parts


def write(text: str, path: Hl7Path, value: str) -> str:
    """`text` with the value at `path` replaced (segments, fields and components created)."""
    separators = Separators.of(text)
    all_segments = segments(text)
    index = _find(all_segments, path.segment, path.segment_repeat)
    while index is None:
        all_segments.append(path.segment)
        index = _find(all_segments, path.segment, path.segment_repeat)
    if path.field is None:
        all_segments[index] = value
        return "\r".join(all_segments) + "\r"
    fields = _fields(all_segments[index], separators)
    fields = fields + [""] * (path.field + 1 - len(fields))
    repetitions = fields[path.field].split(separators.repetition)
    current = repetitions[path.field_repeat - 1] if path.field_repeat <= len(repetitions) else ""
    if path.component is None:
        new = value
    else:
        components = current.split(separators.component)
        if path.subcomponent is None:
            components = _set(components, path.component, value)
        else:
            component = components[path.component - 1] if path.component <= len(components) else ""
            subcomponents = _set(component.split(separators.subcomponent), path.subcomponent, value)
            components = _set(
                components, path.component, separators.subcomponent.join(subcomponents)
            )
        new = separators.component.join(components)
    repetitions = _set(repetitions, path.field_repeat, new)
    fields[path.field] = separators.repetition.join(repetitions)
    all_segments[index] = _join_fields(fields, separators)
    return "\r".join(all_segments) + "\r"
