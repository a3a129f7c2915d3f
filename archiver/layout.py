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

The archive the client receives is zip's file output, without data
descriptors (``rewrite``): the same rules, applied to its own offsets.  An
entry's local header may lie past 4 GiB in zip's output and below it once
the descriptors before it are gone; its central entry then has no ZIP64
offset field (tests/test_rewrite.py checks such an archive byte for byte).

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

    ``name_lengths`` and ``sizes`` (compact: 6 bytes a file) are there when
    ``rewrite`` can take the data descriptors out, which is whenever the
    layout is known but for a corner (an offset of exactly 0xFFFFFFFF);
    ``sent_size`` is then the length of that descriptor-free archive, the
    one the client receives.  ``zip64_end``: zip's output ends with a ZIP64
    end record and locator.
    """

    size: int
    utf8_flag_positions: tuple[int, ...]
    name_lengths: array[int] | None = None
    sizes: array[int] | None = None
    zip64_end: bool = False
    sent_size: int = 0

    @property
    def descriptor_free(self) -> bool:
        return self.name_lengths is not None


def local_entry_size(name_length: int, size: int) -> int:
    """A local header, its name and ZIP64 field, and the data: the same with and without a descriptor after it."""
    return LOCAL_HEADER + name_length + (LOCAL_ZIP64_EXTRA if size > FIELD_LIMIT else 0) + size


def central_entry_size(name_length: int, size: int, offset: int) -> int:
    """A central entry: its ZIP64 field holds the sizes of a file over 4 GiB, and an offset past 4 GiB."""
    zip64 = (16 if size > FIELD_LIMIT else 0) + (8 if offset > FIELD_LIMIT else 0)
    return CENTRAL_HEADER + name_length + (EXTRA_FIELD_HEADER + zip64 if zip64 else 0)


def needs_zip64_end(count: int, central_offset: int) -> bool:
    return count > ENTRY_LIMIT or central_offset > FIELD_LIMIT


def end_records_size(count: int, central_offset: int) -> int:
    zip64 = needs_zip64_end(count, central_offset)
    return END_RECORD + (ZIP64_END_RECORD + ZIP64_END_LOCATOR if zip64 else 0)


def stored_archive_layout(listing: AlbumListing) -> ArchiveLayout | None:
    """The layout of zip's store-mode output for ``listing``, or None where it is not predictable."""
    if not listing.files:
        return ArchiveLayout(END_RECORD, (), array("H"), array("I"), sent_size=END_RECORD)  # producer.EMPTY_ZIP
    offset = sent_offset = 0  # of the next local header, in zip's output and in the descriptor-free archive
    central_size = sent_central_size = 0
    # Compact, for a download holds them to the end: names are under 64 KiB (a header's field),
    # and sizes take 8 bytes only where one needs them.
    name_lengths = array("H")
    sizes = array("Q" if any(file.size > FIELD_LIMIT for file in listing.files) else "I")
    local_flags: list[int] = []
    central_flags: list[int] = []
    corner = False  # a descriptor-free offset of exactly 0xFFFFFFFF: no one has seen what zip does there
    for file in listing.files:
        if file.size == FIELD_LIMIT or offset == FIELD_LIMIT:
            return None
        corner |= sent_offset == FIELD_LIMIT
        name = os.fsencode(file.path)
        name_lengths.append(len(name))
        sizes.append(file.size)
        if needs_utf8_flag(name):
            local_flags.append(offset + LOCAL_FLAGS_HIGH_BYTE)
            central_flags.append(central_size + CENTRAL_FLAGS_HIGH_BYTE)
        central_size += central_entry_size(len(name), file.size, offset)
        sent_central_size += central_entry_size(len(name), file.size, sent_offset)
        local = local_entry_size(len(name), file.size)
        offset += local + (DATA_DESCRIPTOR_ZIP64 if file.size > FIELD_LIMIT else DATA_DESCRIPTOR)
        sent_offset += local
    if offset == FIELD_LIMIT:
        return None
    corner |= sent_offset == FIELD_LIMIT
    count = len(listing.files)
    size = offset + central_size + end_records_size(count, offset)
    utf8_flag_positions = (*local_flags, *(offset + position for position in central_flags))
    if corner:
        return ArchiveLayout(size, utf8_flag_positions, sent_size=size)
    sent_size = sent_offset + sent_central_size + end_records_size(count, sent_offset)
    return ArchiveLayout(
        size, utf8_flag_positions, name_lengths, sizes, needs_zip64_end(count, offset), sent_size=sent_size
    )


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
