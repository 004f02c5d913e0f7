"""Date and number patterns as the format's files write them (.NET style). Pure.

Upstream: template (`${CurrentDateTime:yyyyMMddHHmmss}`), pipeline formatting (`Format`).
Dates are read from DICOM DA / DT / TM text or ISO 8601.
"""

from __future__ import annotations

import re
from datetime import datetime

_DATE_TOKENS = re.compile(r"yyyy|yy|MM|M|dd|d|HH|H|hh|h|mm|m|ss|s|fff|ff|f|tt|'[^']*'|.", re.DOTALL)
_DICOM_DATETIME = re.compile(
    r"^(?P<year>\d{4})(?P<month>\d{2})?(?P<day>\d{2})?(?P<hour>\d{2})?(?P<minute>\d{2})?"
    r"(?P<second>\d{2})?(?:\.(?P<fraction>\d{1,6}))?(?:[+-]\d{4})?$"
)
_DICOM_TIME = re.compile(
    r"^(?P<hour>\d{2})(?P<minute>\d{2})?(?P<second>\d{2})?(?:\.(?P<fraction>\d{1,6}))?$"
)


def format_datetime(moment: datetime, pattern: str) -> str:
    """`pattern` in .NET custom date format (yyyy MM dd HH mm ss fff ...)."""
    parts = []
    for token in _DATE_TOKENS.findall(pattern):
        parts.append(_date_token(moment, token))
    return "".join(parts)


def _date_token(moment: datetime, token: str) -> str:
    hour12 = moment.hour % 12 or 12
    table = {
        "yyyy": f"{moment.year:04d}",
        "yy": f"{moment.year % 100:02d}",
        "MM": f"{moment.month:02d}",
        "M": str(moment.month),
        "dd": f"{moment.day:02d}",
        "d": str(moment.day),
        "HH": f"{moment.hour:02d}",
        "H": str(moment.hour),
        "hh": f"{hour12:02d}",
        "h": str(hour12),
        "mm": f"{moment.minute:02d}",
        "m": str(moment.minute),
        "ss": f"{moment.second:02d}",
        "s": str(moment.second),
        "fff": f"{moment.microsecond // 1000:03d}",
        "ff": f"{moment.microsecond // 10000:02d}",
        "f": str(moment.microsecond // 100000),
        "tt": "AM" if moment.hour < 12 else "PM",
    }
    if token in table:
        return table[token]
    return (
        token[1:-1] if token.startswith("'") and token.endswith("'") and len(token) > 1 else token
    )


def parse_datetime(text: str) -> datetime | None:
    """A DICOM DA/DT/TM value or an ISO 8601 text as a datetime; None when it is neither."""
    text = text.strip()
    if not text:
        return None
    match = _DICOM_DATETIME.match(text) if len(text) != 6 or not text.isdigit() else None
    if match:
        parts = match.groupdict()
        try:
            return datetime(
                int(parts["year"]),
                int(parts["month"] or 1),
                int(parts["day"] or 1),
                int(parts["hour"] or 0),
                int(parts["minute"] or 0),
                int(parts["second"] or 0),
                int((parts["fraction"] or "0").ljust(6, "0")),
            )
        except ValueError:
            return None
    time_match = _DICOM_TIME.match(text)
    if time_match:
        parts = time_match.groupdict()
        try:
            return datetime(
                1900, 1, 1, int(parts["hour"]), int(parts["minute"] or 0), int(parts["second"] or 0)
            )
        except ValueError:
            return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_value(value: str, pattern: str) -> str:
    """A date or a number re-written with a .NET pattern; other values unchanged."""
    if not pattern:
        return value
    moment = parse_datetime(value)
    if moment is not None and not _is_number_pattern(pattern):
        return format_datetime(moment, pattern)
    if _is_number_pattern(pattern):
        try:
            number = float(value)
        except ValueError:
            return value
        decimals = len(pattern.split(".", 1)[1]) if "." in pattern else 0
        integer_digits = len(pattern.split(".", 1)[0])
        return f"{number:0{integer_digits + (decimals + 1 if decimals else 0)}.{decimals}f}"
    return value


def _is_number_pattern(pattern: str) -> bool:
    return bool(pattern) and set(pattern) <= set("0#.")
