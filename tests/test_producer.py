"""The producer: the plan's bytes through a bounded channel, files beneath the album only, and cancellation."""

from __future__ import annotations

import fcntl
import io
import os
import random
import subprocess
import sys
import termios
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import archiver.archive.ctime_trust as ctime_trust_module
from archiver.archive import producer, producer_output, producer_program
from archiver.archive.crc_index import CrcIndex
from archiver.archive.crc_source import CrcSource
from archiver.archive.plan import ArchivePlan
from archiver.archive.producer import (
    PIPE_SIZE,
    ProducerFailed,
    ProducerUnavailable,
    _widen_pipe,
    produce,
)
from archiver.archive.producer_protocol import SECOND, FileChanged
from archiver.archive.storage import list_album
from archiver.archive.zipformat import LOCAL_HEADER_FIXED

from .conftest import expected_archive, producer_children, read_archive, write_tree


def plan_of(album: Path, compression: int = 0) -> ArchivePlan:
    return ArchivePlan(album, list_album(album).files, compression)


async def collect(
    plan: ArchivePlan,
    start: int = 0,
    end: int | None = None,
    chunk_size: int = 4096,
    index: CrcIndex | None = None,
    on_first_chunk: Callable[[], None] | None = None,
    whole_download: bool = False,
) -> bytes:
    """What ``produce`` sends for bytes ``start`` .. ``end`` (the whole archive by default).

    ``whole_download``: as ``CrcSource`` takes it (small files the index lacks: CRCs the producer computes).
    """
    end = (plan.length or 0) - 1 if end is None else end
    crcs = None
    if plan.length is not None:
        entries = plan.crc_entries(start, end)
        crcs = CrcSource(plan, entries, index or CrcIndex(), whole_download=whole_download)
    send_channel, receive_channel = trio.open_memory_channel[bytes](2)
    chunks: list[bytes] = []
    async with trio.open_nursery() as nursery:
        if crcs is not None:
            nursery.start_soon(crcs.compute)
        nursery.start_soon(lambda: produce(plan, start, end, crcs, send_channel, chunk_size=chunk_size))
        async for chunk in receive_channel:
            assert len(chunk) <= chunk_size
            if not chunks and on_first_chunk is not None:
                on_first_chunk()
            chunks.append(chunk)
    return b"".join(chunks)


async def test_output_is_the_planned_archive(storage: Path) -> None:
    tree = {"a.jpg": os.urandom(50_000), "sub/b.txt": b"b", "Фото/в.jpg": os.urandom(3000), "-": b""}
    write_tree(storage / "album", tree)
    data = await collect(plan_of(storage / "album"))
    assert data == expected_archive(storage / "album")
    assert read_archive(data) == tree


async def test_every_range_is_a_slice_of_the_whole(storage: Path) -> None:
    write_tree(storage / "album", {"a.jpg": os.urandom(5000), "b/c.jpg": os.urandom(7000), "d": b"d"})
    plan = plan_of(storage / "album")
    whole = expected_archive(storage / "album")
    assert plan.length is not None
    for start, end in [(0, 0), (1, 29), (30, 4999), (100, plan.length - 1), (plan.central_offset, plan.length - 1)]:
        assert await collect(plan, start, end, chunk_size=1000) == whole[start : end + 1], (start, end)


async def test_a_generated_range_comes_in_chunks_of_the_chunk_size_at_most(storage: Path) -> None:
    # Helper 142: a chunk of the central directory could pass the chunk size by a record (a central
    # header may be KiBs long), which bounds a download's memory (README, Limits and abuse).
    write_tree(storage / "album", {f"photo {k:04}.jpg": b"" for k in range(600)})
    plan = plan_of(storage / "album")
    whole = expected_archive(storage / "album")
    assert plan.length is not None
    for start in (plan.central_offset, plan.central_offset + 37):
        assert await collect(plan, start, plan.length - 1, chunk_size=100) == whole[start:]  # collect checks sizes


async def test_deflate_level_deflates_with_descriptors(storage: Path) -> None:
    tree = {"text.txt": b"hello " * 10_000, "Фото.jpg": os.urandom(2000), "empty": b""}
    write_tree(storage / "album", tree)
    data = await collect(plan_of(storage / "album", 9))
    assert read_archive(data) == tree
    assert len(data) < 10_000


