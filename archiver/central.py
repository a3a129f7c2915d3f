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

from .layout import ENTRY_LIMIT, needs_utf8_flag

VERSION_MADE_BY = 0x031E  # Unix, zip 3.0
VERSION_NEEDED = 10  # stored, no ZIP64
VERSION_NEEDED_ZIP64 = 45
UTF8_FLAG = 0x0800
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


def central_entry(name: bytes, crc: int, size: int, dos_time: int, mode: int, offset: int) -> bytes:
    """A stored file's central directory entry as zip writes it to a file: no extra field, no comment."""
    flags = UTF8_FLAG if needs_utf8_flag(name) else 0
    fixed = _CENTRAL_ENTRY.pack(
        b"PK\x01\x02",
        VERSION_MADE_BY,
        VERSION_NEEDED,
        flags,
        0,  # stored
        dos_time,
        crc,
        size,
        size,
        len(name),
        0,  # extra field
        0,  # comment
        0,  # disk
        0,  # internal attributes: zip's text detection does not run when storing
        external_attributes(mode),
        offset,
    )
    # "<...HHHHII" packs the time as one 32-bit field: zip's time then date, little-endian, is the same bytes.
    return fixed + name


def end_records(count: int, central_size: int, central_offset: int) -> bytes:
    """The end of central directory record, after a ZIP64 end record and locator for more than 65,535 entries.

    Only what descriptor-free archives need: every size and offset fits 32
    bits (``layout``), so only the entry count can overflow.
    """
    end = _END_RECORD.pack(
        b"PK\x05\x06", 0, 0, min(count, ENTRY_LIMIT), min(count, ENTRY_LIMIT), central_size, central_offset, 0
    )
    if count <= ENTRY_LIMIT:
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


def end_records_size(count: int) -> int:
    return _END_RECORD.size + (_ZIP64_END_RECORD.size + _ZIP64_END_LOCATOR.size if count > ENTRY_LIMIT else 0)
