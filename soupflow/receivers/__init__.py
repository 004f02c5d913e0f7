"""Front doors: each receiver kind turns network input into `ingest`. Upstream: runtime.

    base     the Receiver protocol the runtime drives, ReceiverError
    server   the accept loop, a thread per connection, TLS: what every kind shares
    dicom    DicomReceiverSetting: a C-STORE listener (dicom.acceptor per association)
    stow     StowRsReceiverSetting: a STOW-RS origin server (h11, python-multipart)

`RECEIVERS` maps a receiver setting class to the class that serves it; adding a kind is one
module and one line here.
"""

from __future__ import annotations

from soupflow.receivers.base import Receiver
from soupflow.receivers.dicom import Listener
from soupflow.receivers.stow import StowListener
from soupflow.workflow import model

RECEIVERS: dict[type[model.ReceiverSetting], type[Receiver]] = {
    model.DicomReceiverSetting: Listener,
    model.StowRsReceiverSetting: StowListener,
}
