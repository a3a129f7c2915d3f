"""zip's pipe output rewritten as it passes into the archive zip would write to a file: no data descriptors.

zip 3.0 writing to a pipe marks every stored entry with general-purpose bit
3: CRC 0 in the local header, the real CRC in a data descriptor after the
data.  Readers that read front to back (Java's and Android's
``ZipInputStream``, Commons Compress streams, ``busybox unzip -``,
stream-unzip) refuse or misread that.  Written to a file, zip seeks back
instead: the CRC in the local header, bit 3 clear, no descriptor.  Knowing
every entry's shape (``layout``) and every CRC before its header goes out
(``crc_index``), the service turns the first form into the second, byte for
byte (tests/test_rewrite.py compares with zip's own file output):

- each local header: bit 3 cleared, the CRC filled in; its name, ZIP64 field
  (a file over 4 GiB) and data pass unchanged;
- each descriptor (16 bytes, 24 for a file over 4 GiB): checked against that
  CRC and size (a mismatch means the file changed while zipped: the transfer
  is aborted) and left out;
- each central entry: checked against the same, and written anew
  (``central``) with zip's time and attributes and the offset its local
  header has without the descriptors before it.  Where that offset falls
  below 4 GiB the entry loses its ZIP64 offset field, as in zip's file
  output, which is why it is written, not patched;
- the end records: written anew for the new offsets.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Awaitable, Callable

from .central import central_entry, end_records
from .layout import (
    CENTRAL_HEADER,
    DATA_DESCRIPTOR,
    DATA_DESCRIPTOR_ZIP64,
    END_RECORD,
    FIELD_LIMIT,
    LOCAL_HEADER,
    LOCAL_ZIP64_EXTRA,
    ZIP64_END_LOCATOR,
    ZIP64_END_RECORD,
    local_entry_size,
)

_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_LOCAL_SIGNATURE = b"PK\x03\x04"
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_END_SIGNATURE = b"PK\x05\x06"
_ZIP64_END_SIGNATURE = b"PK\x06\x06"
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_BIT3 = 0x08  # "sizes and CRC in a data descriptor", in the flags' low byte
_DESCRIPTOR_FIELDS = struct.Struct("<4sIII")
_LOCAL_LENGTHS = struct.Struct("<HH")  # name, extra field
_CENTRAL_LENGTHS = struct.Struct("<HHH")  # name, extra field, comment


class DescriptorMismatch(RuntimeError):
    """zip's output is not what the layout and the CRCs say: a file changed while it was zipped."""

    def __init__(self, message: str, entry: int | None = None, name: bytes = b"") -> None:
        super().__init__(message)
        self.entry = entry
        self.name = name  # the entry's, where zip's CRC for it was not the one computed


