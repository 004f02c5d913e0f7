"""Runtime failures are a small tree: transient ones are retried, permanent ones are dead."""

from __future__ import annotations


class ActivityError(Exception):
    """An activity (or the steps before it) failed; `str(error)` is the reason an operator sees
    (and the logs carry: soupflow writes it without PHI). `detail` is kept in the dead record
    only: it may hold values from the message (a Python traceback)."""

    detail: str = ""


class TransientError(ActivityError):
    """Worth retrying later: network errors, timeouts, HTTP 5xx/408/429, a full disk."""


class PermanentError(ActivityError):
    """Retrying will not help: HTTP 4xx, a template or path that cannot work, an unsafe path."""
