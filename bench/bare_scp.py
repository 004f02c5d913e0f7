"""The baseline: a bare pynetdicom C-STORE SCP that writes each dataset to a file, no more.

    python -m bench.bare_scp PORT FOLDER

The same library soupflow uses, with chunked receive, no fsync, no queue, no checks.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

_config.STORE_RECV_CHUNKED_DATASET = True
_config.UNRESTRICTED_STORAGE_SERVICE = True


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)

    def store(event: Any) -> int:
        os.replace(event.dataset_path, folder / f"{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_associations = 16
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    threading.Event().wait()


if __name__ == "__main__":
    main()
