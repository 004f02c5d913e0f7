"""The spool: objects made durable by rename, in subfolders that stay."""

from __future__ import annotations

import os
from pathlib import Path

from soupflow.durable import WRITE_BEHIND_BYTES, WriteBehind
from soupflow.store.spool import Spool


def incoming(spool: Spool, name: str, data: bytes) -> Path:
    spool.incoming.mkdir(parents=True, exist_ok=True)
    path = spool.incoming / name
    path.write_bytes(data)
    return path


def test_a_committed_object_is_in_its_subfolder_with_its_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.commit(incoming(spool, "a.part", b"x" * 10), "ab12") == 10
    assert spool.path("ab12").read_bytes() == b"x" * 10
    assert not (spool.incoming / "a.part").exists()


def test_removing_objects_keeps_their_subfolder_for_the_next(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.commit(incoming(spool, "a.part", b"a"), "ab01")
    spool.remove("ab01")
    assert not spool.path("ab01").exists()
    assert spool.path("ab01").parent.is_dir()  # no rmdir, no mkdir for the next object
    spool.commit(incoming(spool, "b.part", b"b"), "ab02")
    assert spool.path("ab02").read_bytes() == b"b"


def test_a_subfolder_an_operator_removed_is_made_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.commit(incoming(spool, "a.part", b"a"), "ab01")
    spool.remove("ab01")
    spool.path("ab01").parent.rmdir()
    spool.commit(incoming(spool, "b.part", b"b"), "ab02")
    assert spool.path("ab02").read_bytes() == b"b"


def test_starting_makes_every_subfolder_and_keeps_what_is_committed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.commit(incoming(spool, "a.part", b"a"), "ab01")
    spool.clear_incoming()
    assert sorted(p.name for p in spool.root.iterdir() if len(p.name) == 2) == [
        f"{n:02x}" for n in range(256)
    ]
    assert spool.path("ab01").read_bytes() == b"a"
    assert list(spool.incoming.iterdir()) == []


def test_write_behind_hands_each_stretch_to_the_kernel_as_the_file_grows(tmp_path: Path) -> None:
    """A large object's bytes leave the process's buffer at each threshold (and the kernel is
    asked to write them back), so the final fsync has little left."""
    on_disk = set()
    piece = b"x" * 1000
    with (tmp_path / "large.part").open("wb", buffering=4 * WRITE_BEHIND_BYTES) as file:
        behind = WriteBehind(file)
        for _ in range(5 * WRITE_BEHIND_BYTES // 2 // len(piece)):
            file.write(piece)
            behind.wrote(len(piece))
            on_disk.add(os.fstat(file.fileno()).st_size)
    stretch = -(-WRITE_BEHIND_BYTES // len(piece)) * len(piece)  # whole pieces past it
    assert sorted(on_disk) == [0, stretch, 2 * stretch]  # nothing else left the 64 MB buffer
