"""File writer (`FileWriterSenderSetting`): write the activity's message to a file.

Text types append a record; Binary (14) base64-decodes the message and overwrites; DICOM (16)
writes the received object's bytes. Relative paths are inside the data folder. The resolved
path must stay inside the folder the setting names (the part before its first variable):
a variable cannot climb out with `..` or an absolute path. Every write goes to a temporary
file that is fsynced and renamed: no reader ever sees half a file. With
`MoveIntoDirectoryOnComplete`, a file that reaches `MaxRecordsPerFile` records moves into
`DirectoryToMoveInto`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from soupflow.activities.base import Activity
from soupflow.pipeline.errors import PermanentError, TransientError
from soupflow.workflow import model
from soupflow.workflow.types import MessageType

_LOCKS: defaultdict[Path, threading.Lock] = defaultdict(threading.Lock)
_LOCKS_GUARD = threading.Lock()
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EAGAIN, errno.EDQUOT, errno.EBUSY})


def run(setting: model.FileWriterSenderSetting, activity: Activity) -> str | None:
    target = resolve(setting.file_path_to_write, activity)
    try:
        with _lock(target):
            if setting.message_type == MessageType.DICOM:
                _replace(target, activity.context.object_path.read_bytes())
            elif setting.message_type == MessageType.Binary:
                _replace(target, _decoded(activity.outbound))
            else:
                _append(setting, target, activity)
    except OSError as exc:
        kind = TransientError if exc.errno in _TRANSIENT_ERRNOS else PermanentError
        raise kind(
            f"cannot write the file for {setting.file_path_to_write!r}: {os.strerror(exc.errno or errno.EIO)}"
        ) from None
    return None


def resolve(path_template: str, activity: Activity) -> Path:
    """The file the template names, refused when it would leave the folder the setting names."""
    data = activity.context.data_folder
    static = path_template.split("${", 1)[0]
    folder = static if static.endswith(("/", "\\")) else os.path.dirname(static)
    root = (data / folder).resolve()
    target = (data / activity.context.expand(path_template)).resolve()
    if target == root or not target.is_relative_to(root):
        raise PermanentError(
            f"the path {path_template!r} resolves outside its folder {folder or '.'!r}; nothing written"
        )
    return target


def _lock(target: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS[target]


def _decoded(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PermanentError("a Binary message must be base64") from None


def _append(setting: model.FileWriterSenderSetting, target: Path, activity: Activity) -> None:
    record = activity.outbound if activity.outbound.endswith("\n") else activity.outbound + "\n"
    existing = target.read_bytes() if target.exists() else _header(setting)
    _replace(target, existing + record.encode("utf-8"))
    counter = target.with_name(f".{target.name}.records")
    count = (int(counter.read_text()) if counter.exists() else 0) + 1
    if setting.move_into_directory_on_complete and count >= setting.max_records_per_file:
        destination = resolve(
            setting.directory_to_move_into.rstrip("/\\") + "/" + _stamped(target.name), activity
        )
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(target, destination)
        count = 0
    _replace(counter, str(count).encode("ascii"))


def _header(setting: model.FileWriterSenderSetting) -> bytes:
    options = setting.message_type_options or {}
    header = options.get("Header")
    return (header + "\n").encode("utf-8") if isinstance(header, str) and header else b""


def _stamped(name: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    stamp = time.strftime("%Y%m%d%H%M%S")
    return f"{stem}-{stamp}{dot}{suffix}" if dot else f"{name}-{stamp}"


def _replace(target: Path, data: bytes) -> None:
    """Write `data` to `target` atomically and durably."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
