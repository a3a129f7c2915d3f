"""One download's CRCs, read ahead of the producer in the order they are sent (``crc_index`` keeps them).

A header waits only for its own entry's CRC: the CRCs are computed in worker
threads, small files a batch per call and large ones a block per call,
while the producer sends the files before them.

Or not read at all: a file the index lacks, of at most HOLD_BYTES, whose
whole entry the download sends, is *held*.  Its local header goes to the
producer with a CRC of 0; the download's reader of the producer's output
(``producer``) keeps that header and the data after it back, computes the
CRC of the very bytes that pass, puts it in the header and lets them go
(``held``).  A cold file is then read once, not twice (its read was a cold
download's largest cost), and what is sent carries the CRC of what is sent.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Sequence
from typing import NamedTuple

import trio
from trio_util import AsyncValue  # type: ignore[attr-defined]

from .crc_index import (
    BATCH_BYTES,
    BATCH_FILES,
    READ_SIZE,
    CrcIndex,
    FileCrc,
    FileKey,
    file_crc,
    is_racy,
    small_file_crc,
)
from .plan import ArchivePlan
from .zipformat import LOCAL_CRC_AT

# The largest file held (see above): a cold download may hold this much more
# memory, for as long as the file's bytes take to come through the pipe.
HOLD_BYTES = 4 * 1024 * 1024

# ``known`` and ``_crcs`` below: -1 not known yet, HELD for a held entry until its CRC comes.
UNKNOWN = -1
HELD = -2


class HeldEntry(NamedTuple):
    """A held entry's place in the archive: its local header's CRC field, its data and end (byte offsets)."""

    k: int
    crc_at: int
    data_at: int
    end: int


class CrcSource:
    """The CRCs of ``entries`` of ``plan`` (in that order), from the index or read; ``crc(k)`` waits for entry k's.

    A file that is not the one listed (another key) is FileChanged, raised
    by ``compute``: its CRC would not be its bytes'.
    """

    def __init__(
        self, plan: ArchivePlan, entries: Sequence[int], index: CrcIndex, hold: tuple[int, int] | None = None
    ) -> None:
        """``hold``: the bytes (start, end) the producer sends, whose whole entries may be held; None: none."""
        self.plan = plan
        self.index = index
        self._hold = hold
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
        self._crcs = array("q", [UNKNOWN]) * len(entries)
        self._racy: set[int] = set()
        self._done = 0  # how many of ``entries`` have their CRC, or are held
        self._changes = AsyncValue(0)  # moves whenever a CRC comes
        self._held: list[HeldEntry] | None = None  # decided once the index is asked
        self._held_decided = trio.Event()
        self._held_crcs: list[tuple[int, int]] = []  # (k, CRC) not in the index yet
        self._started_ns = time.time_ns()

    async def compute(self) -> None:
        """Compute every CRC in order (run in the download's nursery)."""
        keys = (self.plan.key(k) for k in self._entries)
        known = await trio.to_thread.run_sync(self.index.known, keys, limiter=self.index.readers)
        self._decide_held(known)
        buffer = bytearray(READ_SIZE)
        position = 0
        while position < len(self._entries):
            if known[position] != UNKNOWN:
                # A run of known (or held) CRCs at once (a warm album is one run).
                run_end = position
                while run_end < len(self._entries) and known[run_end] != UNKNOWN:
                    run_end += 1
                self._crcs[position:run_end] = known[position:run_end]
                position = self._done = run_end
                self._changes.value += 1
                continue
            k = self._entries[position]
            if self.plan.sizes[k] > BATCH_BYTES:
                path = self.plan.directory / self.plan.path_str(k)
                results = [await file_crc(path, self.plan.sizes[k], self.index, buffer, self.plan.key(k))]
            else:
                results = await trio.to_thread.run_sync(
                    self._small_files, position, known, buffer, limiter=self.index.readers
                )
            for result in results:
                self._crcs[position] = result.crc
                if result.racy:
                    self._racy.add(self._entries[position])
                position += 1
            self._done = position
            self._changes.value += 1
        await trio.to_thread.run_sync(self.index.flush)

    def _decide_held(self, known: array[int]) -> None:
        """Mark HELD in ``known`` the entries to hold (see above) and list them for ``held``."""
        held: list[HeldEntry] = []
        if self._hold is not None and UNKNOWN in known:  # a warm album: none to look at
            start, end = self._hold
            offsets, sizes = self.plan.local_offsets, self.plan.sizes
            for position, k in enumerate(self._entries):
                whole = start <= offsets[k] and offsets[k + 1] <= end + 1
                if known[position] == UNKNOWN and 0 < sizes[k] <= HOLD_BYTES and whole:
                    known[position] = HELD
                    held.append(HeldEntry(k, offsets[k] + LOCAL_CRC_AT, offsets[k + 1] - sizes[k], offsets[k + 1]))
        self._held = held
        self._held_decided.set()

    async def held(self) -> list[HeldEntry]:
        """The entries held, in the order sent (waits until they are decided, when the index has been asked)."""
        await self._held_decided.wait()
        assert self._held is not None
        return self._held

    def held_crc(self, k: int, crc: int) -> None:
        """Held entry k's CRC, of the bytes that passed: to its headers, and to the index (``keep_held``)."""
        position = self._position(k)
        assert self._crcs[position] == HELD, f"entry {k} is not held"
        self._crcs[position] = crc
        self._held_crcs.append((k, crc))
        self._changes.value += 1

    async def keep_held(self) -> None:
        """Put the held CRCs computed so far into the index (in a worker thread; see ``_keep_held``)."""
        crcs, self._held_crcs = self._held_crcs, []
        if crcs:
            await trio.to_thread.run_sync(self._keep_held, crcs, limiter=self.index.readers)

    def _keep_held(self, crcs: list[tuple[int, int]]) -> None:
        """Keep each (k, CRC) whose file is still the one listed, unless racy.

        The CRC is of the bytes the producer sent, copied out of its pipe
        before this runs.  A write to the file before that copy moved its
        ctime (then ``lstat`` finds another key, and the CRC is not kept),
        unless within one tick of the ctime listed: the download began
        before the file was read, so ``is_racy`` from then (as for a read
        here) leaves out every such file.
        """
        for k, crc in crcs:
            key = self.plan.key(k)
            try:
                status = os.lstat(self.plan.directory / self.plan.path_str(k))
            except OSError:
                continue
            found: FileKey = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
            if found == key and not is_racy(key, self._started_ns):
                self.index.put(key, crc)
        self.index.flush()

    def _small_files(self, position: int, known: array[int], buffer: bytearray) -> list[FileCrc]:
        """CRCs of the small files from ``position`` on, as many as one batch holds (in a worker thread)."""
        results: list[FileCrc] = []
        budget = BATCH_BYTES
        while position < len(self._entries) and len(results) < BATCH_FILES and known[position] == UNKNOWN:
            k = self._entries[position]
            size = self.plan.sizes[k]
            if size > BATCH_BYTES or (results and size > budget):
                break
            path = self.plan.directory / self.plan.path_str(k)
            results.append(small_file_crc(path, size, self.index, buffer, self.plan.key(k)))
            budget -= size
            position += 1
        return results

    def _position(self, k: int) -> int:
        for first, end, at in self._runs:
            if first <= k < end:
                return at + k - first
        raise KeyError(k)

    async def crc(self, k: int, or_held: bool = False) -> int:
        """Entry k's CRC, once computed; with ``or_held``, HELD as soon as k is known to be held."""
        if not self.came(k, or_held):  # not computed yet: wait (the usual case is that it is)
            await self._changes.wait_value(lambda _: self.came(k, or_held))
        return self._crcs[self._position(k)]

    def came(self, k: int, or_held: bool = False) -> bool:
        """Whether ``crc`` would return at once."""
        position = self._position(k)
        crc = self._crcs[position]
        return position < self._done and (crc >= 0 or (or_held and crc == HELD))

    def ready(self, k: int) -> int | None:
        """Entry k's CRC if it is computed, without waiting."""
        position = self._position(k)
        crc = self._crcs[position]
        return crc if position < self._done and crc >= 0 else None

    def is_held(self, k: int) -> bool:
        """Whether entry k is held (its header goes to the producer with a CRC of 0)."""
        position = self._position(k)
        return position < self._done and self._crcs[position] == HELD

    def racy(self, k: int) -> bool:
        """Whether entry k's CRC was read from a file that may still change unseen (the producer checks it)."""
        return k in self._racy
