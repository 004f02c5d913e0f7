"""DIMSE statuses: one table for both roles. Pure. Used by the acceptor (what we answer),
the requestor (what a peer answered) and any receiver that reports a DICOM status.

Ranges and meanings from PS3.7 Annex C (general statuses) and PS3.4 Annex B.2.3 (Storage
Service Class, Table B.2-1), in the manner of pynetdicom's `status.py`. Each code has a
category that decides what a sender does with it: success and warning are done, a refusal
for lack of resources may be tried again, anything else is a permanent failure.
"""

from __future__ import annotations

import enum

SUCCESS = 0x0000
# Storage warnings, PS3.4 Table B.2-1.
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
# Failures.
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (the sender may retry)
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand


class Category(enum.StrEnum):
    SUCCESS = "success"
    WARNING = "warning"
    TRANSIENT = "transient"  # refused for now: try again later
    FAILURE = "failure"  # permanent: the same request will fail again


_EXACT: dict[int, tuple[Category, str]] = {
    SUCCESS: (Category.SUCCESS, "Success"),
    COERCION_OF_DATA_ELEMENTS: (Category.WARNING, "Warning: Coercion of Data Elements"),
    ELEMENTS_DISCARDED: (Category.WARNING, "Warning: Elements Discarded"),
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING: (
        Category.WARNING,
        "Warning: Data Set does not match SOP Class",
    ),
    0x0107: (Category.WARNING, "Warning: Attribute list error"),
    0x0116: (Category.WARNING, "Warning: Attribute Value Out of Range"),
    0x0122: (Category.FAILURE, "Refused: SOP Class not Supported"),
    0x0124: (Category.FAILURE, "Refused: Not Authorized"),
    0x0210: (Category.FAILURE, "Failed: Duplicate Invocation"),
    0x0211: (Category.FAILURE, "Failed: Unrecognized Operation"),
    0x0212: (Category.FAILURE, "Failed: Mistyped Argument"),
    0x0213: (Category.TRANSIENT, "Failed: Resource Limitation"),
    0xFE00: (Category.FAILURE, "Cancel"),
}
# (first, last, category, meaning), tried in order after the exact codes.
_RANGES: tuple[tuple[int, int, Category, str], ...] = (
    (0xA700, 0xA7FF, Category.TRANSIENT, "Refused: Out of Resources"),
    (0xA900, 0xA9FF, Category.FAILURE, "Error: Data Set does not match SOP Class"),
    (0xC000, 0xCFFF, Category.FAILURE, "Error: Cannot understand"),
    (0xB000, 0xBFFF, Category.WARNING, "Warning"),
    (0xFF00, 0xFF01, Category.SUCCESS, "Pending"),
)


def lookup(code: int) -> tuple[Category, str]:
    """The category and meaning of a status code (unknown codes are permanent failures)."""
    exact = _EXACT.get(code)
    if exact is not None:
        return exact
    for first, last, category, meaning in _RANGES:
        if first <= code <= last:
            return category, meaning
    return Category.FAILURE, "Failure (unknown status)"


def category(code: int) -> Category:
    return lookup(code)[0]


def describe(code: int) -> str:
    """`0xA700 Refused: Out of Resources`, for log lines and outcome records."""
    return f"0x{code:04X} {lookup(code)[1]}"
