"""One download's CRCs, read ahead of the producer in the order they are sent (``crc_reads``; ``crc_index`` keeps them).

A header waits only for its own entry's CRC: the CRCs are computed in worker
threads, small files a batch per call and large ones a block per call,
while the producer sends the files before them.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Sequence
from functools import partial

from trio_util import AsyncValue  # type: ignore[attr-defined]

from .crc_index import CrcIndex, FileRead
from .crc_reads import BATCH_BYTES, BATCH_FILES, READ_SIZE, FileCrc, in_reader_thread, small_file_crc
from .large_file_crc import file_crc
from .listed_files import Folders
from .plan import ArchivePlan
from .worker_threads import in_thread


class CrcSource:
    """The CRCs of ``entries`` of ``plan`` (in that order), from the index or read; ``crc(k)`` waits for entry k's.

    A file that is not the one listed (another key) is FileChanged, raised
    by ``compute``: its CRC would not be its bytes'.
    """

    def __init__(self, plan: ArchivePlan, entries: Sequence[int], index: CrcIndex) -> None:
        self.plan = plan
        self.index = index
        # Runs of consecutive entries (a range needs at most two: local headers, central
        # headers): k's position is found in them without a table the size of the album.
        self._entries = entries
        self._runs: list[tuple[int, int, int]] = []  # first k, last k + 1, position of the first
        for position, k in enumerate(entries):
            if self._runs and self._runs[-1][1] == k:
                first, _, at = self._runs[-1]
                self._runs[-1] = (first, k + 1, at)
            else:
                self._runs.append((k, k + 1, position))
        self._crcs = array("q", [-1]) * len(entries)
        self._racy: set[int] = set()
        self._ready = AsyncValue(0)  # how many of ``entries`` have their CRC
        # Reads done (counted by the worker threads), and the archive offset of the first byte
        # that waits for a CRC (None: nothing waits): a long cold CRC that the archive's next
        # byte waits for is no hung storage (web.download's watchdog).
        self.reads = 0
        self.waiting_at: int | None = None
        # Waiting for one of the index's readers (all busy): then every download's reads are progress.
        self.queued = False
        # Waiting for another download's read of a file this one needs (``file_crc``): its progress is this one's.
        self._following: FileRead | None = None

    def _progressed(self) -> None:
        # In a worker thread too: a lost increment is harmless, any change counts.
        self.reads += 1
        self.index.reads += 1

    def _queued(self, queued: bool) -> None:
        self.queued = queued

    def _follow(self, read: FileRead | None) -> None:
        self._following = read

    def progress(self) -> tuple[object, int]:
        """What changes while reading this download's CRCs advances (for its watchdog): (whose reads, their count).

        While queued for a reader (the index's readers all busy, possibly with
        other downloads' long reads of slow storage), the storage answering
        them: every download's reads (the index's count); else this download's own.  While waiting
        for another download's read of a file, that read's, as it would be its own
        (helper 112: every download's reads kept a download waiting on a read that
        hung alive as long as others read), by the file's key and the bytes read of it.  Counts
        of different things do not compare.
        """
        following = self._following
        if following is not None:
            # By file, not by read: a read cut short (its client left) goes on in the next one.
            return (self.index, self.index.reads) if following.queued else (following.key, following.covered[1])
        return (self.index, self.index.reads) if self.queued else (self, self.reads)

    async def compute(self) -> None:
        """Compute every CRC in order (run in the download's nursery)."""
        known = self._indexed()
        if known is None:
            keys = (self.plan.key(k) for k in self._entries)
            # Not under the readers' limiter: a lookup reads no file, and must not wait behind reads
            # of hung storage.
            known = await in_thread(self.index.known, keys)
            if self._whole() and min(known, default=0) >= 0:
                self.plan.indexed_crcs = array("q", known)
        buffer = bytearray(READ_SIZE)
        position = 0
        while position < len(self._entries):
            if known[position] >= 0:
                # A run of known CRCs at once (a warm album is one run).
                run_end = position
                while run_end < len(self._entries) and known[run_end] >= 0:
                    run_end += 1
                self._crcs[position:run_end] = known[position:run_end]
                position = self._ready.value = run_end
                continue
            k = self._entries[position]
            if self.plan.sizes[k] > BATCH_BYTES:
                path = self.plan.directory / self.plan.path_str(k)
                results = [
                    await file_crc(
                        path,
                        self.plan.sizes[k],
                        self.index,
                        buffer,
                        self.plan.key(k),
                        self._progressed,
                        self._queued,
                        self._follow,
                    )
                ]
            else:
                # Given up on if cancelled (storage that hangs): the thread opens and closes its files itself.
                results = await in_thread(
                    in_reader_thread(self._queued, self._small_files),
                    position,
                    known,
                    buffer,
                    limiter=self.index.readers,
                )
            for result in results:
                self._crcs[position] = result.crc
                if result.racy:
                    self._racy.add(self._entries[position])
                position += 1
            self._ready.value = position
        # Not behind another download's write (waiting on another process's lock): its rows go with the next.
        await in_thread(partial(self.index.flush, wait=False))

    def _whole(self) -> bool:
        """Whether ``entries`` are all the plan's, in order (a whole download's)."""
        return len(self._entries) == self.plan.count and all(map(operator.eq, self._entries, range(self.plan.count)))

    def _indexed(self) -> array[int] | None:
        """The CRCs of ``entries`` as the plan keeps them from an earlier lookup (``indexed_crcs``), or None.

        None while a device of the plan's is not trusted (a device number is
        reused by the next mount: ``CtimeTrust.learn``), as the index's lookup
        would then answer for none of its files.
        """
        crcs = self.plan.indexed_crcs
        if crcs is None or not all(map(self.index.trust.device, self.plan.devices)):
            return None
        return array("q", crcs) if self._whole() else array("q", (crcs[k] for k in self._entries))

    def _small_files(self, position: int, known: array[int], buffer: bytearray) -> list[FileCrc]:
        """CRCs of the small files from ``position`` on, as many as one batch holds (in a worker thread)."""
        results: list[FileCrc] = []
        budget = BATCH_BYTES
        folders = Folders()
        try:
            while position < len(self._entries) and len(results) < BATCH_FILES and known[position] < 0:
                k = self._entries[position]
                size = self.plan.sizes[k]
                if size > BATCH_BYTES or (results and size > budget):
                    break
                path = self.plan.directory / self.plan.path_str(k)
                key = self.plan.key(k)
                results.append(small_file_crc(path, size, self.index, buffer, key, self._progressed, folders))
                budget -= size
                position += 1
        finally:
            folders.close()
        return results

    def _position(self, k: int) -> int:
        for first, end, at in self._runs:
            if first <= k < end:
                return at + k - first
        raise KeyError(k)

    async def crc(self, k: int, at: int | None = None) -> int:
        """Entry k's CRC, once computed; ``at``: the archive offset of the first byte that needs it."""
        position = self._position(k)
        if position >= self._ready.value:  # not computed yet: wait (the usual case is that it is)
            self.waiting_at = at
            try:
                await self._ready.wait_value(lambda ready: ready > position)
            finally:
                self.waiting_at = None
        return self._crcs[position]

    def ready(self, k: int) -> int | None:
        """Entry k's CRC if it is computed, without waiting."""
        position = self._position(k)
        return self._crcs[position] if position < self._ready.value else None

    def ready_run(self, first: int, stop: int, *, unverified: bool = False) -> array[int]:
        """The CRCs at hand of entries ``first``, ``first + 1``, ... before ``stop``, in order, without waiting.

        The longest such run, possibly empty: it ends at the first entry whose
        CRC is not computed yet, and with ``unverified`` at the first racy one
        too (whose data the producer must check against its CRC).
        """
        for run_first, run_end, at in self._runs:
            if run_first <= first < run_end:
                position = at + first - run_first
                count = min(stop, run_end) - first
                crcs = self._crcs[position : position + max(0, min(count, self._ready.value - position))]
                if unverified and self._racy:
                    for i, k in enumerate(range(first, first + len(crcs))):
                        if k in self._racy:
                            return crcs[:i]
                return crcs
        raise KeyError(first)

    def racy(self, k: int) -> bool:
        """Whether entry k's CRC was read from a file that may still change unseen (the producer checks it)."""
        return k in self._racy
