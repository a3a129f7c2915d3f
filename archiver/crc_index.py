"""CRC-32 of the files to archive, known before zip reads them, and kept for the next download.

A stored ZIP entry carries its CRC in its local header, before its data;
zip writing to a pipe cannot seek back to put it there, so it leaves it 0
and appends a data descriptor, which streaming readers refuse (see
``rewrite``).  The service computes each CRC itself (``zlib.crc32`` in a
worker thread, ahead of zip) and keeps it in a ``CrcIndex`` keyed by
everything that changes when the file does: device, inode, size and mtime.
The index is only a cache: losing it loses nothing but time.  This one lives
in memory; zip's own CRC (in each descriptor) is checked against it as the
bytes pass, so a file changed behind the key's back cannot go out unnoticed.
"""

from __future__ import annotations

import os
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import trio
from trio_util import AsyncValue  # type: ignore[attr-defined]

from .crc_store import CrcStore

# Read into one buffer per download, reused: fresh 1 MiB blocks per read
# raised glibc's mmap threshold and stayed in the heap (+1.2 MB RSS a download).
READ_SIZE = 64 * 1024
# Entries kept: ~100 bytes each, so ~20 MB at the most.
INDEX_ENTRIES = 200_000
# Small files are done many to a worker-thread call (a call costs ~0.1 ms,
# which for 20,000 small files was most of the work): up to this many bytes
# or files a call.  Larger files are read a block a call, so that a
# cancelled download does not wait for a whole large file.
BATCH_BYTES = 4 * 1024 * 1024
BATCH_FILES = 512

FileKey = tuple[int, int, int, int]


class FileChanged(RuntimeError):
    """A file is not what was listed any more (another size, or no longer a regular file)."""


class CrcIndex:
    """CRC-32 by (device, inode, size, mtime_ns): the recently used in memory, all of them in ``store`` if given."""

    def __init__(self, store: CrcStore | None = None, entries: int = INDEX_ENTRIES, readers: int = 2) -> None:
        self.store = store
        self.entries = entries
        self._crcs: OrderedDict[FileKey, int] = OrderedDict()
        self._lock = threading.Lock()  # used from the downloads' worker threads
        # Files read at once for their CRCs, across downloads: the disk and the
        # cores bound it anyway, and each reader is a thread.
        self.readers = trio.CapacityLimiter(readers)

    def get(self, key: FileKey) -> int | None:
        with self._lock:
            crc = self._crcs.get(key)
            if crc is not None:
                self._crcs.move_to_end(key)
                return crc
        crc = None if self.store is None else self.store.get(key)
        if crc is not None:
            self._remember(key, crc)
        return crc

    def known(self, keys: Iterable[FileKey]) -> array[int]:
        """The CRC for each key, -1 where there is none (for ``CrcSource``; in a worker thread with a store)."""
        return array("q", (-1 if (crc := self.get(key)) is None else crc for key in keys))

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


