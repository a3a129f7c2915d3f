"""A byte range of a descriptor-free archive, made from the files it touches and a generated tail.

In a descriptor-free stored archive (``layout``, ``rewrite``) every local
entry (header, name, data) depends on its file alone, not on where it lies:
zip run over the files a range touches writes those entries byte for byte
as it would in the whole archive.  Everything after the last file's data is
the central directory and the end records, which ``central`` writes from
the listing and the CRC index.  So a range costs its own bytes, plus the
partial files at its ends, instead of everything before it.

``plan_range`` maps a range of the archive onto those two parts:

    archive:  | entry 0 | entry 1 | ... | entry n-1 | central directory | end |
    range:              [========================================]
    zip over:   entries 1 .. n-1 (its output from the range's start)
    tail:                                            [===========]
"""

from __future__ import annotations

import bisect
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from .central import central_entry, dos_date_time, end_records, external_attributes
from .crc_index import CrcIndex
from .crc_source import CrcSource
from .layout import ArchiveLayout, central_entry_size, end_records_size, local_entry_size, stored_archive_layout
from .producer import ZipInput, zip_input
from .ranges import ByteRange
from .storage import AlbumFile, AlbumListing


class CentralTail:
    """Bytes ``start`` to ``end`` of the archive's tail (central directory, then end records), generated.

    Holds what the central entries the range touches need, compactly (about
    60 bytes a file: a range may hold the entries of 70,000 files); their
    CRCs come from the index, or are computed (``compute_crcs``, run in the
    download's nursery) where it has none.  A file read for its CRC whose
    mtime is not the listed one has changed since the listing: FileChanged
    (raised by the CRC source).
    """

    def __init__(
        self,
        directory: Path,
        files: Sequence[AlbumFile],
        local_offsets: Sequence[int],
        dos_times: Sequence[int],
        first_entry_at: int,
        start: int,
        end: int,
        end_records: bytes,
        index: CrcIndex,
        known_crcs: array[int],
    ) -> None:
        self.length = end - start + 1
        self._count = len(files)
        # zip's input form, "./name\n" a file, which the CRC source reads too.
        self._names = b"".join(b"./" + os.fsencode(file.path) + b"\n" for file in files)
        self._name_at = 0  # where the next record's name starts in ``_names``
        self._sizes = array("Q", (file.size for file in files))
        self._mtimes = array("q", (file.mtime_ns for file in files))
        self._attributes = array("I", (external_attributes(file.mode) for file in files))
        self._dos_times = array("I", dos_times)
        self._local_offsets = array("Q", local_offsets)
        self._crcs = CrcSource(directory, self._names, self._sizes, index, known_crcs, self._mtimes)
        self._end_records = end_records
        self._record_at = first_entry_at  # the tail offset of the next record to write
        self._next_record = 0  # the k-th file's central entry for k < count, then the end records
        self._start = start
        self._end = end

    async def compute_crcs(self) -> None:
        await self._crcs.compute()

    async def read(self, size: int) -> bytes:
        """The next piece of the tail, about ``size`` bytes (whole records); b"" once all of it is out."""
        pieces: list[bytes] = []
        taken = 0
        while taken < size and self._record_at <= self._end and self._next_record <= self._count:
            record = await self._record(self._next_record)
            at, self._record_at = self._record_at, self._record_at + len(record)
            self._next_record += 1
            piece = record[max(0, self._start - at) : self._end + 1 - at]
            pieces.append(piece)
            taken += len(piece)
        return b"".join(pieces)

    async def _record(self, k: int) -> bytes:
        """The k-th central entry, or the end records; asked for in order."""
        if k == self._count:
            return self._end_records
        name_end = self._names.index(b"\n", self._name_at)
        name = self._names[self._name_at + 2 : name_end]
        self._name_at = name_end + 1
        crc = await self._crcs.crc(k)
        offset = self._local_offsets[k]
        return central_entry(name, crc, self._sizes[k], self._dos_times[k], self._attributes[k], offset)


