"""The central directory and end records of a descriptor-free stored archive, written by the service.

A range that lies in the archive's tail (a download manager asking for the
last bytes first, a resume near the end) should not have zip read every
file to reach it.  The tail holds nothing zip knows that the service does
not: for each file, the name, the CRC (``crc_index``), the size, the mtime
as zip's DOS date and time, the mode, and where its local header lies
(``layout``).  This module writes those records exactly as Info-ZIP zip 3.0
writes them to a regular file with ``-X`` (tests/test_partial.py
compares every byte with zip's own, for generated trees, mtimes and modes),
with the UTF-8 flag the service sets (see ``layout``).
"""

from __future__ import annotations

import stat
import struct
import time

from .layout import ENTRY_LIMIT, FIELD_LIMIT, needs_utf8_flag, needs_zip64_end

VERSION_MADE_BY = 0x031E  # Unix, zip 3.0
VERSION_NEEDED = 10  # stored, no ZIP64
VERSION_NEEDED_ZIP64 = 45
UTF8_FLAG = 0x0800
ZIP64_EXTRA_ID = 0x0001
# What zip writes for a time before 1980, which DOS dates cannot hold: 1980-01-01 00:00.
DOS_TIME_MINIMUM = (1 << 21) | (1 << 16)

_CENTRAL_ENTRY = struct.Struct("<4sHHHHIIIIHHHHHII")
_END_RECORD = struct.Struct("<4sHHHHIIH")
_ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_END_LOCATOR = struct.Struct("<4sIQI")


def dos_date_time(mtime_ns: int) -> int | None:
    """zip 3.0's DOS date and time (date in the high half) for an mtime, or None where zip's is not predictable.

    As zip's ``unix2dostime``: the seconds rounded up to even, in local
    time (the service and zip share TZ, see ``producer``), 1980 at the
    least, and the high bits of years past 2107 lost.  Where ``localtime``
    fails zip takes the current time, which no one can predict.
    """
    seconds = mtime_ns // 1_000_000_000
    try:
        local = time.localtime((seconds + 1) & ~1)
    except (OverflowError, OSError, ValueError):
        return None
    if local.tm_year < 1980:
        return DOS_TIME_MINIMUM
    value = (
        ((local.tm_year - 1980) << 25)
        | (local.tm_mon << 21)
        | (local.tm_mday << 16)
        | (local.tm_hour << 11)
        | (local.tm_min << 5)
        | (local.tm_sec >> 1)
    )
    return value & 0xFFFFFFFF


def external_attributes(mode: int) -> int:
    """The mode in the high half, and MS-DOS's read-only bit where the owner may not write (zip's ``filetime``)."""
    return (mode << 16) | (0 if mode & stat.S_IWUSR else 1)


def central_entry(name: bytes, crc: int, size: int, dos_time: int, attributes: int, offset: int) -> bytes:
    """A stored file's central directory entry as zip writes it to a file.

    No extra field but ZIP64's: the sizes of a file over 4 GiB (which then
    needs version 4.5), the offset of a local header past 4 GiB.  No comment.
    ``dos_time`` is the time in the low half, the date in the high half, as
    the fields lie; ``attributes`` the external ones (``external_attributes``).
    """
    large, far = size > FIELD_LIMIT, offset > FIELD_LIMIT
    extra = b""
    if large or far:
        fields = (struct.pack("<QQ", size, size) if large else b"") + (struct.pack("<Q", offset) if far else b"")
        extra = struct.pack("<HH", ZIP64_EXTRA_ID, len(fields)) + fields
    fixed = _CENTRAL_ENTRY.pack(
        b"PK\x01\x02",
        VERSION_MADE_BY,
        VERSION_NEEDED_ZIP64 if large else VERSION_NEEDED,
        UTF8_FLAG if needs_utf8_flag(name) else 0,
        0,  # stored
        dos_time,
        crc,
        FIELD_LIMIT if large else size,
        FIELD_LIMIT if large else size,
        len(name),
        len(extra),
        0,  # comment
        0,  # disk
        0,  # internal attributes: zip's text detection does not run when storing
        attributes,
        FIELD_LIMIT if far else offset,
    )
    return fixed + name + extra


def end_records(count: int, central_size: int, central_offset: int) -> bytes:
    """The end of central directory record, after a ZIP64 end record and locator where zip writes them.

    That is for more than 65,535 entries, or a central directory past 4 GiB;
    a field that cannot hold its value holds all ones instead.
    """
    end = _END_RECORD.pack(
        b"PK\x05\x06",
        0,
        0,
        min(count, ENTRY_LIMIT),
        min(count, ENTRY_LIMIT),
        min(central_size, FIELD_LIMIT),
        min(central_offset, FIELD_LIMIT),
        0,
    )
    if not needs_zip64_end(count, central_offset):
        return end
    zip64_end = _ZIP64_END_RECORD.pack(
        b"PK\x06\x06",
        _ZIP64_END_RECORD.size - 12,  # the record's size, less the signature and this field
        VERSION_MADE_BY,
        VERSION_NEEDED_ZIP64,
        0,
        0,
        count,
        count,
        central_size,
        central_offset,
    )
    locator = _ZIP64_END_LOCATOR.pack(b"PK\x06\x07", 0, central_offset + central_size, 1)
    return zip64_end + locator + end
