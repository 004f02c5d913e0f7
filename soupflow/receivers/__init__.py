"""Front doors: each receiver kind turns network input into `ingest`. Upstream: runtime.

    base     the Receiver protocol the runtime drives, ReceiverError
    dicom    DicomReceiverSetting: a C-STORE listener (dicom.acceptor per association)

`RECEIVERS` maps a receiver setting class to the class that serves it; adding a kind is one
module and one line here.
"""

from __future__ import annotations

from soupflow.receivers.dicom import Listener
from soupflow.workflow import model

RECEIVERS: dict[type[model.DicomReceiverSetting], type[Listener]] = {
    model.DicomReceiverSetting: Listener,
}
