"""ZIP records, byte for byte, from PKWARE's APPNOTE.TXT 6.3.10; nothing here does I/O.

Both the service (which plans an archive and so must know every record's
length before any is sent) and the producer subprocess (which writes the
records of deflated entries) build records with these functions only: a
length computed by one can never disagree with the bytes written by the
other.  Standard library only.

ZIP64 is decided per field, as APPNOTE 4.5.3 asks: a 4-byte size or offset
that cannot hold its value (0xFFFFFFFF included, which means "see the ZIP64
field") holds 0xFFFFFFFF, and the ZIP64 extended information extra field
carries that value, and only the values so marked, in the fixed order
original size, compressed size, local header offset.  A local header with
the ZIP64 field carries both sizes (4.5.3, "MUST include BOTH").
"""

from __future__ import annotations

import struct

FIELD_LIMIT = 0xFFFFFFFF  # a 4-byte field holding this means "see the ZIP64 field"
COUNT_LIMIT = 0xFFFF  # the same for the end record's 2-byte entry counts

STORED = 0  # compression methods, 4.4.5
DEFLATED = 8

VERSION_STORED = 10  # version needed to extract, 4.4.3.2: 1.0, 2.0 (deflate), 4.5 (ZIP64)
VERSION_DEFLATED = 20
VERSION_ZIP64 = 45
VERSION_MADE_BY = (3 << 8) | VERSION_ZIP64  # 4.4.2: Unix (external attributes hold the mode), spec 4.5

FLAG_DATA_DESCRIPTOR = 0x0008  # general purpose bit 3, 4.4.4: CRC and sizes follow the data
FLAG_UTF8 = 0x0800  # bit 11, 4.4.4 and appendix D: the name is UTF-8

ZIP64_EXTRA_ID = 0x0001  # 4.5.3
EXTENDED_TIMESTAMP_ID = 0x5455  # 4.6.1's third-party "UT" field (Info-ZIP's extended timestamp)

# 4.3.7 local file header: signature, version needed, flags, method, DOS time and date
# (one little-endian 32-bit value: time low, date high), CRC-32, compressed size,
# uncompressed size, name length, extra length.
_LOCAL_HEADER = struct.Struct("<4sHHHIIIIHH")
# 4.3.9 data descriptor, with the optional signature (4.3.9.3): CRC-32, sizes (4.3.9.2: 8 bytes with ZIP64).
_DATA_DESCRIPTOR = struct.Struct("<4sIII")
_DATA_DESCRIPTOR_ZIP64 = struct.Struct("<4sIQQ")
# 4.3.12 central directory header: signature, version made by, version needed, flags, method,
# DOS time and date, CRC-32, compressed size, uncompressed size, name, extra and comment
# lengths, disk number start, internal attributes, external attributes, local header offset.
_CENTRAL_HEADER = struct.Struct("<4sHHHHIIIIHHHHHII")
# 4.3.14 ZIP64 end of central directory record (version 1), 4.3.15 its locator, 4.3.16 the end record.
_ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_END_LOCATOR = struct.Struct("<4sIQI")
_END_RECORD = struct.Struct("<4sHHHHIIH")
# 4.5.1 an extra field's header: its id, the length of its data.
_EXTRA_FIELD_HEADER = struct.Struct("<HH")
# 4.5.3 the ZIP64 extended information extra field of a local header: both sizes, original first.
_ZIP64_LOCAL_EXTRA = struct.Struct("<HHQQ")
# 4.6.1 Info-ZIP's extended timestamp ("UT"), the modification time only: flags (bit 0), a 32-bit Unix time.
_EXTENDED_TIMESTAMP = struct.Struct("<HHBI")
# The local header's fixed part, before its name and extra field.
LOCAL_HEADER_FIXED = _LOCAL_HEADER.size
CENTRAL_HEADER_FIXED = _CENTRAL_HEADER.size
# Where the CRC-32 lies in a local header and in a central directory header (the fields before it).
LOCAL_CRC_AT = struct.calcsize("<4sHHHI")
CENTRAL_CRC_AT = struct.calcsize("<4sHHHHI")
# A CRC-32 field (4.4.7), which a stored plan's headers are made with 0 in and patched.
CRC_FIELD = struct.Struct("<I")
CRC_SIZE = CRC_FIELD.size

LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
DATA_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
CENTRAL_HEADER_SIGNATURE = b"PK\x01\x02"
END_RECORD_SIGNATURE = b"PK\x05\x06"


