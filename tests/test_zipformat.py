"""ZIP records at their limits, read back field by field as APPNOTE 6.3.10 lays them out.

The readers' tests (tests/test_readers.py, the slow run's 4 GiB albums) read
whole archives, and most readers forgive a record that says too much: these
pin each ZIP64 decision at the very value where APPNOTE 4.5.3 and 4.4.1.4 put
it, which no album of a test's size reaches (helper 118: each of these
boundaries moved by one passed the default run).
"""

from __future__ import annotations

import calendar
import struct
from datetime import UTC, datetime

import pytest

from archiver.archive.entries import DOS_TIME_MAXIMUM, DOS_TIME_MINIMUM, dos_date_time, extended_timestamp
from archiver.archive.zipformat import (
    FIELD_LIMIT,
    STORED,
    EntryFields,
    central_header,
    data_descriptor,
    deflate_bound,
    end_records,
    is_utf8,
    local_header,
    stored_when_deflating,
    uses_zip64,
)

# 4.3.12, 4.3.7, 4.3.14-16: read here with formats of our own, not zipformat's.
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
LOCAL = struct.Struct("<4sHHHHHIIIHH")
ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
LOCATOR = struct.Struct("<4sIQI")
END = struct.Struct("<4sHHHHIIH")

FIELDS = EntryFields(b"a.jpg", STORED, 0, 0)


def _extra_fields(extra: bytes) -> dict[int, bytes]:
    """An extra field block (4.5.1) as {header id: data}."""
    found = {}
    while extra:
        header_id, size = struct.unpack_from("<HH", extra)
        found[header_id] = extra[4 : 4 + size]
        extra = extra[4 + size :]
    return found


def _central(size: int, compressed: int, offset: int) -> tuple[tuple[int, ...], dict[int, bytes]]:
    record = central_header(FIELDS, 0x12345678, compressed, size, offset)
    fields = CENTRAL.unpack_from(record)
    name_length, extra_length = fields[10], fields[11]
    extra = record[CENTRAL.size + name_length : CENTRAL.size + name_length + extra_length]
    return fields, _extra_fields(extra)


def test_a_central_header_uses_zip64_exactly_for_the_values_that_reach_0xffffffff() -> None:
    # 4.5.3: a value of 0xFFFFFFFF itself does not fit (it means "see the ZIP64 field").
    fields, extra = _central(FIELD_LIMIT - 1, FIELD_LIMIT - 1, FIELD_LIMIT - 1)
    assert (fields[8], fields[9], fields[16]) == (FIELD_LIMIT - 1,) * 3 and 1 not in extra
    assert fields[2] == 10  # version needed: 1.0, stored, no ZIP64 (4.4.3.2)
    fields, extra = _central(FIELD_LIMIT, FIELD_LIMIT - 1, 7)
    assert (fields[8], fields[9], fields[16]) == (FIELD_LIMIT - 1, FIELD_LIMIT, 7)
    assert extra[1] == struct.pack("<Q", FIELD_LIMIT) and fields[2] == 45
    # Only the values marked, in the order original size, compressed size, local header offset.
    fields, extra = _central(5 << 32, 3 << 32, 9 << 32)
    assert (fields[8], fields[9], fields[16]) == (FIELD_LIMIT,) * 3
    assert extra[1] == struct.pack("<QQQ", 5 << 32, 3 << 32, 9 << 32)
    fields, extra = _central(5, 5, FIELD_LIMIT)  # the offset alone: still version 4.5
    assert fields[16] == FIELD_LIMIT and extra[1] == struct.pack("<Q", FIELD_LIMIT) and fields[2] == 45


def test_a_stored_local_header_uses_zip64_from_0xffffffff_with_both_sizes() -> None:
    assert not uses_zip64(FIELDS, FIELD_LIMIT - 1) and uses_zip64(FIELDS, FIELD_LIMIT)
    record = local_header(FIELDS, 0x12345678, FIELD_LIMIT - 1)
    fields = LOCAL.unpack_from(record)
    assert (fields[7], fields[8], fields[10]) == (FIELD_LIMIT - 1, FIELD_LIMIT - 1, 0)
    record = local_header(FIELDS, 0x12345678, FIELD_LIMIT)
    fields = LOCAL.unpack_from(record)
    assert (fields[7], fields[8]) == (FIELD_LIMIT, FIELD_LIMIT) and fields[1] == 45
    extra = _extra_fields(record[LOCAL.size + fields[9] :])
    assert extra[1] == struct.pack("<QQ", FIELD_LIMIT, FIELD_LIMIT)  # 4.5.3: BOTH sizes


