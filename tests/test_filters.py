"""Filter expressions, table-driven, written from workflow-files.md 2.3 before the code ran."""

from __future__ import annotations

from typing import Any

import pytest

from soupflow.pipeline.filters import Operands, passes
from soupflow.workflow import model
from tests.documents import filter_item


def item(name: str = "StringMessageFilter", **fields: Any) -> model.FilterItem:
    built: model.FilterItem = model.FILTER_ITEMS_BY_NAME[name].model_validate(
        filter_item(name, **fields)
    )
    return built


def evaluate(
    items: list[model.FilterItem],
    values: dict[str, str] | None = None,
    message_text: str = "",
    valid: bool = True,
) -> bool:
    """Each item's left operand is `values[item.path]`; its right operand is its Value."""
    table = values or {}
    return passes(items, lambda i: Operands(table.get(i.path, ""), i.value, message_text, valid))


def t(path: str, not_: bool = False, conjunction: int = 0) -> model.FilterItem:
    """An item that is true when `path` holds "yes"."""
    return item(Path=path, Value="yes", Not=not_, Conjunction=conjunction)


YES = {"x": "yes", "a": "yes", "b": "yes", "c": "yes"}


@pytest.mark.parametrize(
    ("comparer", "left", "right", "case_sensitive", "expected"),
    [
        (0, "CT", "ct", False, True),
        (0, "CT", "ct", True, False),
        (0, "CT", "CT ", False, False),
        (1, "HEAD AND NECK", "neck", False, True),
        (1, "HEAD", "neck", False, False),
        (2, "CHEST PA", "chest", False, True),
        (2, "CHEST PA", "PA", False, False),
        (3, "CHEST PA", " pa", False, True),
        (4, "ABCDE", "4", False, True),
        (4, "ABCD", "4", False, False),
        (5, "ABC", "4", False, True),
        (5, "ABCD", "4", False, False),
        (6, "", "", False, True),
        (6, " ", "", False, False),
        (9, "Doe John", "", False, True),
        (9, "DOE john", "", False, False),
        (10, "DOE^JOHN", "", False, True),
        (10, "Doe^John", "", False, False),
        (11, "doe^john 2", "", False, True),
        (11, "", "", False, False),
        (12, "MR", "CT, mr ,SR", False, True),
        (12, "MR", "CT, mr ,SR", True, False),
        (12, "PT", "CT,MR", False, False),
    ],
)
def test_string_comparers(
    comparer: int, left: str, right: str, case_sensitive: bool, expected: bool
) -> None:
    assert (
        evaluate(
            [item(Path="x", Comparer=comparer, Value=right, CaseSensitive=case_sensitive)],
            {"x": left},
        )
        is expected
    )


def test_in_message_looks_at_the_whole_message_text() -> None:
    found = item(Path="x", Comparer=7, Value="fracture")
    assert evaluate([found], message_text='{"Report": "no FRACTURE seen"}') is True
    assert evaluate([found], message_text='{"Report": "normal"}') is False


@pytest.mark.parametrize(
    ("comparer", "left", "right", "expected"),
    [
        (0, "20260101", "2026-01-01", True),
        (0, "20260101", "20260102", False),
        (1, "20260102", "20260101", True),
        (1, "20260101", "20260101", False),
        (2, "20251231", "20260101", True),
        (3, "20260101", "20260101", True),
        (3, "20251231", "20260101", False),
        (4, "20260101", "20260101120000", True),
        (4, "20260102", "20260101", False),
        (5, "", "", True),
        (5, "20260101", "", False),
        (7, "2026-13-45", "", True),
        (7, "20260101", "", False),
        (1, "not a date", "20260101", False),
    ],
)
def test_date_comparers(comparer: int, left: str, right: str, expected: bool) -> None:
    assert (
        evaluate([item("DateMessageFilter", Path="x", Comparer=comparer, Value=right)], {"x": left})
        is expected
    )


def test_date_in_message() -> None:
    assert (
        evaluate(
            [item("DateMessageFilter", Path="x", Comparer=6, Value="20040119")],
            message_text='"StudyDate":"20040119"',
        )
        is True
    )


@pytest.mark.parametrize(
    ("comparer", "valid", "expected"),
    [(0, True, True), (0, False, False), (1, False, True), (1, True, False)],
)
def test_valid_filter(comparer: int, valid: bool, expected: bool) -> None:
    assert evaluate([item("ValidMessageFilter", Comparer=comparer)], valid=valid) is expected


@pytest.mark.parametrize(
    ("items", "values", "expected"),
    [
        ([], {}, True),
        ([t("a")], {}, False),
        ([t("a", not_=True)], {}, True),
        ([t("a"), t("b")], {"a": "yes"}, False),  # a And b
        ([t("a", conjunction=1), t("b")], {"a": "yes"}, True),  # a Or b
        # And binds tighter than Or: a Or b And c  ==  a Or (b And c)
        ([t("a", conjunction=1), t("b"), t("c")], {"a": "yes"}, True),
        ([t("a", conjunction=1), t("b"), t("c")], {"b": "yes"}, False),
        # a And b Or c  ==  (a And b) Or c
        ([t("a"), t("b", conjunction=1), t("c")], {"c": "yes"}, True),
        ([t("a"), t("b", conjunction=1), t("c")], {"a": "yes"}, False),
        # a And [group: b Or c]: the group is one operand
        (
            [t("a"), item("FilterGroup"), t("b", conjunction=1), t("c")],
            {"a": "yes", "c": "yes"},
            True,
        ),
        ([t("a"), item("FilterGroup"), t("b", conjunction=1), t("c")], {"c": "yes"}, False),
        # Not on the marker negates the whole group: a And Not(b Or c)
        (
            [t("a"), item("FilterGroup", Not=True), t("b", conjunction=1), t("c")],
            {"a": "yes"},
            True,
        ),
        (
            [t("a"), item("FilterGroup", Not=True), t("b", conjunction=1), t("c")],
            {"a": "yes", "b": "yes"},
            False,
        ),
        # the marker's Conjunction joins the group to the next group: [a] Or [b]
        (
            [t("x"), item("FilterGroup", Conjunction=1), t("a"), item("FilterGroup"), t("b")],
            {"x": "yes", "b": "yes"},
            True,
        ),
        (
            [t("x"), item("FilterGroup", Conjunction=0), t("a"), item("FilterGroup"), t("b")],
            {"x": "yes", "b": "yes"},
            False,
        ),
        # inside a group And binds tighter too: x And [a Or b And c]
        (
            [t("x"), item("FilterGroup"), t("a", conjunction=1), t("b"), t("c")],
            {"x": "yes", "b": "yes"},
            False,
        ),
        ([t("x"), item("FilterGroup"), t("a", conjunction=1), t("b"), t("c")], YES, True),
    ],
)
def test_conjunctions_groups_and_not(
    items: list[model.FilterItem], values: dict[str, str], expected: bool
) -> None:
    assert evaluate(items, values) is expected
