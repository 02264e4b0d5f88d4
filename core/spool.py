"""The spool: received DICOM bytes on disk, written so that an acknowledged instance survives a crash.

Why each step: bytes go to a temporary file on the spool's filesystem (so the link below is atomic) and
are synced to disk, then published under their final name with a link that never overwrites (two receivers
racing on one name cannot clobber each other), and the final folder is fsynced so the new name itself is
durable. Only then may the database row and the 0x0000 answer follow. A crash at any point leaves at most
a complete file under its final name without a row (never acknowledged; a resend is published under the
next free name, see `publish_new`) or a temporary `.incoming-*.tmp` file (never acknowledged;
`incoming_leftovers` lists them). Nothing here deletes stored instances; removing an instance is an
explicit act elsewhere.

Layout: `<DATA_DIR>/spool/<study_uid>/<series_uid>/<sop_uid>.v<version>.dcm`, UIDs sanitised to the
characters a UID may hold, so a hostile UID cannot climb out of the spool. The listener stages into
`<DATA_DIR>/spool/~incoming/` (a name no sanitised UID can take), because it starts writing before it has
decoded which study the bytes belong to.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import mmap
import os
import re
import shutil
import threading
from pathlib import Path

_UID_UNSAFE = re.compile(r"[^0-9A-Za-z.\-]")

# Staging folder of the listener: '~' is never left in a sanitised UID, so no study folder can be named so.
INCOMING_FOLDER = "~incoming"

_staged_names = itertools.count()
_MAX_NAMES = 100  # of one instance version's file; only orphans of repeated crashes could take more


class SpoolFull(Exception):
    """Free space on the spool's filesystem is below the watermark; the caller answers 0xA700."""


class SpoolConflict(Exception):
    """A different file already holds this name (a racing receiver, or an orphan from a crash)."""