def _ends(count: int, central_size: int, central_offset: int) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """The ZIP64 end record (None if absent, its locator checked) and the end record of ``end_records``."""
    records = end_records(count, central_size, central_offset)
    end = END.unpack(records[-END.size :])
    if len(records) == END.size:
        return None, end
    assert len(records) == ZIP64_END.size + LOCATOR.size + END.size
    zip64_end = ZIP64_END.unpack_from(records)
    locator = LOCATOR.unpack_from(records, ZIP64_END.size)
    # 4.3.15: the locator gives the ZIP64 end record's offset, which lies right after the central directory.
    assert locator == (b"PK\x06\x07", 0, central_offset + central_size, 1)
    # 4.3.14.1: its size less 12; made by Unix, spec 4.5 (as every central header); version needed 4.5; one disk.
    assert zip64_end[1:6] == (ZIP64_END.size - 12, (3 << 8) | 45, 45, 0, 0)
    return zip64_end, end


def test_the_end_records_need_zip64_exactly_where_a_field_cannot_hold_its_value() -> None:
    zip64_end, end = _ends(0xFFFE, FIELD_LIMIT - 1, FIELD_LIMIT - 1)
    assert zip64_end is None and end == (b"PK\x05\x06", 0, 0, 0xFFFE, 0xFFFE, FIELD_LIMIT - 1, FIELD_LIMIT - 1, 0)
    # 4.4.1.4: 0xFFFF entries do not fit a 2-byte count (all ones means "see the ZIP64 record").
    zip64_end, end = _ends(0xFFFF, 100, 200)
    assert zip64_end is not None and zip64_end[6:] == (0xFFFF, 0xFFFF, 100, 200)
    assert end[3:7] == (0xFFFF, 0xFFFF, 100, 200)
    for central_size, central_offset in ((FIELD_LIMIT, 200), (100, FIELD_LIMIT), (3 << 32, 5 << 32)):
        zip64_end, end = _ends(70_000, central_size, central_offset)
        assert zip64_end is not None and zip64_end[6:] == (70_000, 70_000, central_size, central_offset)
        # Both counts all ones, never the count's low 16 bits (70,000 is 4,464 there).
        assert end[3:7] == (0xFFFF, 0xFFFF, min(central_size, FIELD_LIMIT), min(central_offset, FIELD_LIMIT))


def test_only_a_valid_utf8_name_that_is_not_ascii_is_flagged() -> None:
    assert is_utf8("Пляж.jpg".encode()) and not is_utf8(b"beach.jpg")
    assert not is_utf8("Пляж.jpg".encode("cp1251"))  # another encoding goes unflagged (4.4.4 bit 11)


def test_the_extended_timestamp_covers_exactly_the_seconds_every_reader_takes_alike() -> None:
    last = 2**31 - 1  # 2038-01-19 03:14:07 UTC: Java reads the field signed
    assert extended_timestamp(last * 10**9) == struct.pack("<HHBI", 0x5455, 5, 1, last)
    assert extended_timestamp((last + 1) * 10**9) == b""
    assert extended_timestamp(0) == struct.pack("<HHBI", 0x5455, 5, 1, 0)
    assert extended_timestamp(-1) == b""


def test_dos_times_run_to_the_end_of_2107_and_stop_there() -> None:
    # 4.4.6: seven bits of years from 1980; 2107 is the last, its times kept, later ones clamped.
    late = datetime(2107, 6, 1, 12, 0, 2, tzinfo=UTC)
    dos = dos_date_time(int(late.timestamp()) * 10**9, UTC)
    assert dos >> 25 == 127 and (dos >> 21) & 0xF == 6 and dos != DOS_TIME_MAXIMUM
    after = datetime(2108, 1, 1, tzinfo=UTC)
    assert dos_date_time(int(after.timestamp()) * 10**9, UTC) == DOS_TIME_MAXIMUM


