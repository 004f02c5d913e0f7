"""Config problems are data: `ConfigIssue` and the sink that places them. Upstream: load, checks.

Every problem in a workflow file becomes one `ConfigIssue` with the file, the line and column
where it is, the JSON pointer of the value, a message and an optional hint; it prints as
`file:line:col: /pointer: error: message (hint)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from soupflow.workflow.jsonpos import ParsedJson, Position

Severity = Literal["error", "warning"]


@dataclass(frozen=True, order=True)
class ConfigIssue:
    file: str
    line: int
    column: int
    pointer: str
    message: str
    hint: str = ""
    severity: Severity = "error"

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.column}: {self.pointer or '/'}: {self.severity}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IssueSink:
    """Collects the issues of one file, placing each pointer at its line and column."""

    file: str
    parsed: ParsedJson | None = None
    issues: list[ConfigIssue] = field(default_factory=list)

    def add(
        self,
        severity: Severity,
        pointer: str,
        message: str,
        hint: str = "",
        *,
        at_key: bool = False,
        position: Position | None = None,
    ) -> None:
        if position is None:
            position = self.parsed.position(pointer, key=at_key) if self.parsed else Position(1, 1)
        self.issues.append(
            ConfigIssue(self.file, position.line, position.column, pointer, message, hint, severity)
        )

    def error(self, pointer: str, message: str, hint: str = "", *, at_key: bool = False) -> None:
        self.add("error", pointer, message, hint, at_key=at_key)

    def warning(self, pointer: str, message: str, hint: str = "", *, at_key: bool = False) -> None:
        self.add("warning", pointer, message, hint, at_key=at_key)

    @property
    def has_errors(self) -> bool:
        return any(issue.severity == "error" for issue in self.issues)
