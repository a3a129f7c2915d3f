"""The producer's instructions: the runs copied from the plan's tables make the same bytes as the pieces."""

from __future__ import annotations

import gc
import io
import random
import struct
import tempfile
import time
import weakref
import zipfile
import zlib
from pathlib import Path
from unittest.mock import patch

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from zlib_ng import zlib_ng

from archiver.archive import instructions, producer_output, producer_program, producer_protocol
from archiver.archive.crc_index import CrcIndex
from archiver.archive.crc_source import BY_PRODUCER, CrcMismatch, CrcSource
from archiver.archive.instructions import DecisionWait
from archiver.archive.listing import AlbumFile
from archiver.archive.pieces import CrcWait
from archiver.archive.plan import ArchivePlan
from archiver.archive.producer_protocol import COMPUTED_CRC_LIMIT
from archiver.archive.zipformat import CENTRAL_CRC_AT, CENTRAL_HEADER_FIXED, CRC_SIZE, LOCAL_CRC_AT

from .conftest import expected_archive, read_archive, write_tree
from .test_producer import collect, plan_of


@st.composite
def instruction_cases(draw: st.DrawFn) -> tuple[list[int], int, float, float, int, set[int], int]:
    """Sizes of an album's files, a run length, a range (as fractions), CRCs at hand, racy entries, a seed."""
    # Mostly small (copied with their headers; a whole download's CRCs left to the producer up to
    # COMPUTED_CRC_LIMIT, 16,384), some past COPY_LIMIT (moved by sendfile).
    sizes = draw(st.lists(st.one_of(st.integers(0, 3000), st.integers(16_000, 40_000)), min_size=0, max_size=12))
    run = draw(st.integers(1, 5))
    low, high = (0.0, 1.0) if draw(st.booleans()) else sorted((draw(st.floats(0, 1)), draw(st.floats(0, 1))))
    ready = draw(st.integers(0, 2 * len(sizes)))
    racy = draw(st.sets(st.integers(0, max(0, len(sizes) - 1)), max_size=3)) if sizes else set()
    return sizes, run, low, high, ready, racy, draw(st.integers(0, 2**32))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction_cases())
def test_runs_of_whole_entries_give_the_producer_the_same_bytes(
    tmp_path: Path, case: tuple[list[int], int, float, float, int, set[int], int]
) -> None:
    """The instructions copied and patched in runs (the fast path) make the archive's bytes, whatever is at hand.

    Rendered by the producer program itself (in this process, into a file)
    and compared with the oracle: ranges cutting entries and central headers
    anywhere, runs of 1 to 5 entries, CRCs that come in the middle of a run
    (a cold download), racy entries (checked piece by piece).
    """
    sizes, run, low, high, ready, racy, seed = case
    rng = random.Random(seed)
    album = Path(tempfile.mkdtemp(dir=tmp_path))
    write_tree(album, {f"{k:02}-{'я' * (k % 3)}": rng.randbytes(size) for k, size in enumerate(sizes)})
    plan = plan_of(album)
    assert plan.length is not None
    whole = expected_archive(album)
    start = min(int(low * plan.length), plan.length - 1)
    end = max(start, min(int(high * plan.length), plan.length - 1))
    crcs = CrcSource(
        plan, plan.crc_entries(start, end), CrcIndex(), whole_download=(start, end) == (0, plan.length - 1)
    )
    trio.run(crcs.compute)
    left = {k for k in range(plan.count) if crcs._crcs[k] == BY_PRODUCER} if crcs._whole_download else set()
    assert left == {k for k, size in enumerate(plan.sizes) if crcs._whole_download and size <= COMPUTED_CRC_LIMIT}
    for k in sorted(left):  # some "in the index" after all
        if rng.random() < 0.3:
            crcs._crcs[k] = plan_crc(plan, k)
            left.discard(k)
    crcs._ready.value = min(ready, crcs._ready.value)  # the rest "still being read"
    crcs._racy = {k for k in racy & set(plan.crc_entries(start, end)) if crcs.ready(k) is not None}
    stream = bytearray()
    tapped = False
    with patch.object(instructions, "RUN", run):
        for instruction in instructions.instructions(plan, start, end, crcs):
            if isinstance(instruction, CrcWait | DecisionWait):
                crcs._ready.value = len(crcs._crcs)  # it came
                if isinstance(instruction, CrcWait) and crcs.ready(instruction.k) is None and not tapped:
                    # The producer's bytes pass, in chunks of any size (all of its entries before
                    # the central directory's first wait).
                    at = 0
                    while at < plan.central_offset:
                        step = rng.choice([1, 7, 46, 1000, 65_536])
                        crcs.tap(at, whole[at : min(at + step, plan.central_offset)])
                        at += step
                    tapped = True
            else:
                stream += instruction
    with open(album.parent / f"{album.name}.out", "w+b") as output:
        producer_program.Producer(io.BufferedReader(io.BytesIO(stream)), producer_output.Output(output.fileno())).run()
        output.seek(0)
        assert output.read() == whole[start : end + 1]
    assert list(crcs.learnt) == sorted(left)
    assert [crcs.ready(k) for k in crcs.learnt] == [plan_crc(plan, k) for k in crcs.learnt]


