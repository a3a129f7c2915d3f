"""What the producer is told: the instructions (``producer_protocol``) that make bytes ``start`` .. ``end`` of a plan.

A stored archive's bytes are the plan's generated records and slices of
its files.  Most of a warm download is runs of whole entries whose CRCs are
known: those come from a table kept with the plan (``_WholeEntries``) and
have their CRCs patched in; the rest is made piece by piece
(``pieces.stored_pieces``), with a ``CrcWait`` where an entry's CRC is still
being read.  Runs of small files the CRC index lacks, in a whole download,
come from the same table with their CRCs left to the producer (``H``,
``CrcSource.by_producer``).  Nothing here runs a process (``producer`` does).
"""

from __future__ import annotations

import os
import weakref
from array import array
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import NamedTuple

from . import producer_protocol
from .crc_source import CrcSource
from .pieces import CrcWait, FileSlice, stored_pieces
from .plan import ArchivePlan
from .zipformat import CRC_FIELD, DEFLATED, LOCAL_CRC_AT


class DecisionWait(NamedTuple):
    """Whether entry ``k``'s CRC is read here or left to the producer is not known yet: send what is planned, wait.

    ``at``: the archive offset of its local header (``CrcSource.decided``).
    """

    k: int
    at: int


# What the producer's stdin is fed, in order, and where it waits for a CRC.
Instructions = Iterator[bytes | bytearray | CrcWait | DecisionWait]


def instructions(plan: ArchivePlan, start: int, end: int, crcs: CrcSource | None) -> Instructions:
    """The producer's input for bytes ``start`` .. ``end`` of ``plan``, with the waits for CRCs (``stored_pieces``).

    For a deflated plan (no length) the range is ignored: every entry, whole.
    ``crcs`` is required for a stored plan, and for a deflated one with
    stored entries (``ArchivePlan.entries_stored_when_deflating``).
    """
    level = plan.compression
    yield producer_protocol.album(os.fsencode(plan.directory), level, plan.filesystems)
    if plan.length is None:  # deflated: whole entries, written by the producer
        for k in range(plan.count):
            fields = plan.fields(k)
            if fields.method == DEFLATED:
                yield producer_protocol.deflated_entry(plan.path(k), plan.key(k), fields)
                continue
            assert crcs is not None
            crc = crcs.ready(k)
            if crc is None:
                # At no known offset (a deflated archive has none ahead): while it waits, its reads are
                # the download's progress (web.download's watchdog).
                yield CrcWait(k, 0)
                crc = crcs.ready(k)
                assert crc is not None
            yield producer_protocol.stored_entry(plan.path(k), plan.key(k), fields, crc, crcs.racy(k))
        yield producer_protocol.END
    else:
        assert crcs is not None
        yield from _stored_instructions(plan, start, end, crcs)
    yield producer_protocol.DONE


# Whole entries and central headers are given to the producer this many at a time.
RUN = 512


def _stored_instructions(plan: ArchivePlan, start: int, end: int, crcs: CrcSource) -> Instructions:
    """The instructions for bytes ``start`` .. ``end`` of a stored archive: its entries' part, then its central part.

    Between them, ``CHECKED``: the producer checks every file it sent before the
    central directory's first byte goes out, which tells the service so (``web.tail_hold``).
    """
    if start < plan.central_offset <= end:
        yield from _stored_part(plan, start, plan.central_offset - 1, crcs)
        yield producer_protocol.CHECKED
        yield from _stored_part(plan, plan.central_offset, end, crcs)
    else:
        yield from _stored_part(plan, start, end, crcs)


