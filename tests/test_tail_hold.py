"""The tail hold (``web.tail_hold``), fed a stored archive's bytes in chunks of every size, without a server.

What it must do, whatever the chunks: hand on every byte once, in order; no byte of the tail
(from the last entry's last byte) before the proof (the central directory's first byte, or the
producer's end) and the recheck; what it hands on before the proof ends inside an entry; and if
the recheck fails, nothing of the tail.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver.archive.local_headers import end_inside_an_entry
from archiver.archive.plan import ArchivePlan
from archiver.archive.storage import list_album
from archiver.archive.zipformat import LOCAL_HEADER_FIXED
from archiver.web.tail_hold import TailHold

from .conftest import expected_archive, write_tree
from .test_producer import collect


class RecentFileChanged(Exception):
    pass


@pytest.fixture(scope="module")
def deflated(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArchivePlan, bytes]:
    # Entries that deflate and that do not (random bytes: stored deflate blocks), empty ones, and
    # names of a byte and of many: the next record looked for is short or long.
    album = tmp_path_factory.mktemp("deflated")
    tree = {"a.txt": b"text " * 2000, "b": b"", "c.jpg": os.urandom(5000), "Фото/длинное имя файла.jpg": b"d" * 40}
    write_tree(album, tree | {"e": b"", "z": os.urandom(300)})
    plan = ArchivePlan(album, list_album(album).files, 6)
    return plan, trio.run(collect, plan)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArchivePlan, bytes]:
    album = tmp_path_factory.mktemp("album")
    write_tree(album, {"a.jpg": os.urandom(3000), "b/empty.txt": b"", "c.jpg": os.urandom(70), "d.jpg": b"d"})
    return ArchivePlan(album, list_album(album).files, 0), expected_archive(album)


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def _run(hold: TailHold, data: bytes, size: int) -> tuple[bytes, list[tuple[int, int]], int]:
    """What ``hold`` hands on of ``data`` cut in ``size`` chunks; after each hand-on, how much had been handed on
    and received; and how much had been handed on when the recheck ran (-1: never)."""
    chunks = _chunks(data, size)
    received = 0
    rechecked_after = -1
    out = bytearray()
    steps: list[tuple[int, int]] = []

    async def receive() -> bytes | None:
        nonlocal received
        chunk = next(chunks, None)
        received += len(chunk or b"")
        return chunk

    async def recheck() -> None:
        nonlocal rechecked_after
        rechecked_after = len(out)

    while (piece := await hold.next(receive, len(out), recheck)) is not None:
        out += piece
        steps.append((len(out), received))
    return bytes(out), steps, rechecked_after


@pytest.mark.parametrize("size", [1, 2, 7, 31, 64, 200, 1024, 4096, 1 << 20])
def test_every_byte_goes_once_and_none_of_the_tail_before_the_proof_and_the_recheck(
    stored: tuple[ArchivePlan, bytes], size: int
) -> None:
    plan, archive = stored
    assert plan.length == len(archive)
    tail_start = plan.length - plan.tail_size()
    hold = TailHold(plan, 0, plan.length - 1, size)
    out, steps, rechecked_after = trio.run(_run, hold, archive, size)
    assert out == archive
    assert 0 <= rechecked_after <= tail_start  # it ran, before any byte of the tail
    for handed, received in steps:
        if received <= plan.central_offset:  # no proof yet: nothing of the tail, and a cut inside an entry
            assert handed <= tail_start
            assert plan.cut_inside_an_entry(handed, 0) == handed
    if size < plan.central_offset:  # the case above was met
        assert any(received <= plan.central_offset for _, received in steps)


@pytest.mark.parametrize("size", [1, 64, 4096, 1 << 20])
def test_a_failed_recheck_lets_no_byte_of_the_tail_go(stored: tuple[ArchivePlan, bytes], size: int) -> None:
    plan, archive = stored
    tail_start = plan.length - plan.tail_size()
    hold = TailHold(plan, 0, plan.length - 1, size)
    handed = bytearray()

    async def main() -> None:
        chunks = _chunks(archive, size)

        async def receive() -> bytes | None:
            return next(chunks, None)

        async def recheck() -> None:
            raise RecentFileChanged

        while (piece := await hold.next(receive, len(handed), recheck)) is not None:
            handed.extend(piece)

    with pytest.raises(RecentFileChanged):
        trio.run(main)
    assert len(handed) <= tail_start
    assert archive.startswith(bytes(handed))


@pytest.mark.parametrize("size", [1, 2, 7, 31, 64, 200, 1024, 4096, 1 << 20])
def test_a_deflated_archive_goes_whole_and_ends_inside_an_entry_until_its_central_directory(
    deflated: tuple[ArchivePlan, bytes], size: int
) -> None:
    # Deflated, the plan does not know where entries end: what goes out before the central
    # directory's first header arrives (the proof) ends inside an entry found in the bytes, by a
    # reader's account: past a local header's 30 bytes, and short of the entry's last byte (its
    # data descriptor's) whatever comes next.
    plan, archive = deflated
    assert plan.length is None
    listed = zipfile.ZipFile(io.BytesIO(archive))
    starts = [info.header_offset for info in listed.infolist()]
    ends = [*starts[1:], listed.start_dir]  # each entry's end: the next record's start
    proof = listed.start_dir + 46 + len(plan.name(0))  # the first central header to its name's end, fed
    out, steps, rechecked_after = trio.run(_run, TailHold(plan, 0, 0, size), archive, size)
    assert out == archive
    assert 0 <= rechecked_after < listed.start_dir
    early = [handed for handed, received in steps if received < proof]
    for handed in early:
        assert handed == 0 or any(a + LOCAL_HEADER_FIXED < handed < b for a, b in zip(starts, ends, strict=True))
    assert size >= proof or any(early)  # not all held to the end: the case above was met


def test_a_range_that_ends_before_the_tail_holds_its_last_byte(stored: tuple[ArchivePlan, bytes]) -> None:
    plan, archive = stored
    start, end = 10, plan.central_offset // 2
    hold = TailHold(plan, start, end, 64)
    out, _, rechecked_after = trio.run(_run, hold, archive[start : end + 1], 64)
    assert out == archive[start : end + 1]
    assert rechecked_after == len(out) - 1  # only its last byte waited for the producer's end


def test_no_producer_bytes_at_all_end_the_body(tmp_path: Path) -> None:
    write_tree(tmp_path / "album", {"a.jpg": b"a"})
    plan = ArchivePlan(tmp_path / "album", list_album(tmp_path / "album").files, 0)
    hold = TailHold(plan, 0, plan.length - 1, 64)
    out, seen, rechecked_after = trio.run(_run, hold, b"", 64)
    assert out == b"" and seen == [] and rechecked_after == 0


def test_the_tail_starts_at_the_last_entrys_last_byte_as_a_reader_finds_it(stored: tuple[ArchivePlan, bytes]) -> None:
    # The tests above measure the hold against ``tail_size`` itself; this is the tail by a reader's
    # account: from the last data byte of the last entry (by its local header, as zipfile reads it)
    # to the end.  One byte less held would hand on the last entry whole before the proof
    # (helper 118: that mutation passed every test).
    plan, archive = stored
    last = zipfile.ZipFile(io.BytesIO(archive)).infolist()[-1]
    name_length, extra_length = struct.unpack_from("<HH", archive, last.header_offset + 26)
    last_data_byte = last.header_offset + 30 + name_length + extra_length + last.file_size - 1
    assert plan.tail_size() == len(archive) - last_data_byte


def test_a_cut_is_inside_an_entry_only_past_its_local_headers_fixed_part() -> None:
    # A cut at the fixed part's end (30 bytes, APPNOTE 4.3.7) leaves a reader a whole header and no name:
    # Java's ZipInputStream may take that for the archive's end.  Past it, or within the data, it is inside.
    starts = [0, 100]
    assert end_inside_an_entry(starts, 2, LOCAL_HEADER_FIXED, 0) == 0
    assert end_inside_an_entry(starts, 2, LOCAL_HEADER_FIXED + 1, 0) == LOCAL_HEADER_FIXED + 1
    assert end_inside_an_entry(starts, 2, 100 + LOCAL_HEADER_FIXED, 0) == 99  # back into the first entry
    assert end_inside_an_entry(starts, 2, 100, 50) == 99


async def _run_chunked(
    hold: TailHold, data: bytes, sizes: list[int]
) -> tuple[bytes, list[tuple[int, int, bool]], int, int]:
    """As ``_run``, the chunks' sizes drawn (cycled); each step also says whether the producer had ended."""
    chunks: list[bytes] = []
    at, turn = 0, 0
    while at < len(data):
        size = sizes[turn % len(sizes)]
        chunks.append(data[at : at + size])
        at, turn = at + size, turn + 1
    feed = iter(chunks)
    received, ended, rechecks, rechecked_after = 0, False, 0, -1
    out = bytearray()
    steps: list[tuple[int, int, bool]] = []

    async def receive() -> bytes | None:
        nonlocal received, ended
        chunk = next(feed, None)
        received += len(chunk or b"")
        ended = ended or chunk is None
        return chunk

    async def recheck() -> None:
        nonlocal rechecks, rechecked_after
        rechecks += 1
        rechecked_after = len(out)

    while (piece := await hold.next(receive, len(out), recheck)) is not None:
        assert piece  # an empty piece would read as the body's end to a sender
        out += piece
        steps.append((len(out), received, ended))
    return bytes(out), steps, rechecks, rechecked_after


