"""CRC-32 of the files to archive, kept by key for the next download: in memory, and in ``crc_store`` if set.

A stored ZIP entry carries its CRC in its local header, before its data
(a data descriptor after it is what streaming readers refuse for stored
entries).  The service computes each CRC itself (``crc_reads``, ahead of the
producer) and keeps it in a ``CrcIndex`` keyed by everything that changes
when the file does: device, inode, size, mtime and ctime, and the id of the
filesystem on that device (``ctime_trust``: where ctimes are not trusted, and
for racy reads, nothing is kept).  Which filesystem is a download's walk's
(``FilesystemView``): a device number is given to the next mount, and a CRC
looked up or kept under the filesystem another walk saw there since went out
with the bytes of the one this download's producer checks (helper 161).  A
store through a shared writable mapping to a page already dirty does not
move the ctime: a known limit, tests/test_integrity_limits.py.
The index is only a cache: losing it loses nothing but time.  The producer
checks that each file it sends is the one listed (the same key) before and
after sending it, so a CRC is only ever sent beside the bytes it was read
from; a racy one is checked against the bytes as they go (``FileSlice.verify_crc``,
checked by the producer).
"""

from __future__ import annotations

import enum
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import trio

from .crc_store import CrcStore, IndexKey, index_key
from .ctime_trust import CtimeTrust, trusted_ctime
from .filesystems import filesystem_id
from .producer_protocol import FileKey

# Device -> the id of the trusted filesystem a download's walk saw on it (``ArchivePlan.filesystem_ids``):
# what that download's CRCs are looked up, read and kept under, and what its producer checks each
# file against.  A device not in it is not trusted.
FilesystemView = Mapping[int, int]


class _Latest(enum.Enum):
    LATEST = 0


# For a caller without a walk's view (``archiver index`` has one; tests, a lookup by hand): the
# filesystem the trust last saw on the key's device (``CtimeTrust.filesystem``).
LATEST = _Latest.LATEST

# Entries kept: ~100 bytes each, so ~20 MB at the most.
INDEX_ENTRIES = 200_000
# Reads of large files cut short, kept to be resumed (``PartialCrc``): ~450 bytes each (helper 112), 4.5 MB at most.
PARTIAL_ENTRIES = 10_000


class FileRead:
    """A large file's CRC read in progress (``CrcIndex.reading``): what a download that waits for it watches.

    ``key``: the file's.  ``covered`` is its CRC so far and the bytes that covers
    (set by its worker threads); ``queued``: waiting for one of the index's readers
    now; ``started``: when it began reading (time.time_ns).  ``ended`` is set once
    it ends, however; ``result`` is then the CRC and whether it is racy
    (``crc_reads.FileCrc``), if it was read whole.
    """

    def __init__(self, key: FileKey) -> None:
        self.key = key
        self.ended = trio.Event()
        self.queued = False
        self.covered = (0, 0)
        self.started = 0
        self.result: tuple[int, bool] | None = None


class PartialCrc(NamedTuple):
    """A large file's CRC read cut short (its download cancelled): resumed by the next read of the same key.

    ``crc``: CRC-32 of the file's first ``covered`` bytes; ``read_started_ns``
    (time.time_ns): when the first of them was read, for ``ctime_trust.is_racy``
    of the whole CRC once it is complete.
    """

    crc: int
    covered: int
    read_started_ns: int