def test_a_crc_the_producer_wrote_that_is_not_its_data_s_fails_the_tap(tmp_path: Path) -> None:
    # The service takes each CRC the producer computed (for the central directory, the index) only
    # once it has checked it against the data that passed after it.
    write_tree(tmp_path / "album", {"a.jpg": b"abc" * 100, "b.jpg": b"xyz" * 100})
    plan = plan_of(tmp_path / "album")
    assert plan.length is not None
    whole = bytearray(expected_archive(tmp_path / "album"))
    crcs = CrcSource(plan, range(plan.count), CrcIndex(), whole_download=True)
    trio.run(crcs.compute)
    assert crcs.by_producer(0, plan.count) == 2
    at = plan.local_offsets[1] + LOCAL_CRC_AT
    whole[at] ^= 1  # b.jpg's local header
    crcs.tap(0, whole[:at])
    assert crcs.ready(0) == zlib.crc32(b"abc" * 100) and crcs.ready(1) is None
    with pytest.raises(CrcMismatch, match=r"b\.jpg: the producer wrote CRC"):
        crcs.tap(at, whole[at:])
    assert crcs.ready(1) is None


def plan_crc(plan: ArchivePlan, k: int) -> int:
    """Entry k's CRC-32, read from its file."""
    return zlib.crc32((plan.directory / plan.path_str(k)).read_bytes())


# Deflate budgets (CPU-s a byte written, CPU-s besides, bytes read a byte written, bytes read
# besides), by what they make of the data; the CPU allowance counts from the run's start (this
# process has spent seconds already).
BUDGETS = {
    "never past": (1.0, 1e9, 10**9, 1 << 40),
    "past at once, by CPU": (0.0, 0.0, 10**9, 1 << 40),
    "past at once, by reads": (1.0, 1e9, 0, 0),
    "reads 2:1 past 64 KiB": (1.0, 1e9, 2, 65_536),
    "CPU 0.01 s a MB past 1 ms": (1e-8, 0.001, 10**9, 1 << 40),
    "CPU 0.2 s a MB past 20 ms": (2e-7, 0.02, 10**9, 1 << 40),
}


