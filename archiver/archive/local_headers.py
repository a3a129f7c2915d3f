"""Where a deflated archive's entries begin, found in its bytes as the producer writes them.

A deflated entry's compressed size is known only once written (APPNOTE 4.3.9,
the data descriptor), so the plan cannot say where the next entry begins.  A
response that fails mid-stream must still end inside an entry, never between
two nor within a local header's first 30 bytes, which a reader that reads front
to back (Java's ``ZipInputStream``) takes for the end of a whole archive of the
entries before it (helper 75).  ``LocalHeaderFinder`` finds each entry's local
header (4.3.7) in the bytes as they pass: the plan knows its every byte but the
CRC (name, times, sizes as written: 0 with bit 3 set, or a stored entry's size),
so it is looked for whole, the entry's name among it.

A file's own bytes pass through verbatim where deflate stores a block it cannot
shrink, and an album may hold an earlier archive of itself: its records could be
taken for this one's (helper 77: an album's own central directory, found early,
ended the hold on the tail).  So a record is taken only where the entry before
it ends: right after a data descriptor (4.3.9) whose sizes are that entry's (its
compressed size the bytes since its header; its size the file's), or a stored
entry's data, or at offset 0.  A file made to hold all that, descriptor included,
can still pass for the real thing; only its uploader can make one, who could as
well upload a broken file.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from .zipformat import (
    CENTRAL_HEADER_FIXED,
    CRC_SIZE,
    DATA_DESCRIPTOR_BOUND,
    DATA_DESCRIPTOR_SIGNATURE,
    DATA_DESCRIPTOR_SIZE,
    DEFLATED,
    LOCAL_CRC_AT,
    LOCAL_HEADER_FIXED,
    EntryFields,
    uses_zip64,
)

CRC_END = LOCAL_CRC_AT + CRC_SIZE  # the CRC field: the one part of a local header not matched
CENTRAL_NAME_LENGTH_AT = 28  # 4.3.12: file name length, then the extra field's and the comment's
CENTRAL_COMMENT_LENGTH_AT = 32  # from the comment length on, a first central header is known whole


def end_inside_an_entry(starts: Sequence[int], entries: int, end: int, floor: int) -> int:
    """The largest cut in [floor, end] of an archive's bytes (from its start) that lies inside an entry.

    ``starts``: the local header offsets of entries 0, 1, ... as far as known,
    then (optionally) the central directory's offset as entry ``entries``'s.
    Inside: past the local header's fixed part (30 bytes) and before the next
    known local header; at or past the central directory, any cut is kept (the
    tail is the caller's).  A cut before the first local header is ``floor``.
    """
    cut = end
    while cut > floor:
        k = bisect.bisect_right(starts, cut - 1) - 1  # the entry of the byte before the cut
        if k < 0:
            return floor
        if k >= entries:
            return cut
        start = starts[k]
        if start + LOCAL_HEADER_FIXED < cut and (k + 1 == len(starts) or cut < starts[k + 1]):
            return cut
        cut = start - 1 if cut <= start + LOCAL_HEADER_FIXED else cut - 1
    return floor


class Needle(NamedTuple):
    """A record looked for in the bytes: its bytes, those from ``key_at`` on searched for, ``checked`` slices compared.

    The rest (a CRC, sizes not known yet) is not matched.
    """

    record: bytes
    key_at: int
    checked: tuple[tuple[int, int], ...]


def local_header_needle(header: bytes) -> Needle:
    """A local header (4.3.7) as written, every byte matched but its CRC."""
    return Needle(header, CRC_END, ((0, LOCAL_CRC_AT),))


def first_central_header_needle(header: bytes) -> Needle:
    """The central directory's first header (4.3.12) to its name's end (its local header at offset 0).

    Not matched: the version needed, CRC, sizes and extra field's length (ZIP64
    fields there depend on the sizes written).
    """
    (name_length,) = struct.unpack_from("<H", header, CENTRAL_NAME_LENGTH_AT)
    checked = ((0, 6), (8, 16), (CENTRAL_NAME_LENGTH_AT, CENTRAL_NAME_LENGTH_AT + 2))
    return Needle(header[: CENTRAL_HEADER_FIXED + name_length], CENTRAL_COMMENT_LENGTH_AT, checked)


class DeflatedLayout(Protocol):
    """What the finder needs of an archive's plan (``ArchivePlan``)."""

    @property
    def count(self) -> int: ...
    @property
    def sizes(self) -> Sequence[int]: ...
    def fields(self, k: int) -> EntryFields: ...
    def written_local_header(self, k: int) -> bytes: ...
    def written_first_central_header(self) -> bytes: ...


