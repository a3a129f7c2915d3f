"""A large file's CRC-32: read once, whoever asks and however often they leave, a block per worker-thread call.

Files over ``crc_reads.BATCH_BYTES`` are read on a descriptor shared with the
event loop (``SharedDescriptor``), which gives the thread up if its download is
cancelled.  Until 2026-12-04 such a read was thrown away: a client that asked for
the first bytes of a large cold file and left before its CRC was read, again and
again, had it read from its start each time (helper 111: a 4 GiB file, 1.8 GB
read and 0.5 CPU-s for each request of 79 bytes), and downloads at once each
read it.  Now a read of a file that another download is reading waits for that
one and takes its CRC (``CrcIndex.being_read``), and a read cut short is kept
where it stopped (``CrcIndex.keep_partial``) for the next read of the same key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import trio

from .crc_index import CrcIndex, FileRead, FilesystemView, PartialCrc
from .crc_reads import READ_SIZE, FileCrc, crc_of_shared_block, in_reader, keep, read_filesystem
from .ctime_trust import is_racy
from .listed_files import failures_named
from .producer_protocol import RESOURCE_ERRNOS, FileChanged, FileKey
from .shared_descriptor import SharedDescriptor
from .worker_threads import NoThread


async def file_crc(
    path: Path,
    size: int,
    index: CrcIndex,
    buffer: bytearray | None = None,
    key: FileKey | None = None,
    progress: Callable[[], None] | None = None,
    queued: Callable[[bool], None] | None = None,
    following: Callable[[FileRead | None], None] | None = None,
    view: FilesystemView | None = None,
) -> FileCrc:
    """The CRC-32 of the file at ``path``, from ``index`` or read in worker threads a block at a time.

    Opened without following a link; FileChanged unless it is the one listed
    (``key``, or ``size`` bytes).  ``progress`` is called after each read,
    in a worker thread (it must only count); ``queued`` with True before each
    call waits for a reader, with False as its thread starts; ``following`` with
    another download's read of the file before this one waits for it, with None
    after (that read's progress is this one's).  If cancelled, it returns at
    once: a thread reading the file is given up on, stops at its next read, and
    closes the file (``SharedDescriptor``); ``buffer`` may be written until then.
    A thread holds its place in ``index.readers`` until it ends.  ``view``: the
    download's (``CrcIndex.read_filesystem``): what the CRC is looked up, shared,
    resumed and kept under.
    """
    shared = SharedDescriptor()
    try:
        asked = time.time_ns()
        found, filesystem, known = await in_reader(
            index, queued, _open_and_look_up, shared, index, path, size, key, view
        )
        while known is None and (other := index.being_read(found, filesystem)) is not None:
            if following is not None:
                following(other)
            try:
                await other.ended.wait()
            finally:
                if following is not None:
                    following(None)
            if other.result is not None and (not other.result[1] or other.started >= asked):
                # Racy (a file not trusted: its key does not move with an edit in place), only from
                # a read begun since this one was asked for, as its own would be (helper 114).
                return FileCrc(found, *other.result)
        if known is None:
            known = index.remembered(
                found, filesystem
            )  # a read that ended after this one's lookup (no checkpoint since)
        if known is not None:
            return FileCrc(found, known)
        with index.reading(found, filesystem) as read:
            result = await _read_crc(shared, path, size, index, buffer, found, filesystem, read, progress, queued)
            read.result = result.crc, result.racy
            return result
    finally:
        shared.drop()


async def _read_crc(
    shared: SharedDescriptor,
    path: Path,
    size: int,
    index: CrcIndex,
    buffer: bytearray | None,
    found: FileKey,
    filesystem: int | None,
    read: FileRead,
    progress: Callable[[], None] | None,
    queued: Callable[[bool], None] | None,
) -> FileCrc:
    """``file_crc``'s read of ``shared`` (``found``, on ``filesystem``), from where an earlier one cut short stopped."""
    buffer = bytearray(READ_SIZE) if buffer is None else buffer
    resumed = index.take_partial(found, filesystem)
    crc, covered, started = resumed if resumed is not None else (0, 0, time.time_ns())
    read.covered, read.started = (crc, covered), started

    def noted(waiting: bool) -> None:
        read.queued = waiting
        if queued is not None:
            queued(waiting)

    with failures_named(path):
        try:
            while covered < size:
                crc, count = await in_reader(
                    index, noted, crc_of_shared_block, shared, crc, buffer, progress, covered, size - covered, read
                )
                if not count:
                    raise FileChanged(f"{path}: shorter than the {size} bytes listed")
                covered += count
            kept = await in_reader(index, noted, _keep_shared, shared, index, path, found, filesystem, crc, started)
        except BaseException as error:
            if _for_now(error):
                shared.drop()  # first: the thread given up on stops at its next read (helper 114)
                _keep_partial(index, found, filesystem, read, started)
            raise
    # A read resumed is kept: what it resumed was kept, under this key and filesystem, only if not
    # racy there (``_keep_partial``), and ``keep`` judges it by the same key, start and filesystem.
    # (Helper 176: a resumed read not kept was read again whole, from when the filesystem was the
    # trust's latest look rather than the download's view's, cb0cde9; it could no longer happen.)
    return FileCrc(found, crc, not kept)


def _for_now(error: BaseException) -> bool:
    """Whether ``error`` ends a read for reasons that are not the file's: its client left, a resource ran short."""
    if isinstance(error, (trio.Cancelled, NoThread)):
        return True
    return isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS


def _keep_partial(index: CrcIndex, found: FileKey, filesystem: int | None, read: FileRead, started: int) -> None:
    """Keep what ``read`` covered, where the key moves with every write and the first read was past the racy window.

    The bytes covered are then still the file's while the key stands.  What the
    thread given up on reads after this is not counted: it stops at its next read.
    """
    crc, covered = read.covered
    if covered and filesystem is not None and not is_racy(found, started):
        index.keep_partial(found, PartialCrc(crc, covered, started), filesystem)


def _keep_shared(
    shared: SharedDescriptor,
    index: CrcIndex,
    path: Path,
    key: FileKey,
    filesystem: int | None,
    crc: int,
    read_started_ns: int,
) -> bool:
    """``crc_reads.keep`` for a shared descriptor (in a worker thread: its ``fstat`` may wait on the storage)."""
    fd = shared.borrow()
    if fd is None:
        return False
    try:
        return keep(index, fd, path, key, filesystem, crc, read_started_ns)
    finally:
        shared.give_back()


def _open_and_look_up(
    shared: SharedDescriptor, index: CrcIndex, path: Path, size: int, key: FileKey | None, view: FilesystemView | None
) -> tuple[FileKey, int | None, int | None]:
    """In a worker thread: ``shared.open`` the file; its key, its filesystem (``read_filesystem``), and its CRC if kept.

    Not the lookup on the event loop: the index's SQLite store waits on
    another process's write lock up to 5 s (its busy timeout), and the whole
    service with it (found by helper 34).
    """
    found = shared.open(path, size, key)
    fd = shared.borrow()
    if fd is None:  # given up on meanwhile: its download is gone
        return found, None, None
    try:
        filesystem = read_filesystem(index, fd, path, found, view)
    finally:
        shared.give_back()
    return found, filesystem, index.get(found, filesystem)