@given(
    kinds=st.lists(st.sampled_from(["zeros", "random", "two letters", "text"]), min_size=1, max_size=4),
    sizes=st.lists(st.integers(0, 600_000), min_size=4, max_size=4),
    budget=st.sampled_from(sorted(BUDGETS)),
    level=st.sampled_from([1, 6, 9]),
    seed=st.integers(0, 2**32),
)
@example(  # every stretch stored, or none
    kinds=["zeros", "two letters", "random", "text"],
    sizes=[600_000] * 4,
    budget="past at once, by CPU",
    level=9,
    seed=1,
)
@example(
    kinds=["zeros", "two letters", "random", "text"],
    sizes=[600_000] * 4,
    budget="past at once, by reads",
    level=9,
    seed=1,
)
@example(kinds=["zeros", "two letters", "zeros", "text"], sizes=[600_000] * 4, budget="never past", level=9, seed=1)
@example(  # deflated and stored in turn, as the ratio allows, or as the CPU does
    kinds=["zeros", "text", "zeros", "two letters"],
    sizes=[600_000] * 4,
    budget="reads 2:1 past 64 KiB",
    level=6,
    seed=2,
)
@example(
    kinds=["two letters", "random", "two letters", "text"],
    sizes=[600_000] * 4,
    budget="CPU 0.2 s a MB past 20 ms",
    level=9,
    seed=3,
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_deflated_stretches_switching_to_stored_blocks_anywhere_read_back_whole(
    tmp_path: Path,
    kinds: list[str],
    sizes: list[int],
    budget: str,
    level: int,
    seed: int,
) -> None:
    """The producer past its deflate budget (any budget, here set per case) writes stored blocks, and back.

    Rendered by the producer program in this process, into a file: every entry
    reads back as its file, however its data switched between deflated and
    stored stretches (Producer._deflate; helper 106).  Past its budget at once,
    every entry is stored blocks (longer than its file); never past, files of
    zeros deflate to almost nothing.
    """
    rng = random.Random(seed)
    makers = {
        "zeros": lambda size: bytes(size),
        "random": rng.randbytes,
        "two letters": lambda size: bytes(rng.choice(b"ab") for _ in range(size)),
        "text": lambda size: (b"the archive's own bytes, " * (size // 25 + 1))[:size],
    }
    files = {f"{k}.bin": makers[kind](size) for k, (kind, size) in enumerate(zip(kinds, sizes, strict=False))}
    album = Path(tempfile.mkdtemp(dir=tmp_path))
    write_tree(album, files)
    plan = plan_of(album, level)
    stream = b"".join(i for i in instructions.instructions(plan, 0, 0, None) if not isinstance(i, CrcWait))
    with open(album.parent / f"{album.name}.zip", "w+b") as output:
        source = io.BufferedReader(io.BytesIO(stream))
        producer = producer_program.Producer(source, producer_output.Output(output.fileno()))
        cpu_per_byte, cpu_allowance, read_per_byte, read_allowance = BUDGETS[budget]
        producer.cpu_per_byte, producer.cpu_allowance = cpu_per_byte, time.process_time() + cpu_allowance
        producer.read_per_byte, producer.read_allowance = read_per_byte, read_allowance
        producer.run()
        output.seek(0)
        archive = output.read()
    assert read_archive(archive) == files
    entries = zipfile.ZipFile(io.BytesIO(archive)).infolist()
    if budget.startswith("past at once"):
        assert all(entry.compress_size > entry.file_size for entry in entries if entry.file_size)
    if budget == "never past":
        assert all(
            entry.compress_size < entry.file_size / 100 + 100
            for entry in entries
            if kinds[int(entry.filename[0])] == "zeros"
        )


async def test_runs_across_a_block_of_the_whole_entry_table_send_the_archive(storage: Path) -> None:
    """More entries than one block (RUN): the real block edge, warm and cold, whole and cut around it."""
    album = storage / "album"
    write_tree(album, {f"{k:04}": bytes(k % 4) for k in range(2 * instructions.RUN + 7)})
    plan = plan_of(album)
    whole = expected_archive(album)
    assert plan.length is not None
    edge = plan.local_offsets[instructions.RUN]  # the first byte of the second block's first entry
    central_edge = plan.central_offset + plan.central_offsets[instructions.RUN]
    index = CrcIndex()
    assert await collect(plan, chunk_size=65536) == whole  # cold: CRCs come as the instructions go
    for start, end in [(0, plan.length - 1), (edge - 1, edge), (edge, plan.length - 1), (1, central_edge)]:
        assert await collect(plan, start, end, chunk_size=65536, index=index) == whole[start : end + 1]
        assert await collect(plan, start, end, chunk_size=65536, index=index) == whole[start : end + 1]  # warm


def test_a_plan_is_freed_once_no_download_and_no_cache_holds_it(tmp_path: Path) -> None:
    # Found by helper 46: the instructions kept for a plan (its weak dictionary's value) held
    # the plan itself, so every plan a producer had run for stayed for good: ~55 MB an album of
    # 119,000 files, a download of each album changed since the last one.
    write_tree(tmp_path / "album", {"a.jpg": b"a", "b.jpg": b"b"})
    plan = plan_of(tmp_path / "album")
    crcs = CrcSource(plan, plan.crc_entries(0, plan.length - 1), CrcIndex())
    trio.run(crcs.compute)
    assert [i for i in instructions.instructions(plan, 0, plan.length - 1, crcs) if not isinstance(i, CrcWait)]
    assert len(instructions._whole_entries_of) >= 1
    freed = weakref.ref(plan)
    del plan, crcs
    gc.collect()
    assert freed() is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**63 - 1)), min_size=1, max_size=5))
