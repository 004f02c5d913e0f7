"""Positions-aware JSON: text -> value plus where each JSON pointer starts. Upstream: load. Pure.

The standard `json` module gives the values and the syntax errors; this module walks the same
text once more to record, for every JSON pointer (RFC 6901), the line and column where its
value (and, for object members, its key) starts, so that every problem found later can be
shown as `file:line:col`.
"""

from __future__ import annotations

import bisect
import json
import json.decoder
import json.scanner
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_WHITESPACE = " \t\n\r"
# The standard library's own JSON string scanner (not in its type stubs).
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based, in characters


class JsonSyntaxError(ValueError):
    """The text is not JSON; `position` says where the parser gave up."""

    def __init__(self, message: str, position: Position) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


@dataclass
class ParsedJson:
    value: Any
    values: dict[str, Position] = field(default_factory=dict)
    keys: dict[str, Position] = field(default_factory=dict)
    duplicate_keys: list[str] = field(default_factory=list)

    def position(self, pointer: str, *, key: bool = False) -> Position:
        """Where `pointer` starts; the nearest existing ancestor for a missing member."""
        if key and pointer in self.keys:
            return self.keys[pointer]
        while pointer not in self.values:
            pointer = pointer.rsplit("/", 1)[0] if "/" in pointer else ""
            if pointer == "":
                break
        return self.values.get(pointer, Position(1, 1))


def pointer_join(pointer: str, token: str | int) -> str:
    text = str(token).replace("~", "~0").replace("/", "~1")
    return f"{pointer}/{text}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse(text: str) -> ParsedJson:
    """Parse `text` (a BOM is tolerated) or raise JsonSyntaxError with a position."""
    if text.startswith("\ufeff"):
        text = text[1:]
    line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]

    def position_at(offset: int) -> Position:
        line = bisect.bisect_right(line_starts, offset)
        return Position(line, offset - line_starts[line - 1] + 1)

    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise JsonSyntaxError(exc.msg, position_at(exc.pos)) from None
    except ValueError as exc:  # NaN / Infinity
        raise JsonSyntaxError(str(exc), Position(1, 1)) from None
    except RecursionError:
        raise JsonSyntaxError("nested too deeply", Position(1, 1)) from None
    parsed = ParsedJson(value)
    _Walker(text, parsed, position_at).walk()
    return parsed


class _Walker:
    """Re-reads text that `json.loads` accepted, recording positions (no error paths needed)."""

    def __init__(self, text: str, parsed: ParsedJson, position_at: Any) -> None:
        self.text = text
        self.parsed = parsed
        self.position_at = position_at
        self.index = 0

    def skip(self) -> None:
        text, i = self.text, self.index
        while i < len(text) and text[i] in _WHITESPACE:
            i += 1
        self.index = i

    def walk(self) -> None:
        self.value("")

    def value(self, pointer: str) -> None:
        self.skip()
        self.parsed.values[pointer] = self.position_at(self.index)
        char = self.text[self.index]
        if char == "{":
            self.object(pointer)
        elif char == "[":
            self.array(pointer)
        elif char == '"':
            _, self.index = _scanstring(self.text, self.index + 1)
        else:
            match = json.scanner.NUMBER_RE.match(self.text, self.index)
            if match and match.end() > self.index:
                self.index = match.end()
            else:  # true, false, null
                for literal in ("true", "false", "null"):
                    if self.text.startswith(literal, self.index):
                        self.index += len(literal)
                        break

    def object(self, pointer: str) -> None:
        self.index += 1
        seen: set[str] = set()
        self.skip()
        if self.text[self.index] == "}":
            self.index += 1
            return
        while True:
            self.skip()
            key_position = self.position_at(self.index)
            key, self.index = _scanstring(self.text, self.index + 1)
            member = pointer_join(pointer, key)
            if key in seen:
                self.parsed.duplicate_keys.append(member)
            seen.add(key)
            self.parsed.keys[member] = key_position
            self.skip()
            self.index += 1  # ':'
            self.value(member)
            self.skip()
            closing = self.text[self.index]
            self.index += 1
            if closing == "}":
                return

    def array(self, pointer: str) -> None:
        self.index += 1
        self.skip()
        if self.text[self.index] == "]":
            self.index += 1
            return
        item = 0
        while True:
            self.value(pointer_join(pointer, item))
            item += 1
            self.skip()
            closing = self.text[self.index]
            self.index += 1
            if closing == "]":
                return
