"""Reading files' CRC-32s for the index: a large file a block per worker-thread call, small ones many a call.

Each file is opened through no link (``listed_files.Folders``) and checked to be the one
listed (its key) before it is read, and again after: a file that changed
meanwhile is ``FileChanged``, and its CRC is never used.  A read that may
have raced a write (``ctime_trust.is_racy``), or of a file whose ctime is
not trusted, gives a CRC for this download only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

from zlib_ng import zlib_ng

from .crc_index import CrcIndex, FileRead, FilesystemView
from .ctime_trust import is_racy
from .listed_files import Folders, close_read, failures_named, open_listed
from .producer_protocol import FileChanged, FileKey
from .shared_descriptor import SharedDescriptor
from .sparse import Holes, crc32_with_zeros, may_have_holes
from .uncached_status import refresh_attributes, uncached_status
from .worker_threads import in_thread

# CRC-32 (ZIP's, the same function as zlib.crc32) by zlib-ng, which folds with carry-less
# multiplication (PCLMULQDQ/VPCLMULQDQ): 50 GB/s here, against 3.4-4.8 for zlib.crc32 (zlib
# 1.2.13; binascii.crc32 is the same function).  It was a cold download's largest cost; reading is now.
# Read into one buffer per download, reused: fresh 1 MiB blocks per read
# raised glibc's mmap threshold and stayed in the heap (+1.2 MB RSS a download).
# 256 KiB reads: a quarter of the GIL hand-overs of 64 KiB ones, which the event
# loop's thread paid for (a cold 500 MB download, service + producer CPU: 0.58
# against 0.62 s; warm 0.45; 1 MiB no better).  Not mmap: a file truncated
# meanwhile would be SIGBUS, the whole service's end.
READ_SIZE = 256 * 1024
# Small files are done many to a worker-thread call (a call costs ~0.1 ms,
# which for 20,000 small files was most of the work): up to this many bytes
# or files a call.  Larger files are read a block a call, so that a
# cancelled download does not wait for a whole large file.
BATCH_BYTES = 4 * 1024 * 1024
BATCH_FILES = 512
# A hole in a sparse file, this long or longer, is folded into its CRC as zeros, unread
# (``sparse.Holes``): a file of a few bytes written, made 32 GiB long by `truncate` or an
# FTP `REST` past its end, cost 41 CPU-s of reads of zeros (ext4 allows 16 TiB: hours), and
# again after any restart (helper 87).  A fold costs ~13 us (``sparse``, in Python) and its
# lseeks ~1 us each; reading 64 KiB of a hole on ext4 ~85 us (each page zeroed into the page
# cache).  Shorter holes are read: at most 4x the data around them on disk (at 1 MiB, 4 KiB
# of data every 1 MiB was read for 256x the disk the uploader used; helper 92).
HOLE_MIN = 16 * 1024

T = TypeVar("T")


def keep(
    index: CrcIndex, fd: int, path: Path, key: FileKey, filesystem: int | None, crc: int, read_started_ns: int
) -> bool:
    """Keep ``crc`` in ``index`` under ``filesystem`` (``CrcIndex.read_filesystem``) unless racy or None (then False).

    FileChanged if the file changed while read.
    """
    if uncached_status(fd)[1][2:] != key[2:]:  # not what the kernel keeps of a FUSE or NFS file's (helper 148)
        raise FileChanged(f"{path}: modified while its CRC was read")
    if is_racy(key, read_started_ns) or filesystem is None:
        return False
    index.put(key, crc, filesystem)
    return True


def read_filesystem(index: CrcIndex, fd: int, path: Path, key: FileKey, view: FilesystemView | None) -> int | None:
    """``index.read_filesystem``: FileChanged where the file lies on another filesystem than ``view``'s for its device.

    Its CRC, read from other bytes than the walk listed, would be for this
    download only, and checked against its bytes as they go: but a range that
    holds its CRC field and not its data (a resume of the central directory,
    by If-Range) sent it unchecked, under the ETag of the walk's view: a clean
    ``206`` with another file's CRC (helper 162).  As the producer's check
    (``producer_files.Album``).  In a worker thread.
    """
    with failures_named(path):
        filesystem = index.read_filesystem(fd, key, view)
    if filesystem is None and view is not None and index.filesystem(key, view) is not None:
        raise FileChanged(f"{path}: on another filesystem than the one listed")
    return filesystem


def _crc_of_block(
    fd: int,
    crc: int,
    buffer: bytearray,
    budget: int = BATCH_BYTES,
    progress: Callable[[], None] | None = None,
    left: int = 0,
    after_read: Callable[[int, int], bool] | None = None,
) -> tuple[int, int]:
    """Read up to ``budget`` bytes of ``fd`` through ``buffer`` into ``crc``: the CRC and the bytes it covers.

    0 bytes at the file's end.

    Holes of HOLE_MIN or more (``sparse.Holes``) within the ``left`` bytes still to
    do are folded in unread, and do not count toward ``budget``; a read stops where
    one begins.  ``progress`` is called after each read (in this thread: it must only count);
    ``after_read`` with the CRC and the bytes covered so far, and the reading stops early
    if it returns False.
    """
    read = covered = 0
    holes = Holes(fd, HOLE_MIN) if left >= HOLE_MIN and may_have_holes(os.fstat(fd)) else None
    view = memoryview(buffer)
    while read < budget:
        limit = len(buffer)
        if holes is not None and covered < left:
            step = holes.next(left - covered)
            if step < 0:
                crc = crc32_with_zeros(crc, -step)
                covered -= step
                continue
            limit = min(limit, step)
        if not (count := os.readv(fd, [view[:limit]])):
            break
        crc = zlib_ng.crc32(view[:count], crc)
        read += count
        covered += count
        if progress is not None:
            progress()
        if after_read is not None and not after_read(crc, covered):
            break
    return crc, covered


class FileCrc(NamedTuple):
    """A file's CRC-32 and key; ``racy``: read from a file that may still change unseen, so not kept."""

    key: FileKey
    crc: int
    racy: bool = False