class DescriptorRemover:
    """Feeds on zip's output in order; ``feed`` returns the rewritten bytes for what it has seen so far.

    An entry all in one chunk (the usual case for small files) is rewritten
    in one step; otherwise headers, descriptors and central entries are
    gathered whole (they are small) across chunks.  File data passes through
    as slices of the chunks it came in.
    """

    def __init__(
        self,
        name_lengths: array[int],
        sizes: array[int],
        crc: Callable[[int], Awaitable[int]],
        ready_crc: Callable[[int], int | None],
        zip64_end: bool = False,
    ) -> None:
        self._name_lengths = name_lengths
        self._sizes = sizes
        self._count = count = len(sizes)
        self._crc = crc  # waits for the k-th CRC
        self._ready_crc = ready_crc  # the k-th CRC if it is there already
        self._end_size = END_RECORD + (ZIP64_END_RECORD + ZIP64_END_LOCATOR if zip64_end else 0)
        self._pending = bytearray()  # a record being gathered
        self._passing = 0  # bytes to pass through unchanged before the next record
        # Where in the archive we are: the k-th local entry, then the k-th central one, then
        # the end; with the length of the record expected there and what rewrites it (a
        # local header has ``_local``, which may wait for its CRC).
        self._part = ""
        self._need = 0
        self._handler: Callable[[bytes], bytes] = self._end
        self._index = 0
        self._expect_next("local" if count else "end")
        self._current_crc = 0
        # The current entry's name, gathered as it passes (entries that span chunks only; one
        # in a chunk is done again this way if it does not check out): a mismatch names the file.
        self._name_wanted = 0
        self._current_name = bytearray()
        self._central_fixed = b""  # a central entry's first 46 bytes, while its name and extra are gathered
        # The descriptor-free archive: its length so far, the central directory's size, and
        # (while its central entries go out, in the same order) where the next local header lies.
        self._sent = 0
        self._sent_central_size = 0
        self._local_offset = 0

    @property
    def done(self) -> bool:
        return self._part == "done"

    async def feed(self, chunk: bytes) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        view = memoryview(chunk)
        while view:
            if self._passing:
                taken = view[: self._passing]
                if self._name_wanted:
                    name_part = taken[: self._name_wanted]
                    self._current_name += name_part
                    self._name_wanted -= len(name_part)
                out.append(taken)
                self._passing -= len(taken)
                view = view[len(taken) :]
                continue
            if self._part == "done":
                raise DescriptorMismatch("zip wrote past its end record")
            if not self._pending and (whole := self._whole_entry(view, out)):
                view = view[whole:]
                continue
            need = self._need
            if not self._pending and len(view) >= need:  # the record is all in this chunk
                record = bytes(view[:need])
                view = view[need:]
            else:
                missing = need - len(self._pending)
                self._pending += view[:missing]
                view = view[missing:]
                if len(self._pending) < need:
                    break
                record, self._pending = bytes(self._pending), bytearray()
            piece = await self._local(record) if self._part == "local" else self._handler(record)
            if piece:
                out.append(piece)
        return out

    def _whole_entry(self, view: memoryview, out: list[bytes | memoryview]) -> int:
        """Rewrite the entries all in ``view`` (the usual case for small files) in one go; the bytes taken.

        Local entries (with their descriptors) whose CRC is ready, and central
        entries without ZIP64 fields, in a tight loop: for 20,000 small files
        the per-record steps below cost twice as much.  Anything else is left
        to them.
        """
        if self._part == "local":
            return self._whole_local_entries(view, out)
        if self._part == "central":
            return self._whole_central_entries(view, out)
        return 0

    def _whole_local_entries(self, view: memoryview, out: list[bytes | memoryview]) -> int:
        sizes, name_lengths, ready_crc = self._sizes, self._name_lengths, self._ready_crc
        index, sent, position, available = self._index, self._sent, 0, len(view)
        try:
            while index < self._count:
                size, name_length = sizes[index], name_lengths[index]
                end = position + LOCAL_HEADER + name_length + size + DATA_DESCRIPTOR
                crc = ready_crc(index)
                if size > FIELD_LIMIT or end > available or crc is None:
                    break
                header = bytearray(view[position : position + LOCAL_HEADER])
                lengths = _LOCAL_LENGTHS.unpack_from(header, 26)
                if header[:4] != _LOCAL_SIGNATURE or not header[6] & _BIT3 or lengths != (name_length, 0):
                    break  # the step-by-step path says what is wrong
                header[6] &= ~_BIT3
                struct.pack_into("<I", header, 14, crc)
                signature, zip_crc, compressed, original = _DESCRIPTOR_FIELDS.unpack_from(view, end - DATA_DESCRIPTOR)
                if signature != _DESCRIPTOR_SIGNATURE or (zip_crc, compressed, original) != (crc, size, size):
                    break
                out.append(bytes(header))
                out.append(view[position + LOCAL_HEADER : end - DATA_DESCRIPTOR])
                sent += LOCAL_HEADER + name_length + size
                index += 1
                position = end
        finally:
            self._index, self._sent = index, sent
        if index == self._count:
            self._index = 0
            self._expect_next("central")
        return position

    def _whole_central_entries(self, view: memoryview, out: list[bytes | memoryview]) -> int:
        name_lengths, sizes, ready_crc = self._name_lengths, self._sizes, self._ready_crc
        index, position, available, offset = self._index, 0, len(view), self._local_offset
        try:
            while index < self._count:
                name_length = name_lengths[index]
                end = position + CENTRAL_HEADER + name_length
                if end > available or offset >= FIELD_LIMIT or sizes[index] > FIELD_LIMIT:
                    break
                entry = bytearray(view[position:end])
                (crc,) = struct.unpack_from("<I", entry, 16)
                # No ZIP64 field (and no comment), or the step-by-step path writes it anew.
                lengths = _CENTRAL_LENGTHS.unpack_from(entry, 28)
                if entry[:4] != _CENTRAL_SIGNATURE or lengths != (name_length, 0, 0) or crc != ready_crc(index):
                    break
                # As ``central.central_entry`` would write it (tests/test_rewrite.py): bit 3 clear, the new offset.
                entry[8] &= ~_BIT3
                struct.pack_into("<I", entry, 42, offset)
                out.append(bytes(entry))
                self._sent_central_size += end - position
                offset += LOCAL_HEADER + name_length + sizes[index]
                index += 1
                position = end
        finally:
            self._index, self._local_offset = index, offset
        if index == self._count:
            self._expect_next("end")
        return position

    def _expect_next(self, part: str) -> None:
        """Move on to ``part``: the record length it starts with, and its handler."""
        self._part = part
        if part == "local":
            self._need = LOCAL_HEADER
        elif part == "descriptor":
            large = self._sizes[self._index] > FIELD_LIMIT
            self._need, self._handler = (DATA_DESCRIPTOR_ZIP64 if large else DATA_DESCRIPTOR), self._descriptor
        elif part == "central":
            self._need, self._handler = CENTRAL_HEADER, self._central
        elif part == "central rest":
            self._handler = self._central_entry  # its length is set by ``_central``
        elif part == "end":
            self._need, self._handler = self._end_size, self._end

    async def _local(self, header: bytes) -> bytes:
        rewritten = self._local_header(header, await self._crc(self._index))
        self._name_wanted, self._current_name = self._name_lengths[self._index], bytearray()
        return rewritten

    def _local_header(self, header: bytes, crc: int) -> bytes:
        self._expect(header, _LOCAL_SIGNATURE, "local header")
        size = self._sizes[self._index]
        name_length, extra_length = struct.unpack_from("<HH", header, 26)
        if not header[6] & _BIT3:
            raise DescriptorMismatch(f"entry {self._index}: zip wrote no data descriptor")
        zip64_extra = LOCAL_ZIP64_EXTRA if size > FIELD_LIMIT else 0
        if (name_length, extra_length) != (self._name_lengths[self._index], zip64_extra):
            raise DescriptorMismatch(f"entry {self._index}: not the local header the layout has")
        self._current_crc = crc
        patched = bytearray(header)
        patched[6] &= ~_BIT3
        struct.pack_into("<I", patched, 14, crc)
        self._passing = name_length + extra_length + size
        self._sent += LOCAL_HEADER + self._passing
        self._expect_next("descriptor")
        return bytes(patched)

    def _descriptor(self, descriptor: bytes) -> bytes:
        self._expect(descriptor, _DESCRIPTOR_SIGNATURE, "data descriptor")
        size_format = "<QQ" if len(descriptor) == DATA_DESCRIPTOR_ZIP64 else "<II"
        (crc,) = struct.unpack_from("<I", descriptor, 4)
        sizes = struct.unpack_from(size_format, descriptor, 8)
        if crc != self._current_crc or sizes != (self._sizes[self._index],) * 2:
            raise DescriptorMismatch(
                f"entry {self._index}: zip's CRC {crc:08x} and sizes {sizes}, {self._current_crc:08x} computed",
                self._index,
                bytes(self._current_name),
            )
        self._index += 1
        if self._index == self._count:
            self._index = 0
            self._expect_next("central")
        else:
            self._expect_next("local")
        return b""

    def _central(self, fixed: bytes) -> bytes:
        self._expect(fixed, _CENTRAL_SIGNATURE, "central entry")
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", fixed, 28)
        if name_length != self._name_lengths[self._index]:
            raise DescriptorMismatch(f"entry {self._index}: not the central entry the layout has")
        self._central_fixed = fixed
        self._expect_next("central rest")
        self._need = name_length + extra_length + comment_length
        return b""

    def _central_entry(self, rest: bytes) -> bytes:
        """zip's central entry for the current file, as zip would write it to a file."""
        entry = self._central_fixed + rest
        (crc,) = struct.unpack_from("<I", entry, 16)
        if crc != self._ready_crc(self._index):
            raise DescriptorMismatch(f"entry {self._index}: zip's central CRC {crc:08x} is not its descriptor's")
        (dos_time,) = struct.unpack_from("<I", entry, 12)
        (attributes,) = struct.unpack_from("<I", entry, 38)
        name_length, size = self._name_lengths[self._index], self._sizes[self._index]
        name = entry[CENTRAL_HEADER : CENTRAL_HEADER + name_length]
        rewritten = central_entry(name, crc, size, dos_time, attributes, self._local_offset)
        self._local_offset += local_entry_size(name_length, size)
        self._sent_central_size += len(rewritten)
        self._index += 1
        self._expect_next("end" if self._index == self._count else "central")
        return rewritten

    def _end(self, records: bytes) -> bytes:
        if self._end_size > END_RECORD:
            self._expect(records, _ZIP64_END_SIGNATURE, "ZIP64 end record")
            self._expect(records[ZIP64_END_RECORD:], _ZIP64_LOCATOR_SIGNATURE, "ZIP64 end locator")
        self._expect(records[-END_RECORD:], _END_SIGNATURE, "end record")
        self._expect_next("done")
        return end_records(self._count, self._sent_central_size, self._sent)

    def _expect(self, record: bytes, signature: bytes, what: str) -> None:
        if record[:4] != signature:
            raise DescriptorMismatch(f"no {what} where the layout has entry {self._index}'s")
