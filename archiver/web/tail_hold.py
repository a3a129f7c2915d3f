"""A download's tail, held back until the producer has proven that every file it sent was checked.

The tail: from the last entry's last byte to the end, or the last byte of a range
that ends before it.  It goes out once the producer has checked every file it sent
(after the reader took its bytes out of the pipe), and the files changed lately were
looked at again.  The proof is the central directory's first byte, which the producer
writes only then (``producer_protocol.CHECKED``), or its clean exit.  Whatever a client
keeps of a transfer that failed for a file changed is then no whole archive, even to a
reader that reads front to back (helper 74: with only the last chunk held back, of an
album of 4,000 files, bsdtar and Java's ZipInputStream unpacked every entry of the
bytes received, the file cut; helper 75: files not changed lately too; helper 73: the
end records went out before the recheck).  What goes out before the proof ends inside
an entry (stored: ``ArchivePlan.cut_inside_an_entry``; deflated: ``LocalHeaderFinder``): if
the producer fails, no reader takes it for a whole archive of the entries so far
(helper 75, Java's ZipInputStream).  Held meanwhile: a few bytes.  Until 2026-12-03
the whole central directory was held until the producer's exit, in memory, ~20 MB a
download for an album of 20,000 long names (helper 76).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..archive.local_headers import LocalHeaderFinder
from ..archive.plan import ArchivePlan


class TailHold:
    """What of a body's bytes ``start`` .. ``end`` of ``plan`` may go out now, the tail held (``next``)."""

    def __init__(self, plan: ArchivePlan, start: int, end: int, chunk_size: int) -> None:
        self.plan = plan
        self._start, self._end = start, end
        self.chunk_size = chunk_size
        self.held = bytearray()  # bytes received and not yet handed on: the tail, or a few after a cut
        self.checked = False  # the proof came (or the producer's end): the rest goes as it comes
        self._size: int | None = None
        # Deflated (no length ahead, nor ranges): where its entries begin, found in the bytes as they come.
        assert plan.length is not None or start == 0
        self._headers = None if plan.length is not None else LocalHeaderFinder(plan)

    async def next(
        self,
        receive: Callable[[], Awaitable[bytes | None]],
        sent: int,
        recheck: Callable[[], Awaitable[None]] | None,
    ) -> bytes | None:
        """The next bytes to hand on, ``sent`` having gone so far; None at the end.

        ``receive`` gives the producer's next chunk (None at its end);
        ``recheck``, if any, runs once the proof has come and before the tail
        goes: it raises if a file changed lately is no longer as listed.
        """
        while not self.checked:
            chunk = await receive()
            if chunk is not None and self._headers is not None:
                self._headers.feed(chunk)
            if chunk is None or self._checked_with(len(chunk), sent):
                if recheck is not None:
                    await recheck()
                self.checked = True
                if chunk is not None:
                    self.held += chunk
                break
            waiting = len(self.held)
            sendable = self._sendable(waiting + len(chunk), sent)
            if not waiting and sendable == len(chunk):
                return chunk  # as it came
            if sendable >= waiting:
                # What was held and the chunk up to the cut, one copy: a chunk read as the producer
                # wrote an entry's last byte ends between two entries, and is cut just before
                # (most chunks of an album of small files).  The few bytes after the cut wait.
                ahead = b"".join((self.held, memoryview(chunk)[: sendable - waiting]))
                self.held = bytearray(memoryview(chunk)[sendable - waiting :])
                if ahead:
                    return ahead
                continue
            self.held += chunk
            if sendable:
                ahead = bytes(self.held[:sendable])
                del self.held[:sendable]
                return ahead
        if self.held:
            ahead = bytes(self.held[: self.chunk_size])
            del self.held[: len(ahead)]
            return ahead
        return await receive()

    def _checked_with(self, arriving: int, sent: int) -> bool:
        """Whether the ``arriving`` bytes prove that the producer checked every file it sent: the central directory."""
        if self._headers is not None:
            return self._headers.central_start is not None
        received = self._start + sent + len(self.held) + arriving
        return received > self.plan.central_offset

    def _sendable(self, pending: int, sent: int) -> int:
        """How many of the next ``pending`` bytes can go now: none of the tail, and ending inside an entry."""
        at = self._start + sent  # the next byte's offset in the archive
        if self._headers is not None:
            # Deflated (a whole archive: the finder was fed every byte sent and pending): inside an
            # entry found, whatever the bytes to come.
            return self._headers.cut_inside_an_entry(at) - at
        length = self._end - self._start + 1  # stored: its length is known
        limit = min(pending, length - self._tail_size() - sent)
        if limit <= 0:
            return 0
        return self.plan.cut_inside_an_entry(at + limit, at) - at

    def _tail_size(self) -> int:
        """How many bytes at a stored body's end are held back (computed once).

        This response's part of the archive's tail (``ArchivePlan.tail_size``), or its last byte.
        """
        if self._size is None:
            assert self.plan.length is not None
            tail_start = self.plan.length - self.plan.tail_size()
            self._size = max(1, self._end + 1 - max(tail_start, self._start))
        return self._size