def _stored_part(plan: ArchivePlan, start: int, end: int, crcs: CrcSource) -> Instructions:
    """The instructions for bytes ``start`` .. ``end`` of a stored archive.

    Runs of whole entries and of whole central headers whose CRCs are at
    hand are copied from the plan's joined records and patched (``_WholeEntries``,
    ``ArchivePlan.central_headers``); whatever else (an entry cut by the range,
    a CRC still being read, a racy file) goes piece by piece (``stored_pieces``).
    Both send the same bytes (``tests/test_instructions.py``); the runs cost a
    tenth: a warm 20,000-file download's instructions took 0.10 s of the
    service's CPU piece by piece.
    """
    position = start
    local = plan.whole_entries(start, end)
    if local:
        entries = _whole_entries(plan)
        yield from _pieces(plan, position, plan.local_offsets[local.start] - 1, crcs)
        k = local.start
        while k < local.stop:
            # A run lies within one of the table's blocks (``_WholeEntries``).
            block_stop = min(k - k % entries.block + entries.block, local.stop)
            if not crcs.is_decided(k):
                yield DecisionWait(k, plan.local_offsets[k])
            if computed := crcs.by_producer(k, block_stop):
                stop = k + computed
                yield producer_protocol.computed_run(computed)
                yield entries.instructions(plan, k, stop)
            elif known := crcs.ready_run(k, block_stop, unverified=True):
                stop = k + len(known)
                yield entries.instructions(plan, k, stop, known)
            else:  # a racy CRC: checked against the bytes as they go
                stop = k + 1
                yield from _pieces(plan, plan.local_offsets[k], plan.local_offsets[stop] - 1, crcs)
            k = stop
        position = plan.local_offsets[local.stop]
    central = plan.whole_central_headers(start, end)
    if central:
        k = central.start
        while k < central.stop:
            known = crcs.ready_run(k, min(k + RUN, central.stop))
            stop = k + max(1, len(known))
            at = plan.central_offset + plan.central_offsets[stop]
            if known:
                yield from _pieces(plan, position, plan.central_offset + plan.central_offsets[k] - 1, crcs)
                yield producer_protocol.literal(plan.central_headers(k, stop, known))
            else:
                yield from _pieces(plan, position, at - 1, crcs)
            position, k = at, stop
    yield from _pieces(plan, position, end, crcs)


def _pieces(plan: ArchivePlan, start: int, end: int, crcs: CrcSource) -> Instructions:
    """The instructions for bytes ``start`` .. ``end`` (none if ``start > end``), piece by piece."""
    if start > end:
        return
    for piece in stored_pieces(plan, start, end, crcs.ready, crcs.racy):
        if isinstance(piece, FileSlice):
            k, offset, length, verify_crc = piece
            yield producer_protocol.file_slice(plan.path(k), plan.identity(k), offset, length, verify_crc)
        elif isinstance(piece, CrcWait):
            yield piece
        else:
            yield producer_protocol.literal(piece)


class _WholeEntries:
    """A plan's instructions for each whole stored entry (its local header, then all its data), with CRC 0.

    Made a block of ``RUN`` entries at a time, as a download first needs
    them, and kept with the plan: copied and patched for each download
    (made entry by entry, they were half of a warm 20,000-file download's
    instruction work).  A block costs ~1.2 ms to make on the event loop (the
    whole table at once was 45 ms for 20,000 files, 270 for 120,000), and a
    range makes only the blocks it sends.  About 170 bytes an entry: its
    header and path again, and 77 bytes of instruction fields.
    """

    def __init__(self) -> None:
        # No reference to the plan: these are its weak dictionary's value, which would keep it alive
        # (every plan a producer had run for was kept for good: found by helper 46).
        self.block = RUN
        self._blocks: dict[int, tuple[bytes, array[int]]] = {}

    def instructions(self, plan: ArchivePlan, first: int, stop: int, crcs: Sequence[int] = ()) -> bytearray:
        """Entries ``first`` .. ``stop - 1`` of ``plan`` (in one block), entry ``first + i``'s header with crcs[i].

        No ``crcs``: with CRC 0 (an ``H`` run's, which the producer fills in).
        """
        block_first = first - first % self.block
        assert stop <= block_first + self.block, "a run crosses a block"
        joined, starts = self._blocks.get(block_first) or self._make(plan, block_first)
        low, high = first - block_first, stop - block_first  # starts[] counts from the block's first entry
        base = starts[low]
        data = bytearray(memoryview(joined)[base : starts[high]])
        at = producer_protocol.LITERAL.size + LOCAL_CRC_AT - base
        if not crcs:
            return data
        for i, crc in zip(range(low, high), crcs, strict=True):
            CRC_FIELD.pack_into(data, starts[i] + at, crc)
        return data

    def _make(self, plan: ArchivePlan, block_first: int) -> tuple[bytes, array[int]]:
        parts = []
        for k in range(block_first, min(block_first + self.block, plan.count)):
            parts.append(producer_protocol.literal(plan.local_header(k, 0)))
            parts.append(producer_protocol.file_slice(plan.path(k), plan.identity(k), 0, plan.sizes[k], None))
        starts = array("Q", [0])
        starts.extend(accumulate(len(parts[i]) + len(parts[i + 1]) for i in range(0, len(parts), 2)))
        made = self._blocks[block_first] = (b"".join(parts), starts)
        return made


# Kept while their plan is (in the plan cache, or downloading).
_whole_entries_of: weakref.WeakKeyDictionary[ArchivePlan, _WholeEntries] = weakref.WeakKeyDictionary()


def _whole_entries(plan: ArchivePlan) -> _WholeEntries:
    entries = _whole_entries_of.get(plan)
    if entries is None:
        entries = _whole_entries_of[plan] = _WholeEntries()
    return entries
