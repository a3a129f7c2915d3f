"""Every record of an archive checked against APPNOTE 6.3.10, read with formats of this file's own.

The oracle the integrity tests compare with (``conftest.expected_archive``) is
the plan's own records, and zipfile forgives most of what a record may say
wrong: it reads sizes and CRCs from the central directory only, and nothing
of the local headers but their name and extra lengths.  Helper 185
mutation-tested the code that writes records: a local header's version
needed, a deflated entry's sizes in its local header (bit 3 says they are 0),
a data descriptor's sizes in the wrong order, a stored entry flagged with bit
3, the internal attributes, the ZIP64 end record's version needed each went
through every fast test.  So every archive a test reads (``conftest.read_archive``)
is walked here record by record, front to back as a streaming reader does and
through the central directory, and each field is checked against what it must
be, not against what the plan computed.
"""

from __future__ import annotations

import mmap
import stat
import struct
import zlib

# 4.3.7, 4.3.9, 4.3.12, 4.3.14-4.3.16.
LOCAL = struct.Struct("<4sHHHHHIIIHH")
DESCRIPTOR = struct.Struct("<4sIII")
DESCRIPTOR_ZIP64 = struct.Struct("<4sIQQ")
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
LOCATOR = struct.Struct("<4sIQI")
END = struct.Struct("<4sHHHHIIH")
LIMIT = 0xFFFFFFFF
COUNT_LIMIT = 0xFFFF
ZIP64_ID = 0x0001
UT_ID = 0x5455
BIT_3 = 0x0008
UTF8 = 0x0800
PIECE = 1 << 24  # bytes of data checked at a time


def _extra(data: bytes) -> list[tuple[int, bytes]]:
    """An extra field block (4.5.1) as (id, data) in order; each field whole."""
    fields, at = [], 0
    while at < len(data):
        header_id, size = struct.unpack_from("<HH", data, at)
        assert at + 4 + size <= len(data), "an extra field runs past its block"
        fields.append((header_id, data[at + 4 : at + 4 + size]))
        at += 4 + size
    return fields


def _dos_time_valid(time: int, date: int) -> bool:
    """4.4.6: a date of 1980-2107 with a month and a day, a time of day in two-second steps."""
    month, day = (date >> 5) & 0xF, date & 0x1F
    hours, minutes, halves = time >> 11, (time >> 5) & 0x3F, time & 0x1F
    return 1 <= month <= 12 and 1 <= day <= 31 and hours < 24 and minutes < 60 and halves < 30


def _utf8_flag(name: bytes) -> int:
    """Bit 11 as it must be: set for a name that is UTF-8 and not ASCII (appendix D), else not."""
    if name.isascii():
        return 0
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return 0
    return UTF8


def _crc_of(data: bytes | mmap.mmap, start: int, length: int, deflated: bool) -> int:
    """The CRC-32 of ``length`` bytes of ``data`` from ``start``, inflated first if ``deflated``, a piece at a time.

    Pieces of a view, never a copy of the whole: an archive over 4 GiB is checked as a mapped file.
    """
    view = memoryview(data)[start : start + length]
    inflater = zlib.decompressobj(-15)
    crc = 0
    for at in range(0, length, PIECE):
        piece: bytes | memoryview = view[at : at + PIECE]
        if not deflated:
            crc = zlib.crc32(piece, crc)
            continue
        while piece:  # at most a piece out at a time: 5 GiB of zeros deflate to 5 MB
            crc = zlib.crc32(inflater.decompress(piece, PIECE), crc)
            piece = inflater.unconsumed_tail
    if deflated:
        crc = zlib.crc32(inflater.flush(), crc)
        assert inflater.eof and not inflater.unused_data, "deflated data that does not end where its size says"
    return crc


