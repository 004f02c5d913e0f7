"""Transformer actions: variables, mappings, conditional and for-each blocks, appended lines.

Upstream: pipeline.run. workflow-files.md 2.4: actions run in list order; Begin/End
Conditional blocks run only when their filters pass; ForEach/Next blocks run once per item
of a repeating node with `${ForEachIterator}` counting from 1; blocks nest.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
from collections.abc import Sequence

from soupflow.pipeline import code
from soupflow.pipeline.context import RunContext
from soupflow.pipeline.errors import PermanentError
from soupflow.pipeline.filters import Operands, Reader, passes
from soupflow.pipeline.patterns import format_value
from soupflow.workflow import model
from soupflow.workflow.types import TextFormat, Truncation, ValueEncoding


def read_operands(context: RunContext) -> Reader:
    """The filter reader over this run's messages."""

    def read(item: model.FilterItem) -> Operands:
        left = (
            context.read(item.path, item.from_type, item.from_direction, item.from_setting)
            if item.path
            else ""
        )
        if item.value:
            right = context.expand(item.value)
        elif item.to_path:
            right = context.read(item.to_path, item.to_type, item.to_direction, item.to_setting)
        else:
            right = ""
        return Operands(left, right, context.message_text, context.valid)

    return read


def filter_passes(context: RunContext, items: Sequence[model.FilterItem]) -> bool:
    return passes(items, read_operands(context))


def run_actions(
    context: RunContext, actions: Sequence[model.Action], activity_id: str | None
) -> None:
    """Run `actions`; mappings and appended lines go to `activity_id`'s message by default."""
    _run_block(context, list(actions), 0, len(actions), activity_id)


def _block_end(actions: list[model.Action], start: int) -> int:
    """Index of the action that closes the block opened at `start` (validation checked pairs)."""
    depth = 0
    for index in range(start, len(actions)):
        action = actions[index]
        if isinstance(
            action, model.BeginConditionalTransformerAction | model.ForEachTransformerAction
        ):
            depth += 1
        elif isinstance(
            action, model.EndConditionalTransformerAction | model.NextTransformerAction
        ):
            depth -= 1
            if depth == 0:
                return index
    return len(actions)


def _run_block(
    context: RunContext, actions: list[model.Action], start: int, end: int, activity_id: str | None
) -> None:
    index = start
    while index < end:
        action = actions[index]
        if isinstance(action, model.BeginConditionalTransformerAction):
            close = _block_end(actions, index)
            if filter_passes(context, action.filters):
                _run_block(context, actions, index + 1, close, activity_id)
            index = close + 1
            continue
        if isinstance(action, model.ForEachTransformerAction):
            close = _block_end(actions, index)
            loop, count = context.items(
                action.from_path, action.from_type, action.from_direction, action.from_setting
            )
            context.loops.append(loop)
            try:
                for number in range(1, count + 1):
                    loop.index = number
                    _run_block(context, actions, index + 1, close, activity_id)
            finally:
                context.loops.pop()
            index = close + 1
            continue
        _run_one(context, action, activity_id)
        index += 1


def _run_one(context: RunContext, action: model.Action, activity_id: str | None) -> None:
    if isinstance(action, model.CreateVariableTransformerAction):
        value = context.read(
            action.from_path, action.from_type, action.from_direction, action.from_setting
        )
        context.variables[action.variable_name.strip().lower()] = formatted(value, action)
    elif isinstance(action, model.CreateMappingTransformerAction):
        value = context.read(
            action.from_path, action.from_type, action.from_direction, action.from_setting
        )
        target = action.to_setting or activity_id
        context.write(
            target, action.to_direction, action.to_path, action.to_type, formatted(value, action)
        )
    elif isinstance(action, model.AppendLineTransformerAction):
        line = context.read(
            action.from_path, action.from_type, action.from_direction, action.from_setting
        )
        context.append_line(action.to_setting or activity_id, action.to_direction, line)
    elif isinstance(action, model.CodeTransformerAction):
        code.call(action.python_callable, context, activity_id, action.timeout_seconds)


def formatted(value: str, fields: model.FormattingFields) -> str:
    """Formatting fields, in the format's order: Format, TextFormat, Truncation, Remove,
    Replace, PaddingLength, Encoding."""
    value = format_value(value, fields.format)
    if fields.text_format == TextFormat.UpperCase:
        value = value.upper()
    elif fields.text_format == TextFormat.LowerCase:
        value = value.lower()
    elif fields.text_format == TextFormat.TitleCase:
        value = value.title()
    if fields.truncation == Truncation.TruncateEnd:
        value = value[: fields.truncation_length]
    elif fields.truncation == Truncation.TruncateStart and len(value) > fields.truncation_length:
        value = value[len(value) - fields.truncation_length :]
    if fields.remove:
        value = value.replace(fields.remove, "")
    if fields.replace:
        value = value.replace(fields.replace, fields.replace_with)
    if fields.padding_length:
        value = value.ljust(fields.padding_length)
    return _encoded(value, fields.encoding)


def _encoded(value: str, encoding: ValueEncoding) -> str:
    if encoding == ValueEncoding.HL7Encode:
        table = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}
        escaped = "".join(table.get(char, char) for char in value)
        # a line break inside a value is `\.br\` (HL7 v2 2.7.6), never a segment break
        return escaped.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")
    if encoding == ValueEncoding.HL7Decode:
        for escaped, char in (
            ("\\F\\", "|"),
            ("\\S\\", "^"),
            ("\\R\\", "~"),
            ("\\T\\", "&"),
            ("\\E\\", "\\"),
        ):
            value = value.replace(escaped, char)
        return value
    if encoding == ValueEncoding.JSONEncode:
        return json.dumps(value, ensure_ascii=False)[1:-1]
    if encoding == ValueEncoding.JSONDecode:
        try:
            decoded = json.loads(f'"{value}"')
        except json.JSONDecodeError:
            return value
        return str(decoded)
    if encoding == ValueEncoding.XMLEncode:
        return html.escape(value)
    if encoding == ValueEncoding.XMLDecode:
        return html.unescape(value)
    if encoding == ValueEncoding.Base64Encode:
        return base64.b64encode(value.encode("utf-8")).decode("ascii")
    if encoding == ValueEncoding.Base64Decode:
        try:
            return base64.b64decode(value, validate=True).decode("utf-8", errors="replace")
        except (binascii.Error, ValueError):
            raise PermanentError("Base64Decode: the value is not base64") from None
    return value
