"""The spool: objects made durable by rename, in subfolders that stay."""

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
