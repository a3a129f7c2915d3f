"""The exact layout of the archive zip writes for a file list in store mode.

With ``-0 -X -D`` and its output a pipe, Info-ZIP zip 3.0 writes, for each
file in list order: a local header (30 bytes + name), the bytes, and a data
descriptor (16 bytes); then a central directory entry per file (46 bytes +
name); then the end record (22 bytes).  No extra fields, thanks to -X, except
ZIP64 ones, which appear by these rules (measured on zip 3.0-13, Debian 12):

- a file of 0xFFFFFFFF bytes or more: a 20-byte ZIP64 extra field in its local
  header, a 24-byte data descriptor, and 16 bytes of sizes (+4 header) in its
  central entry;
- a local header at offset 0xFFFFFFFF or more: 8 bytes of offset (+4 header,
  shared with the sizes) in its central entry;
- 65,536 entries or more, or the central directory starting at 0xFFFFFFFF or
  more: a ZIP64 end record (56 bytes) and locator (20) before the end record.

zip 3.0 (Debian's build included) writes UTF-8 names without the
language-encoding flag (bit 11), so Windows Explorer and 7-Zip would read
them as CP437.  Knowing where every header lies, we set that bit as the bytes
pass (``set_utf8_flags``); headers are outside every CRC.

Exactly 0xFFFFFFFF is a corner zip itself handles oddly (a file of that size
gets 0xFFFFFFFF in its header and no ZIP64 field); where a size or offset
lands on it, no prediction is made and the archive goes without a length.
"""

from __future__ import annotations

import bisect
import os
from array import array
from dataclasses import dataclass

from .storage import AlbumListing

LOCAL_HEADER = 30
DATA_DESCRIPTOR = 16
DATA_DESCRIPTOR_ZIP64 = 24
LOCAL_ZIP64_EXTRA = 20
CENTRAL_HEADER = 46
EXTRA_FIELD_HEADER = 4
END_RECORD = 22
ZIP64_END_RECORD = 56
ZIP64_END_LOCATOR = 20

FIELD_LIMIT = 0xFFFFFFFF  # a 4-byte field holding this means "see the ZIP64 field"
ENTRY_LIMIT = 0xFFFF


UTF8_FLAG_HIGH_BYTE = 0x08  # general purpose bit 11 ("names are UTF-8"), in the flags' high byte
LOCAL_FLAGS_HIGH_BYTE = 7  # offsets of that byte in a local header and a central entry
CENTRAL_FLAGS_HIGH_BYTE = 9


@dataclass(frozen=True, eq=False)
class ArchiveLayout:
    """zip's output length, where the UTF-8 flag must be set for zip, which never sets it, and each entry's shape.

    ``name_lengths`` and ``sizes`` (compact: 12 bytes a file) are there when
    every size and offset in the archive fits 32 bits, which is when
    ``rewrite`` can take its data descriptors out; ``sent_size`` is then what
    the client receives.
    """

    size: int
    utf8_flag_positions: tuple[int, ...]
    name_lengths: array[int] | None = None
    sizes: array[int] | None = None
    # More than 65,535 entries: a ZIP64 end record and locator precede the end record.
    zip64_end: bool = False

    @property
    def descriptor_free(self) -> bool:
        return self.name_lengths is not None

    @property
    def sent_size(self) -> int:
        return self.size - DATA_DESCRIPTOR * len(self.name_lengths) if self.name_lengths is not None else self.size


def stored_archive_layout(listing: AlbumListing) -> ArchiveLayout | None:
    """The layout of zip's store-mode output for ``listing``, or None where it is not predictable."""
    if not listing.files:
        return ArchiveLayout(END_RECORD, (), array("I"), array("Q"))  # producer.EMPTY_ZIP
    offset = 0
    name_lengths, sizes = array("I"), array("Q")
    central_size = 0
    local_flags: list[int] = []
    central_flags: list[int] = []
    for file in listing.files:
        if file.size == FIELD_LIMIT or offset == FIELD_LIMIT:
            return None
        name = os.fsencode(file.path)
        name_lengths.append(len(name))
        sizes.append(file.size)
        if needs_utf8_flag(name):
            local_flags.append(offset + LOCAL_FLAGS_HIGH_BYTE)
            central_flags.append(central_size + CENTRAL_FLAGS_HIGH_BYTE)
        large = file.size > FIELD_LIMIT
        central_zip64 = (16 if large else 0) + (8 if offset > FIELD_LIMIT else 0)
        central_size += CENTRAL_HEADER + len(name) + (EXTRA_FIELD_HEADER + central_zip64 if central_zip64 else 0)
        offset += LOCAL_HEADER + len(name) + file.size
        offset += LOCAL_ZIP64_EXTRA + DATA_DESCRIPTOR_ZIP64 if large else DATA_DESCRIPTOR
    if offset == FIELD_LIMIT:
        return None
    needs_zip64_end = len(listing.files) > ENTRY_LIMIT or offset > FIELD_LIMIT
    size = offset + central_size + END_RECORD + (ZIP64_END_RECORD + ZIP64_END_LOCATOR if needs_zip64_end else 0)
    utf8_flag_positions = (*local_flags, *(offset + position for position in central_flags))
    # Descriptors come out only where every size and offset fits 32 bits; a
    # ZIP64 end record for the entry count alone is fine (``rewrite``).
    if any(size >= FIELD_LIMIT for size in sizes) or offset + central_size >= FIELD_LIMIT:
        return ArchiveLayout(size, utf8_flag_positions)
    return ArchiveLayout(size, utf8_flag_positions, name_lengths, sizes, len(listing.files) > ENTRY_LIMIT)


def needs_utf8_flag(name: bytes) -> bool:
    """Non-ASCII names that are valid UTF-8 (a name in another encoding stays unflagged)."""
    if name.isascii():
        return False
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def set_utf8_flags(chunk: bytes, offset: int, positions: tuple[int, ...]) -> bytes:
    """``chunk`` (the archive's bytes from ``offset``) with the UTF-8 flag set at ``positions`` inside it.

    ``positions`` is sorted; a chunk that holds none of them is returned as it is, without a copy.
    """
    start = bisect.bisect_left(positions, offset)
    end = bisect.bisect_left(positions, offset + len(chunk))
    if start == end:
        return chunk
    patched = bytearray(chunk)
    for position in positions[start:end]:
        patched[position - offset] |= UTF8_FLAG_HIGH_BYTE
    return bytes(patched)