def _open_listed(path: Path, size: int) -> tuple[int, FileKey]:
    """Open the regular file at ``path`` without following a link; FileChanged unless it is ``size`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise FileChanged(f"{path}: {error.strerror}") from None
    status = os.fstat(fd)
    if status.st_size != size:
        os.close(fd)
        raise FileChanged(f"{path}: {status.st_size} bytes, {size} listed")
    return fd, (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def _crc_of_block(fd: int, crc: int, buffer: bytearray, budget: int = BATCH_BYTES) -> tuple[int, int]:
    """Read up to ``budget`` bytes of ``fd`` through ``buffer`` into ``crc``: the CRC and the count (0 at the end)."""
    read = 0
    while read < budget and (count := os.readv(fd, [buffer])):
        crc = zlib.crc32(memoryview(buffer)[:count], crc)
        read += count
    return crc, read


def _small_file_crc(path: Path, size: int, index: CrcIndex, buffer: bytearray) -> tuple[FileKey, int]:
    """The CRC of a small file, in the calling (worker) thread."""
    fd, key = _open_listed(path, size)
    try:
        known = index.get(key)
        if known is not None:
            return key, known
        crc, read = _crc_of_block(fd, 0, buffer, budget=size)
    finally:
        os.close(fd)
    if read != size:
        raise FileChanged(f"{path}: read {read} bytes, {size} listed")
    index.put(key, crc)
    return key, crc


async def file_crc(path: Path, size: int, index: CrcIndex, buffer: bytearray | None = None) -> tuple[FileKey, int]:
    """The CRC-32 of the file at ``path``, from ``index`` or read in worker threads a block at a time.

    Opened without following a link (as zip -y treats one).  If cancelled,
    the file is closed before the cancellation propagates.
    """
    fd, key = await trio.to_thread.run_sync(_open_listed, path, size, limiter=index.readers)
    try:
        known = index.get(key)
        if known is not None:
            return key, known
        buffer = bytearray(READ_SIZE) if buffer is None else buffer
        crc, read = 0, 0
        while read < size:
            crc, count = await trio.to_thread.run_sync(_crc_of_block, fd, crc, buffer, limiter=index.readers)
            if not count:
                raise FileChanged(f"{path}: shorter than the {size} bytes listed")
            read += count
    finally:
        os.close(fd)
    index.put(key, crc)
    return key, crc


class CrcSource:
    """One download's CRCs, computed in file order ahead of zip; ``crc(k)`` waits for the k-th.

    ``known`` holds the CRCs the index had for the files' listed keys (-1
    where it had none, see ``CrcIndex.known``): those files are not opened
    at all.  One changed since it was listed is caught where its CRC is
    checked against zip's (``rewrite``).  Where no zip will check (the
    central directory of a range, ``partial``), ``mtimes`` are the listed
    ones, and a file read with another is FileChanged.
    """

    def __init__(
        self,
        directory: Path,
        names: bytes,
        sizes: array[int],
        index: CrcIndex,
        known: array[int] | None = None,
        mtimes: array[int] | None = None,
    ) -> None:
        self.directory = directory
        self.sizes = sizes
        self.index = index
        self.known = known
        self.mtimes = mtimes
        # zip's input: "./path\n" per file, in archive order.
        self._names = names
        self._crcs = array("I")
        self._ready = AsyncValue(0)

    async def compute(self) -> None:
        """Compute every CRC in order (run in the download's nursery)."""
        buffer = bytearray(READ_SIZE)
        entry, start = 0, 0
        while entry < len(self.sizes):
            if self.known is not None and self.known[entry] >= 0:
                # A run of known CRCs at once (a warm album is one run); the names are skipped
                # only if an unknown one follows.
                run_end = entry
                while run_end < len(self.sizes) and self.known[run_end] >= 0:
                    run_end += 1
                self._crcs.extend(self.known[entry:run_end].tolist())
                if run_end < len(self.sizes):
                    for _ in range(run_end - entry):
                        start = self._names.index(b"\n", start) + 1
                entry = self._ready.value = run_end
                continue
            if self.sizes[entry] > BATCH_BYTES:
                path, start = self._path(start)
                results = [await file_crc(path, self.sizes[entry], self.index, buffer)]
            else:
                results, start = await trio.to_thread.run_sync(
                    self._small_files, entry, start, buffer, limiter=self.index.readers
                )
            for read, (file_key, crc) in enumerate(results, entry):
                if self.mtimes is not None and file_key[3] != self.mtimes[read]:
                    raise FileChanged(f"{self._name(read)}: modified since it was listed")
                self._crcs.append(crc)
            entry += len(results)
            self._ready.value = entry
        self.known = None  # in ``_crcs`` now
        await trio.to_thread.run_sync(self.index.flush)

    def _path(self, start: int) -> tuple[Path, int]:
        """The path of the name at ``start`` in zip's input, and where the next name starts."""
        end = self._names.index(b"\n", start)
        return self.directory / os.fsdecode(self._names[start:end]), end + 1

    def _small_files(self, entry: int, start: int, buffer: bytearray) -> tuple[list[tuple[FileKey, int]], int]:
        """CRCs of the small files from ``entry`` on, as many as one batch holds (in a worker thread)."""
        results: list[tuple[FileKey, int]] = []
        budget = BATCH_BYTES
        while entry < len(self.sizes) and len(results) < BATCH_FILES:
            size = self.sizes[entry]
            if size > BATCH_BYTES or (results and size > budget):
                break
            if self.known is not None and self.known[entry] >= 0:
                break
            path, start = self._path(start)
            results.append(_small_file_crc(path, size, self.index, buffer))
            budget -= size
            entry += 1
        return results, start

    async def crc(self, entry: int) -> int:
        if entry >= len(self._crcs):  # not computed yet: wait (the usual case is that it is)
            await self._ready.wait_value(lambda ready: ready > entry)
        return self._crcs[entry]

    def ready(self, entry: int) -> int | None:
        """The ``entry``-th CRC if it is computed, without waiting."""
        return self._crcs[entry] if entry < len(self._crcs) else None

    def forget(self, entry: int) -> None:
        """Drop an entry's CRC from the index (zip found another one: the file changed).

        The row to drop is the file's key now: the same as the one read or
        listed when the file changed behind the key's back (same size and
        mtime), and if the key changed, the old row is never asked for again.
        """
        try:
            status = os.lstat(self.directory / self._name(entry))
        except OSError:
            return
        self.index.forget((status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns))

    def _name(self, entry: int) -> str:
        """The ``entry``-th name (relative to the album)."""
        start = 0
        for _ in range(entry):
            start = self._names.index(b"\n", start) + 1
        return os.fsdecode(self._names[start + 2 : self._names.index(b"\n", start)])


def album_crcs(
    album: Path, files: list[tuple[str, int]], index: CrcIndex, progress: Callable[[int], None] | None = None
) -> int:
    """Put the CRC of each (relative path, size) in ``album`` into ``index``, synchronously; how many were new.

    For ``archiver index``; a file that changed or vanished meanwhile is
    skipped.  ``progress`` is called with the count of files done after each.
    """
    buffer = bytearray(READ_SIZE)
    new = 0
    for done, (relative, size) in enumerate(files, 1):
        if progress is not None:
            progress(done)
        try:
            fd, key = _open_listed(album / relative, size)
        except FileChanged:
            continue
        os.close(fd)
        if index.get(key) is None:
            try:
                _small_file_crc(album / relative, size, index, buffer)
            except FileChanged:
                continue
            new += 1
    index.flush()
    return new