@given(data=st.data(), sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_range_in_any_chunks_goes_whole_and_holds_its_tail_until_the_proof(
    stored: tuple[ArchivePlan, bytes], data: st.DataObject, sizes: list[int]
) -> None:
    # Chunks of drawn sizes (a producer's reads end wherever the pipe had bytes) and any range
    # (a download manager's pieces, a resume): every byte once, in order; the recheck once, before
    # the range's tail; and before the proof, what went out ends inside an entry.
    plan, archive = stored
    assert plan.length is not None
    start = data.draw(st.integers(0, plan.length - 1), label="start")
    end = data.draw(st.integers(start, plan.length - 1), label="end")
    tail_start = plan.length - plan.tail_size()
    own_tail = max(1, end + 1 - max(tail_start, start))  # the range's part of the tail, or its last byte
    out, steps, rechecks, rechecked_after = trio.run(
        _run_chunked, TailHold(plan, start, end, 4096), archive[start : end + 1], sizes
    )
    assert out == archive[start : end + 1]
    assert rechecks == 1 and 0 <= rechecked_after <= len(out) - own_tail
    for handed, received, ended in steps:
        if start + received <= plan.central_offset and not ended:  # no proof yet
            assert handed <= len(out) - own_tail
            assert handed == 0 or plan.cut_inside_an_entry(start + handed, start) == start + handed


@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_deflated_archive_in_any_chunks_goes_whole_and_ends_inside_an_entry_until_the_proof(
    deflated: tuple[ArchivePlan, bytes], sizes: list[int]
) -> None:
    plan, archive = deflated
    listed = zipfile.ZipFile(io.BytesIO(archive))
    starts = [info.header_offset for info in listed.infolist()]
    ends = [*starts[1:], listed.start_dir]
    proof = listed.start_dir + 46 + len(plan.name(0))
    out, steps, rechecks, rechecked_after = trio.run(_run_chunked, TailHold(plan, 0, 0, 4096), archive, sizes)
    assert out == archive
    assert rechecks == 1 and 0 <= rechecked_after < listed.start_dir
    for handed, received, _ in steps:
        if received < proof:
            assert handed == 0 or any(a + LOCAL_HEADER_FIXED < handed < b for a, b in zip(starts, ends, strict=True))
