"""CRC-32 of the files to archive, known before their headers go out, and kept for the next download.

A stored ZIP entry carries its CRC in its local header, before its data
(a data descriptor after it is what streaming readers refuse for stored
entries).  The service computes each CRC itself (zlib-ng's ``crc32`` in a
worker thread, ahead of the producer) and keeps it in a ``CrcIndex`` keyed by
everything that changes when the file does: device, inode, size, mtime and
ctime.  The ctime catches a file rewritten in place with its size kept and
its mtime put back (``touch -r``): a ``write`` always moves it (a store
through a shared writable mapping to a page already dirty does not: a known
limit, tests/test_integrity_limits.py).  A CRC read
while the file may still have been changing within one tick of the
filesystem's clock (its ctime is not clearly older than the read) is used
for that download but not kept, as git treats "racily clean" entries: a
later change in the same tick would leave the key as it was.
The index is only a cache: losing it loses nothing but time.  The producer
checks that each file it sends is the one listed (the same key) before and
after sending it, so a CRC is only ever sent beside the bytes it was read
from; a racy one is checked against the bytes as they go (``plan``).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple, TypeVar

import trio
from zlib_ng import zlib_ng

from .crc_store import CrcStore
from .filesystems import KERNEL, MOUNTINFO, filesystem_name

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
# Entries kept: ~100 bytes each, so ~20 MB at the most.
INDEX_ENTRIES = 200_000
# Small files are done many to a worker-thread call (a call costs ~0.1 ms,
# which for 20,000 small files was most of the work): up to this many bytes
# or files a call.  Larger files are read a block a call, so that a
# cancelled download does not wait for a whole large file.
BATCH_BYTES = 4 * 1024 * 1024
BATCH_FILES = 512

FileKey = tuple[int, int, int, int, int]
T = TypeVar("T")

# Linux stamps file times from a coarse clock (one tick: 1-10 ms); a file
# whose ctime lies within this of the moment its read began may change again
# without its ctime moving.  Such a CRC is not kept in the index.
RACY_NS = 100_000_000
SECOND = 1_000_000_000
# A filesystem that keeps whole seconds (ext4's 128-byte inodes; FAT keeps two) changes a
# file later in the second of its ctime without moving it: a wider window for such ctimes.
# A ctime of whole seconds lies on such a filesystem (the kernel's clock stamps nanoseconds).
COARSE_RACY_NS = 2 * SECOND + RACY_NS


def trusted_ctime(mtime_ns: int, ctime_ns: int) -> bool:
    """Whether a file's ctime, on a filesystem whose ctimes are trusted, moves with every write to it.

    Not when it is a whole second no later than the mtime: sshfs reports the
    mtime, in whole seconds, as the ctime (SFTP version 3 carries no ctime),
    and so might a filesystem not known to (``CtimeTrust``).  There an edit in
    place that keeps the size and puts the mtime back (an FTP client that
    preserves times, ``touch -r``) leaves the whole key as it was.  Nor a ctime
    at or before 1970 (a filesystem that reports none shows 0).  On a
    filesystem of whole seconds that keeps a real ctime, a file written once
    has it equal to its mtime too: its CRC is read again for every download,
    the price of telling the two apart by the key.
    """
    return ctime_ns > 0 and (ctime_ns % SECOND != 0 or ctime_ns > mtime_ns)


class CtimeTrust:
    """Whether a file's ctime moves with every write to it, so that its CRC may be kept by its key.

    Decided per filesystem as walks meet them (``learn``; a device never
    looked at is not trusted): not a FUSE one (its daemon reports what it likes,
    and sshfs and rclone's mount report the mtime) unless its type is in
    ``trusted_fuse`` (``ARCHIVER_TRUSTED_FUSE``: mergerfs passes its branches'
    ctimes through), nor exFAT (``filesystems.MTIME_AS_CTIME``); and on any, not
    a ctime ``trusted_ctime`` refuses.  A file not trusted has its CRC read for
    every download and checked against its bytes as they go (racy), and its
    album's archive no ETag (``web.ranges.archive_validator``).
    """

    def __init__(self, trusted_fuse: Iterable[str] = (), mountinfo: Path = MOUNTINFO) -> None:
        self.trusted_fuse = frozenset(trusted_fuse)
        self._mountinfo = mountinfo
        # Device -> trusted, as last looked at (set in walkers' and readers' threads: one store each).
        self._devices: dict[int, bool] = {}

    def learn(self, fd: int, device: int) -> None:
        """Look at the filesystem ``fd`` (a folder a walk opened) lies on, ``device``; in a worker thread.

        Every walk calls this for each device it meets: a device number is
        reused by the next mount.  A filesystem that cannot be told is not trusted.
        """
        try:
            name = filesystem_name(fd, device, bool(self.trusted_fuse), self._mountinfo)
        except OSError:
            self._devices[device] = False
        else:
            self._devices[device] = name == KERNEL or name in self.trusted_fuse

    def device(self, device: int) -> bool:
        """Whether ctimes on ``device`` are trusted, as last looked at (never looked at: no)."""
        return self._devices.get(device, False)

    def file(self, fd: int, key: FileKey) -> bool:
        """Whether the ctime in ``key``, of the file open as ``fd``, is trusted; its device looked at if never yet."""
        if key[0] not in self._devices:
            self.learn(fd, key[0])
        return self(key)

    def __call__(self, key: FileKey) -> bool:
        return trusted_ctime(key[3], key[4]) and self.device(key[0])


def is_racy(key: FileKey, read_started_ns: int) -> bool:
    """Whether a CRC read from ``read_started_ns`` (time.time_ns) may not match every file with ``key``.

    Always, for a key whose ctime is not trusted (``trusted_ctime``).
    """
    if not trusted_ctime(key[3], key[4]):
        return True
    window = COARSE_RACY_NS if key[4] % SECOND == 0 else RACY_NS
    return key[4] >= read_started_ns - window


class FileChanged(RuntimeError):
    """A file is not what was listed any more (another size, or no longer a regular file)."""


class CrcIndex:
    """CRC-32 by (device, inode, size, mtime_ns, ctime_ns): the recent ones in memory, all in ``store`` if given."""

    def __init__(
        self,
        store: CrcStore | None = None,
        entries: int = INDEX_ENTRIES,
        readers: int = 2,
        trust: CtimeTrust | None = None,
    ) -> None:
        self.store = store
        self.entries = entries
        # Which files' CRCs may be kept and looked up by key.
        self.trust = trust or CtimeTrust()
        self._crcs: OrderedDict[FileKey, int] = OrderedDict()
        self._lock = threading.Lock()  # used from the downloads' worker threads
        # Files read at once for their CRCs, across downloads: the disk and the
        # cores bound it anyway, and each reader is a thread.
        self.readers = trio.CapacityLimiter(readers)
        # Reads done by every download's readers (counted by the worker threads): a download
        # queued for a reader sees the storage answer by them (web.download's watchdog).
        self.reads = 0

    def get(self, key: FileKey) -> int | None:
        crc = self.known((key,))[0]
        return None if crc < 0 else crc

    def known(self, keys: Iterable[FileKey]) -> array[int]:
        """The CRC for each key, -1 where there is none (for ``CrcSource``; in a worker thread with a store).

        The memory's under one lock for all keys (20,000 keys: a lock and two
        calls a key were 0.03 s of a warm download's first byte), then the
        store's for those it lacks.
        """
        keys = list(keys)
        crcs = array("q", [-1]) * len(keys)
        lacking = []
        # A key whose ctime is not trusted is never kept: one found was kept before it was known so.
        devices = {device: self.trust.device(device) for device in {key[0] for key in keys}}
        with self._lock:
            remembered, used = self._crcs.get, self._crcs.move_to_end
            for position, key in enumerate(keys):
                crc = remembered(key) if devices[key[0]] and trusted_ctime(key[3], key[4]) else None
                if crc is None:
                    lacking.append(position)
                else:
                    used(key)
                    crcs[position] = crc
        if self.store is not None:
            for position in lacking:
                key = keys[position]
                if not (devices[key[0]] and trusted_ctime(key[3], key[4])):
                    continue
                crc = self.store.get(keys[position])
                if crc is not None:
                    self._remember(keys[position], crc)
                    crcs[position] = crc
        return crcs

    def put(self, key: FileKey, crc: int) -> None:
        self._remember(key, crc)
        if self.store is not None:
            self.store.put(key, crc)

    def forget(self, key: FileKey) -> None:
        with self._lock:
            self._crcs.pop(key, None)
        if self.store is not None:
            self.store.forget(key)

    def flush(self) -> None:
        """Write what the store has batched (after a download's or an album's CRCs)."""
        if self.store is not None:
            self.store.flush()

    def _remember(self, key: FileKey, crc: int) -> None:
        with self._lock:
            self._crcs[key] = crc
            self._crcs.move_to_end(key)
            while len(self._crcs) > self.entries:
                self._crcs.popitem(last=False)


def _open_listed(path: Path, size: int, key: FileKey | None = None) -> tuple[int, FileKey]:
    """Open the regular file at ``path`` without following a link; FileChanged unless it is the one listed.

    The one listed: ``key`` (device, inode, size, mtime, ctime) if given, else ``size`` bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise FileChanged(f"{path}: {error.strerror}") from None
    status = os.fstat(fd)
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
    fd: int, crc: int, buffer: bytearray, budget: int = BATCH_BYTES, progress: Callable[[], None] | None = None
) -> tuple[int, int]:
    """Read up to ``budget`` bytes of ``fd`` through ``buffer`` into ``crc``: the CRC and the count (0 at the end).

    ``progress`` is called after each read (in this thread: it must only count).
    """
    read = 0
    while read < budget and (count := os.readv(fd, [buffer])):
        crc = zlib_ng.crc32(memoryview(buffer)[:count], crc)
        read += count
        if progress is not None:
            progress()
    return crc, read


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
        crc, read = _crc_of_block(fd, 0, buffer, size, progress)
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
        trio.lowlevel.start_thread_soon(self._close_if_unused, lambda _: None, name="archiver close")

    def _close_if_unused(self) -> None:
        with self._lock:
            fd, self._fd = (self._fd, -1) if self._users == 0 else (-1, self._fd)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as error:  # the CRC is returned by now (or given up on): nothing to fail but a log line
                logger.warning("CRC reader: a file's close failed: %s", error.strerror)