async def test_empty_album_is_an_empty_zip(storage: Path) -> None:
    (storage / "album").mkdir()
    data = await collect(plan_of(storage / "album"))
    assert data == b"PK\x05\x06" + bytes(18)


async def test_missing_interpreter_raises_unavailable(storage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(storage / "album", {"a.jpg": b"a"})
    monkeypatch.setattr(producer, "COMMAND", ("/nonexistent/python",))
    with pytest.RaisesGroup(ProducerUnavailable):
        await collect(plan_of(storage / "album"))


async def test_cancellation_kills_and_reaps_the_producer(storage: Path) -> None:
    write_tree(storage / "album", {f"{i}.jpg": os.urandom(1_000_000) for i in range(20)})
    plan = plan_of(storage / "album")
    send_channel, receive_channel = trio.open_memory_channel[bytes](0)
    async with trio.open_nursery() as nursery:
        # 20 MB: the producer waits on its full pipe, still running (100 kB, it had ended by now).
        end = (plan.length or 0) - 1
        crcs = CrcSource(plan, plan.crc_entries(0, end), CrcIndex())
        nursery.start_soon(crcs.compute)
        await nursery.start(
            lambda task_status: produce(plan, 0, end, crcs, send_channel, chunk_size=4096, task_status=task_status)
        )
        assert len(producer_children()) == 1
        nursery.cancel_scope.cancel()
    assert producer_children() == []
    assert receive_channel.statistics().open_send_channels == 1  # never closed: no clean end


@pytest.mark.parametrize("chunk_size", [256 * 1024, 64 * 1024 * 1024])  # the second past pipe-max-size
async def test_stdout_pipe_is_widened_to_hold_several_chunks(chunk_size: int) -> None:
    process = await trio.lowlevel.open_process(["true"], stdout=subprocess.PIPE)
    assert process.stdout is not None
    _widen_pipe(process.stdout, chunk_size)
    assert fcntl.fcntl(process.stdout.fileno(), fcntl.F_GETPIPE_SZ) >= min(PIPE_SIZE, _pipe_max_size())
    await process.wait()
    await process.stdout.aclose()


def _pipe_max_size() -> int:
    with open("/proc/sys/fs/pipe-max-size") as file:
        return int(file.read())


def test_producer_starts_quickly_with_the_standard_library_only() -> None:
    subprocess.run([*producer.COMMAND], input=b"Z", check=True)  # it runs (~15 ms here: README, the benchmark)
    imports = subprocess.run(
        [*producer.COMMAND[:3], "-X", "importtime", *producer.COMMAND[3:]], input=b"Z", capture_output=True, check=True
    ).stderr.decode()
    modules = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in imports.splitlines()[1:]}
    assert modules <= {*sys.stdlib_module_names, "archiver"}, modules - set(sys.stdlib_module_names)
    assert "typing" not in modules  # ~7 ms of every start


# Races: what changes between the listing and the producer's reading must never be sent as if whole.


def big_album(storage: Path, size: int = 3_000_000) -> Path:
    album = storage / "album"
    write_tree(album, {"a.jpg": os.urandom(3_000_000), "b/c.jpg": os.urandom(size), "b/e.txt": b""})
    return album


OUTSIDE = b"SECRET-OUTSIDE-THE-STORAGE" * 1000