def small_file_crc(
    path: Path,
    size: int,
    index: CrcIndex,
    buffer: bytearray,
    key: FileKey | None = None,
    progress: Callable[[], None] | None = None,
    folders: Folders | None = None,
    view: FilesystemView | None = None,
    *,
    stored: bool = True,
) -> FileCrc:
    """The CRC of a small file, in the calling (worker) thread; FileChanged unless it is the one listed.

    ``progress`` is called after the open and after each read (in this thread: it must only count).
    ``folders``: the batch's (``open_listed``).  ``view``: the download's (``CrcIndex.read_filesystem``).
    ``stored=False``: the index's memory alone is looked at (its store was, for the whole batch).
    """
    fd, found = open_listed(path, size, key, folders)
    try:
        if progress is not None:
            progress()
        filesystem = read_filesystem(index, fd, path, found, view)
        known = index.get(found, filesystem) if stored else index.remembered(found, filesystem)
        if known is not None:
            return FileCrc(found, known)
        started = time.time_ns()
        with failures_named(path):
            crc, read = _crc_of_block(fd, 0, buffer, size, progress, size)
            if read != size:
                refresh_attributes(fd)  # the kernel's stale copy of a FUSE or NFS file's (helper 150)
                raise FileChanged(f"{path}: read {read} bytes, {size} listed")
            kept = keep(index, fd, path, found, filesystem, crc, started)
    finally:
        close_read(fd, path)
    return FileCrc(found, crc, not kept)


def crc_of_shared_block(
    shared: SharedDescriptor,
    crc: int,
    buffer: bytearray,
    progress: Callable[[], None] | None,
    at: int,
    left: int,
    read: FileRead | None = None,
) -> tuple[int, int]:
    """``_crc_of_block`` of a shared descriptor from offset ``at``, BATCH_BYTES read at most (in a worker thread).

    (crc, 0) if given up on.  ``read.covered`` is kept at the CRC and the bytes it
    covers after each read, and the thread stops at the next read once the event
    loop has given it up (a client that left: the read goes on from there).
    """
    fd = shared.borrow()
    if fd is None:
        return crc, 0

    def after_read(crc: int, covered: int) -> bool:
        if read is not None:
            read.covered = (crc, at + covered)  # one tuple: the event loop reads a pair that goes together
        return not shared.dropped

    try:
        os.lseek(fd, at, os.SEEK_SET)  # where this read's progress stands: it may resume an earlier one's
        crc, covered = _crc_of_block(fd, crc, buffer, BATCH_BYTES, progress, left, after_read)
        if not covered and left and not shared.dropped:
            refresh_attributes(fd)  # shorter than listed: the kernel's stale copy of a FUSE or NFS file's (helper 150)
        return crc, covered
    finally:
        shared.give_back()


async def in_reader(
    index: CrcIndex, queued: Callable[[bool], None] | None, function: Callable[..., T], *args: object
) -> T:
    """``function(*args)`` in a worker thread under ``index.readers``; given up on (not waited for) if cancelled.

    ``queued(True)`` before, ``queued(False)`` in the thread as it starts (it holds a reader then).
    """
    return await in_thread(in_reader_thread(queued, function), *args, limiter=index.readers)


def in_reader_thread(queued: Callable[[bool], None] | None, function: Callable[..., T]) -> Callable[..., T]:
    """``function``, calling ``queued(True)`` now and ``queued(False)`` first when called (in its thread)."""
    if queued is None:
        return function
    queued(True)

    def call(*args: object) -> T:
        queued(False)
        return function(*args)

    return call
