"""Writing files so that no reader sees half of one and a crash keeps what was written.

Used by the spool, the file writer, the runtime's listeners file and `soupflow fmt`, and by
the receivers as they stream an object to disk (`WriteBehind`). A file
is replaced by writing a temporary file beside it and renaming it into place (atomic on
POSIX); with `sync`, its bytes and the folder entry are fsynced first and after, so the new
content survives a crash or power loss the moment `replace` returns.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

WRITE_BEHIND_BYTES = 16 * 1024 * 1024


def replace(target: Path, data: bytes, *, sync: bool = True) -> None:
    """Write `data` to `target` atomically (and durably with `sync`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            if sync:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if sync:
        fsync_directory(target.parent)


def fsync_file(path: Path) -> int:
    """fsync a file's bytes; its size."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        return os.fstat(descriptor).st_size
    finally:
        os.close(descriptor)


def fsync_directory(path: Path) -> None:
    """fsync a folder, so the names created or renamed in it survive a crash."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class WriteBehind:
    """The disk starts writing a large file while it is still being received, so that the
    fsync that makes it durable has little left to wait for, and its bytes leave the page
    cache instead of pushing out what else is cached. Every WRITE_BEHIND_BYTES written, the
    file's buffer is flushed and the kernel asked to write that range back
    (POSIX_FADV_DONTNEED starts writeback of dirty pages; it never drops one unwritten).
    Files under the threshold (a CT image) are never touched. Advisory: a filesystem that
    refuses the advice changes nothing."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.written = 0
        self._started = 0  # where the range not yet handed to writeback begins

    def wrote(self, count: int) -> None:
        self.written += count
        if self.written - self._started < WRITE_BEHIND_BYTES:
            return
        self.file.flush()
        with contextlib.suppress(OSError):
            os.posix_fadvise(
                self.file.fileno(),
                self._started,
                self.written - self._started,
                os.POSIX_FADV_DONTNEED,
            )
        self._started = self.written
