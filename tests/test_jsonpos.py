"""Positions of JSON values and keys, and of syntax errors."""

from __future__ import annotations

import pytest

from soupflow.workflow.jsonpos import JsonSyntaxError, Position, parse


def test_every_value_and_key_has_its_line_and_column() -> None:
    text = '{\n  "a": [1, {"b~/c": "x"}],\n  "d": null\n}'
    parsed = parse(text)
    assert parsed.values[""] == Position(1, 1)
    assert parsed.values["/a"] == Position(2, 8)
    assert parsed.values["/a/0"] == Position(2, 9)
    assert parsed.values["/a/1/b~0~1c"] == Position(2, 21)
    assert parsed.keys["/a/1/b~0~1c"] == Position(2, 13)
    assert parsed.values["/d"] == Position(3, 8)


def test_a_missing_member_is_placed_at_its_object() -> None:
    parsed = parse('{"a": {"b": 1}}')
    assert parsed.position("/a/missing") == Position(1, 7)


def test_positions_count_characters_not_bytes() -> None:
    parsed = parse('{"名前": "検査", "x": 1}')
    assert parsed.values["/x"] == Position(1, 19)


def test_a_bom_is_tolerated_and_duplicates_are_recorded() -> None:
    parsed = parse('\ufeff{"a": 1, "a": 2}')
    assert parsed.value == {"a": 2}
    assert parsed.duplicate_keys == ["/a"]


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ('{"a": 1,\n', Position(2, 1)),
        ('{"a": NaN}', Position(1, 1)),
        ("[" * 100000, Position(1, 1)),
    ],
)
def test_syntax_errors_carry_a_position(text: str, position: Position) -> None:
    with pytest.raises(JsonSyntaxError) as error:
        parse(text)
    assert error.value.position == position