@pytest.mark.parametrize(
    "change",
    [
        "file_to_link",
        "directory_to_link",
        "truncate",
        "grow",
        "rewrite_same_size",
        "replaced_same_size",
        "file_to_fifo",
        "file_to_directory",
        "delete",
        "delete_empty",
    ],
)
# b/c.jpg moved by sendfile, or copied with its header (COPY_LIMIT)
@pytest.mark.parametrize("size", [3_000_000, 10_000])
async def test_a_file_changed_mid_download_fails_it_and_nothing_outside_is_sent(
    storage: Path, tmp_path: Path, change: str, size: int
) -> None:
    album = big_album(storage, size)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c.jpg").write_bytes(OUTSIDE)
    plan = plan_of(album)
    # The CRCs are known (a warm index, but for files written within its racy window, which are
    # read again: then the CRC's reader may be the one to see the change first).
    index = CrcIndex()
    await collect(plan, index=index)

    def make_change() -> None:
        target = album / "b" / "c.jpg"
        if change == "file_to_link":
            target.unlink()
            target.symlink_to(outside / "c.jpg")
        elif change == "directory_to_link":
            (album / "b").rename(tmp_path / "b-moved")
            (album / "b").symlink_to(outside)
        elif change == "truncate":
            os.truncate(target, 1000)
        elif change == "grow":
            with open(target, "ab") as file:
                file.write(b"more")
        elif change == "rewrite_same_size":
            status = target.stat()
            with open(target, "r+b") as file:
                file.write(b"X" * 100)
            os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))
        elif change == "replaced_same_size":  # another file, renamed over it
            (album / "b" / "new").write_bytes(b"N" * target.stat().st_size)
            (album / "b" / "new").rename(target)
        elif change == "file_to_fifo":
            target.unlink()
            os.mkfifo(target)
        elif change == "file_to_directory":
            target.unlink()
            target.mkdir()
        elif change == "delete":
            target.unlink()
        else:
            (album / "b" / "e.txt").unlink()  # an empty file: no data to send, but still checked

    received: list[bytes] = []
    send_channel, receive_channel = trio.open_memory_channel[bytes](0)
    crcs = CrcSource(plan, plan.crc_entries(0, (plan.length or 0) - 1), index)
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crcs.compute)
            nursery.start_soon(lambda: produce(plan, 0, (plan.length or 0) - 1, crcs, send_channel, chunk_size=4096))
            received.append(await receive_channel.receive())
            make_change()
            async for chunk in receive_channel:
                received.append(chunk)
    failure = raised.value.exceptions[0]
    assert isinstance(failure, (ProducerFailed, FileChanged)), failure
    # (A folder swapped: whichever of its files is opened first is named.)
    assert {"delete_empty": "b/e.txt", "directory_to_link": "b/"}.get(change, "b/c.jpg") in str(failure)
    if change in ("file_to_fifo", "file_to_directory") and isinstance(failure, ProducerFailed):
        # (The CRC reader, re-reading a file written within its racy window, may see the change first.)
        assert "not a regular file" in str(failure)
    assert b"SECRET-OUTSIDE" not in b"".join(received)
    assert producer_children() == []


