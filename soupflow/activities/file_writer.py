"""File writer (`FileWriterSenderSetting`): write the activity's message to a file.

Text types append a record; Binary (14) base64-decodes the message and overwrites; DICOM (16)
writes the received object's bytes. Relative paths are inside the data folder. The resolved
path must stay inside the folder the setting names (the part before its first variable):
a variable cannot climb out with `..` or an absolute path. A new file, and every overwrite,
goes to a temporary file that is fsynced and renamed: no reader ever sees half a new file
(output folders are often watched). A record for a file that exists is appended in place
and fsynced (`durable.append`): rewriting the whole file made each record cost the file. With
`MoveIntoDirectoryOnComplete`, a file that reaches `MaxRecordsPerFile` records moves into
`DirectoryToMoveInto`; the record count is kept in the data folder (`file-writer/`), never
beside the output: output folders are often watched by another system.

Writes to one file are serialised by one of a fixed set of lock files in `file-writer/locks/`
(by a hash of the target path: bounded, and it holds across threads and worker processes).
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from soupflow import durable
from soupflow.activities.base import Activity, Outcome
from soupflow.pipeline.errors import PermanentError, TransientError
from soupflow.workflow import model
from soupflow.workflow.types import MessageType

BOOKKEEPING_FOLDER = "file-writer"
_LOCK_STRIPES = 64
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EAGAIN, errno.EDQUOT, errno.EBUSY})


def run(setting: model.FileWriterSenderSetting, activity: Activity) -> Outcome:
    target = resolve(setting.file_path_to_write, activity)
    try:
        with _lock(activity.context.data_folder, target):
            if setting.message_type == MessageType.DICOM:
                durable.replace(target, activity.context.object_path.read_bytes())
            elif setting.message_type == MessageType.Binary:
                durable.replace(target, _decoded(activity.outbound))
            else:
                _append(setting, target, activity)
    except OSError as exc:
        kind = TransientError if exc.errno in _TRANSIENT_ERRNOS else PermanentError
        raise kind(
            f"cannot write the file for {setting.file_path_to_write!r}: {os.strerror(exc.errno or errno.EIO)}"
        ) from None
    return Outcome(None, "written")


def resolve(path_template: str, activity: Activity) -> Path:
    """The file the template names, refused when it would leave the folder the setting names."""
    data = activity.context.data_folder
    static = path_template.split("${", 1)[0]
    folder = static if static.endswith(("/", "\\")) else os.path.dirname(static)
    root = (data / folder).resolve()
    expanded = activity.context.expand(path_template)
    if "\0" in expanded:
        raise PermanentError(
            f"the path {path_template!r} expands to a name with a NUL character; nothing written"
        )
    target = (data / expanded).resolve()
    if target == root or not target.is_relative_to(root):
        raise PermanentError(
            f"the path {path_template!r} resolves outside its folder {folder or '.'!r}; nothing written"
        )
    return target


def _key(target: Path) -> str:
    return hashlib.sha256(str(target).encode("utf-8", "surrogateescape")).hexdigest()


@contextmanager
def _lock(data_folder: Path, target: Path) -> Iterator[None]:
    """One of `_LOCK_STRIPES` lock files, chosen by the target's path, held exclusively."""
    folder = data_folder / BOOKKEEPING_FOLDER / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    stripe = int(_key(target)[:8], 16) % _LOCK_STRIPES
    descriptor = os.open(folder / f"{stripe:02d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _decoded(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PermanentError("a Binary message must be base64") from None


def _append(setting: model.FileWriterSenderSetting, target: Path, activity: Activity) -> None:
    record = activity.outbound if activity.outbound.endswith("\n") else activity.outbound + "\n"
    fresh = not target.exists()
    if fresh:  # a new file appears whole, header and first record (renamed into place)
        durable.replace(target, _header(setting) + record.encode("utf-8"))
    else:
        durable.append(target, record.encode("utf-8"))
    if not setting.move_into_directory_on_complete:
        return
    counter = activity.context.data_folder / BOOKKEEPING_FOLDER / "records" / _key(target)
    count = (int(counter.read_text()) if counter.exists() and not fresh else 0) + 1
    if count < setting.max_records_per_file:
        durable.replace(counter, str(count).encode("ascii"))
        return
    destination = resolve(
        setting.directory_to_move_into.rstrip("/\\") + "/" + _stamped(target.name), activity
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(target, destination)
    durable.fsync_directory(destination.parent)
    counter.unlink(missing_ok=True)


def _header(setting: model.FileWriterSenderSetting) -> bytes:
    options = setting.message_type_options or {}
    header = options.get("Header")
    return (header + "\n").encode("utf-8") if isinstance(header, str) and header else b""


def _stamped(name: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    stamp = time.strftime("%Y%m%d%H%M%S")
    return f"{stem}-{stamp}{dot}{suffix}" if dot else f"{name}-{stamp}"