def check_zip_records(data: bytes | mmap.mmap) -> None:
    """AssertionError unless every record of ``data`` (an archive the service wrote) is as APPNOTE has it.

    Counts, sizes and offsets in the end records; each central header's version
    needed, flags, ZIP64 fields (exactly the values that reach 0xFFFFFFFF, in
    order), attributes; each local header agreeing with its central header, and
    for bit 3 holding CRC and sizes 0 and followed by a data descriptor of the
    central header's CRC and sizes (8-byte sizes where the local header has
    ZIP64); the entries one after the other from offset 0 to the central
    directory; a stored entry's data of its CRC.
    """
    assert len(data) >= END.size
    end = END.unpack_from(data, len(data) - END.size)
    assert end[0] == b"PK\x05\x06" and end[1] == end[2] == 0 and end[7] == 0, end  # one disk, no comment
    assert end[3] == end[4], end
    count, central_size, central_offset = end[4], end[5], end[6]
    zip64_end_at = len(data) - END.size - LOCATOR.size - ZIP64_END.size
    if count == COUNT_LIMIT or central_size == LIMIT or central_offset == LIMIT:
        locator = LOCATOR.unpack_from(data, len(data) - END.size - LOCATOR.size)
        assert locator[0] == b"PK\x06\x07" and locator[1] == 0 and locator[3] == 1, locator
        assert locator[2] == zip64_end_at, locator
        zip64_end = ZIP64_END.unpack_from(data, zip64_end_at)
        # 4.3.14: its size less 12; made by Unix, 4.5; version needed 4.5; one disk.
        assert zip64_end[:6] == (b"PK\x06\x06", ZIP64_END.size - 12, (3 << 8) | 45, 45, 0, 0), zip64_end
        assert zip64_end[6] == zip64_end[7], zip64_end
        count, central_size, central_offset = zip64_end[7], zip64_end[8], zip64_end[9]
        assert zip64_end_at == central_offset + central_size
        assert end[4] == min(count, COUNT_LIMIT), "the end record's count is not the count, or all ones"
        assert (end[5], end[6]) == (min(central_size, LIMIT), min(central_offset, LIMIT))
        # 4.4.1.4: the ZIP64 records only where a field of the end record cannot hold its value.
        assert count >= COUNT_LIMIT or central_size >= LIMIT or central_offset >= LIMIT
    else:
        assert len(data) - END.size == central_offset + central_size, "bytes between the central directory and its end"

    at = central_offset
    entries = []
    for _ in range(count):
        fields = CENTRAL.unpack_from(data, at)
        (signature, made_by, version, flags, method, time, date, crc, compressed, size) = fields[:10]
        name_length, extra_length, comment_length, disk, internal, external, offset = fields[10:]
        assert signature == b"PK\x01\x02", at
        name = data[at + CENTRAL.size : at + CENTRAL.size + name_length]
        extra = _extra(data[at + CENTRAL.size + name_length : at + CENTRAL.size + name_length + extra_length])
        at += CENTRAL.size + name_length + extra_length + comment_length
        assert made_by == (3 << 8) | 45, (name, made_by)  # 4.4.2: Unix (the mode in the attributes), 4.5
        assert (comment_length, disk, internal) == (0, 0, 0), name  # internal: nothing said to be text
        assert method in (0, 8), name
        assert flags == _utf8_flag(name) | (BIT_3 if method == 8 else 0), (name, hex(flags))
        assert _dos_time_valid(time, date), (name, hex(date), hex(time))
        mode = external >> 16
        assert stat.S_ISREG(mode) and external & 0xFFFF == (0 if mode & stat.S_IWUSR else 1), (name, oct(external))
        # 4.5.3: exactly the values that reach 0xFFFFFFFF, in the order size, compressed size, offset.
        values = [value for header_id, value in extra if header_id == ZIP64_ID]
        others = [(header_id, value) for header_id, value in extra if header_id != ZIP64_ID]
        assert len(values) <= 1 and (not values or extra[0][0] == ZIP64_ID), name
        zip64 = list(struct.unpack(f"<{len(values[0]) // 8}Q", values[0])) if values else []
        assert len(values[0]) % 8 == 0 if values else True
        actual = []
        for field in (size, compressed, offset):
            if field == LIMIT:
                assert zip64, (name, "a field of all ones and no ZIP64 value")
                value = zip64.pop(0)
                assert value >= LIMIT, (name, value)
                actual.append(value)
            else:
                actual.append(field)
        assert not zip64, (name, "ZIP64 values no field is marked for")
        size, compressed, offset = actual
        assert version == (45 if values else 20 if method == 8 else 10), (name, version)  # 4.4.3.2
        assert method == 8 or compressed == size, name
        for header_id, value in others:
            if header_id == UT_ID:
                assert len(value) == 5 and value[0] == 1, (name, value)  # 4.6.1: the modification time only
        entries.append((name, version, flags, method, time, date, crc, compressed, size, offset, others))
    assert at == central_offset + central_size, "the central directory's size is not its records'"

    position = 0
    for name, _, flags, method, time, date, crc, compressed, size, offset, others in entries:
        assert offset == position, (name, offset, position)  # one after the other, from 0
        fields = LOCAL.unpack_from(data, offset)
        local_name = data[offset + LOCAL.size : offset + LOCAL.size + fields[9]]
        extra_at = offset + LOCAL.size + fields[9]
        local_extra = _extra(data[extra_at : extra_at + fields[10]])
        assert fields[0] == b"PK\x03\x04" and local_name == name, (name, fields)
        assert fields[2:6] == (flags, method, time, date), (name, fields, (flags, method, time, date))
        values = [value for header_id, value in local_extra if header_id == ZIP64_ID]
        assert [field for field in local_extra if field[0] != ZIP64_ID] == others, name
        assert len(values) <= 1 and (not values or local_extra[0][0] == ZIP64_ID), name
        assert fields[1] == (45 if values else 20 if method == 8 else 10), (name, fields[1])
        data_at = extra_at + fields[10]
        if flags & BIT_3:
            # 4.4.4: CRC and sizes 0 (0xFFFFFFFF and a ZIP64 field of both sizes, 0, where it has one).
            zeros = LIMIT if values else 0
            assert fields[6:9] == (0, zeros, zeros), (name, fields)
            assert not values or values[0] == bytes(16), name
            descriptor = DESCRIPTOR_ZIP64 if values else DESCRIPTOR
            found = descriptor.unpack_from(data, data_at + compressed)
            # 4.3.9: CRC, compressed size, size, as the central header has them.
            assert found == (b"PK\x07\x08", crc, compressed, size), (name, found, (crc, compressed, size))
            position = data_at + compressed + descriptor.size
            assert _crc_of(data, data_at, compressed, deflated=True) == crc, name
        else:
            # Stored: CRC and sizes in the header, ZIP64 (both sizes) exactly from 0xFFFFFFFF.
            assert fields[6] == crc, (name, fields[6], crc)
            if size >= LIMIT:
                assert fields[7:9] == (LIMIT, LIMIT) and values == [struct.pack("<QQ", size, size)], name
            else:
                assert fields[7:9] == (size, size) and not values, (name, fields)
            assert _crc_of(data, data_at, size, deflated=False) == crc, name
            position = data_at + size
    assert position == central_offset, (position, central_offset)