def test_a_file_cut_short_under_sendfile_ends_the_output_there(storage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file cut short between its check and its bytes' move (sendfile finds its end early) ends the
    producer's output there: nothing that follows it goes out, as the next record would if the
    producer went on and left the file to its check once read, which, its output a pipe not read
    yet, comes only once the reader has taken the bytes.  The next record would then go out at an
    earlier offset than planned before the failure, bytes a client's resume keeps.  Found by helper
    185's mutation testing: with the short sendfile taken as the file's end, every test passed (the
    reader had mostly taken the pipe's bytes by then)."""
    from archiver.archive import producer_protocol as program

    data = os.urandom(100_000)  # past COPY_LIMIT: moved by sendfile
    write_tree(storage / "album", {"a.jpg": data})
    path = storage / "album" / "a.jpg"
    status = path.stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    real_check = producer_program.check_identity

    def check_then_cut(fd: int, key: program.FileKey, uncached: bool = False) -> None:
        real_check(fd, key, uncached)
        os.truncate(path, 0)  # after the check before its bytes go out

    monkeypatch.setattr(producer_program, "check_identity", check_then_cut)
    left_to_its_check = threading.Event()
    real_check_once_read = producer_output.Output.check_once_read

    def noted(output: producer_output.Output, *args: Any) -> None:
        real_check_once_read(output, *args)
        left_to_its_check.set()

    monkeypatch.setattr(producer_output.Output, "check_once_read", noted)
    instructions = (
        program.album(os.fsencode(storage / "album"), 0)
        + program.literal(b"ITS-HEADER")  # in the pipe, not read: the file's check waits for it
        + program.file_slice(b"a.jpg", program.identity(key), 0, len(data), None)
        + program.literal(b"THE-NEXT-RECORD")
        + program.DONE
    )
    read_end, write_end = os.pipe()
    produced = done = False
    received = bytearray()

    def read_all() -> None:  # once the file is left to its check, or the producer has stopped
        while not (left_to_its_check.wait(0.01) or done):
            pass
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        with pytest.raises(program.FileChanged, match=r"a\.jpg"):
            producer_program.Producer(
                io.BufferedReader(io.BytesIO(instructions)), producer_output.Output(write_end)
            ).run()
            produced = True
    finally:
        done = True
        os.close(write_end)
        reader.join(10)
        os.close(read_end)
    assert not produced and not reader.is_alive()
    assert bytes(received) == b"ITS-HEADER"


@pytest.mark.parametrize("change", ["same bytes written again", "rewritten at its end", "touched", "truncated"])
@pytest.mark.parametrize("compression", [0, 6], ids=["stored, read whole for its racy CRC", "deflated"])
async def test_a_file_changed_while_the_producer_reads_it_through_fails_the_download(
    storage: Path, monkeypatch: pytest.MonkeyPatch, change: str, compression: int
) -> None:
    """A file the producer reads through (deflating it, or reading it whole to check a racy CRC against
    its bytes) changes while it is read: the download fails, naming it.  Deflated, a file rewritten
    ahead of the read would otherwise go out torn (its CRC the producer's own, of the bytes read), as
    a file that never was; stored, the bytes may even match the CRC.  The producer's check of the file
    once read catches every change (helper 118: without it, deflated or stored, every test passed)."""
    monkeypatch.setattr(ctime_trust_module, "RACY_NS", 10**15)  # every CRC racy: checked as it is sent
    album = storage / "album"
    write_tree(album, {"a.jpg": os.urandom(3_000_000), "b.jpg": b"b"})
    plan = plan_of(album, compression)
    target = album / "a.jpg"

    def make_change() -> None:
        status = target.stat()
        if change == "touched":
            os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns + SECOND))
            return
        if change == "truncated":
            os.truncate(target, status.st_size - 100)
            return
        with open(target, "r+b") as file:
            file.seek(-100, os.SEEK_END)
            end = file.read()
            file.seek(-100, os.SEEK_END)
            file.write(end if change == "same bytes written again" else bytes(100))
        os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))

    received: list[bytes] = []
    send_channel, receive_channel = trio.open_memory_channel[bytes](0)
    stored = plan.crc_entries(0, plan.length - 1) if plan.length is not None else plan.entries_stored_when_deflating()
    crcs = CrcSource(plan, stored, CrcIndex())
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crcs.compute)
            nursery.start_soon(lambda: produce(plan, 0, (plan.length or 0) - 1, crcs, send_channel, chunk_size=4096))
            received.append(await receive_channel.receive())
            assert plan.length is None or crcs.racy(0)  # read whole as it goes
            make_change()  # a.jpg being read: 3 MB, past the pipe and the channel
            async for chunk in receive_channel:
                received.append(chunk)
    failure = raised.value.exceptions[0]
    assert isinstance(failure, (ProducerFailed, FileChanged)), failure
    assert "a.jpg" in str(failure)
    assert not zipfile.is_zipfile(io.BytesIO(b"".join(received)))


async def test_a_file_rewritten_with_size_and_mtime_kept_gets_its_new_crc(storage: Path) -> None:
    album = storage / "album"
    write_tree(album, {"a.jpg": os.urandom(10_000)})
    index = CrcIndex()
    await collect(plan_of(album), index=index)  # its CRC is in the index now
    path = album / "a.jpg"
    status = path.stat()
    with open(path, "r+b") as file:
        file.write(os.urandom(10_000))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    data = await collect(plan_of(album), index=index)
    assert read_archive(data) == {"a.jpg": path.read_bytes()}


def test_a_file_rewritten_while_its_bytes_wait_in_the_pipe_fails(storage: Path) -> None:
    """sendfile leaves references to the file's pages in the pipe, not copies: a write before the
    reader takes them changes what it reads.  So the producer checks a file again only once the
    reader has taken its bytes, and a rewrite in that window is a failure naming the file."""
    from archiver.archive import producer_protocol as program

    album = storage / "album"
    write_tree(album, {"a.jpg": os.urandom(32_768)})  # fits a pipe's default 64 KiB
    path = album / "a.jpg"
    status = path.stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    instructions = program.album(os.fsencode(album), 0) + program.file_slice(
        b"a.jpg", program.identity(key), 0, 32_768, None
    )
    with _producer(stderr=subprocess.PIPE) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        process.stdin.write(instructions + program.DONE)
        process.stdin.close()
        deadline = time.monotonic() + 10
        while _unread(process.stdout.fileno()) < 32_768:  # every byte of the file is in the pipe
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.001)
        with open(path, "r+b") as file:
            file.write(b"X" * 100)
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
        process.stdout.read()
        assert process.wait(10) == program.EXIT_CHANGED
        assert b"a.jpg" in process.stderr.read()


