"""Several instances behind a real nginx (deploy/nginx.conf): one dies or restarts, clients do not notice.

Two ``python -m archiver`` processes share one storage, each on its own port,
with nginx in front exactly as shipped (upstream lines and ports substituted).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from .conftest import CLIENT_TLS, files_on_disk, producer_processes, read_archive, write_tree
from .test_cli import Launched, launched
from .test_deploy import needs_nginx, nginx_in_front
from .test_observability import samples

pytestmark = needs_nginx

ABORTED = (httpx.RemoteProtocolError, httpx.ReadError)


@pytest.fixture
def shared_storage(tmp_path: Path) -> Path:
    storage = tmp_path / "storage"
    write_tree(storage / "small", {"photo.jpg": os.urandom(100_000), "notes.txt": b"notes"})
    # About 2 s at 1 MB/s: long enough to be in flight when something happens.
    write_tree(storage / "slow", {f"{index}.jpg": os.urandom(500_000) for index in range(4)})
    # About 8 s at 1 MB/s: its producer outlives the first seconds of the download even on a loaded
    # machine (a producer waits for the pipe to drain before it exits, and 2 MB is gone in ~1 s).
    write_tree(storage / "long", {f"{index}.jpg": os.urandom(500_000) for index in range(16)})
    return storage


def instance_command(storage: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", str(port), "-D", str(storage)]


@asynccontextmanager
async def instances(storage: Path, count: int, **settings: str) -> AsyncIterator[list[Launched]]:
    env = {f"ARCHIVER_{name.upper()}": value for name, value in settings.items()}
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(launched(instance_command(storage, 0), env)) for _ in range(count)]


async def download_small(front: str, storage: Path) -> None:
    async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=front, timeout=30) as client:
        response = await client.get("/archive/small/")
    assert response.status_code == 200, response.text
    assert read_archive(response.content) == files_on_disk(storage / "small")


async def serving(instance: Launched) -> bool:
    """Whether ``instance`` has a download in flight (its producer may be done already: a small album fits the pipe)."""
    async with httpx.AsyncClient(verify=CLIENT_TLS) as scraper:
        figures = samples((await scraper.get(f"{instance.url}/metrics")).text)
    finished = sum(value for key, value in figures.items() if key.startswith("archiver_downloads_finished_total"))
    return figures["archiver_downloads_started_total"] > finished


async def test_instance_killed_mid_download_fails_its_transfers_and_nobody_elses(
    shared_storage: Path, tmp_path: Path
) -> None:
    async with (
        instances(shared_storage, 2, rate_limit="1000000") as (first, second),
        nginx_in_front([first.url, second.url], tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front, timeout=30) as client,
        client.stream("GET", "/archive/long/") as doomed,
    ):
        chunks = doomed.aiter_raw()
        await anext(chunks)
        victim = first if await serving(first) else second
        survivor = second if victim is first else first
        assert await serving(victim)
        orphans = [(child.pid, _start_time(child.pid)) for child in producer_processes(victim.process.pid)]
        assert orphans and all(started is not None for _, started in orphans)  # soon without its parent
        os.kill(victim.process.pid, signal.SIGKILL)
        await victim.process.wait()
        # The download in flight on the killed instance ends as a failed transfer, not a short file.
        with pytest.raises(ABORTED):
            async for _ in chunks:
                pass
        # Every request started after the kill succeeds: nginx goes to the instance that is left.
        for _ in range(6):
            await download_small(front, shared_storage)
        async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=survivor.url) as direct:
            assert (await direct.get("/healthz")).status_code == 200
        # The killed instance's producer ends too (its pipe's reader is gone), orphaned but not for long.
        with trio.fail_after(10):
            while any(_start_time(pid) == started for pid, started in orphans):
                await trio.sleep(0.02)


def _start_time(pid: int) -> str | None:
    """Process ``pid``'s start time (``/proc/<pid>/stat``'s 22nd field) while it runs; None once it has ended.

    A forked producer's command line is the service's: it names no producer.
    The start time tells the producer from a later process given its pid.
    """
    try:
        with open(f"/proc/{pid}/stat") as file:
            state, *fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if state in ("Z", "X") else fields[18]


async def test_a_full_instance_hands_its_requests_to_the_next(shared_storage: Path, tmp_path: Path) -> None:
    # One job per instance: while a slow download holds one, its 503s go to the other.
    async with (
        instances(shared_storage, 2, max_jobs="1", rate_limit="1000000") as (first, second),
        nginx_in_front([first.url, second.url], tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front, timeout=30) as client,
        client.stream("GET", "/archive/slow/") as holding,
    ):
        holding_chunks = holding.aiter_raw()  # kept: a dropped iterator closes the response
        await anext(holding_chunks)
        for _ in range(6):
            await download_small(front, shared_storage)
        refusals = sum(
            float(line.split()[-1])
            for instance in (first, second)
            for line in httpx.get(f"{instance.url}/metrics", verify=CLIENT_TLS).text.splitlines()
            if line.startswith('archiver_downloads_rejected_total{reason="job_limit"}')
        )
    # nginx met at least one 503 on the way (round robin sends every other request to the full
    # instance) and the client saw none.
    assert refusals >= 1


async def test_restart_of_one_instance_under_load_loses_no_download(shared_storage: Path, tmp_path: Path) -> None:
    outcomes: list[str] = []
    addresses = iter(f"127.0.0.{10 + index}" for index in range(100))

    async def one_download(front: str) -> None:
        # Each download a client of its own (nginx passes its address on), as on the internet.
        transport = httpx.AsyncHTTPTransport(verify=CLIENT_TLS, local_address=next(addresses))
        async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=front, transport=transport, timeout=30) as client:
            try:
                response = await client.get("/archive/slow/")
            except httpx.HTTPError as error:
                outcomes.append(f"error: {error!r}")
                return
        if response.status_code != 200:
            outcomes.append(f"status {response.status_code}")
        elif read_archive(response.content) != files_on_disk(shared_storage / "slow"):
            outcomes.append("wrong archive")
        else:
            outcomes.append("complete")

    async with (
        instances(shared_storage, 2, rate_limit="2000000", shutdown_grace="4") as (first, second),
        nginx_in_front([first.url, second.url], tmp_path / "nginx") as front,
        trio.open_nursery() as nursery,
    ):
        # Downloads keep starting, on both instances, while the first one is stopped.
        for _ in range(6):
            nursery.start_soon(one_download, front)
        with trio.fail_after(10):
            while not (await serving(first) and await serving(second)):
                await trio.sleep(0.02)
        first.process.terminate()  # SIGTERM: stop accepting, let downloads finish within the grace period
        for _ in range(6):
            nursery.start_soon(one_download, front)
            await trio.sleep(0.1)  # spread over the shutdown (the load, not a synchronisation)
        assert await first.process.wait() == 0
        # ... and once it is gone, its port is refused: nginx goes to the other one.
        for _ in range(4):
            nursery.start_soon(one_download, front)
        # Started again on its port, it takes its share again.
        port = first.url.rsplit(":", 1)[1]
        async with launched(instance_command(shared_storage, int(port)), {"ARCHIVER_SHUTDOWN_GRACE": "1"}) as restarted:
            async with trio.open_nursery() as after_restart:
                for _ in range(4):
                    after_restart.start_soon(one_download, front)
            async with httpx.AsyncClient(verify=CLIENT_TLS) as scraper:
                metrics = (await scraper.get(f"{restarted.url}/metrics")).text
    assert outcomes == ["complete"] * 20
    assert "archiver_downloads_started_total 0.0" not in metrics  # the restarted instance served some
