"""pynetdicom's association reactor, paused without its race (pynetdicom 3.0.4).

An SCU's `send_c_store` (and `release`) clears the association's `_reactor_checkpoint` and
waits for `_is_paused`; the reactor sets `_is_paused` just before it waits on the
checkpoint, and clears it after. A reactor past the wait but not yet through
`_is_paused = False` reads as paused: the SCU sends, a peer that answers at once (soupflow
does) has its C-STORE-RSP taken off the DIMSE queue by the reactor ("Received unexpected
C-STORE service message"), and the SCU waits out its DIMSE timeout and aborts. Seen in CI
as a sender stuck mid-transfer with the runtime's log showing every store answered.

Here the checkpoint's `clear()` returns only once the reactor is back in `wait()` (or
gone), and a reactor woken by a `set()` goes on only if the checkpoint is still set when it
holds its turn. Installed for every association the tests make (tests/conftest.py).
"""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom.association import Association

_HOLDER_POLL_SECONDS = 0.05


class ReactorCheckpoint(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.set()  # as pynetdicom's: running
        self._turn = threading.Lock()  # the reactor's between two waits
        self._holder: threading.Thread | None = None

    def wait(self, timeout: float | None = None) -> bool:
        if self._holder is threading.current_thread():
            self._holder = None
            self._turn.release()
        while True:
            woken = super().wait(timeout)
            self._turn.acquire()
            if self.is_set() or not woken:
                self._holder = threading.current_thread()
                return woken
            self._turn.release()  # cleared again before our turn: wait on

    def clear(self) -> None:
        super().clear()
        holder = self._holder
        if holder is None or holder is threading.current_thread():
            return  # the reactor waits, or will find the checkpoint clear when it wakes
        while not self._turn.acquire(timeout=_HOLDER_POLL_SECONDS):
            if not holder.is_alive():  # a reactor that ended holds its turn for good
                return
        self._turn.release()


def install() -> None:
    made = Association.__init__

    def with_checkpoint(self: Association, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        self._reactor_checkpoint = ReactorCheckpoint()

    Association.__init__ = with_checkpoint  # type: ignore[method-assign]
