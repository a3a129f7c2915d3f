"""Ranges from the right file: zip over the files a range touches, the tail generated (archiver/partial.py).

The oracle is zip's own output to a regular file (see test_rewrite): every
range the service sends is a slice of it, so the central directory and end
records the service writes (``central``) are zip's byte for byte, for
generated trees, mtimes (DST changes, odd seconds, before 1980, after 2107)
and modes.  The service and zip run in a zone with daylight saving time.
What a range costs is read from the metrics: the files it gave zip.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from archiver.config import Settings
from archiver.crc_index import RACY_NS, CrcIndex
from archiver.layout import stored_archive_layout
from archiver.partial import plan_range
from archiver.ranges import ByteRange
from archiver.storage import AlbumFile, AlbumListing

from .conftest import http11_request, read_archive, server_in_thread, write_tree
from .test_observability import samples
from .test_rewrite import NAMES, new_album, zip_to_file

# Berlin: clocks go forward at 2024-03-31 01:00 UTC and back at 2024-10-27 01:00 UTC.
ZONE = "Europe/Berlin"
SPRING_FORWARD = 1_711_846_800
FALL_BACK = 1_729_990_800
END_OF_2107 = 4_354_819_199  # UTC; already 2108 in Berlin, past what a DOS date holds


@pytest.fixture(scope="module")
def local_zone() -> Iterator[None]:
    previous = os.environ.get("TZ")
    os.environ["TZ"] = ZONE
    time.tzset()
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = previous
        time.tzset()


@pytest.fixture(scope="module")
def partial_server(
    local_zone: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[tuple[str, int], Path]]:
    storage = tmp_path_factory.mktemp("partial")
    with server_in_thread(Settings(storage_dir=storage)) as address:
        yield address, storage


def get(address: tuple[str, int], name: str, range_header: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = [] if range_header is None else [("Range", range_header)]
    return http11_request(address, "GET", f"/archive/{name}/".encode(), headers)


def zip_counters(address: tuple[str, int]) -> tuple[float, float]:
    """Files given to zip so far, and their bytes."""
    figures = samples(http11_request(address, "GET", b"/metrics", [])[2].decode())
    return figures["archiver_zip_files_total"], figures["archiver_zip_file_bytes_total"]


def central_directory_offset(archive: bytes) -> int:
    end = archive.rfind(b"PK\x05\x06")
    return int.from_bytes(archive[end + 16 : end + 20], "little")


SECONDS = st.one_of(
    st.sampled_from([SPRING_FORWARD, FALL_BACK, END_OF_2107, 0, 315_532_799, 315_532_800]).flatmap(
        lambda moment: st.integers(moment - 3601, moment + 3601)
    ),
    st.integers(min_value=0, max_value=2**33),
)
FILES = st.tuples(
    st.one_of(st.binary(max_size=3000), st.text(max_size=200).map(str.encode)),
    st.builds(lambda seconds, fraction: seconds * 1_000_000_000 + fraction, SECONDS, st.integers(0, 999_999_999)),
    st.sampled_from([0o644, 0o444, 0o755, 0o600, 0o000, 0o4755]),
)
TREES = st.dictionaries(st.lists(NAMES, min_size=1, max_size=3).map("/".join), FILES, max_size=8)


@given(tree=TREES, data=st.data())
@example(tree={"-": (b"dash", SPRING_FORWARD * 10**9, 0o444), "Фото/пляж.jpg": (b"x" * 5000, 1, 0o644)}, data=None)
@example(tree={}, data=None)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_range_is_a_slice_of_what_zip_writes_to_a_file(
    partial_server: tuple[tuple[str, int], Path],
    tmp_path_factory: pytest.TempPathFactory,
    tree: dict[str, tuple[bytes, int, int]],
    data: st.DataObject | None,
) -> None:
    address, storage = partial_server
    album = new_album(storage, tmp_path_factory, {path: content for path, (content, _, _) in tree.items()})
    if album is None:
        return
    name = album.name
    for path, (_, mtime_ns, mode) in tree.items():
        os.utime(album / path, ns=(mtime_ns, mtime_ns))
        os.chmod(album / path, mode)
    expected = zip_to_file(album, album.parent / f"{name}.zip") if tree else b"PK\x05\x06" + bytes(18)
    length = len(expected)
    central = central_directory_offset(expected)
    ranges = [(central, length - 1), (length - 1, length - 1), (max(0, length - 22), length - 1)]
    if data is not None:
        start = data.draw(st.integers(0, length - 1), label="start")
        ranges.append((start, data.draw(st.integers(start, length - 1), label="end")))
    # Ranges first, while the index knows none of these files: the tail's CRCs are computed.
    for start, end in ranges:
        status, headers, body = get(address, name, f"bytes={start}-{end}")
        assert (status, headers["content-range"]) == (206, f"bytes {start}-{end}/{length}")
        assert body == expected[start : end + 1]
    status, _, whole = get(address, name)
    assert (status, whole) == (200, expected)


@pytest.fixture
def ten_files(partial_server: tuple[tuple[str, int], Path]) -> tuple[tuple[str, int], str, bytes]:
    """An album of ten 100 kB files, and its archive (a whole download: the index knows them all)."""
    address, storage = partial_server
    write_tree(storage / "ten", {f"{index}.jpg": os.urandom(100_000) for index in range(10)})
    status, _, whole = get(address, "ten")
    assert status == 200
    return address, "ten", whole


def test_a_range_in_the_tail_runs_no_zip(ten_files: tuple[tuple[str, int], str, bytes]) -> None:
    address, name, whole = ten_files
    before = zip_counters(address)
    for range_header, expected in [
        ("bytes=-1", whole[-1:]),
        ("bytes=-22", whole[-22:]),
        (f"bytes={central_directory_offset(whole)}-", whole[central_directory_offset(whole) :]),
    ]:
        status, _, body = get(address, name, range_header)
        assert (status, body) == (206, expected)
    assert zip_counters(address) == before


def test_a_resume_gives_zip_only_the_files_it_touches(ten_files: tuple[tuple[str, int], str, bytes]) -> None:
    address, name, whole = ten_files
    files, size = zip_counters(address)
    # From the middle of the eighth file (each entry: 30 + 5 + 100,000 bytes) to the end.
    start = 7 * 100_035 + 50_000
    status, _, body = get(address, name, f"bytes={start}-")
    assert (status, body) == (206, whole[start:])
    assert zip_counters(address) == (files + 3, size + 300_000)
    # And a range inside one file: that file alone.
    status, _, body = get(address, name, "bytes=250000-250099")
    assert (status, body) == (206, whole[250_000:250_100])
    assert zip_counters(address) == (files + 4, size + 400_000)


def test_a_file_rewritten_in_place_is_whole_in_the_next_range(
    partial_server: tuple[tuple[str, int], Path],
) -> None:
    address, storage = partial_server
    album = storage / "changing-range"
    write_tree(album, {"a.jpg": b"A" * 300_000, "b.jpg": b"B" * 300_000})
    time.sleep(2 * RACY_NS / 1e9)  # older than a clock tick: their CRCs are kept (the age is the point)
    status, _, whole = get(address, album.name)
    assert read_archive(whole)["b.jpg"] == b"B" * 300_000
    path = album / "b.jpg"
    status_before = path.stat()
    with open(path, "r+b") as file:
        file.write(b"C")  # same size, mtime put back: only the ctime tells
    os.utime(path, ns=(status_before.st_atime_ns, status_before.st_mtime_ns))
    # A range over all of b.jpg: its CRC is computed anew (the index's key has the ctime), never the stale one.
    status, _, body = get(address, album.name, "bytes=300000-")
    assert status == 206
    assert read_archive(whole[:300000] + body)["b.jpg"] == b"C" + b"B" * 299_999


# What a plan is, on listings of files that need not exist (planning reads no file).


def synthetic_listing(sizes: list[int]) -> AlbumListing:
    files = tuple(AlbumFile(f"f{index:03d}", size, 1_700_000_000 * 10**9) for index, size in enumerate(sizes))
    return AlbumListing(Path("/nonexistent"), files, ())


@given(sizes=st.lists(st.integers(0, 5000), max_size=12), data=st.data())
def test_a_plan_covers_the_range_and_nothing_more(sizes: list[int], data: st.DataObject) -> None:
    listing = synthetic_listing(sizes)
    layout = stored_archive_layout(listing)
    assert layout is not None
    start = data.draw(st.integers(0, layout.sent_size - 1), label="start")
    end = data.draw(st.integers(start, layout.sent_size - 1), label="end")
    plan = plan_range(listing, layout, ByteRange(start, end), CrcIndex(), array("q", [-1] * len(sizes)))
    assert plan is not None
    zip_part = 0 if plan.zip_range is None else plan.zip_range.length
    tail = 0 if plan.tail is None else plan.tail.length
    assert zip_part + tail == end - start + 1
    central_at = sum(30 + 4 + size for size in sizes)
    assert (plan.zip_input is not None) == (start < central_at)
    assert (plan.tail is not None) == (end >= central_at)
    if plan.zip_input is not None and plan.zip_range is not None and plan.layout is not None:
        # zip gets the files from the one holding the range's first byte to the one holding its last data byte.
        offsets = [sum(30 + 4 + size for size in sizes[:index]) for index in range(len(sizes) + 1)]
        first = max(index for index in range(len(sizes)) if offsets[index] <= start)
        last = max(index for index in range(len(sizes)) if offsets[index] <= min(end, central_at - 1))
        assert plan.zip_input.file_count == last - first + 1
        assert plan.zip_range.start == start - offsets[first]
        assert plan.zip_range.end < offsets[last + 1] - offsets[first]


def test_a_range_whose_files_meet_the_0xffffffff_corner_is_made_from_the_first_file() -> None:
    # Alone, f001 and f002 would put f002's header at exactly 0xFFFFFFFF, where no one knows what zip
    # writes; in the whole archive it is 44 bytes further.  Such a range runs zip from the first file.
    listing = synthetic_listing([10, 0xFFFFFFFF - 34, 1])
    layout = stored_archive_layout(listing)
    assert layout is not None and layout.descriptor_free
    start = 30 + 4 + 10
    plan = plan_range(listing, layout, ByteRange(start, layout.sent_size - 1), CrcIndex(), array("q", [-1] * 3))
    assert plan is None
    assert plan_range(listing, layout, ByteRange(0, 10), CrcIndex(), array("q", [-1] * 3)) is not None


def test_a_browsers_resume_reads_nothing_before_where_it_resumes(ten_files: tuple[tuple[str, int], str, bytes]) -> None:
    # Chromium resuming a cancelled download asks for bytes=N-N, then bytes=N-.
    address, name, whole = ten_files
    files, size = zip_counters(address)
    resume_at = 5 * 100_035 + 20_000  # inside the sixth file
    for range_header, expected in [
        (f"bytes={resume_at}-{resume_at}", whole[resume_at : resume_at + 1]),
        (f"bytes={resume_at}-", whole[resume_at:]),
    ]:
        status, _, body = get(address, name, range_header)
        assert (status, body) == (206, expected)
    assert zip_counters(address) == (files + 1 + 5, size + 100_000 + 500_000)