def test_the_plan_carries_each_files_key_as_the_protocol_splits_it(times: list[tuple[int, int]]) -> None:
    """The plan keeps each key's times split into seconds and nanoseconds (an mtime past 2262 overflows 64
    bits of nanoseconds), and hands them to the producer from its tables: the same identity as
    ``producer_protocol.identity`` of the key, and the same key back (``file_key``), for any time."""
    files = [
        AlbumFile(f"{k}.jpg", k, mtime_ns=mtime, device=7, inode=100 + k, ctime_ns=ctime)
        for k, (mtime, ctime) in enumerate(times)
    ]
    plan = ArchivePlan(Path("/album"), files)
    for k, file in enumerate(files):
        assert plan.key(k) == file.key
        assert plan.identity(k) == producer_protocol.identity(file.key)
        assert producer_protocol.file_key(plan.identity(k)) == file.key


LaidOut = tuple[ArchivePlan, bytes, list[int], list[int]]


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory: pytest.TempPathFactory) -> LaidOut:
    """A stored album's plan, its archive (the oracle), and each entry's local and central header offsets by
    a reader's account (zipfile's, and the central directory walked record by record), the central
    directory's offset and its end appended."""
    album = tmp_path_factory.mktemp("edges")
    write_tree(album, {"a": b"", "b.jpg": random.randbytes(3000), "в/г.jpg": b"x", "d" * 40: random.randbytes(50)})
    plan = plan_of(album)
    archive = expected_archive(album)
    listed = zipfile.ZipFile(io.BytesIO(archive))
    local = [info.header_offset for info in listed.infolist()] + [listed.start_dir]
    central = [listed.start_dir]
    for _ in listed.infolist():
        name, extra, comment = struct.unpack_from("<HHH", archive, central[-1] + 28)
        central.append(central[-1] + CENTRAL_HEADER_FIXED + name + extra + comment)
    return plan, archive, local, central


def _touches(start: int, end: int, at: int) -> bool:
    return at + CRC_SIZE > start and at <= end


def _edges(laid_out: LaidOut) -> list[int]:
    """Each record's first byte and each CRC field's first and past-last, a byte or two either side."""
    plan, archive, local, central = laid_out
    count = plan.count
    edges = {at for at in local + central} | {len(archive)}
    edges |= {at + d for at in local[:count] for d in (LOCAL_CRC_AT, LOCAL_CRC_AT + CRC_SIZE)}
    edges |= {at + d for at in central[:count] for d in (CENTRAL_CRC_AT, CENTRAL_CRC_AT + CRC_SIZE)}
    return sorted({min(max(at + d, 0), len(archive) - 1) for at in edges for d in range(-2, 3)})


def _check_range(laid_out: LaidOut, start: int, end: int) -> None:
    """The entries the plan takes as whole in bytes ``start`` .. ``end``, or as holding their CRC field, are
    those a reader's layout says; the instructions check the files before the central directory; and the
    bytes the producer writes for the range are the archive's (a cut CRC field's part of it too)."""
    plan, archive, local, central = laid_out
    count = plan.count
    assert list(plan.whole_entries(start, end)) == [
        k for k in range(count) if start <= local[k] and local[k + 1] - 1 <= end
    ]
    assert list(plan.whole_central_headers(start, end)) == [
        k for k in range(count) if start <= central[k] and central[k + 1] - 1 <= end
    ]
    holding = {k for k in range(count) if _touches(start, end, local[k] + LOCAL_CRC_AT)}
    holding |= {k for k in range(count) if _touches(start, end, central[k] + CENTRAL_CRC_AT)}
    crc_entries = list(plan.crc_entries(start, end))
    assert sorted(crc_entries) == sorted(holding) and len(set(crc_entries)) == len(crc_entries)
    crcs = CrcSource(plan, plan.crc_entries(start, end), CrcIndex())
    trio.run(crcs.compute)
    given = [i for i in instructions.instructions(plan, start, end, crcs) if not isinstance(i, CrcWait)]
    # The check before the central directory's first byte (the service's proof), whenever the range holds both.
    assert (producer_protocol.CHECKED in given) == (start < plan.central_offset <= end)
    with tempfile.TemporaryFile() as output:
        source = io.BufferedReader(io.BytesIO(b"".join(given)))
        producer_program.Producer(source, producer_output.Output(output.fileno())).run()
        output.seek(0)
        assert output.read() == archive[start : end + 1], (start, end)


