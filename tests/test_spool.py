"""The spool writes bytes durably under sanitised names and refuses below the free-space watermark."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.spool import INCOMING_FOLDER, Spool, SpoolFull, relative_path, sanitise_uid


def store(spool: Spool, relative: str, data: bytes) -> str:
    """What the listener does: stage into ~incoming, publish under the final (or next free) name, discard."""
    staged = spool.stage(INCOMING_FOLDER, data)
    try:
        return spool.publish_new(staged, relative)
    finally:
        spool.discard(staged)


def test_stored_bytes_land_under_the_layout(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    rel = relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5", 1)
    assert rel == "1.2.3/1.2.3.4/1.2.3.4.5.v1.dcm"
    assert store(spool, rel, b"DICM-bytes") == rel
    assert (tmp_path / "spool" / rel).read_bytes() == b"DICM-bytes"
    assert spool.incoming_leftovers() == []  # the temporary file is gone


def test_hostile_uids_cannot_leave_the_spool(tmp_path: Path) -> None:
    assert sanitise_uid("../../etc/passwd") == ".._.._etc_passwd"
    assert sanitise_uid("..") not in {"..", "."} and sanitise_uid(".") not in {"..", "."}
    assert sanitise_uid("") and "/" not in sanitise_uid("a/b")
    spool = Spool(tmp_path / "spool")
    rel = relative_path("..", "../x", "/abs", 1)
    store(spool, rel, b"x")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1 and (tmp_path / "spool") in written[0].parents


def test_a_taken_name_is_never_overwritten(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    store(spool, "a/b/c.v1.dcm", b"first")
    assert store(spool, "a/b/c.v1.dcm", b"second") == "a/b/c.v1~2.dcm"
    assert (tmp_path / "a/b/c.v1.dcm").read_bytes() == b"first"
    assert spool.incoming_leftovers() == []


def test_below_the_watermark_nothing_is_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)
    with pytest.raises(SpoolFull):
        spool.check_space()
    with pytest.raises(SpoolFull):
        store(spool, "a/b/c.v1.dcm", b"x")
    assert not any(p.is_file() for p in (tmp_path / "spool").rglob("*"))


def test_remove_deletes_only_the_named_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    store(spool, "a/b/c.v1.dcm", b"1")
    store(spool, "a/b/d.v1.dcm", b"2")
    spool.remove("a/b/c.v1.dcm")
    assert not (tmp_path / "a/b/c.v1.dcm").exists() and (tmp_path / "a/b/d.v1.dcm").exists()


def test_staged_in_the_incoming_folder_and_published_into_a_new_study_folder(tmp_path: Path) -> None:
    """The listener stages before it knows the study: publishing creates the final folders durably."""
    spool = Spool(tmp_path / "spool")
    staged = spool.stage(INCOMING_FOLDER, b"bytes of an instance")
    assert staged.parent == tmp_path / "spool" / INCOMING_FOLDER and staged.read_bytes() == b"bytes of an instance"
    rel = relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5", 1)
    assert spool.publish_new(staged, rel) == rel
    spool.discard(staged)
    assert (tmp_path / "spool" / rel).read_bytes() == b"bytes of an instance"
    assert spool.incoming_leftovers() == []


def test_no_uid_can_name_the_incoming_folder() -> None:
    for uid in ("~incoming", INCOMING_FOLDER, "../~incoming"):
        assert sanitise_uid(uid) != INCOMING_FOLDER


def test_a_staged_file_from_outside_the_spool_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.tmp"
    outside.write_bytes(b"x")
    with pytest.raises(ValueError):
        Spool(tmp_path / "spool").publish_new(outside, "a/b/c.v1.dcm")


@pytest.mark.parametrize("orphan", [b"bytes of a crashed receive", b"partial", b"the new bytes"])
def test_publish_new_never_adopts_or_replaces_a_taken_name(tmp_path: Path, orphan: bytes) -> None:
    """A file left at a final name by a crash before its row was committed must not block a resend, and
    nothing may touch it: it could also belong to a concurrent receiver that has not committed yet."""
    spool = Spool(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a/b/c.v1.dcm").write_bytes(orphan)
    staged = spool.stage(INCOMING_FOLDER, b"the new bytes")
    assert spool.publish_new(staged, "a/b/c.v1.dcm") == "a/b/c.v1~2.dcm"
    assert spool.publish_new(staged, "a/b/c.v1.dcm") == "a/b/c.v1~3.dcm"
    assert spool.publish_new(staged, "a/b/d.v1.dcm") == "a/b/d.v1.dcm"
    assert (tmp_path / "a/b/c.v1.dcm").read_bytes() == orphan
    assert (tmp_path / "a/b/c.v1~2.dcm").read_bytes() == b"the new bytes"


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 529_000, (16 << 20) + 3])
def test_staged_bytes_are_exact_at_every_length(tmp_path: Path, size: int) -> None:
    """Staging writes the whole 4 kB blocks of up to 16 MiB with O_DIRECT and the partial last block (and
    anything larger) through the page cache: either way the file holds exactly the bytes, and the staging
    buffer's earlier, longer contents never leak into a shorter file."""
    spool = Spool(tmp_path / "spool")
    longer = bytes(range(256)) * 40  # 10 kB left in the staging thread's buffer by an earlier instance
    spool.discard(spool.stage(INCOMING_FOLDER, longer))
    data = bytes((i * 7 + 3) % 251 for i in range(size)) if size < 1 << 20 else b"\x5a" * size
    staged = spool.stage(INCOMING_FOLDER, data)
    assert staged.read_bytes() == data
    spool.discard(staged)