@pytest.mark.parametrize("mode", ["stored", "deflated"])
def test_nothing_after_a_check_goes_out_before_the_files_sent_are_checked_once_read(storage: Path, mode: str) -> None:
    """Before a central directory (stored: the ``C`` instruction, CHECKED; deflated: the producer's own, at
    ``E``), the producer waits for the reader to take every byte sent, then checks each file, and only
    then writes the central directory, whose first byte the service takes as the proof that the files'
    bytes stand (``web.tail_hold``).  A file rewritten while its pages wait in the pipe (here a file a
    deflated archive stores: one near 4 GiB, ``zipformat.stored_when_deflating``): the central directory
    never goes out (helper 118: a check that did not wait passed every test, stored or deflated, the
    end's own check catching the change later)."""
    from archiver.archive import producer_protocol as program

    album = storage / "album"
    data = random.Random(118).randbytes(32_768)
    assert b"PK\x01\x02" not in data
    write_tree(album, {"a.jpg": data})
    path = album / "a.jpg"
    status = path.stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    if mode == "stored":
        sent = len(data)
        instructions = (
            program.album(os.fsencode(album), 0)
            + program.file_slice(b"a.jpg", program.identity(key), 0, len(data), None)
            + program.CHECKED
            + program.literal(b"PK\x01\x02 the central directory")
        )
    else:
        fields = plan_of(album, 6).fields(0)
        sent = LOCAL_HEADER_FIXED + len(fields.name) + len(fields.extra) + len(data)  # its local header and data
        instructions = (
            program.album(os.fsencode(album), 6)
            + program.stored_entry(b"a.jpg", key, fields, zlib.crc32(data), False)
            + program.END
        )
    with _producer(stderr=subprocess.PIPE) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        process.stdin.write(instructions + program.DONE)
        process.stdin.close()
        deadline = time.monotonic() + 10
        while _unread(process.stdout.fileno()) < sent:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.001)
        with open(path, "r+b") as file:
            file.write(b"X" * 100)
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
        output = process.stdout.read()
        assert process.wait(10) == program.EXIT_CHANGED
        assert len(output) == sent and b"PK\x01\x02" not in output
        assert b"a.jpg" in process.stderr.read()


def test_a_producer_whose_reader_died_exits_while_it_waits_for_the_pipe_to_drain(storage: Path) -> None:
    """The service killed (SIGKILL) while a file's bytes wait in the pipe: the producer does not
    wait for a reader that will never come; it exits like a write to a broken pipe."""
    from archiver.archive import producer_protocol as program

    album = storage / "album"
    write_tree(album, {"a.jpg": os.urandom(32_768)})
    status = (album / "a.jpg").stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    instructions = program.album(os.fsencode(album), 0) + program.file_slice(
        b"a.jpg", program.identity(key), 0, 32_768, None
    )
    with _producer() as process:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(instructions + program.DONE)
        process.stdin.close()
        deadline = time.monotonic() + 10
        while _unread(process.stdout.fileno()) < 32_768:  # written, waiting for the reader
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.001)
        process.stdout.close()  # the reader dies
        assert process.wait(5) == program.EXIT_OUTPUT_CLOSED


