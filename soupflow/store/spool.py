"""Object files: received Part 10 objects, made durable before anything is acknowledged.

Upstream: receivers (write into `incoming`), ingest (`commit`), runtime.workers (`path`,
`remove`). Layout: `<objects>/<first two hex digits of the request id>/<request id>.dcm`,
where `<objects>` is `<data>/objects` unless `--objects` names a folder (a mount several
nodes share). Objects being received are in an incoming folder on the same filesystem, so
committing is a rename: `<data>/incoming/`, or with a shared objects folder
`<objects>/incoming/<node>/`, one per node, so that a node clearing its own at start never
touches another's files in transit. A file is durable once `commit` returns: its bytes and
its directory entry are fsynced (a crash one instant later keeps it). Objects that no queue
entry names (a crash between the commit and the enqueue) are found by `unclaimed`. The 256
subfolders are made at start (or on first use), with their own entries fsynced, and never
removed (as git's object folders): removing an emptied one and making it again for the next object cost
two directory operations per message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from soupflow.durable import fsync_directory, fsync_file

_COPY_CHUNK = 1024 * 1024


class SpoolError(OSError):
    """The object could not be made durable (disk full, unwritable folder, ...)."""


class Spool:
    def __init__(self, data_folder: Path, objects: Path | None = None, node: str = "") -> None:
        self.root = objects if objects is not None else data_folder / "objects"
        self.incoming = (
            data_folder / "incoming" if objects is None else objects / "incoming" / (node or "node")
        )
        self._made: set[Path] = set()  # subfolders known to exist, their entries durable

    def clear_incoming(self) -> None:
        """Start with an empty incoming folder (what a crash left there was never
        acknowledged) and every object subfolder made, with one fsync for their entries."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        for prefix in range(256):
            folder = self.root / f"{prefix:02x}"
            folder.mkdir(exist_ok=True)
            self._made.add(folder)
        fsync_directory(self.root)

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
            try:
                self._subfolder(target.parent)
                _move(source, target)
            except FileNotFoundError:  # an operator removed the subfolder meanwhile
                if not source.exists():
                    raise
                self._made.discard(target.parent)
                self._subfolder(target.parent)
                _move(source, target)
            size = fsync_file(target)
            fsync_directory(target.parent)
            if size != expected:
                raise SpoolError(errno.EIO, f"wrote {size} bytes of {expected}")
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise SpoolError(exc.errno or errno.EIO, exc.strerror or str(exc)) from exc
        return size

    def _subfolder(self, folder: Path) -> None:
        if folder in self._made:
            return
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            pass
        else:  # a new folder's own entry, so that what is renamed into it survives a crash
            fsync_directory(folder.parent)
        self._made.add(folder)

    def unclaimed(self, older_than: float, limit: int = 100_000) -> Iterator[str]:
        """Request ids of objects last modified before `older_than` (epoch seconds): the
        candidates for the sweep, which keeps those the queue knows (bounded by `limit`)."""
        found = 0
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if len(folder.name) != 2 or not folder.is_dir():
                continue  # the incoming folders, anything an operator put there
            for path in folder.glob("*.dcm"):
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    if path.stat().st_mtime < older_than:
                        yield path.stem
                        found += 1
                        if found >= limit:
                            return

    def remove(self, request_id: str) -> None:
        """Delete the object (its subfolder stays)."""
        self.path(request_id).unlink(missing_ok=True)


def _move(source: Path, target: Path) -> None:
    """Rename into place (copy across filesystems)."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy(source, target)


def _copy(source: Path, target: Path) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        shutil.copyfileobj(reader, writer, _COPY_CHUNK)