def _crc_of_shared_block(
    shared: _SharedDescriptor, crc: int, buffer: bytearray, progress: Callable[[], None] | None
) -> tuple[int, int]:
    """``_crc_of_block`` of a shared descriptor, BATCH_BYTES at most (in a worker thread); (crc, 0) if given up on."""
    fd = shared.borrow()
    if fd is None:
        return crc, 0
    try:
        return _crc_of_block(fd, crc, buffer, BATCH_BYTES, progress)
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
        found = await _in_reader(index, queued, shared.open, path, size, key)
        known = index.get(found)
        if known is not None:
            return FileCrc(found, known)
        buffer = bytearray(READ_SIZE) if buffer is None else buffer
        started = time.time_ns()
        crc, read = 0, 0
        while read < size:
            crc, count = await _in_reader(index, queued, _crc_of_shared_block, shared, crc, buffer, progress)
            if not count:
                raise FileChanged(f"{path}: shorter than the {size} bytes listed")
            read += count
        kept = await _in_reader(index, queued, _keep_shared, shared, index, path, found, crc, started)
    finally:
        shared.drop()
    return FileCrc(found, crc, not kept)


async def _in_reader(
    index: CrcIndex, queued: Callable[[bool], None] | None, function: Callable[..., T], *args: object
) -> T:
    """``function(*args)`` in a worker thread under ``index.readers``; given up on (not waited for) if cancelled.

    ``queued(True)`` before, ``queued(False)`` in the thread as it starts (it holds a reader then).
    """
    return await trio.to_thread.run_sync(
        in_reader_thread(queued, function), *args, limiter=index.readers, abandon_on_cancel=True
    )


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
    """What ``album_crcs`` did: CRCs computed and kept; files left, their ctimes not trusted (``CtimeTrust``)."""

    computed: int
    untrusted: int


def album_crcs(
    album: Path, files: list[tuple[str, int]], index: CrcIndex, progress: Callable[[int], None] | None = None
) -> AlbumCrcs:
    """Put the CRC of each (relative path, size) in ``album`` into ``index``, synchronously.

    For ``archiver index``; a file that changed or vanished meanwhile is
    skipped, and so is one whose CRC would not be kept (read for every
    download anyway).  ``progress`` is called with the count of files done after each.
    """
    buffer = bytearray(READ_SIZE)
    new = untrusted = 0
    for done, (relative, size) in enumerate(files, 1):
        if progress is not None:
            progress(done)
        try:
            fd, key = _open_listed(album / relative, size)
        except FileChanged:
            continue
        try:
            trusted = index.trust.file(fd, key)
        finally:
            os.close(fd)
        if not trusted:
            untrusted += 1
        elif index.get(key) is None:
            try:
                small_file_crc(album / relative, size, index, buffer)
            except FileChanged:
                continue
            new += 1
    index.flush()
    return AlbumCrcs(new, untrusted)
