"""Filters: a flat list of items as one boolean expression. Upstream: pipeline.run. Pure.

workflow-files.md 2.3: each item's `Conjunction` joins it to the NEXT one; `Not` negates it.
A FilterGroup item opens a group that runs to the next FilterGroup item or the end of the
list; the marker's `Not` and `Conjunction` apply to the whole group. Inside and between
groups, And binds tighter than Or. An empty list passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from soupflow.pipeline.patterns import parse_datetime
from soupflow.workflow import model
from soupflow.workflow.types import Conjunction, DateComparer, StringComparer, ValidComparer


@dataclass(frozen=True)
class Operands:
    """What an item compares: its left value, its right value, and the whole message text."""

    left: str
    right: str
    message_text: str
    valid: bool


Reader = Callable[[model.FilterItem], Operands]


def passes(items: Sequence[model.FilterItem], read: Reader) -> bool:
    units: list[tuple[bool, Conjunction]] = []
    index = 0
    while index < len(items):
        item = items[index]
        if isinstance(item, model.FilterGroup):
            end = index + 1
            while end < len(items) and not isinstance(items[end], model.FilterGroup):
                end += 1
            inner = [(_item(member, read), member.conjunction) for member in items[index + 1 : end]]
            units.append((_combine(inner) != item.not_, item.conjunction))
            index = end
            continue
        units.append((_item(item, read), item.conjunction))
        index += 1
    return _combine(units)


def _combine(units: Sequence[tuple[bool, Conjunction]]) -> bool:
    """And binds tighter than Or: the Or of the And-runs. The last conjunction is unused."""
    if not units:
        return True
    any_term, term = False, True
    for position, (value, conjunction) in enumerate(units):
        term = term and value
        if conjunction == Conjunction.Or or position == len(units) - 1:
            any_term = any_term or term
            term = True
    return any_term


def _item(item: model.FilterItem, read: Reader) -> bool:
    operands = read(item)
    if isinstance(item, model.StringMessageFilter):
        result = _string(item.comparer, operands, item.case_sensitive)
    elif isinstance(item, model.DateMessageFilter):
        result = _date(item.comparer, operands)
    elif isinstance(item, model.ValidMessageFilter):
        result = operands.valid if item.comparer == ValidComparer.Valid else not operands.valid
    else:
        result = True
    return result != item.not_


def _string(comparer: StringComparer, operands: Operands, case_sensitive: bool) -> bool:
    left, right = operands.left, operands.right
    if not case_sensitive:
        left, right = left.casefold(), right.casefold()
    letters = [char for char in operands.left if char.isalpha()]
    checks: dict[StringComparer, Callable[[], bool]] = {
        StringComparer.Equals: lambda: left == right,
        StringComparer.Contains: lambda: right in left,
        StringComparer.StartsWith: lambda: left.startswith(right),
        StringComparer.EndsWith: lambda: left.endswith(right),
        StringComparer.LengthGreaterThan: lambda: len(operands.left) > _integer(operands.right),
        StringComparer.LengthLessThan: lambda: len(operands.left) < _integer(operands.right),
        StringComparer.Empty: lambda: operands.left == "",
        StringComparer.InMessage: lambda: (
            right in (operands.message_text if case_sensitive else operands.message_text.casefold())
        ),
        StringComparer.IsTitleCase: lambda: (
            bool(letters) and operands.left == operands.left.title()
        ),
        StringComparer.IsUpperCase: lambda: (
            bool(letters) and all(char.isupper() for char in letters)
        ),
        StringComparer.IsLowerCase: lambda: (
            bool(letters) and all(char.islower() for char in letters)
        ),
        StringComparer.InList: lambda: left in [entry.strip() for entry in right.split(",")],
    }
    check = checks.get(comparer)
    return check() if check else False  # InDataTable: refused by validation


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def _date(comparer: DateComparer, operands: Operands) -> bool:
    if comparer == DateComparer.Empty:
        return operands.left.strip() == ""
    if comparer == DateComparer.InMessage:
        return operands.right != "" and operands.right in operands.message_text
    left = parse_datetime(operands.left)
    if comparer == DateComparer.InvalidDate:
        return left is None
    right = parse_datetime(operands.right)
    if left is None or right is None:
        return False
    if (left.tzinfo is None) != (right.tzinfo is None):
        left, right = left.replace(tzinfo=None), right.replace(tzinfo=None)
    return {
        DateComparer.Equals: left == right,
        DateComparer.GreaterThan: left > right,
        DateComparer.LessThan: left < right,
        DateComparer.GreaterThanOrEqualTo: left >= right,
        DateComparer.LessThanOrEqualTo: left <= right,
    }[comparer]
