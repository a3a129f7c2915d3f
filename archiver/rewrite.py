"""zip's pipe output rewritten as it passes into the archive zip would write to a file: no data descriptors.

zip 3.0 writing to a pipe marks every stored entry with general-purpose bit
3: CRC 0 in the local header, the real CRC in a 16-byte data descriptor after
the data.  Readers that read front to back (Java's and Android's
``ZipInputStream``, Commons Compress streams, ``busybox unzip -``,
stream-unzip) refuse or misread that.  Written to a file, zip seeks back
instead: the CRC in the local header, bit 3 clear, no descriptor.  Knowing
every header's place (``layout``) and every CRC before its header goes out
(``crc_index``), the service turns the first form into the second, byte for
byte (tests/test_rewrite.py compares with zip's own file output):

- each local header: bit 3 cleared, the CRC filled in;
- each descriptor: checked against that CRC (a mismatch means the file
  changed while zipped: the transfer is aborted) and left out;
- each central entry: bit 3 cleared, its local header's offset moved back
  by 16 bytes per descriptor before it;
- the end record: the central directory's offset moved back likewise.

- with more than 65,535 entries, the ZIP64 end record's and its locator's
  offsets likewise.

Archives with ZIP64 sizes or offsets (a file, or the archive, over 4 GiB)
are not rewritten (``layout`` decides): there a descriptor is 24 bytes and
offsets live in extra fields.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Awaitable, Callable

DESCRIPTOR = 16
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_LOCAL_SIGNATURE = b"PK\x03\x04"
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_END_SIGNATURE = b"PK\x05\x06"
_ZIP64_END_SIGNATURE = b"PK\x06\x06"
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_LOCAL_HEADER = 30
_CENTRAL_HEADER = 46
_END_RECORD = 22
_ZIP64_END_RECORD = 56
_ZIP64_LOCATOR = 20
_UNKNOWN = 0xFFFFFFFF  # a 4-byte field that says "see the ZIP64 record"
_BIT3 = 0x08  # "sizes and CRC in a data descriptor", in the flags' low byte


class DescriptorMismatch(RuntimeError):
    """zip's output is not what the layout and the CRCs say: a file changed while it was zipped."""

    def __init__(self, message: str, entry: int | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class DescriptorRemover:
    """Feeds on zip's output in order; ``feed`` returns the rewritten bytes for what it has seen so far.

    Headers and descriptors are gathered whole (they are small) and may span
    chunks; file data passes through as slices of the chunks it came in.
    """

    def __init__(
        self,
        name_lengths: array[int],
        sizes: array[int],
        crc: Callable[[int], Awaitable[int]],
        zip64_end: bool = False,
    ) -> None:
        self._zip64_end = zip64_end
        self._name_lengths = name_lengths
        self._sizes = sizes
        self._count = count = len(sizes)
        self._crc = crc
        self._pending = bytearray()  # a header or descriptor being gathered
        self._passing = 0  # bytes to pass through unchanged before the next header
        # Where in the archive we are: the k-th local entry, then the k-th central one, then the end.
        self._part = "local" if count else "end"
        self._index = 0
        self._current_crc = 0
        self._name_left = 0  # a central entry's name, passed after its fixed part

    @property
    def done(self) -> bool:
        return self._part == "done"

    async def feed(self, chunk: bytes) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        view = memoryview(chunk)
        while view:
            if self._passing:
                taken = view[: self._passing]
                out.append(taken)
                self._passing -= len(taken)
                view = view[len(taken) :]
                continue
            if self._part == "done":
                raise DescriptorMismatch("zip wrote past its end record")
            need = self._need()
            if not self._pending and len(view) >= need:  # the usual case: the record is all in this chunk
                record = bytes(view[:need])
                view = view[need:]
            else:
                missing = need - len(self._pending)
                self._pending += view[:missing]
                view = view[missing:]
                if len(self._pending) < need:
                    break
                record, self._pending = bytes(self._pending), bytearray()
            piece = await self._rewrite(record)
            if piece:
                out.append(piece)
        return out

    def _need(self) -> int:
        if self._part == "local":
            return _LOCAL_HEADER
        if self._part == "descriptor":
            return DESCRIPTOR
        if self._part == "central":
            return _CENTRAL_HEADER
        if self._part == "zip64 end":
            return _ZIP64_END_RECORD
        if self._part == "zip64 locator":
            return _ZIP64_LOCATOR
        return _END_RECORD

    async def _rewrite(self, record: bytes) -> bytes:
        if self._part == "local":
            return await self._local(record)
        if self._part == "descriptor":
            self._descriptor(record)
            return b""
        if self._part == "central":
            return self._central(record)
        if self._part == "zip64 end":
            return self._move_offset(record, _ZIP64_END_SIGNATURE, "<Q", 48, "zip64 locator")
        if self._part == "zip64 locator":
            return self._move_offset(record, _ZIP64_LOCATOR_SIGNATURE, "<Q", 8, "end")
        return self._end(record)

    async def _local(self, header: bytes) -> bytes:
        self._expect(header, _LOCAL_SIGNATURE, "local header")
        if not header[6] & _BIT3:
            raise DescriptorMismatch(f"entry {self._index}: zip wrote no data descriptor")
        self._current_crc = await self._crc(self._index)
        patched = bytearray(header)
        patched[6] &= ~_BIT3
        struct.pack_into("<I", patched, 14, self._current_crc)
        self._passing = self._name_lengths[self._index] + self._sizes[self._index]
        self._part = "descriptor"
        return bytes(patched)

    def _descriptor(self, descriptor: bytes) -> None:
        self._expect(descriptor, _DESCRIPTOR_SIGNATURE, "data descriptor")
        (crc,) = struct.unpack_from("<I", descriptor, 4)
        if crc != self._current_crc:
            raise DescriptorMismatch(
                f"entry {self._index}: zip's CRC {crc:08x}, {self._current_crc:08x} computed", self._index
            )
        self._index += 1
        if self._index == self._count:
            self._part, self._index = "central", 0
        else:
            self._part = "local"

    def _central(self, header: bytes) -> bytes:
        self._expect(header, _CENTRAL_SIGNATURE, "central entry")
        patched = bytearray(header)
        patched[8] &= ~_BIT3
        (offset,) = struct.unpack_from("<I", patched, 42)
        struct.pack_into("<I", patched, 42, offset - DESCRIPTOR * self._index)
        self._passing = self._name_lengths[self._index]  # -X: no extra field, no comment
        self._index += 1
        if self._index == self._count:
            self._part = "zip64 end" if self._zip64_end else "end"
        return bytes(patched)

    def _end(self, record: bytes) -> bytes:
        self._expect(record, _END_SIGNATURE, "end record")
        patched = bytearray(record)
        (offset,) = struct.unpack_from("<I", patched, 16)
        if offset != _UNKNOWN:
            struct.pack_into("<I", patched, 16, offset - DESCRIPTOR * self._count)
        self._part = "done"
        return bytes(patched)

    def _move_offset(self, record: bytes, signature: bytes, field: str, at: int, then: str) -> bytes:
        """A ZIP64 end record or locator with the offset at ``at`` moved back past every descriptor."""
        self._expect(record, signature, self._part)
        patched = bytearray(record)
        (offset,) = struct.unpack_from(field, patched, at)
        struct.pack_into(field, patched, at, offset - DESCRIPTOR * self._count)
        self._part = then
        return bytes(patched)

    def _expect(self, record: bytes, signature: bytes, what: str) -> None:
        if record[:4] != signature:
            raise DescriptorMismatch(f"no {what} where the layout has entry {self._index}'s")
