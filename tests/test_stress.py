"""Stress and soak tests (marked slow: `make test-slow`). Each prints its figures at the end of the run."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from archiver.config import Settings

from .conftest import (
    PROTOCOLS,
    make_client,
    producer_children,
    read_archive,
    record_figure,
    running_server,
    wait_until_no_producer_children,
    write_tree,
)
from .test_cli import launched

pytestmark = pytest.mark.slow

ABORTED = (httpx.RemoteProtocolError, httpx.ReadError)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def descriptor_table() -> dict[str, str]:
    """This process's open descriptors and what each names (a file, ``socket:[inode]``, ``pipe:[inode]``)."""
    table = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            table[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
    return table


async def wait_for_descriptors(baseline: int, timeout: float) -> int:
    """Poll until this process's open descriptors are back to ``baseline``; return the last count."""
    with trio.move_on_after(timeout):
        while open_descriptors() > baseline:
            await trio.sleep(0.05)
    return open_descriptors()


async def cancelled_download(url: str, protocol: str, stop_after: int) -> None:
    """Download, and leave (close the connection) once ``stop_after`` bytes have arrived."""
    async with make_client(url, protocol) as client, client.stream("GET", "/archive/album/") as response:
        received = 0
        chunks = response.aiter_raw()
        while received < stop_after:
            received += len(await anext(chunks))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Every client here comes from 127.0.0.1: one client to the per-client job
    # cap, which these tests are not about (tests/test_adversarial.py is).
    return replace(settings, max_jobs_per_client=settings.max_jobs)


async def test_thousand_cancelled_downloads_leave_no_process_or_descriptor(storage: Path, settings: Settings) -> None:
    write_tree(storage / "album", {f"photo-{i}.jpg": os.urandom(1024 * 1024) for i in range(8)})
    size = 8 * 1024 * 1024
    rng = random.Random(20261125)
    async with running_server(settings) as url:
        await cancelled_download(url, "HTTP/1.1", 1)  # warm up: imports, lazily made objects
        await wait_until_no_producer_children(timeout=10)
        baseline = await wait_for_descriptors(open_descriptors(), 0)
        before = descriptor_table()
        limiter = trio.Semaphore(8)

        async def one(protocol: str) -> None:
            async with limiter:
                await cancelled_download(url, protocol, rng.randrange(0, size))

        async with trio.open_nursery() as nursery:
            for index in range(1000):
                nursery.start_soon(one, PROTOCOLS[index % 2])
        await wait_until_no_producer_children(timeout=10)
        leftover_producers = len(producer_children())
        zombies = sum(child.state == "Z" for child in producer_children())
        descriptors = await wait_for_descriptors(baseline, timeout=5)
        added = {fd: name for fd, name in descriptor_table().items() if before.get(fd) != name}
    record_figure(
        f"1000 cancelled downloads (HTTP/1.1 + HTTP/2): leftover producers {leftover_producers}, zombies {zombies}, "
        f"open fds {descriptors} (baseline {baseline})"
    )
    assert leftover_producers == zombies == 0
    assert descriptors <= baseline, f"descriptors opened since the baseline and still open: {added}"


async def test_64_concurrent_downloads_of_50_mb_are_byte_correct(storage: Path, settings: Settings) -> None:
    write_tree(storage / "album", {f"photo-{i:02d}.jpg": os.urandom(2_500_000) for i in range(20)})
    async with running_server(settings) as url:
        async with make_client(url, "HTTP/1.1") as client:
            reference = (await client.get("/archive/album/")).content
        expected = read_archive(reference)
        assert len(expected) == 20
        digests: list[str] = []

        async def one(protocol: str) -> None:
            digest = hashlib.sha256()
            async with make_client(url, protocol) as client, client.stream("GET", "/archive/album/") as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
            digests.append(digest.hexdigest())

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for index in range(64):
                nursery.start_soon(one, PROTOCOLS[index % 2])
        elapsed = trio.current_time() - started
    correct = digests.count(hashlib.sha256(reference).hexdigest())
    record_figure(
        f"64 concurrent downloads of {len(reference) / 1e6:.0f} MB: {correct}/64 byte-identical to a verified "
        f"archive, {64 * len(reference) / elapsed / 1e6:.0f} MB/s aggregate"
    )
    assert correct == 64


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_slow_reader_keeps_server_memory_flat(large_storage: Path) -> None:
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(large_storage)]
    async with (
        launched(command) as server,
        make_client(server.url, "HTTP/1.1") as client,
        client.stream("GET", "/archive/big/") as response,
    ):
        chunks = response.aiter_raw(65536)
        await anext(chunks)
        before = peak = resident_kib(server.process.pid)
        started = trio.current_time()
        received = 0
        while (elapsed := trio.current_time() - started) < 30:
            received += len(await anext(chunks))
            await trio.sleep_until(started + received / 1_000_000)  # read at 1 MB/s
            peak = max(peak, resident_kib(server.process.pid))
    growth_mb = (peak - before) / 1024
    record_figure(
        f"client reading at 1 MB/s for {elapsed:.0f} s ({received / 1e6:.0f} MB): server RSS {before / 1024:.1f} MB "
        f"-> peak {peak / 1024:.1f} MB, growth {growth_mb:.1f} MB"
    )
    assert growth_mb < 20


async def test_zip_killed_mid_stream_is_seen_by_every_client(large_storage: Path) -> None:
    settings = Settings(settle_time=0, storage_dir=large_storage, host="127.0.0.1", port=0)
    errors_seen = {protocol: 0 for protocol in PROTOCOLS}
    rounds = 25
    async with running_server(settings) as url:
        for protocol in PROTOCOLS:
            for _ in range(rounds):
                try:
                    async with make_client(url, protocol) as client, client.stream("GET", "/archive/big/") as response:
                        chunks = response.aiter_raw()
                        await anext(chunks)
                        for child in producer_children():
                            os.kill(child.pid, signal.SIGKILL)
                        async for _ in chunks:
                            pass
                except ABORTED:
                    errors_seen[protocol] += 1
                await wait_until_no_producer_children(timeout=10)
    record_figure(
        "producer killed (SIGKILL) mid-stream: clients that saw an error: "
        + ", ".join(f"{protocol} {seen}/{rounds}" for protocol, seen in errors_seen.items())
    )
    assert errors_seen == {protocol: rounds for protocol in PROTOCOLS}
