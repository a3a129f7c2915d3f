"""Producer: zip's output through a bounded channel, failure status, and cancellation."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from archiver.producer import (
    EMPTY_ZIP,
    PIPE_SIZE,
    ZipFailed,
    ZipUnavailable,
    _bytes_in_pipe,
    _widen_pipe,
    find_zip,
    produce_zip,
    zip_arguments,
    zip_input,
)
from archiver.storage import list_album

from .conftest import read_archive, write_tree, zip_children, zip_script

ZIP = zip_arguments(find_zip("zip"), 0)


async def collect(arguments: list[str], album: Path, chunk_size: int = 4096) -> bytes:
    send_channel, receive_channel = trio.open_memory_channel[bytes](2)
    chunks = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: produce_zip(arguments, zip_input(list_album(album)), send_channel, chunk_size=chunk_size)
        )
        async for chunk in receive_channel:
            assert len(chunk) <= chunk_size
            chunks.append(chunk)
    return b"".join(chunks)


async def test_output_is_the_album_archive(storage: Path) -> None:
    tree = {"a.jpg": os.urandom(50_000), "sub/b.txt": b"b"}
    write_tree(storage / "album", tree)
    assert read_archive(await collect(ZIP, storage / "album")) == tree


async def test_compression_setting_deflates(storage: Path) -> None:
    tree = {"text.txt": b"hello " * 10_000}
    write_tree(storage / "album", tree)
    data = await collect(zip_arguments(find_zip("zip"), 9), storage / "album")
    assert read_archive(data) == tree
    assert len(data) < 10_000


async def test_empty_album_is_an_empty_zip_without_running_zip(storage: Path) -> None:
    (storage / "empty").mkdir()
    assert await collect(["/nonexistent/zip"], storage / "empty") == EMPTY_ZIP
    assert read_archive(EMPTY_ZIP) == {}


async def test_failing_zip_raises_and_never_ends_the_channel(storage: Path, tmp_path: Path) -> None:
    write_tree(storage / "album", {"a.jpg": b"a" * 100_000})
    failing = zip_script(tmp_path, "failing-zip", 'head -c 70000 /dev/zero\necho "disk on fire" >&2\nexit 15')
    send_channel, receive_channel = trio.open_memory_channel[bytes](100)
    with pytest.raises(ZipFailed) as caught:
        await produce_zip([failing], zip_input(list_album(storage / "album")), send_channel, chunk_size=8192)
    assert caught.value.returncode == 15
    assert "disk on fire" in caught.value.stderr_tail
    buffered = receive_channel.statistics().current_buffer_used
    received = b"".join(receive_channel.receive_nowait() for _ in range(buffered))
    # The last chunk is held back, and the channel stays open: no clean end.
    assert 0 < len(received) < 70_000
    with pytest.raises(trio.WouldBlock):
        receive_channel.receive_nowait()


async def test_missing_zip_raises_unavailable(storage: Path) -> None:
    write_tree(storage / "album", {"a.jpg": b"a"})
    send_channel, _ = trio.open_memory_channel[bytes](1)
    with pytest.raises(ZipUnavailable):
        await produce_zip(["/nonexistent/zip"], zip_input(list_album(storage / "album")), send_channel, chunk_size=1)
    with pytest.raises(ZipUnavailable, match="apt-get install zip"):
        find_zip("no-such-zip-command")


async def test_cancellation_kills_and_reaps_zip(storage: Path) -> None:
    write_tree(storage / "album", {"a.bin": os.urandom(4 * 1024 * 1024)})
    send_channel, receive_channel = trio.open_memory_channel[bytes](0)
    job = zip_input(list_album(storage / "album"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: produce_zip(ZIP, job, send_channel, chunk_size=4096))
        await receive_channel.receive()
        assert len(zip_children()) == 1  # blocked: nobody reads the channel
        # A download in flight no longer holds its file names: zip has them.
        assert job.take_names() == b""
        nursery.cancel_scope.cancel()
    # produce_zip has returned, so zip must already be reaped.
    assert zip_children() == []


async def test_stdout_pipe_is_widened_to_hold_several_chunks() -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    async with trio.lowlevel.FdStream(read_end) as stdout:
        _widen_pipe(stdout, 256 * 1024)
        size = fcntl.fcntl(stdout.fileno(), fcntl.F_GETPIPE_SZ)
    assert size >= 256 * 1024  # at worst (a low pipe-max-size) one chunk
    with open("/proc/sys/fs/pipe-max-size") as limit:
        if int(limit.read()) >= PIPE_SIZE:
            assert size == PIPE_SIZE


def test_bytes_in_pipe_counts_what_is_waiting_to_be_read() -> None:
    read_end, write_end = os.pipe()
    try:
        assert _bytes_in_pipe(read_end) == 0
        os.write(write_end, b"x" * 5000)
        assert _bytes_in_pipe(read_end) == 5000
    finally:
        os.close(read_end)
        os.close(write_end)


SECRET = b"outside the storage"


def swap_for_link_to_a_secret(storage: Path, tmp_path: Path) -> Path:
    """An album listed with photo.jpg, which is then swapped for a link to a file outside the storage."""
    write_tree(storage / "album", {"photo.jpg": b"a photo of the same length"[: len(SECRET)]})
    (tmp_path / "secret.txt").write_bytes(SECRET)
    listing = storage / "album"
    (listing / "photo.jpg").unlink()
    (listing / "photo.jpg").symlink_to(tmp_path / "secret.txt")
    return listing


async def test_file_swapped_for_a_link_after_listing_never_reaches_the_archive(storage: Path, tmp_path: Path) -> None:
    album = storage / "album"
    write_tree(album, {"photo.jpg": b"photo"})
    job = zip_input(list_album(album))  # listed while photo.jpg is a file...
    swap_for_link_to_a_secret(storage, tmp_path)  # ...then swapped
    send_channel, receive_channel = trio.open_memory_channel[bytes](2)
    received: list[bytes] = []
    # zip -y takes the link as a link, never what it points to; writing to a
    # pipe it then refuses it outright (status 16): the download fails.
    with pytest.RaisesGroup(ZipFailed, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: produce_zip(ZIP, job, send_channel, chunk_size=4096))
            received.extend([chunk async for chunk in receive_channel])
    assert SECRET not in b"".join(received)


@pytest.mark.skipif(shutil.which("bsdtar") is None, reason="bsdtar is not installed")
def test_bsdtar_follows_a_swapped_link_so_it_cannot_be_the_producer(storage: Path, tmp_path: Path) -> None:
    # Why the producer is Info-ZIP and not the faster bsdtar (README, Performance):
    # an mtree manifest, the only way to make bsdtar's output deterministic,
    # has it open each file by path, following a link that replaced it, and
    # it ignores the size declared.  If this ever fails, bsdtar is worth a new look.
    album = swap_for_link_to_a_secret(storage, tmp_path)
    manifest = b"#mtree\n./photo.jpg type=file uid=0 gid=0 mode=0644 time=0 size=5 contents=photo.jpg\n"
    result = subprocess.run(
        ["bsdtar", "-c", "--format", "zip", "--options", "zip:compression=store", "-f", "-", "@-"],
        cwd=album,
        input=manifest,
        capture_output=True,
        check=True,
    )
    assert SECRET in result.stdout
