"""Storage that stops answering mid-download (a FUSE mount whose reads hang): the service stays up, the download fails.

A producer blocked in a read of dead storage must not take the service's event loop
with it, and the storage timeout must end the download: aborted, producer killed and
reaped, nothing left.  SIGSTOP (tests/test_failures.py) cannot show the first: a
stopped process is never stopped inside a system call.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from .conftest import free_port, producer_processes, read_archive
from .test_cli import Launched, launched
from .test_failures import ABORTED

GATED_FS = Path(__file__).with_name("gated_fs.py")


def _fuse_unavailable() -> str | None:
    try:
        import mfusepy  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError) as error:  # OSError: no libfuse
        return f"no FUSE binding: {error}"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "no /dev/fuse or fusermount3 (Debian package fuse3)"
    return None


pytestmark = pytest.mark.skipif(_fuse_unavailable() is not None, reason=str(_fuse_unavailable()))


@asynccontextmanager
async def gated_mount(source: Path, mountpoint: Path, gate: Path) -> AsyncIterator[None]:
    """Mount ``source`` read-only at ``mountpoint``; its reads hang while ``gate`` exists."""
    mountpoint.mkdir()
    process = subprocess.Popen([sys.executable, str(GATED_FS), str(source), str(mountpoint), str(gate)])
    try:
        with trio.fail_after(10):
            while not os.path.ismount(mountpoint):
                assert process.poll() is None, "the FUSE file system did not start"
                await trio.sleep(0.02)
        yield
    finally:
        gate.unlink(missing_ok=True)  # first: whatever waits on the storage goes on, and can end
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        process.wait(timeout=10)


@dataclass
class GatedAlbum:
    server: Launched
    client: httpx.AsyncClient
    source: Path  # what the album shows: files put here appear in it
    gate: Path  # present: reads hang; holding a number: each read takes that many seconds


@asynccontextmanager
async def served_gated_album(tmp_path: Path, files: dict[str, bytes], env: dict[str, str]) -> AsyncIterator[GatedAlbum]:
    """A server process (``env`` its settings) whose storage holds ``album``, a gated mount of ``files``."""
    source, storage, gate = tmp_path / "source", tmp_path / "storage", tmp_path / "gate"
    source.mkdir()
    storage.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    command = [sys.executable, "-m", "archiver", "-D", str(storage), "-H", "127.0.0.1", "-P", str(free_port())]
    # The mount inside the server's lifetime: its end opens the gate first, so that a server
    # stuck on the storage (the fault these tests are about) can be stopped.
    async with (
        launched(command, env) as server,
        gated_mount(source, storage / "album", gate),
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        yield GatedAlbum(server, client, source, gate)


async def test_a_read_hanging_mid_download_fails_the_download_not_the_service(tmp_path: Path) -> None:
    files = {f"photo-{i}.jpg": os.urandom(8 * 1024 * 1024) for i in range(4)}
    env = {"ARCHIVER_STORAGE_TIMEOUT": "1", "ARCHIVER_STALL_TIMEOUT": "60"}
    async with served_gated_album(tmp_path, files, env) as album:
        server, client, gate = album.server, album.client, album.gate
        # Once whole: the CRCs are then known, and the producer is the one to meet the hang.
        whole = await client.get("/archive/album/")
        assert whole.status_code == 200 and read_archive(whole.content) == files
        received = 0
        with pytest.raises(ABORTED), trio.fail_after(20):
            async with client.stream("GET", "/archive/album/") as response:
                async for chunk in response.aiter_raw():
                    if not received:
                        gate.touch()  # from now on every read of the storage hangs
                        # The service answers meanwhile: its event loop is not stuck behind the producer.
                        with trio.fail_after(3):
                            assert (await client.get("/healthz")).status_code == 200
                    received += len(chunk)
        assert received < len(whole.content)
        with trio.fail_after(10):
            while producer_processes(server.process.pid):
                await trio.sleep(0.02)
        with trio.fail_after(3):
            assert (await client.get("/healthz")).status_code == 200
    assert b"failed: nothing came from the storage" in bytes(server.output)


async def test_slow_storage_deflating_zeros_is_no_hang(tmp_path: Path) -> None:
    # Zeros deflate to almost nothing: without the producer's heartbeat (a sync flush when
    # nothing went out for a second, across files), the pipe would stay silent for the whole
    # album, longer than the storage timeout, though no file alone takes a second.
    files = {f"zeros-{i}.bin": bytes(512 * 1024) for i in range(10)} | {"after.txt": b"still here"}
    env = {"ARCHIVER_STORAGE_TIMEOUT": "3", "ARCHIVER_COMPRESSION": "6"}
    async with served_gated_album(tmp_path, files, env) as album:
        album.gate.write_text("0.25")  # each read (the kernel asks 128-256 KiB) takes 0.25 s: ~5 s for the zeros
        client = album.client
        started = trio.current_time()
        response = await client.get("/archive/album/")
        took = trio.current_time() - started
    assert response.status_code == 200 and read_archive(response.content) == files
    assert took > 3  # else the storage was not slow enough for this test to prove anything


async def test_a_stopped_producer_is_seen_while_later_crcs_are_still_read(tmp_path: Path) -> None:
    # The CRC of a later cold file, read ahead on slow storage, advances all along; it is
    # not what the download waits for while the producer, stopped, owes the bytes before it.
    first = os.urandom(8 * 1024 * 1024)
    async with served_gated_album(tmp_path, {"a-first.jpg": first}, {"ARCHIVER_STORAGE_TIMEOUT": "1"}) as album:
        server, client, source, gate = album.server, album.client, album.source, album.gate
        assert read_archive((await client.get("/archive/album/")).content) == {"a-first.jpg": first}
        with open(source / "b-later.mov", "wb") as later:
            later.truncate(64 * 1024 * 1024)  # cold: ~25 s to read at the pace below
        gate.write_text("0.05")
        with pytest.raises(ABORTED), trio.fail_after(10):
            async with client.stream("GET", "/archive/album/") as response:
                async for _ in response.aiter_raw():
                    for producer in producer_processes(server.process.pid):
                        os.kill(producer.pid, signal.SIGSTOP)
        with trio.fail_after(10):
            while producer_processes(server.process.pid):
                await trio.sleep(0.02)
    assert b"failed: nothing came from the storage" in bytes(server.output)