@contextmanager
def _producer(stderr: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """The producer program run alone, its stdin and stdout piped; killed if the test fails first
    (helper 105: left blocked on its pipe otherwise)."""
    process = subprocess.Popen([*producer.COMMAND], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def _unread(fd: int) -> int:
    count = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return int.from_bytes(count, sys.byteorder)


def test_producer_refuses_input_that_is_not_its_own() -> None:
    result = subprocess.run([*producer.COMMAND], input=b"Q garbage", capture_output=True)
    assert result.returncode == 2 and b"archiver-producer" in result.stderr
    result = subprocess.run([*producer.COMMAND], input=b"", capture_output=True)
    assert result.returncode == 2  # the input ended without its end: never a clean exit


def test_producer_refuses_an_album_whose_path_leads_through_a_link(storage: Path, tmp_path: Path) -> None:
    """The album's real path, with a folder on it swapped for a link since it was planned: the
    producer opens it a folder at a time from "/" and refuses, even where the file planned is
    the one the link leads to (its identity matches: the walk could have been misled the same way)."""
    from archiver.archive import producer_protocol as program

    secret = tmp_path / "outside" / "pub" / "secret.txt"
    write_tree(secret.parent, {"secret.txt": OUTSIDE})
    status = secret.stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    (storage / "x").symlink_to(tmp_path / "outside")
    instructions = program.album(os.fsencode(storage / "x" / "pub"), 0) + program.file_slice(
        b"secret.txt", program.identity(key), 0, len(OUTSIDE), None
    )
    result = subprocess.run([*producer.COMMAND], input=instructions + program.DONE, capture_output=True)
    assert result.returncode == program.EXIT_CHANGED and result.stdout == b""
    assert b"the album" in result.stderr


def test_no_descriptor_left_for_the_album_is_out_of_resources_not_a_change(storage: Path) -> None:
    """Out of descriptors at the album's open (a tight LimitNOFILE): exit 4, the 503 to try again,
    not exit 3, "the album is changing" (helper 116: every error there was a change)."""
    from archiver.archive import producer_protocol as program

    write_tree(storage / "album", {"a.jpg": b"a"})
    status = (storage / "album" / "a.jpg").stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    instructions = program.album(os.fsencode(storage / "album"), 0) + program.file_slice(
        b"a.jpg", program.identity(key), 0, 1, None
    )
    # The program imported, then the limit set to the lowest free descriptor: its next open fails.
    run_out = (
        "import os, resource, sys; "
        f"sys.path.insert(0, {str(producer.PROGRAM.parents[2])!r}); "
        "from archiver.archive.producer_program import main; "
        "held = {int(fd) for fd in os.listdir('/proc/self/fd')}; "
        "free = min(set(range(len(held) + 1)) - held); "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (free, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
        "sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", run_out], input=instructions + program.DONE, capture_output=True
    )
    assert result.returncode == program.EXIT_OUT_OF_RESOURCES and result.stdout == b"", result
    assert b"the album" in result.stderr and b"Too many open files" in result.stderr


@pytest.mark.parametrize(
    ("size", "verified"), [(1000, False), (100_000, False), (100_000, True)], ids=["copied", "sendfile", "verified"]
)
def test_a_slice_past_the_planned_size_is_refused_before_any_byte(storage: Path, size: int, verified: bool) -> None:
    """A slice that ends past its file's planned size (which the file has) is no slice of the plan's:
    refused as a file changed, nothing written, however it would be sent (copied, by sendfile, or
    read whole for its CRC, which wrote the part within the file and exited 0 as if whole).  Found
    by helper 169's coverage run: no test reached the producer's check."""
    from archiver.archive import producer_protocol as program

    data = os.urandom(size)
    write_tree(storage / "album", {"a.jpg": data})
    status = (storage / "album" / "a.jpg").stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    crc = zlib.crc32(data) if verified else None
    # Bytes 10 .. size + 9: 10 past the end.
    instructions = program.album(os.fsencode(storage / "album"), 0) + program.file_slice(
        b"a.jpg", program.identity(key), 10, size, crc
    )
    result = subprocess.run([*producer.COMMAND], input=instructions + program.DONE, capture_output=True)
    assert (result.returncode, result.stdout) == (program.EXIT_CHANGED, b""), result
    assert result.stderr == b"archiver-producer: a.jpg: slice past the planned size\n"


def test_producer_refuses_paths_that_climb_out(storage: Path) -> None:
    from archiver.archive import producer_protocol as program

    write_tree(storage / "album", {"a.jpg": b"a"})
    (storage / "secret").write_bytes(b"s")
    status = (storage / "secret").stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    # Links to it, a file's and a folder's: never followed, though the file is the one planned
    # (helper 118's kind of mutation: without O_NOFOLLOW, only the identity check stood, and
    # this planned identity passes it).
    (storage / "album" / "link").symlink_to(storage / "secret")
    (storage / "album" / "folder-link").symlink_to(storage)
    climbing = (b"../secret", b"/etc/passwd", b"/secret", b"..", b"./../secret", b"a//b", b"a.jpg/..")
    for path in (*climbing, b"link", b"folder-link/secret"):
        instructions = program.album(os.fsencode(storage / "album"), 0) + program.file_slice(
            path, program.identity(key), 0, 1, None
        )
        result = subprocess.run([*producer.COMMAND], input=instructions + program.DONE, capture_output=True)
        assert result.returncode == 3 and result.stdout == b"", (path, result)
