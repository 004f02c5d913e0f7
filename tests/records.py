"""Queue records for tests that need one without receiving anything."""

from __future__ import annotations

from typing import Any

from soupflow.store.queue import Arrival, Origin

_ORIGIN_FIELDS = ("calling_aet", "called_aet", "peer_address", "peer_port")


def arrival(**fields: Any) -> Arrival:
    """An Arrival with plausible values; `fields` override them (the origin's too)."""
    defaults: dict[str, Any] = {
        "request_id": "8c7f0c1e-2b6a-4f7e-9a51-0d1c2b3a4f5e",
        "workflow_id": "workflow-1",
        "object_path": "8c/x.dcm",
        "byte_count": 0,
        "sop_class_uid": "",
        "sop_instance_uid": "",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "calling_aet": "MODALITY01",
        "called_aet": "SOUPFLOW",
        "peer_address": "127.0.0.1",
        "peer_port": 40001,
        "received_at": 1_790_000_000.123,
    }
    merged = {**defaults, **fields}
    origin = Origin(**{name: merged.pop(name) for name in _ORIGIN_FIELDS})
    return Arrival(**merged, origin=origin)