class EntryFields:
    """What an entry's records say of it, whichever record: its name (as stored), method, time, mode.

    ``dos_time``: the MS-DOS time in the low 16 bits, the date in the high
    16 (4.4.6).  ``attributes``: the external attributes (4.4.15), for a
    Unix "made by" the mode in the high 16 bits.  ``extra``: extra fields
    other than ZIP64's, the same in the local header and the central entry.
    (A plain class: ``typing`` would add ~7 ms to the producer's start.)
    """

    __slots__ = ("attributes", "dos_time", "extra", "method", "name")

    def __init__(self, name: bytes, method: int, dos_time: int, attributes: int, extra: bytes = b"") -> None:
        self.name = name
        self.method = method
        self.dos_time = dos_time
        self.attributes = attributes
        self.extra = extra

    @property
    def flags(self) -> int:
        """The general purpose bit flags (4.4.4): bit 11 for a UTF-8 name, bit 3 (a data descriptor) if deflated."""
        utf8 = FLAG_UTF8 if is_utf8(self.name) else 0
        return utf8 | (FLAG_DATA_DESCRIPTOR if self.method == DEFLATED else 0)


def is_utf8(name: bytes) -> bool:
    """Whether ``name`` needs the UTF-8 flag: not ASCII, and valid UTF-8 (a name in another encoding goes unflagged)."""
    if name.isascii():
        return False
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def deflate_bound(size: int) -> int:
    """The most ``size`` bytes can take deflated (zlib's compressBound): the ZIP64 decision for an unknown size."""
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 13


def stored_when_deflating(size: int) -> bool:
    """Whether a file of ``size`` bytes is stored, not deflated, in a deflated archive: from 0xFFFFFFFF less ~1.3 MB on.

    Deflated, such a file's data might pass 0xFFFFFFFF bytes though the file
    does not, so its local header would carry ZIP64 sizes (``uses_zip64``),
    and its data descriptor 8-byte sizes, as 4.3.9.2 allows.  Java's
    ``ZipInputStream`` before JDK 21 (JDK-8303866) and Android's read 8-byte
    sizes only after more than 0xFFFFFFFF bytes, and failed on it ("invalid
    entry size"; found by helper 35).  Stored, its sizes are known before its
    data: no data descriptor, and ZIP64 only at 0xFFFFFFFF itself, where every
    reader expects it.
    """
    return size <= FIELD_LIMIT and deflate_bound(size) >= FIELD_LIMIT


def uses_zip64(fields: EntryFields, size: int) -> bool:
    """Whether an entry's local header (and its data descriptor) carry 8-byte sizes.

    Stored: the size is known.  Deflated: the compressed size is known only
    after the data, so the bound decides (4.3.9.2 lets ZIP64 be used for
    any file).
    """
    return (deflate_bound(size) if fields.method == DEFLATED else size) >= FIELD_LIMIT


def local_header(fields: EntryFields, crc: int, size: int) -> bytes:
    """An entry's local file header (4.3.7), name and extra fields.

    Stored entries (the size and CRC known before the data): both in the
    header, no data descriptor.  Deflated ones: bit 3 set, CRC and sizes 0
    (4.4.4), a data descriptor after the data (``data_descriptor``).  Where
    ``uses_zip64``, both 4-byte size fields hold 0xFFFFFFFF and the ZIP64
    extra field (4.5.3) comes first, with both sizes (0 if deflated).
    """
    zip64 = uses_zip64(fields, size)
    known = fields.method == STORED
    crc_field = crc if known else 0
    size_field = size if known else 0
    extra = fields.extra
    if zip64:
        extra = _ZIP64_LOCAL_EXTRA.pack(ZIP64_EXTRA_ID, 16, size_field, size_field) + extra
        size_field = FIELD_LIMIT
    version = VERSION_ZIP64 if zip64 else VERSION_DEFLATED if fields.method == DEFLATED else VERSION_STORED
    header = _LOCAL_HEADER.pack(
        LOCAL_HEADER_SIGNATURE,
        version,
        fields.flags,
        fields.method,
        fields.dos_time,
        crc_field,
        size_field,
        size_field,
        len(fields.name),
        len(extra),
    )
    return header + fields.name + extra


