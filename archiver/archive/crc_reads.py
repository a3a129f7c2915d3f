"""Reading files' CRC-32s for the index: a large file a block per worker-thread call, small ones many a call.

Each file is opened without following a link and checked to be the one
listed (its key) before it is read, and again after: a file that changed
meanwhile is ``FileChanged``, and its CRC is never used.  A read that may
have raced a write (``ctime_trust.is_racy``), or of a file whose ctime is
not trusted, gives a CRC for this download only.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, TypeVar

import trio
from zlib_ng import zlib_ng

from .crc_index import CrcIndex
from .ctime_trust import COARSE_RACY_NS, RACY_NS, SECOND, FileKey, is_racy, trusted_ctime
from .producer_protocol import CHANGED_ERRNOS, RESOURCE_ERRNOS
from .sparse import Holes, crc32_with_zeros, may_have_holes
from .worker_threads import NoThread, in_thread

logger = logging.getLogger(__name__)

# CRC-32 (ZIP's, the same function as zlib.crc32) by zlib-ng, which folds with carry-less
# multiplication (PCLMULQDQ/VPCLMULQDQ): 50 GB/s here, against 3.4 for binascii.crc32 and
# 3.8 for zlib.crc32 (zlib 1.2.13).  It was a cold download's largest cost; reading is now.
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
# Seconds between tries to close a file whose close found no thread to run in (the tasks' limit).
CLOSE_RETRY = 1.0

T = TypeVar("T")


class FileChanged(RuntimeError):
    """A file is not what was listed any more (another size, or no longer a regular file)."""


class OutOfResources(RuntimeError):
    """The system ran out of descriptors or memory opening or reading a file (RESOURCE_ERRNOS): ``path: reason``."""


class FileUnreadable(RuntimeError):
    """The storage failed a read of a file (EIO: a bad sector, a network mount's error): ``path: reason``."""


@contextmanager
def _failures_named(path: Path) -> Iterator[None]:
    """An OSError of an open or read of ``path``: FileChanged (CHANGED_ERRNOS: gone, ESTALE...), else FileUnreadable.

    Named either way: a bare "[Errno 5] Input/output error" named no file, and was a traceback (helper 70).
    """
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in CHANGED_ERRNOS:
            raise FileChanged(f"{path}: {reason}") from None
        if error.errno in RESOURCE_ERRNOS:
            raise OutOfResources(f"{path}: {reason}") from None
        raise FileUnreadable(f"{path}: {reason}") from None


def _open_listed(path: Path, size: int, key: FileKey | None = None) -> tuple[int, FileKey]:
    """Open the regular file at ``path`` without following a link; FileChanged unless it is the one listed.

    The one listed: ``key`` (device, inode, size, mtime, ctime) if given, else ``size`` bytes.
    """
    with _failures_named(path):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise FileChanged(f"{path}: not the file listed") from None
    found = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    if not stat.S_ISREG(status.st_mode) or found[2] != size or (key is not None and found != key):
        os.close(fd)
        raise FileChanged(f"{path}: not the file listed")
    return fd, found


def _keep(index: CrcIndex, fd: int, path: Path, key: FileKey, crc: int, read_started_ns: int) -> bool:
    """Keep ``crc`` in ``index`` unless racy (then False); FileChanged if the file changed while read."""
    status = os.fstat(fd)
    if (status.st_size, status.st_mtime_ns, status.st_ctime_ns) != key[2:]:
        raise FileChanged(f"{path}: modified while its CRC was read")
    if is_racy(key, read_started_ns) or not index.trust.file(fd, key):
        return False
    index.put(key, crc)
    return True


def _crc_of_block(
    fd: int,
    crc: int,
    buffer: bytearray,
    budget: int = BATCH_BYTES,
    progress: Callable[[], None] | None = None,
    left: int = 0,
) -> tuple[int, int]:
    """Read up to ``budget`` bytes of ``fd`` through ``buffer`` into ``crc``: the CRC and the bytes it covers.

    0 bytes at the file's end.

    Holes of HOLE_MIN or more (``sparse.Holes``) within the ``left`` bytes still to
    do are folded in unread, and do not count toward ``budget``; a read stops where
    one begins.  ``progress`` is called after each read (in this thread: it must only count).
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
) -> FileCrc:
    """The CRC of a small file, in the calling (worker) thread; FileChanged unless it is the one listed.

    ``progress`` is called after the open and after each read (in this thread: it must only count).
    """
    fd, found = _open_listed(path, size, key)
    try:
        if progress is not None:
            progress()
        known = index.get(found)
        if known is not None:
            return FileCrc(found, known)
        started = time.time_ns()
        with _failures_named(path):
            crc, read = _crc_of_block(fd, 0, buffer, size, progress, size)
            if read != size:
                raise FileChanged(f"{path}: read {read} bytes, {size} listed")
            kept = _keep(index, fd, path, found, crc, started)
    finally:
        _close_read(fd, path)
    return FileCrc(found, crc, not kept)


def _close_read(fd: int, path: Path) -> None:
    """Close ``fd``, a file read; FileChanged if that fails.

    A FUSE filesystem may report a failed read only at the close: rclone's
    mount answers EIO when the bytes read do not match the checksum it had.
    """
    try:
        os.close(fd)
    except OSError as error:
        raise FileChanged(f"{path}: {error.strerror} when closed after reading") from None


class _SharedDescriptor:
    """A file's descriptor, read by worker threads the event loop may give up on: closed once neither uses it.

    A read of storage that hangs (a dead NFS server) cannot be interrupted:
    the download gives up on its thread (``abandon_on_cancel``) and leaves it
    to return when it can.  The descriptor must outlive that thread: closed
    under it, its number could name another file, or a client's socket, by
    the time the thread reads on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._users = 1  # the event loop's side, until it drops it
        self._dropped = False

    def open(self, path: Path, size: int, key: FileKey | None) -> FileKey:
        """In a worker thread: open ``path`` (``_open_listed``) into this; its key."""
        fd, found = _open_listed(path, size, key)
        with self._lock:
            if not self._dropped:
                self._fd = fd
                return found
        os.close(fd)  # given up on while it opened
        raise FileChanged(f"{path}: given up on")

    def borrow(self) -> int | None:
        """In a worker thread, before using the descriptor: it, or None if given up on (then do nothing)."""
        with self._lock:
            if self._dropped or self._fd < 0:
                return None
            self._users += 1
            return self._fd

    def give_back(self) -> None:
        """In the worker thread that borrowed it: closed here if the event loop has dropped it meanwhile."""
        with self._lock:
            self._users -= 1
        self._close_if_unused()

    def drop(self) -> None:
        """On the event loop, once done with it (or given up): closed by the last thread using it, or by a new one.

        Never closed on the event loop: a ``close`` on FUSE sends a FLUSH,
        which a dead file system (sshfs with its network gone) does not answer.
        """
        with self._lock:
            if self._dropped:
                return
            self._dropped = True
            self._users -= 1
            if self._users or self._fd < 0:
                return
        try:
            trio.lowlevel.start_thread_soon(self._close_if_unused, lambda _: None, name="archiver close")
        except RuntimeError:  # no thread to be had (the tasks' limit): closed once one can be (helper 49)
            trio.lowlevel.spawn_system_task(self._close_once_a_thread_can_be_had, name="archiver close")

    async def _close_once_a_thread_can_be_had(self) -> None:
        while True:
            try:
                await in_thread(self._close_if_unused)
                return
            except NoThread:
                await trio.sleep(CLOSE_RETRY)

    def _close_if_unused(self) -> None:
        with self._lock:
            fd, self._fd = (self._fd, -1) if self._users == 0 else (-1, self._fd)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as error:  # the CRC is returned by now (or given up on): nothing to fail but a log line
                logger.warning("CRC reader: a file's close failed: %s", error.strerror)


def _crc_of_shared_block(
    shared: _SharedDescriptor, crc: int, buffer: bytearray, progress: Callable[[], None] | None, left: int
) -> tuple[int, int]:
    """``_crc_of_block`` of a shared descriptor, BATCH_BYTES read at most (in a worker thread).

    (crc, 0) if given up on.
    """
    fd = shared.borrow()
    if fd is None:
        return crc, 0
    try:
        return _crc_of_block(fd, crc, buffer, BATCH_BYTES, progress, left)
    finally:
        shared.give_back()


def _keep_shared(
    shared: _SharedDescriptor, index: CrcIndex, path: Path, key: FileKey, crc: int, read_started_ns: int
) -> bool:
    """``_keep`` for a shared descriptor (in a worker thread: its ``fstat`` may wait on the storage)."""
    fd = shared.borrow()
    if fd is None:
        return False
    try:
        return _keep(index, fd, path, key, crc, read_started_ns)
    finally:
        shared.give_back()


async def file_crc(
    path: Path,
    size: int,
    index: CrcIndex,
    buffer: bytearray | None = None,
    key: FileKey | None = None,
    progress: Callable[[], None] | None = None,
    queued: Callable[[bool], None] | None = None,
) -> FileCrc:
    """The CRC-32 of the file at ``path``, from ``index`` or read in worker threads a block at a time.

    Opened without following a link; FileChanged unless it is the one listed
    (``key``, or ``size`` bytes).  ``progress`` is called after each read,
    in a worker thread (it must only count); ``queued`` with True before each
    call waits for a reader, with False as its thread starts.  If cancelled, it returns at
    once: a thread reading the file is given up on, and closes the file
    when its read returns (``_SharedDescriptor``); ``buffer`` may be written
    until then.  A thread holds its place in ``index.readers`` until it ends.
    """
    shared = _SharedDescriptor()
    try:
        found, known = await _in_reader(index, queued, _open_and_look_up, shared, index, path, size, key)
        if known is not None:
            return FileCrc(found, known)
        buffer = bytearray(READ_SIZE) if buffer is None else buffer
        started = time.time_ns()
        crc, read = 0, 0
        with _failures_named(path):
            while read < size:
                crc, count = await _in_reader(
                    index, queued, _crc_of_shared_block, shared, crc, buffer, progress, size - read
                )
                if not count:
                    raise FileChanged(f"{path}: shorter than the {size} bytes listed")
                read += count
            kept = await _in_reader(index, queued, _keep_shared, shared, index, path, found, crc, started)
    finally:
        shared.drop()
    return FileCrc(found, crc, not kept)


def _open_and_look_up(
    shared: _SharedDescriptor, index: CrcIndex, path: Path, size: int, key: FileKey | None
) -> tuple[FileKey, int | None]:
    """In a worker thread: ``shared.open`` the file, and its CRC if the index has it.

    Not the lookup on the event loop: the index's SQLite store waits on
    another process's write lock up to 5 s (its busy timeout), and the whole
    service with it (found by helper 34).
    """
    found = shared.open(path, size, key)
    return found, index.get(found)


async def _in_reader(
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


class AlbumCrcs(NamedTuple):
    """What ``album_crcs`` did: CRCs computed and kept; files left, their ctimes not trusted (``CtimeTrust``);
    files left as they changed while read, were changed within the racy window, or could not be read."""

    computed: int
    untrusted: int
    changing: int = 0
    unreadable: tuple[str, ...] = ()  # "path: reason" of each file the storage failed to read (EIO)


def album_crcs(
    album: Path, files: list[tuple[str, int]], index: CrcIndex, progress: Callable[[int], None] | None = None
) -> AlbumCrcs:
    """Put the CRC of each (relative path, size) in ``album`` into ``index``, synchronously.

    For ``archiver index``; a file that changed or vanished meanwhile is
    skipped, and so is one whose CRC would not be kept (read for every
    download anyway).  Files changed within the racy window of their read (an
    upload hook runs a moment after the upload) are read once more when it has
    passed, up to COARSE_RACY_NS later.  ``progress`` is called with the count of files done after each.
    """
    buffer = bytearray(READ_SIZE)
    new = untrusted = 0
    racy: dict[tuple[str, int], int] = {}  # (path, size) -> when its read may be kept (time.time_ns)
    unreadable: list[str] = []
    for done, (relative, size) in enumerate(files, 1):
        if progress is not None:
            progress(done)
        try:
            fd, key = _open_listed(album / relative, size)
        except FileChanged:
            racy[relative, size] = 0
            continue
        except (FileUnreadable, OutOfResources) as error:  # at the open (helper 72: a traceback, CRCs lost)
            racy[relative, size] = 0
            unreadable.append(str(error))
            continue
        try:
            trusted = index.trust.file(fd, key)
        finally:
            os.close(fd)
        if not trusted:
            untrusted += 1
        elif index.get(key) is None:
            new += _read_to_keep(album / relative, size, index, buffer, racy, (relative, size), unreadable)
    if settles := [when for when in racy.values() if when]:
        # At most the coarse window: a ctime ahead of this host's clock (a file server's) is no reason to wait longer.
        time.sleep(min(COARSE_RACY_NS, max(0, max(settles) - time.time_ns())) / SECOND)
        for relative, size in [file for file, when in racy.items() if when]:
            del racy[relative, size]
            new += _read_to_keep(album / relative, size, index, buffer, racy, (relative, size), unreadable)
    index.flush()
    # Not "already known" either (helper 70): read again when downloaded.
    return AlbumCrcs(new, untrusted, len(racy) - len(unreadable), tuple(unreadable))


def _read_to_keep(
    path: Path,
    size: int,
    index: CrcIndex,
    buffer: bytearray,
    racy: dict[tuple[str, int], int],
    file: tuple[str, int],
    unreadable: list[str],
) -> bool:
    """Read ``path``'s CRC into ``index``: True if kept; else ``racy[file]`` says when to try again (0: not)."""
    try:
        result = small_file_crc(path, size, index, buffer)
    except FileChanged:
        racy[file] = 0
        return False
    except (FileUnreadable, OutOfResources) as error:  # a failing disk: for the hook's exit status, named
        racy[file] = 0
        unreadable.append(str(error))
        return False
    if result.racy:
        ctime = result.key[4]
        window = COARSE_RACY_NS if ctime % SECOND == 0 else RACY_NS
        racy[file] = ctime + window + 1 if trusted_ctime(*result.key[3:]) else 0  # untrusted: racy for good
    return not result.racy
