"""One download's CRCs, read ahead of the producer in the order they are sent (``crc_reads``; ``crc_index`` keeps them).

A header waits only for its own entry's CRC: the CRCs are computed in worker
threads, small files a batch per call and large ones a block per call,
while the producer sends the files before them.  In a whole stored download,
a small file the index lacks is not read here: the producer reads it once,
computes its CRC and writes it into the local header before the data
(``producer_protocol``'s ``H``), and the service learns that CRC, for the
central directory and the index, from the bytes as they pass (``tap``).
Read here too, each such file was read twice: a cold download of 20,000 files
of 8 KB cost 1.8-3.0 times a warm one.
"""

from __future__ import annotations

import operator
import time
from array import array
from collections.abc import Sequence
from functools import partial

from trio_util import AsyncValue  # type: ignore[attr-defined]
from zlib_ng import zlib_ng

from .crc_index import CrcIndex, FileRead
from .crc_reads import BATCH_BYTES, BATCH_FILES, READ_SIZE, FileCrc, in_reader_thread, small_file_crc
from .ctime_trust import is_racy
from .large_file_crc import file_crc
from .listed_files import Folders
from .plan import ArchivePlan
from .producer_protocol import COMPUTED_CRC_LIMIT
from .worker_threads import in_thread
from .zipformat import CRC_FIELD, CRC_SIZE, LOCAL_CRC_AT

# An entry whose CRC the producer computes (``_crcs``), until its bytes pass (``tap``).
BY_PRODUCER = -2


class CrcMismatch(RuntimeError):
    """A local header the producer wrote carries a CRC-32 that is not its data's (``CrcSource.tap``)."""