def data_descriptor(crc: int, compressed_size: int, size: int, zip64: bool) -> bytes:
    """The data descriptor (4.3.9) after a deflated entry's data; 8-byte sizes where its local header has ZIP64.

    ValueError if a size does not fit 4 bytes without ZIP64 (the producer keeps the compressed
    size within them: ``producer_program.PENDING_BOUND``).
    """
    if not zip64 and max(compressed_size, size) >= FIELD_LIMIT:
        raise ValueError(f"deflated data of {compressed_size} bytes for {size} has no ZIP64 sizes to go in")
    if zip64:
        return _DATA_DESCRIPTOR_ZIP64.pack(DATA_DESCRIPTOR_SIGNATURE, crc, compressed_size, size)
    return _DATA_DESCRIPTOR.pack(DATA_DESCRIPTOR_SIGNATURE, crc, compressed_size, size)


def central_header(fields: EntryFields, crc: int, compressed_size: int, size: int, offset: int) -> bytes:
    """An entry's central directory header (4.3.12), name and extra fields; ``offset`` is its local header's.

    A size or offset of 0xFFFFFFFF or more holds 0xFFFFFFFF, and the ZIP64
    extra field (4.5.3), first, carries it, and only such values, in the order
    size, compressed size, offset; the version needed is then 4.5 (4.4.3.2).
    """
    zip64_values = [value for value in (size, compressed_size, offset) if value >= FIELD_LIMIT]
    extra = fields.extra
    if zip64_values:
        values = struct.pack(f"<{len(zip64_values)}Q", *zip64_values)
        extra = _EXTRA_FIELD_HEADER.pack(ZIP64_EXTRA_ID, len(values)) + values + extra
    # 4.4.3.2: 4.5 wherever a ZIP64 field is used, the offset's alone included.
    version = VERSION_ZIP64 if zip64_values else VERSION_DEFLATED if fields.method == DEFLATED else VERSION_STORED
    header = _CENTRAL_HEADER.pack(
        CENTRAL_HEADER_SIGNATURE,
        VERSION_MADE_BY,
        version,
        fields.flags,
        fields.method,
        fields.dos_time,
        crc,
        min(compressed_size, FIELD_LIMIT),
        min(size, FIELD_LIMIT),
        len(fields.name),
        len(extra),
        0,  # comment length
        0,  # disk number start
        0,  # internal attributes: nothing is said to be text
        fields.attributes,
        min(offset, FIELD_LIMIT),
    )
    return header + fields.name + extra


def extended_timestamp_field(seconds: int) -> bytes:
    """Info-ZIP's extended timestamp extra field (4.6.1, "UT"), 9 bytes: the modification time only.

    ``seconds``: the Unix time, 0 to 2**32 - 1 (struct.error outside it).
    """
    return _EXTENDED_TIMESTAMP.pack(EXTENDED_TIMESTAMP_ID, _EXTENDED_TIMESTAMP.size - 4, 1, seconds)


# The bytes of a data descriptor without ZIP64 fields, and at most (with them).
DATA_DESCRIPTOR_SIZE = _DATA_DESCRIPTOR.size
DATA_DESCRIPTOR_BOUND = _DATA_DESCRIPTOR_ZIP64.size


def needs_zip64_end(count: int, central_size: int, central_offset: int) -> bool:
    """Whether the end record cannot hold the count, size or offset of the central directory (4.4.1.4)."""
    return count >= COUNT_LIMIT or central_size >= FIELD_LIMIT or central_offset >= FIELD_LIMIT


def end_records(count: int, central_size: int, central_offset: int) -> bytes:
    """The end of central directory record (4.3.16), after the ZIP64 end record and locator where needed.

    A field of the end record that cannot hold its value holds all ones.
    """
    end = _END_RECORD.pack(
        END_RECORD_SIGNATURE,
        0,
        0,
        min(count, COUNT_LIMIT),
        min(count, COUNT_LIMIT),
        min(central_size, FIELD_LIMIT),
        min(central_offset, FIELD_LIMIT),
        0,
    )
    if not needs_zip64_end(count, central_size, central_offset):
        return end
    zip64_end = _ZIP64_END_RECORD.pack(
        b"PK\x06\x06",
        _ZIP64_END_RECORD.size - 12,  # 4.3.14.1: the record's size less the signature and this field
        VERSION_MADE_BY,
        VERSION_ZIP64,
        0,
        0,
        count,
        count,
        central_size,
        central_offset,
    )
    zip64_end_at = central_offset + central_size
    return zip64_end + _ZIP64_END_LOCATOR.pack(b"PK\x06\x07", 0, zip64_end_at, 1) + end