class CrcIndex:
    """CRC-32 by (device, inode, size, mtime_ns, ctime_ns) and filesystem id: the recent ones in memory, all in
    ``store`` if given.

    The id is the download's (``FilesystemView``, ``filesystem``; without one, the
    filesystem ``trust`` last saw on the device); a key of a device not
    trusted, or whose ctime is not, is neither looked up nor kept.
    """

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
        self._crcs: OrderedDict[IndexKey, int] = OrderedDict()
        self._lock = threading.Lock()  # used from the downloads' worker threads
        # Files read at once for their CRCs, across downloads: the disk and the
        # cores bound it anyway, and each reader is a thread.
        self.readers = trio.CapacityLimiter(readers)
        # Reads done by every download's readers (counted by the worker threads): a download
        # queued for a reader sees the storage answer by them (web.download's watchdog).
        self.reads = 0
        # Large files being read for their CRC now (``reading``), and reads cut short
        # (``partial``), by key: one client that asked for a range of a large cold file and
        # left before its CRC was read, again and again, had it read from its start each
        # time (helper 111: a 4 GiB file, 0.5 CPU-s and 1.8 GB read a request of 79 bytes,
        # one core for as long as it went on), and concurrent downloads each read it.
        # On the event loop only.
        self._reading: dict[tuple[FileKey, int | None], FileRead] = {}
        self._partial: OrderedDict[tuple[FileKey, int], PartialCrc] = OrderedDict()

    def filesystem(self, key: FileKey, view: FilesystemView | None = None) -> int | None:
        """The id ``key``'s CRC is looked up and kept under: ``view``'s for its device (None: ``LATEST``'s).

        None where its device or its ctime (``trusted_ctime``) is not trusted.
        """
        return self._on_device(key[0], view) if trusted_ctime(key[3], key[4]) else None

    def _on_device(self, device: int, view: FilesystemView | None) -> int | None:
        return self.trust.filesystem(device) if view is None else view.get(device)

    def read_filesystem(self, fd: int, key: FileKey, view: FilesystemView | None = None) -> int | None:
        """As ``filesystem``, for a CRC read from ``fd``, the file listed as ``key``: None unless ``fd`` lies on it.

        A CRC read from another filesystem's file (one given the device number
        since) is neither looked up, kept, nor resumed (``crc_reads.read_filesystem``
        fails its download).  In a worker thread (``fstatfs`` may wait on the
        storage); OSError as ``fstatfs`` raises it, with a ``view``.
        """
        if view is None:
            return self.trust.filesystem(key[0]) if self.trust.file(fd, key) else None
        filesystem = self.filesystem(key, view)
        return filesystem if filesystem is not None and filesystem_id(fd) == filesystem else None

    def _resolved(self, key: FileKey, filesystem: int | _Latest | None) -> int | None:
        return self.filesystem(key) if filesystem is LATEST else filesystem

    def get(self, key: FileKey, filesystem: int | _Latest | None = LATEST) -> int | None:
        """``key``'s CRC kept under ``filesystem`` (``filesystem``, ``read_filesystem``), if any."""
        if (filesystem := self._resolved(key, filesystem)) is None:
            return None
        crc = self._known([index_key(key, filesystem)])[0]
        return None if crc < 0 else crc

    def known(self, keys: Iterable[FileKey], view: FilesystemView | None = None) -> array[int]:
        """The CRC for each key under ``view`` (``filesystem``), -1 where there is none (for ``CrcSource``).

        In a worker thread with a store.  The memory's under one lock for all
        keys (20,000 keys: a lock and two calls a key were 0.03 s of a warm
        download's first byte), then the store's for those it lacks, in one call
        (``CrcStore.get_many``: none if the store's file does not answer).
        """
        keys = list(keys)
        # A key whose ctime is not trusted is never kept: one found was kept before it was known so.
        filesystems = {device: self._on_device(device, view) for device in {key[0] for key in keys}}
        indexed: list[IndexKey | None] = [
            index_key(key, filesystem)
            if (filesystem := filesystems[key[0]]) is not None and trusted_ctime(key[3], key[4])
            else None
            for key in keys
        ]
        return self._known(indexed)

    def _known(self, indexed: list[IndexKey | None]) -> array[int]:
        crcs = array("q", [-1]) * len(indexed)
        lacking = []
        with self._lock:
            remembered, used = self._crcs.get, self._crcs.move_to_end
            for position, key in enumerate(indexed):
                if key is None or (crc := remembered(key)) is None:
                    lacking.append(position)
                else:
                    used(key)
                    crcs[position] = crc
        if self.store is not None:
            asked = [(position, key) for position in lacking if (key := indexed[position]) is not None]
            found = self.store.get_many([key for _, key in asked])
            for (position, key), crc in zip(asked, found, strict=True):
                if crc is not None:
                    self._remember(key, crc)
                    crcs[position] = crc
        return crcs

    def remembered(self, key: FileKey, filesystem: int | _Latest | None = LATEST) -> int | None:
        """``key``'s CRC if kept in memory (no store lookup: on the event loop), as ``get``."""
        if (filesystem := self._resolved(key, filesystem)) is None:
            return None
        with self._lock:
            return self._crcs.get(index_key(key, filesystem))

    def being_read(self, key: FileKey, filesystem: int | _Latest | None = LATEST) -> FileRead | None:
        """The read of ``key``'s file on ``filesystem`` in progress (``reading``), if any."""
        return self._reading.get((key, self._resolved(key, filesystem)))

    @contextmanager
    def reading(self, key: FileKey, filesystem: int | _Latest | None = LATEST) -> Iterator[FileRead]:
        """While ``key``'s file on ``filesystem`` is read for its CRC (``being_read``); one such read at a time."""
        read_key = (key, self._resolved(key, filesystem))
        assert read_key not in self._reading
        self._reading[read_key] = read = FileRead(key)
        try:
            yield read
        finally:
            del self._reading[read_key]
            read.ended.set()

    def take_partial(self, key: FileKey, filesystem: int | _Latest | None = LATEST) -> PartialCrc | None:
        """The read of ``key``'s file on ``filesystem`` cut short, if kept, to resume: no longer kept.

        None where ``key`` is not trusted there (its filesystem looked at anew:
        a device number the next mount reused), as ``known`` would say.
        """
        if (filesystem := self._resolved(key, filesystem)) is None:
            return None
        return self._partial.pop((key, filesystem), None)

    def keep_partial(self, key: FileKey, partial: PartialCrc, filesystem: int | _Latest | None = LATEST) -> None:
        """Keep a read cut short of ``key``'s file on ``filesystem`` (the oldest go past PARTIAL_ENTRIES)."""
        if (filesystem := self._resolved(key, filesystem)) is None:
            return
        self._partial[key, filesystem] = partial
        self._partial.move_to_end((key, filesystem))
        while len(self._partial) > PARTIAL_ENTRIES:
            self._partial.popitem(last=False)

    def put(self, key: FileKey, crc: int, filesystem: int | _Latest | None = LATEST) -> None:
        """Keep ``crc`` for ``key`` under ``filesystem`` (``filesystem``, ``read_filesystem``; None: not at all)."""
        if (filesystem := self._resolved(key, filesystem)) is None:
            return
        indexed = index_key(key, filesystem)
        self._remember(indexed, crc)
        if self.store is not None:
            self.store.put(indexed, crc)

    def flush(self, *, wait: bool = True) -> None:
        """Write what the store has batched (after a download's or an album's CRCs); ``wait``: as ``CrcStore.flush``."""
        if self.store is not None:
            self.store.flush(wait=wait)

    def _remember(self, key: IndexKey, crc: int) -> None:
        with self._lock:
            self._crcs[key] = crc
            self._crcs.move_to_end(key)
            while len(self._crcs) > self.entries:
                self._crcs.popitem(last=False)