def test_dos_times_are_rounded_up_to_an_even_second_and_1980_is_kept_whole() -> None:
    # 4.4.6: seconds in two-second steps, rounded up (Info-ZIP: an extracted file is never older than
    # its original's whole second), the fraction dropped first; 1980 is the first year, not clamped.
    def dos(year: int, month: int, day: int, hour: int, minute: int, second: int, fraction_ns: int = 0) -> int:
        seconds = calendar.timegm((year, month, day, hour, minute, second))
        return dos_date_time(seconds * 10**9 + fraction_ns, UTC)

    def fields(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int:
        return (year - 1980) << 25 | month << 21 | day << 16 | hour << 11 | minute << 5 | second // 2

    assert dos(2024, 7, 1, 12, 34, 56) == fields(2024, 7, 1, 12, 34, 56)
    assert dos(2024, 7, 1, 12, 34, 57, 999_999_999) == fields(2024, 7, 1, 12, 34, 58)
    assert dos(2024, 7, 1, 12, 34, 56, 999_999_999) == fields(2024, 7, 1, 12, 34, 56)
    assert dos(2024, 12, 31, 23, 59, 59) == fields(2025, 1, 1, 0, 0, 0)  # rounded up into the next year
    assert dos(1980, 1, 1, 0, 0, 0) == DOS_TIME_MINIMUM == fields(1980, 1, 1, 0, 0, 0)
    assert dos(1980, 6, 15, 12, 34, 57) == fields(1980, 6, 15, 12, 34, 58)
    assert dos(1979, 12, 31, 23, 59, 59) == DOS_TIME_MINIMUM  # rounded up to 1980-01-01 00:00:00 itself
    assert dos(1979, 12, 31, 23, 59, 57) == DOS_TIME_MINIMUM  # clamped
    # Before any year datetime holds (a clock far off): the first moment too, never the last.
    assert dos_date_time(-(10**12) * 10**9, UTC) == DOS_TIME_MINIMUM
    assert dos_date_time(10**12 * 10**9, UTC) == DOS_TIME_MAXIMUM


def test_a_deflated_archive_stores_a_file_exactly_when_its_deflated_bound_reaches_0xffffffff() -> None:
    # A file whose data, deflated, might reach 0xFFFFFFFF bytes (zlib's compressBound) would need a
    # ZIP64 local header though the file does not (4.5.3): it is stored instead, up to 0xFFFFFFFF
    # itself.  4,293,656,835 bytes is the first size whose bound is 0xFFFFFFFF exactly.
    first = 4_293_656_835
    assert deflate_bound(first) == FIELD_LIMIT and deflate_bound(first - 1) == FIELD_LIMIT - 1
    assert not stored_when_deflating(first - 1) and stored_when_deflating(first)
    assert stored_when_deflating(FIELD_LIMIT) and not stored_when_deflating(FIELD_LIMIT + 1)
    assert not stored_when_deflating(0)


def test_a_data_descriptor_without_zip64_refuses_sizes_that_4_bytes_cannot_hold() -> None:
    # A named failure (the producer's exit names it), not struct.error's traceback (helper 142).
    assert len(data_descriptor(1, FIELD_LIMIT - 1, FIELD_LIMIT - 1, False)) == 16
    for compressed, size in [(FIELD_LIMIT, 5), (5, FIELD_LIMIT)]:
        with pytest.raises(ValueError, match="no ZIP64 sizes"):
            data_descriptor(1, compressed, size, False)
    assert len(data_descriptor(1, FIELD_LIMIT, FIELD_LIMIT, True)) == 24
    # 4.3.9: CRC, compressed size, then size, whichever width (a deflated file past 4 GiB: ZIP64's 8 bytes).
    assert data_descriptor(7, 5, 6, False) == struct.pack("<4sIII", b"PK\x07\x08", 7, 5, 6)
    assert data_descriptor(7, 5 << 32, 6 << 32, True) == struct.pack("<4sIQQ", b"PK\x07\x08", 7, 5 << 32, 6 << 32)
