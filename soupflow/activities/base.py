"""What every activity runs with and returns. Upstream: pipeline.run; downstream: each
activity module."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from soupflow.activities.connections import Connections
from soupflow.pipeline.context import RunContext


@dataclass(frozen=True)
class Activity:
    """The run's context, the activity's id, its outbound message after transformers, and
    the clients the workers share (HTTP, connections kept open)."""

    context: RunContext
    activity_id: str
    http: httpx.Client
    connections: Connections

    @property
    def outbound(self) -> str:
        """The activity's message after its transformers (made now if it was deferred)."""
        return self.context.outbound.get(self.activity_id, "")


@dataclass(frozen=True)
class Outcome:
    """What an activity did: its response (the activity's inbound message, None for none)
    and a PHI-free line for the outcome record (`dead show`): a status, a count, a note."""

    response: str | None
    detail: str
