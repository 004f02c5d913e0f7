"""The spool: objects made durable by rename, removed without leaving empty folders."""

from __future__ import annotations

from pathlib import Path

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


def test_removing_the_last_object_of_a_subfolder_removes_the_subfolder(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.commit(incoming(spool, "a.part", b"a"), "ab01")
    spool.commit(incoming(spool, "b.part", b"b"), "ab02")
    spool.remove("ab01")
    assert spool.path("ab02").is_file()  # a sibling keeps the folder
    spool.remove("ab02")
    assert not spool.path("ab02").parent.exists()
    assert spool.root.is_dir()
    spool.commit(incoming(spool, "c.part", b"c"), "ab03")  # and it comes back when needed
    assert spool.path("ab03").is_file()