# Helper 118: an entry one byte short of a range's end taken as whole, a central header's likewise, a
# range ending on a CRC field's first byte taken as not holding it, a range ending on the central
# directory's first byte sent without the check before it: each passed every test before these.


def test_ranges_to_and_from_every_record_edge_as_a_reader_lays_the_archive_out(laid_out: LaidOut) -> None:
    """Every edge (``_edges``) as a range's end from the start, as its start to the end, and alone."""
    last = len(laid_out[1]) - 1
    for at in _edges(laid_out):
        for start, end in ((0, at), (at, last), (at, at)):
            _check_range(laid_out, start, end)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_ranges_between_any_two_record_edges_as_a_reader_lays_the_archive_out(
    laid_out: LaidOut, data: st.DataObject
) -> None:
    """Ranges from one edge (``_edges``) to another."""
    edges = _edges(laid_out)
    start, end = sorted((data.draw(st.sampled_from(edges)), data.draw(st.sampled_from(edges))))
    _check_range(laid_out, start, end)


def test_a_deflated_entry_without_zip64_stays_within_4_byte_sizes_with_a_zlib_that_passes_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Helper 142: zlib-ng, the system's libz on some distributions, makes incompressible data ~5.5 %
    longer at level 1, past the reference zlib's bound that decides ZIP64 (``zipformat.uses_zip64``):
    a 4.1 GB video passed 4 GiB with 4-byte sizes.  The producer stores the rest of such an entry
    before it could (``producer_program.PENDING_BOUND``).  Shown at a limit of 33.5 MiB for 32 MiB
    of random bytes (33.75 MiB, 35.4 MB, deflated by zlib-ng alone), with zlib-ng as the producer's zlib.
    """
    files = {"video.bin": random.Random(7).randbytes(32 * 1024 * 1024)}
    album = Path(tempfile.mkdtemp(dir=tmp_path))
    write_tree(album, files)
    plan = plan_of(album, 1)
    limit = 33 * 1024 * 1024 + 512 * 1024
    monkeypatch.setattr(producer_program, "zlib", zlib_ng)
    monkeypatch.setattr(producer_program, "FIELD_LIMIT", limit + 1)
    stream = b"".join(i for i in instructions.instructions(plan, 0, 0, None) if not isinstance(i, CrcWait))
    with open(album.parent / f"{album.name}.zip", "w+b") as output:
        producer = producer_program.Producer(
            io.BufferedReader(io.BytesIO(stream)), producer_output.Output(output.fileno())
        )
        # Its deflating budget counted from now, as a producer's is from its start.  Until helper 169 the
        # CPU this test process had used before (the property test's above) was taken as deflate's: every
        # block was stored from the first, the limit never neared, and the test passed with the switch to
        # stored blocks taken out (coverage showed that switch never ran in `make test`).
        producer.cpu_allowance = time.process_time() + producer_program.DEFLATE_CPU_ALLOWANCE
        producer.run()
        output.seek(0)
        archive = output.read()
    assert read_archive(archive) == files
    (entry,) = zipfile.ZipFile(io.BytesIO(archive)).infolist()
    assert entry.compress_type == zipfile.ZIP_DEFLATED
    assert entry.compress_size <= limit
    # Its first block deflated (RFC 1951 3.2.3: BTYPE 01 or 10, after BFINAL), not stored.
    name_length, extra_length = struct.unpack_from("<HH", archive, entry.header_offset + 26)
    assert (archive[entry.header_offset + 30 + name_length + extra_length] >> 1) & 3 in (1, 2)
    # Deflated as far as the room allowed, then stored: more than stored alone, not all of zlib-ng's.
    assert producer_program.stored_length(entry.file_size) < entry.compress_size