@dataclass(frozen=True)
class RangePlan:
    """What one range needs: zip over the files it touches (sending ``zip_range`` of their archive), then ``tail``.

    ``zip_input`` and ``layout`` are those files' (None: the range lies in the tail).
    """

    zip_input: ZipInput | None
    layout: ArchiveLayout | None
    zip_range: ByteRange | None
    tail: CentralTail | None
    zip_known_crcs: array[int] | None


def plan_range(
    listing: AlbumListing, layout: ArchiveLayout, byte_range: ByteRange, index: CrcIndex, known_crcs: array[int]
) -> RangePlan | None:
    """How to make ``byte_range`` of the descriptor-free archive of ``listing``; None where it cannot be done so.

    None for archives that keep their data descriptors (``layout``), where
    the touched files alone would (an offset of exactly 0xFFFFFFFF), and
    where zip's DOS time for a file in the tail cannot be predicted: such a
    range is made as before, by zip from the first file.
    """
    if not layout.descriptor_free:
        return None
    files = listing.files
    entry_sizes = (local_entry_size(len(os.fsencode(file.path)), file.size) for file in files)
    local_offsets = list(accumulate(entry_sizes, initial=0))
    central_at = local_offsets.pop()  # where the central directory starts: after the last entry
    start, end = byte_range.start, byte_range.end
    zip_files, zip_layout, zip_range, zip_known_crcs = None, None, None, None
    if start < central_at:
        first = bisect.bisect_right(local_offsets, start) - 1
        last = bisect.bisect_right(local_offsets, min(end, central_at - 1)) - 1
        zip_files = AlbumListing(listing.directory, files[first : last + 1], ())
        zip_layout = stored_archive_layout(zip_files)
        if zip_layout is None or not zip_layout.descriptor_free:
            return None  # the files' own offsets meet layout's 0xFFFFFFFF corner
        zip_range = ByteRange(start - local_offsets[first], min(end, central_at - 1) - local_offsets[first])
        zip_known_crcs = known_crcs[first : last + 1]
    tail = None
    if end >= central_at:
        tail_start, tail_end = max(start, central_at) - central_at, end - central_at
        tail = _central_tail(listing, local_offsets, central_at, tail_start, tail_end, index, known_crcs)
        if tail is None:
            return None
    zip_files_input = None if zip_files is None else zip_input(zip_files)
    return RangePlan(zip_files_input, zip_layout, zip_range, tail, zip_known_crcs)


def _central_tail(
    listing: AlbumListing,
    local_offsets: list[int],
    central_at: int,
    start: int,
    end: int,
    index: CrcIndex,
    known_crcs: array[int],
) -> CentralTail | None:
    """The tail's bytes ``start`` to ``end`` (offsets from the central directory's start)."""
    files = listing.files
    entry_sizes = (
        central_entry_size(len(os.fsencode(file.path)), file.size, offset)
        for file, offset in zip(files, local_offsets, strict=True)
    )
    central_offsets = list(accumulate(entry_sizes, initial=0))
    central_size = central_offsets.pop()
    records = end_records(len(files), central_size, central_at)
    assert len(records) == end_records_size(len(files), central_at)
    first, last = len(files), len(files) - 1  # no central entry: the range is in the end records
    if start < central_size:
        first = bisect.bisect_right(central_offsets, start) - 1
        last = bisect.bisect_right(central_offsets, min(end, central_size - 1)) - 1
    touched = files[first : last + 1]
    dos_times = [dos_date_time(file.mtime_ns) for file in touched]
    if None in dos_times:
        return None
    first_at = central_offsets[first] if first < len(files) else central_size
    return CentralTail(
        listing.directory,
        touched,
        local_offsets[first : last + 1],
        [time for time in dos_times if time is not None],
        first_at,
        start,
        end,
        records,
        index,
        known_crcs[first : last + 1],
    )