class CrcSource:
    """The CRCs of ``entries`` of ``plan`` (in that order), from the index or read; ``crc(k)`` waits for entry k's.

    A file that is not the one listed (another key) is FileChanged, raised
    by ``compute``: its CRC would not be its bytes'.  ``whole_download``: the
    bytes sent are the whole stored archive, so small files the index lacks
    are left to the producer (``by_producer``, ``tap``); a range that holds
    every CRC field need not hold every entry whole.
    """

    def __init__(
        self, plan: ArchivePlan, entries: Sequence[int], index: CrcIndex, *, whole_download: bool = False
    ) -> None:
        self.plan = plan
        self._whole_download = whole_download
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
        self._ready = AsyncValue(0)  # how many of ``entries`` have their CRC, or BY_PRODUCER
        # Entries the producer computes (whole stored downloads only): the next to ``tap`` (a position,
        # perhaps not decided yet), its CRC so far and its header's CRC field as they pass; the CRCs
        # learnt (for the index); when the index was asked (no read of these began before: ``is_racy``).
        self._producer_computes = False
        self._tapping = 0
        self._tap_crc = 0
        self._tap_field = bytearray()
        self._tapped = AsyncValue(0)
        self.learnt = array("I")  # positions (12 bytes an entry with its CRC: a key and a tuple were ~150)
        self._asked_ns = 0
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
            self._asked_ns = time.time_ns()
            known = await in_thread(self.index.known, keys, self.plan.filesystem_ids)
            if self._whole() and min(known, default=0) >= 0:
                self.plan.indexed_crcs = array("q", known)
            elif self._whole_download and self._whole() and self.plan.length is not None:
                sizes = self.plan.sizes  # a whole download's entries are the plan's, in order
                for k, crc in enumerate(known):
                    if crc < 0 and sizes[k] <= COMPUTED_CRC_LIMIT:
                        known[k] = BY_PRODUCER
                        self._producer_computes = True
        buffer = bytearray(READ_SIZE)
        position = 0
        while position < len(self._entries):
            if known[position] >= 0 or known[position] == BY_PRODUCER:
                # A run of known CRCs at once (a warm album is one run).
                run_end = position
                while run_end < len(self._entries) and (known[run_end] >= 0 or known[run_end] == BY_PRODUCER):
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
                        self.plan.filesystem_ids,
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
        batch: list[int] = []  # the entries read
        budget = BATCH_BYTES
        # -1: neither known nor BY_PRODUCER.
        while position < len(self._entries) and len(batch) < BATCH_FILES and known[position] == -1:
            k = self._entries[position]
            size = self.plan.sizes[k]
            if size > BATCH_BYTES or (batch and size > budget):
                break
            batch.append(k)
            budget -= size
            position += 1
        view = self.plan.filesystem_ids
        # The index looked at again (another download may have read them since), in one lookup: one a
        # file, each handed to the store's thread, cost ~45 us (the lookup itself ~8).  Each file's own
        # look is then at the memory, where those found now are.
        self.index.known((self.plan.key(k) for k in batch), view)
        results: list[FileCrc] = []
        folders = Folders()
        try:
            for k in batch:
                path = self.plan.directory / self.plan.path_str(k)
                size, key = self.plan.sizes[k], self.plan.key(k)
                crc = small_file_crc(path, size, self.index, buffer, key, self._progressed, folders, view, stored=False)
                results.append(crc)
        finally:
            folders.close()
        return results

    def _position(self, k: int) -> int:
        for first, end, at in self._runs:
            if first <= k < end:
                return at + k - first
        raise KeyError(k)

    async def decided(self, k: int, at: int | None = None) -> None:
        """Until entry k's CRC is computed or left to the producer (``by_producer``); ``at`` as for ``crc``."""
        position = self._position(k)
        if position >= self._ready.value:  # not computed yet: wait (the usual case is that it is)
            self.waiting_at = at
            try:
                await self._ready.wait_value(lambda ready: ready > position)
            finally:
                self.waiting_at = None

    async def crc(self, k: int, at: int | None = None) -> int:
        """Entry k's CRC, once computed (the producer's: once its bytes passed); ``at``: the first byte needing it."""
        await self.decided(k, at)
        position = self._position(k)
        if self._crcs[position] == BY_PRODUCER:
            # Its bytes are on their way: the instructions before this wait have all been sent.
            await self._tapped.wait_value(lambda _: self._crcs[position] != BY_PRODUCER)
        return self._crcs[position]

    def ready(self, k: int) -> int | None:
        """Entry k's CRC if it is computed (a producer's: once its bytes passed), without waiting."""
        position = self._position(k)
        crc = self._crcs[position] if position < self._ready.value else -1
        return crc if crc >= 0 else None

    def is_decided(self, k: int) -> bool:
        """Whether entry k's CRC is computed or left to the producer (``decided``), without waiting."""
        return self._position(k) < self._ready.value

    def by_producer(self, first: int, stop: int) -> int:
        """How many of entries ``first``, ``first + 1``, ... before ``stop`` are left to the producer, in a row.

        Only for a whole download (its positions are the entries), and of those decided (``decided``).
        """
        count = 0
        if not self._producer_computes:
            return count
        crcs, ready = self._crcs, min(stop, self._ready.value)
        while first + count < ready and crcs[first + count] == BY_PRODUCER:
            count += 1
        return count

    def tap(self, at: int, chunk: bytes) -> None:
        """Bytes ``at`` .. ``at + len(chunk) - 1`` of the archive as they pass: the CRCs of the producer's entries.

        Each such entry's CRC is computed from its data here (zlib-ng), and must
        equal the one the producer wrote into its local header (APPNOTE 4.3.7,
        4.4.7), else CrcMismatch.  Chunks come in order, none skipped.
        """
        if not self._producer_computes:
            return
        plan, crcs = self.plan, self._crcs
        end = at + len(chunk)
        view = memoryview(chunk)
        while True:
            position = self._tapping
            ready = self._ready.value
            while position < ready and crcs[position] != BY_PRODUCER:
                position += 1
            self._tapping = position
            if position >= ready:  # none, or not decided yet (its bytes cannot have been written)
                return
            field_at = plan.local_offsets[position] + LOCAL_CRC_AT
            if field_at >= end:
                return
            entry_end = plan.local_offsets[position + 1]
            data_at = entry_end - plan.sizes[position]
            low, high = max(field_at, at), min(field_at + CRC_SIZE, end)
            if low < high:
                self._tap_field += view[low - at : high - at]
            low, high = max(data_at, at), min(entry_end, end)
            if low < high:
                self._tap_crc = zlib_ng.crc32(view[low - at : high - at], self._tap_crc)
            if entry_end > end:
                return
            (written,) = CRC_FIELD.unpack(self._tap_field)
            if written != self._tap_crc:
                name, crc = self.plan.path_str(position), self._tap_crc
                raise CrcMismatch(f"{name}: the producer wrote CRC {written:08x}, its data's is {crc:08x}")
            crcs[position] = written
            self.learnt.append(position)
            self._tap_crc = 0
            self._tap_field.clear()
            self._tapping = position + 1
            self._tapped.value += 1

    def keep_learnt(self) -> None:
        """Keep in the index the CRCs learnt from the producer's bytes (``tap``), those not racy; in a worker thread."""
        learnt, self.learnt = self.learnt, array("I")
        for position in learnt:
            key = self.plan.key(position)  # a whole download's: positions are entries
            if not is_racy(key, self._asked_ns):
                # Under the filesystem the producer checked the file to lie on (None: not trusted).
                self.index.put(key, self._crcs[position], self.index.filesystem(key, self.plan.filesystem_ids))
        self.index.flush(wait=False)

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
                if crcs and min(crcs) < 0:  # the producer's, its bytes still to pass
                    crcs = crcs[: next(i for i, crc in enumerate(crcs) if crc < 0)]
                if unverified and self._racy:
                    for i, k in enumerate(range(first, first + len(crcs))):
                        if k in self._racy:
                            return crcs[:i]
                return crcs
        raise KeyError(first)

    def racy(self, k: int) -> bool:
        """Whether entry k's CRC was read from a file that may still change unseen (the producer checks it)."""
        return k in self._racy
