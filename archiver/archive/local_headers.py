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
shrink: a file made to hold the very next entry's local header could be taken
for it.  Only whoever uploads the album can make one, and what it costs is a cut
between entries on a transfer that fails anyway (which its client sees fail).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from .zipformat import LOCAL_CRC_AT, LOCAL_HEADER_FIXED

CRC_END = LOCAL_CRC_AT + 4  # the CRC field: the one part of a local header not matched


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


class LocalHeaderFinder:
    """The local header offsets of a deflated archive's entries, found in its bytes fed in order.

    ``header(k)``: entry k's local header as written, with any CRC (it is not matched), for
    ``count`` entries (``ArchivePlan.written_local_header``).
    """

    def __init__(self, count: int, header: Callable[[int], bytes]) -> None:
        self.count = count
        self.starts: list[int] = []
        self._header = header
        self._next: bytes | None = header(0) if count else None
        self._window = bytearray()  # bytes fed, from offset _window_at, that a header may yet begin in
        self._window_at = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Look for the next local headers in ``data``, the bytes after those fed before."""
        if self._next is None:
            return
        self._window += data
        searched = 0
        while self._next is not None:
            header = self._next
            at = self._window.find(header[CRC_END:], searched + CRC_END)
            if at < 0:
                break
            at -= CRC_END
            if self._window[at : at + LOCAL_CRC_AT] != header[:LOCAL_CRC_AT]:
                searched = at + 1
                continue
            self.starts.append(self._window_at + at)
            searched = at + len(header)
            k = len(self.starts)
            self._next = self._header(k) if k < self.count else None
        # Keep what the next header may have begun in (all of it, if it was found in part).
        keep = max(searched, len(self._window) - (len(self._next) - 1 if self._next is not None else 0))
        del self._window[:keep]
        self._window_at += keep

    def end_inside_an_entry(self, end: int, floor: int) -> int:
        """``end_inside_an_entry`` of the headers found, for an ``end`` a local header or more before the bytes fed.

        That far back, a cut past the last header found is not at the end of its entry: the next
        header would have been fed whole, and found.  The tail a response holds back is farther
        (``ArchivePlan.tail_bound``: the central directory holds every entry's name, and more).
        """
        return end_inside_an_entry(self.starts, self.count, end, floor)
