"""Watch the workflows folder: any change is only a trigger to rescan. Upstream: cli (`run`).

watchfiles reports changes after a quiet period (debounce), so a file being written or
copied in pieces triggers one rescan once it settles; a half-written file that is not JSON
yet is reported and the workflow's last good version keeps running until the file is whole.
The folder is also rescanned every second when nothing was reported: a change made before
the watch began, or missed by the filesystem, is still picked up (a rescan of unchanged
files changes nothing).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import watchfiles

from soupflow.workflow.load import is_workflow_file

log = logging.getLogger(__name__)

DEBOUNCE_MILLISECONDS = 300
RESCAN_MILLISECONDS = 1000


def watch(folder: Path, on_change: Callable[[], None], stopping: threading.Event) -> None:
    """Call `on_change` after each settled batch of changes to workflow files, until stopped."""
    folder.mkdir(parents=True, exist_ok=True)
    changes = watchfiles.watch(
        folder,
        watch_filter=lambda _, path: is_workflow_file(Path(path)),
        debounce=DEBOUNCE_MILLISECONDS,
        step=50,
        stop_event=stopping,
        recursive=False,
        rust_timeout=RESCAN_MILLISECONDS,
        yield_on_timeout=True,
    )
    for _ in changes:
        try:
            on_change()
        except Exception:  # a reload must never stop the watcher
            log.exception("reloading %s failed", folder)
