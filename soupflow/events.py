"""Structured fields for an event line: `log.info(text, *args, extra=fields(...))`. The text
line shows the message; `--log-format json` adds the fields to the event's object (ids, AE
titles, addresses, statuses and counts: the same PHI rule as the text)."""

from __future__ import annotations


def fields(**values: object) -> dict[str, dict[str, object]]:
    return {"fields": {name: value for name, value in values.items() if value not in (None, "")}}
