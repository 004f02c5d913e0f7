"""What every activity runs with. Upstream: pipeline.run; downstream: each activity module."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from soupflow.pipeline.context import RunContext


@dataclass(frozen=True)
class Activity:
    """The run's context, the activity's id, and its outbound message after transformers."""

    context: RunContext
    activity_id: str
    outbound: str
    http: httpx.Client
