"""Object files: received Part 10 objects, made durable before anything is acknowledged.

Upstream: association (writes into `incoming`), listener (`commit`), workers (`path`,
`remove`). Layout under the data folder: `incoming/` for objects being received (on the
same filesystem, so committing is a rename), `objects/<first two hex digits of the request
id>/<request id>.dcm`. A file is durable once `commit` returns: its bytes and its
directory entry are fsynced (a crash one instant later keeps it).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_COPY_CHUNK = 1024 * 1024


class SpoolError(OSError):
    """The object could not be made durable (disk full, unwritable folder, ...)."""


class Spool:
    def __init__(self, data_folder: Path) -> None:
        self.root = data_folder / "objects"
        self.incoming = data_folder / "incoming"

    def clear_incoming(self) -> None:
        """Start with an empty incoming folder: what a crash left there was never acknowledged."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True, exist_ok=True)

    def path(self, request_id: str) -> Path:
        return self.root / request_id[:2] / f"{request_id}.dcm"

    def relative(self, request_id: str) -> str:
        return self.path(request_id).relative_to(self.root).as_posix()

    def commit(self, source: Path, request_id: str) -> int:
        """Move a received file into the spool and make it durable; return its size.

        `source` is renamed when it is on the same filesystem, else copied in bounded chunks.
        On any failure nothing is left in the spool and SpoolError says why.
        """
        target = self.path(request_id)
        try:
            expected = source.stat().st_size
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy(source, target)
            size = _fsync_file(target)
            _fsync_directory(target.parent)
            if size != expected:
                raise SpoolError(errno.EIO, f"wrote {size} bytes of {expected}")
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise SpoolError(exc.errno or errno.EIO, exc.strerror or str(exc)) from exc
        return size

    def remove(self, request_id: str) -> None:
        self.path(request_id).unlink(missing_ok=True)


def _copy(source: Path, target: Path) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        shutil.copyfileobj(reader, writer, _COPY_CHUNK)


def _fsync_file(path: Path) -> int:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        return os.fstat(descriptor).st_size
    finally:
        os.close(descriptor)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
