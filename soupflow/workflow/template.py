"""`${}` templates: parsing into text and variable parts. Upstream: workflow.checks, pipeline. Pure.

Forms (workflow-files.md 2.6): `${Name}`, `${Name:Modifier:...:Format}` (names are
case-insensitive), `${<guid> inbound}` / `${<guid> outbound}` (a whole activity message) and
`${env:NAME}` (an environment variable). A `$` or `{` outside `${...}` is plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

_ACTIVITY_MESSAGE = re.compile(
    r"^([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})\s+"
    r"(inbound|outbound)$",
    re.IGNORECASE,
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Variables every workflow has (lower case: names are case-insensitive).
BUILT_IN_VARIABLES = frozenset(
    name.lower()
    for name in (
        "CurrentDateTime",
        "ReceivedDate",
        "WorkflowInstanceId",
        "UUID",
        "WorkflowError",
        "WorkflowErrorMessage",
        "CR",
        "LF",
        "MLLPStart",
        "MLLPEnd",
        "ForEachIterator",
        "CallingAET",
        "CalledAET",
        "PeerAddress",
        "SOPInstanceUID",
        "RequestId",
        "ClientCertSha256",
        "ClientCertSubject",
        "StowStudyInstanceUID",
    )
)


class TemplateError(ValueError):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Variable:
    name: str
    spec: str  # what follows the first ':' (modifiers and format), "" when none
    offset: int

    @property
    def key(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class ActivityMessage:
    setting_id: str  # lower case
    direction: str  # "inbound" | "outbound"
    offset: int


@dataclass(frozen=True)
class EnvironmentVariable:
    name: str
    offset: int


Part = Text | Variable | ActivityMessage | EnvironmentVariable


def parse_template(template: str) -> tuple[Part, ...]:
    """Split a template into parts, or raise TemplateError at the offending offset."""
    parts: list[Part] = []
    position = 0
    while True:
        start = template.find("${", position)
        if start < 0:
            break
        if start > position:
            parts.append(Text(template[position:start]))
        end = template.find("}", start + 2)
        nested = template.find("${", start + 2)
        if end < 0:
            raise TemplateError("'${' is never closed by '}'", start)
        if 0 <= nested < end:
            raise TemplateError("'${' inside a variable: variables do not nest", nested)
        parts.append(_variable(template[start + 2 : end].strip(), start))
        position = end + 1
    if position < len(template):
        parts.append(Text(template[position:]))
    return tuple(parts)


def _variable(body: str, offset: int) -> Part:
    if not body:
        raise TemplateError("'${}' names no variable", offset)
    activity = _ACTIVITY_MESSAGE.match(body)
    if activity:
        return ActivityMessage(activity.group(1).lower(), activity.group(2).lower(), offset)
    name, _, spec = body.partition(":")
    if name.strip().lower() == "env":
        if not _ENV_NAME.match(spec):
            raise TemplateError(f"'${{env:{spec}}}' does not name an environment variable", offset)
        return EnvironmentVariable(spec, offset)
    if not name.strip():
        raise TemplateError(f"'${{{body}}}' names no variable before ':'", offset)
    return Variable(name.strip(), spec, offset)


class Resolver(Protocol):
    """What a template's parts expand to (the pipeline's run context implements it)."""

    def variable(self, name: str, spec: str) -> str: ...

    def activity_message(self, setting_id: str, direction: str) -> str: ...

    def environment(self, name: str) -> str: ...


def expand(template: str, resolver: Resolver) -> str:
    """The template with every `${...}` replaced; TemplateError when it does not parse."""
    out = []
    for part in parse_template(template):
        if isinstance(part, Text):
            out.append(part.text)
        elif isinstance(part, Variable):
            out.append(resolver.variable(part.name, part.spec))
        elif isinstance(part, ActivityMessage):
            out.append(resolver.activity_message(part.setting_id, part.direction))
        else:
            out.append(resolver.environment(part.name))
    return "".join(out)
