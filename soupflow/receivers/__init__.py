"""Front doors: each receiver kind turns network input into `ingest`. Upstream: runtime.

    base     the Receiver protocol the runtime drives, ReceiverError
    server   the accept loop, a thread per connection, TLS: what every kind shares
    dicom    DicomReceiverSetting: a C-STORE listener (dicom.acceptor per association)
    stow     StowRsReceiverSetting: a STOW-RS origin server (h11, python-multipart)

`RECEIVERS` maps a receiver setting class to the class that serves it; adding a kind is one
module and one line here. `handed` builds the one a worker process serves a handed
connection with (runtime.handoff).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soupflow.ingest import Ingest
from soupflow.receivers.base import Receiver
from soupflow.receivers.dicom import Listener
from soupflow.receivers.stow import StowListener
from soupflow.workflow import model

RECEIVERS: dict[type[model.ReceiverSetting], type[Receiver]] = {
    model.DicomReceiverSetting: Listener,
    model.StowRsReceiverSetting: StowListener,
}


def handed(workflow_id: str, settings: dict[str, Any], folder: Path, ingest: Ingest) -> Receiver:
    """The listener for a connection a runtime handed over, by its setting's `$type`
    (KeyError for a kind this soupflow does not know)."""
    kind = str(settings.get("$type", "")).split(",", 1)[0].strip()
    by_type = {setting.TYPE_NAME: listener for setting, listener in RECEIVERS.items()}
    return by_type[kind].from_settings(workflow_id, settings, folder, ingest)
