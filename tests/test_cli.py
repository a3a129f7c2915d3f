"""Both launch ways, as an operator runs them: the console script and hypercorn with hypercorn.toml."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from .conftest import PROTOCOLS, files_on_disk, make_client, read_archive

PROJECT = Path(__file__).resolve().parent.parent
SAMPLE_ALBUM = "holiday-2024"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def launched(command: Sequence[str], env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """Start ``command``, wait for Hypercorn's "Running on" line, yield its URL, then SIGTERM it."""
    process = await trio.lowlevel.open_process(
        list(command),
        cwd=PROJECT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(30):
            while not (match := re.search(rb"Running on (http://\S+)", output)):
                data = await process.stdout.receive_some()
                assert data, f"server exited before listening:\n{output.decode()}"
                output += data
        async with trio.open_nursery() as nursery:
            # Keep reading so a chatty server never blocks on a full pipe.
            nursery.start_soon(_discard, process.stdout)
            yield match.group(1).decode()
            process.terminate()
            with trio.fail_after(15):
                assert await process.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _discard(stream: trio.abc.ReceiveStream) -> None:
    async for _ in stream:
        pass


async def check_serves_sample_album(url: str) -> None:
    expected = files_on_disk(PROJECT / "data" / SAMPLE_ALBUM)
    for protocol in PROTOCOLS:
        async with make_client(url, protocol) as client:
            response = await client.get(f"/archive/{SAMPLE_ALBUM}/")
        assert response.http_version == protocol
        assert response.status_code == 200
        assert read_archive(response.content) == expected


async def test_console_script_serves_sample_data() -> None:
    port = free_port()
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", str(port), "-D", "data"]
    async with launched(command) as url:
        assert url.endswith(f":{port}")
        await check_serves_sample_album(url)


async def test_hypercorn_config_serves_sample_data() -> None:
    port = free_port()
    hypercorn = Path(sys.executable).with_name("hypercorn")
    command = [
        str(hypercorn),
        "--config",
        "hypercorn.toml",
        "--bind",
        f"127.0.0.1:{port}",
        "archiver.asgi:app",
    ]
    async with launched(command, env={"ARCHIVER_DIR": "data"}) as url:
        assert url.endswith(f":{port}")
        await check_serves_sample_album(url)


def test_help_documents_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "-h"], capture_output=True, text=True, check=True, cwd=PROJECT
    )
    for flag in (
        "-H",
        "--host",
        "-P",
        "--port",
        "-D",
        "--dir",
        "-d",
        "--delay",
        "-v",
        "--verbose",
        "--compression",
    ):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", result.stdout), flag


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["-D", "/nonexistent/storage"], "does not exist"),
        (["--compression", "12"], "invalid choice"),
    ],
)
def test_bad_settings_fail_fast_with_a_message(arguments: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "archiver", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT,
    )
    assert result.returncode != 0
    assert message in result.stderr