class LocalHeaderFinder:
    """Where a deflated archive's entries begin, and its central directory, found in its bytes fed in order.

    ``plan.written_local_header(k)``: entry k's local header as written, with any CRC
    (it is not matched); ``plan.written_first_central_header()``: the central
    directory's first header, with any CRC and sizes.
    """

    def __init__(self, plan: DeflatedLayout) -> None:
        self.count = plan.count
        self.starts: list[int] = []  # the local headers' offsets found, entry 0, 1, ...
        self.central_start: int | None = None  # the central directory's, once found
        self._plan = plan
        self._local_header = plan.written_local_header
        self._central_header = plan.written_first_central_header
        self._data_start = 0  # where the last entry found has its data
        self._next: Needle | None = self._needle(0)
        self._window = bytearray()  # bytes fed, from offset _window_at, that a header may yet begin in
        self._window_at = 0
        self.fed = 0  # bytes fed in all

    def _needle(self, k: int) -> Needle | None:
        if k < self.count:
            return local_header_needle(self._local_header(k))
        return first_central_header_needle(self._central_header()) if self.count else None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Look for the next records in ``data``, the bytes after those fed before."""
        self.fed += len(data)
        if self._next is None:
            return
        self._window += data
        searched = found = 0  # where to look on; the end of the last record found
        while (needle := self._next) is not None:
            record = needle.record
            at = self._window.find(record[needle.key_at :], searched + needle.key_at)
            if at < 0:
                break
            at -= needle.key_at
            if any(self._window[at + a : at + b] != record[a:b] for a, b in needle.checked) or not self._ends_here(at):
                searched = at + 1
                continue
            searched = found = at + len(record)
            if len(self.starts) < self.count:
                self.starts.append(self._window_at + at)
                self._data_start = self._window_at + searched
                self._next = self._needle(len(self.starts))
            else:
                self.central_start = self._window_at + at
                self._next = None
        # Keep what the next record may have begun in, and the data descriptor before it (from the
        # last record found, not from a false match: the descriptor may lie before its end).
        reach = len(needle.record) - 1 + DATA_DESCRIPTOR_BOUND if needle is not None else 0
        keep = max(found, len(self._window) - reach)
        del self._window[:keep]
        self._window_at += keep

    def _ends_here(self, at: int) -> bool:
        """Whether the last entry found ends at ``at`` of the window (entry 0 begins at offset 0)."""
        offset = self._window_at + at
        if not self.starts:
            return offset == 0
        k = len(self.starts) - 1
        fields, size = self._plan.fields(k), self._plan.sizes[k]
        if fields.method != DEFLATED:
            return offset == self._data_start + size
        length = DATA_DESCRIPTOR_BOUND if uses_zip64(fields, size) else DATA_DESCRIPTOR_SIZE
        descriptor = self._window[max(at - length, 0) : at]
        if len(descriptor) < length or descriptor[:4] != DATA_DESCRIPTOR_SIGNATURE:
            return False
        sizes = struct.unpack_from("<QQ" if length == DATA_DESCRIPTOR_BOUND else "<II", descriptor, 8)
        return sizes == (offset - length - self._data_start, size)

    def cut_inside_an_entry(self, floor: int) -> int:
        """The largest cut in [floor, bytes fed] that lies inside an entry, whatever the bytes not fed yet.

        ``end_inside_an_entry`` of the headers found, short of the bytes fed by the
        next record's length: that far back, a cut past the last local header found
        is not at the end of its entry (nor in its data descriptor's last byte), for
        the record that follows the entry would have been fed whole, and found.
        ``floor`` when no cut is (nothing found yet, or no entry at all).
        """
        hold = len(self._next.record) if self._next is not None else 0
        return end_inside_an_entry(self.starts, self.count, self.fed - hold, floor)