def sanitise_uid(uid: str) -> str:
    """A UID as a safe path component: only digits, letters, '.', '-'; never empty, '.' or '..'."""
    cleaned = _UID_UNSAFE.sub("_", uid.strip().strip("\x00"))[:128]
    if cleaned in {"", ".", ".."}:
        cleaned = "_" + cleaned.replace(".", "_")
    return cleaned


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a stored file, read in 1 MiB blocks (a multi-frame instance can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def relative_folder(study_uid: str, series_uid: str) -> str:
    return f"{sanitise_uid(study_uid)}/{sanitise_uid(series_uid)}"


def relative_path(study_uid: str, series_uid: str, sop_uid: str, version: int) -> str:
    return f"{relative_folder(study_uid, series_uid)}/{sanitise_uid(sop_uid)}.v{version}.dcm"


def fsync_dir(path: Path) -> None:
    """Make a folder's entry list durable: a new or renamed file is only safe once its folder is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path, root: Path) -> None:
    """Create `path` (below `root`) and fsync each parent whose entry list changed."""
    missing: list[Path] = []
    current = path
    while not current.exists() and current != root:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        fsync_dir(folder.parent)


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SYNC_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_SYNC | _CLOEXEC
# No O_DSYNC with O_DIRECT: the write is followed by an fsync anyway (the file's size, its partial last block), and
# that fsync's flush makes the direct write durable too; O_DSYNC added a second device flush per instance
# (529 kB staged: 0.62 ms median without it, 0.69-0.78 ms with it, Intel Xeon VM, 2026-12-03).
_DIRECT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0) | _CLOEXEC
_DIRECT_ALIGN = 4096  # buffer address, length and file offset of an O_DIRECT write (the page size covers disks)
_DIRECT_MAX_BYTES = 16 << 20  # larger instances (multi-frame) go through the page cache: no 16 MiB+ buffers
_buffers = threading.local()


def _write_direct(fd: int, data: bytes) -> None:
    """Write `data` through an O_DIRECT descriptor: the whole blocks copied into this thread's page-aligned
    buffer (kept and reused, so its pages are warm) and written straight to the disk, then the last, partial
    block through the page cache (O_DIRECT cleared on the descriptor), for the caller's fsync to flush.

    Why not the whole buffer padded to a block and cut back with ftruncate (as before 2026-12-05): cutting a
    file inside a block the page cache never saw makes ext4 read that block back from the disk to zero its
    tail, a synchronous read on every staged instance (perf: `ext4_block_zero_page_range` -> `ext4_read_bh`
    under `ftruncate`, docs/bench/ingest.md)."""
    size = len(data)
    whole = size - size % _DIRECT_ALIGN
    with memoryview(data) as source:
        if whole:
            buffer: mmap.mmap | None = getattr(_buffers, "buffer", None)
            if buffer is None or len(buffer) < whole:
                if buffer is not None:
                    buffer.close()
                buffer = _buffers.buffer = mmap.mmap(-1, max(whole, 1 << 20))  # anonymous: page-aligned
            buffer[:whole] = source[:whole]
            with memoryview(buffer) as view:
                written = 0
                while written < whole:
                    written += os.write(fd, view[written:whole])
        if whole < size:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            written = whole
            while written < size:
                written += os.pwrite(fd, source[written:], written)


class Spool:
    """Durable writes under one root folder, refusing below a free-space watermark."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.direct = hasattr(os, "O_DIRECT")  # cleared once the filesystem refuses it

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int = 0) -> None:
        """Raise SpoolFull if writing `incoming` bytes would leave less than the watermark free."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise SpoolFull(f"{free} bytes free, {incoming} incoming, watermark {self.min_free_bytes}")

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def stage(self, folder: str, data: bytes) -> Path:
        """Write `data` to a temporary file in `folder` (relative), synced to disk, ready for `publish_new`.

        Why two steps: the slow part (writing and syncing the bytes) can happen before the database
        transaction, which then only publishes the name; the transaction holds its locks shorter.
        Why O_SYNC where the write goes through the page cache (beyond 16 MiB, or no O_DIRECT): the write
        returns only once the bytes and the file's metadata are on disk (fsync's guarantee) in one system
        call, so a thread staging while another decodes the same instance does not wait for the GIL between
        a write and an fsync.
        Why O_DIRECT for instances up to 16 MiB: the bytes go from one page-aligned buffer per
        staging thread straight to the disk instead of being copied into fresh page-cache pages first. On
        the benchmark VM that copy (`copy_folio_from_iter_atomic`) was 29 % of the listener's CPU (perf,
        4 associations); a 529 kB staged write took 1.1-1.2 ms and 0.4-0.5 ms of system time with O_DIRECT
        against 1.8-3.1 ms and 0.6-2.3 ms with O_SYNC. The whole blocks are written directly and the partial
        last one through the page cache, before the one fsync that makes the bytes and the size durable (a
        direct write may still sit in the disk's volatile cache until that flush). A filesystem
        without O_DIRECT (tmpfs) is written as before.
        """
        self.check_space(len(data))
        target = self.root / folder
        _makedirs_durable(target, self.root)
        direct = self.direct and len(data) <= _DIRECT_MAX_BYTES
        while True:  # a name this process has not used; one left by a crashed process is skipped
            path = target / f".incoming-{os.getpid()}-{next(_staged_names)}.tmp"
            try:
                fd = os.open(path, _DIRECT_FLAGS if direct else _SYNC_FLAGS, 0o644)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                self.direct = direct = False  # this filesystem has no O_DIRECT (tmpfs): the page cache it is
        try:
            if direct:
                try:
                    _write_direct(fd, data)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # opened, but the filesystem refuses these writes (alignment): the page cache it is
                    os.close(fd)
                    path.unlink(missing_ok=True)
                    self.direct = False
                    return self.stage(folder, data)
            else:
                with memoryview(data) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(fd, view[written:])
            os.fsync(fd)  # the direct write's bytes and size (O_SYNC already made page-cache bytes durable)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return path

    def publish_new(self, staged: Path, relative: str, *, sync: bool = True) -> str:
        """Link a staged file under `relative` or, if that name is taken, under the first free
        `<name>~<n>.dcm` (n = 2, 3, ...), fsync the folder, and return the relative name used. This call
        created that name, so only its caller may remove it.

        `sync=False` leaves the folder's fsync to the caller (`sync_folder`), who publishes several files
        into one folder and syncs it once for all of them before anything may rely on their names.

        Why never adopt or replace a taken name: a file can hold it without any row pointing at it, left
        by a crash between publishing and committing (complete: bytes are synced before they are linked),
        or published by a concurrent receiver of the same instance that has not committed yet (and may
        still remove it). Adopting such a file races with its owner's cleanup and replacing it with the
        owner's commit; a fresh name does neither, so an orphan never blocks a later resend, and the
        database's unique (SOP instance, version) still lets only one of two racing rows win. A '~' never
        occurs in a sanitised UID, so these names cannot collide with another instance's.
        """
        self._check_staged(staged)
        final = self.root / relative
        _makedirs_durable(final.parent, self.root)
        folder, name = relative.rsplit("/", 1) if "/" in relative else ("", relative)
        stem, dot, suffix = name.rpartition(".")
        for n in range(1, _MAX_NAMES + 1):
            candidate = name if n == 1 else (f"{stem}~{n}.{suffix}" if dot else f"{name}~{n}")
            try:
                os.link(staged, final.parent / candidate)
            except FileExistsError:
                continue
            if sync:
                fsync_dir(final.parent)
            return f"{folder}/{candidate}" if folder else candidate
        raise SpoolConflict(f"{relative}: {_MAX_NAMES} names taken")

    def sync_folder(self, relative: str) -> None:
        """fsync the folder holding `relative` (a name returned by `publish_new(..., sync=False)`)."""
        fsync_dir((self.root / relative).parent)

    def _check_staged(self, staged: Path) -> None:
        if self.root not in staged.parents:
            raise ValueError("a staged file is published from within the spool (one filesystem)")

    @staticmethod
    def discard(staged: Path) -> None:
        """Remove a staged temporary file (after publishing it, or when it is not needed)."""
        staged.unlink(missing_ok=True)

    def remove(self, relative: str) -> None:
        """Remove a file this process just wrote whose database row could not be committed."""
        path = self.root / relative
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def incoming_leftovers(self) -> list[Path]:
        """Temporary files left by a crash mid-write (never acknowledged; safe for an operator to delete)."""
        return sorted(self.root.rglob(".incoming-*.tmp"))
