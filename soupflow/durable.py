"""Writing files so that no reader sees half of one and a crash keeps what was written.

Used by the spool, the file writer, the runtime's listeners file and `soupflow fmt`. A file
is replaced by writing a temporary file beside it and renaming it into place (atomic on
POSIX); with `sync`, its bytes and the folder entry are fsynced first and after, so the new
content survives a crash or power loss the moment `replace` returns. `append` adds a record
to an existing file in place (fsynced), for logs that grow by a record at a time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def append(target: Path, data: bytes) -> None:
    """Add `data` at the end of the existing file `target` and fsync it: the cost is the
    record, not the file. A reader can see the record while it is being written; a crash can
    leave part of it, and the file is never shortened: when the file does not end with a
    newline (such a torn record, or a file made by hand), `data` starts on a new line."""
    with target.open("r+b") as stream:
        size = stream.seek(0, os.SEEK_END)
        if size:
            stream.seek(size - 1)
            if stream.read(1) != b"\n":
                data = b"\n" + data
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
