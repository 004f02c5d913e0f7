"""Runtime failures are a small tree: transient ones are retried, permanent ones are dead."""

from __future__ import annotations


class ActivityError(Exception):
    """An activity (or the steps before it) failed; `str(error)` is the reason an operator sees."""


class TransientError(ActivityError):
    """Worth retrying later: network errors, timeouts, HTTP 5xx/408/429, a full disk."""


class PermanentError(ActivityError):
    """Retrying will not help: HTTP 4xx, a template or path that cannot work, an unsafe path."""
