"""Hostile input: fuzzed paths never give a 5xx or a byte from outside the storage."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from functools import partial
from urllib.parse import quote

import h11
import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver.app import create_app
from archiver.config import Settings

from .conftest import write_tree

SECRET = b"SECRET-OUTSIDE-THE-STORAGE-7f3a"


def request(address: tuple[str, int], method: str, target: bytes, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One HTTP/1.1 request with ``target`` sent as is; the status and the whole body."""
    connection = h11.Connection(h11.CLIENT)
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(connection.send(h11.Request(method=method, target=target, headers=[("Host", "x"), *headers])))
        sock.sendall(connection.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, body


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A real server in a thread of its own, so that synchronous hypothesis tests can call it."""
    base = tmp_path_factory.mktemp("hostile")
    storage = base / "storage"
    write_tree(storage / "album", {"photo.jpg": b"photo", "sub/more.jpg": b"more"})
    write_tree(base / "outside", {"secret.txt": SECRET})
    (storage / "album" / "leak").symlink_to(base / "outside" / "secret.txt")
    (storage / "outside").symlink_to(base / "outside")
    (storage / "secret.txt").write_bytes(SECRET)  # in the root, but not in any album
    app = create_app(Settings(storage_dir=storage))
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 1
    started: list[tuple[str, int]] = []
    ready = threading.Event()
    stop: list[tuple[trio.lowlevel.TrioToken, trio.Event]] = []

    async def run() -> None:
        shutdown = trio.Event()
        stop.append((trio.lowlevel.current_trio_token(), shutdown))
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
            host, port = binds[0].removeprefix("http://").rsplit(":", 1)
            started.append((host, int(port)))
            ready.set()

    thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield started[0]
    token, shutdown = stop[0]
    trio.from_thread.run_sync(shutdown.set, trio_token=token)
    thread.join(30)


SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "archive",
            "album",
            "outside",
            "secret.txt",
            "leak",
            "sub",
            "..",
            ".",
            "",
            "%2e%2e",
            "%2E%2e",
            "%2f",
            "%2F",
            "%00",
            "%",
            "%25",
            "%c0%ae%c0%ae",
            "..%2f",
            "%5c",
            "\\",
            "~",
            "a" * 129,
            "album%00",
            "album.zip",
        ]
    ),
    st.text(max_size=12),
)


@given(segments=st.lists(SEGMENTS, max_size=6), trailing_slash=st.booleans(), method=st.sampled_from(["GET", "HEAD"]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_paths_never_5xx_nor_leak(
    threaded_server: tuple[str, int], segments: list[str], trailing_slash: bool, method: str
) -> None:
    path = "/" + "/".join(segments) + ("/" if trailing_slash else "")
    target = quote(path, safe="/%\\~").encode()
    status, body = request(threaded_server, method, target, [])
    assert 200 <= status < 500
    assert SECRET not in body


@given(name=st.text(min_size=1, max_size=20))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_album_names_never_5xx_nor_leak(threaded_server: tuple[str, int], name: str) -> None:
    status, body = request(threaded_server, "GET", f"/archive/{quote(name, safe='')}/".encode(), [])
    assert status in (200, 404)
    assert SECRET not in body


def status_of_unfinished_request(address: tuple[str, int], head: bytes) -> int:
    """Send the start of a request (no blank line after it) and read the status of the answer.

    Nothing is left unread on the server when it answers, so its close does
    not reset the connection under the answer, as a 100 KB burst would.
    """
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n" not in answer and (data := sock.recv(65536)):
            answer += data
    return int(answer.split()[1])


# Over the 16 KiB Hypercorn lets a request head grow to, inside one 64 KiB read.
TOO_LONG = 60_000


def test_very_long_path_is_4xx(threaded_server: tuple[str, int]) -> None:
    status = status_of_unfinished_request(threaded_server, b"GET /archive/" + b"a" * TOO_LONG)
    assert 400 <= status < 500


def test_very_long_header_is_4xx(threaded_server: tuple[str, int]) -> None:
    head = b"GET /archive/album/ HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * TOO_LONG
    assert 400 <= status_of_unfinished_request(threaded_server, head) < 500


@pytest.mark.parametrize("path_length, header_length", [(60_000, 0), (0, 100_000)])
def test_very_long_path_or_header_over_http2_is_refused(
    threaded_server: tuple[str, int], path_length: int, header_length: int
) -> None:
    host, port = threaded_server
    headers = {"x-padding": "p" * header_length} if header_length else {}
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        try:
            response = client.get(f"http://{host}:{port}/archive/{'a' * path_length}/", headers=headers)
        except httpx.RemoteProtocolError:
            return  # the server refused the header block outright: also no 5xx, no bytes
        assert 400 <= response.status_code < 500


def test_album_archive_still_served_beside_the_fuzzing(threaded_server: tuple[str, int]) -> None:
    status, body = request(threaded_server, "GET", b"/archive/album/", [])
    assert status == 200
    assert body.startswith(b"PK\x03\x04")
    assert SECRET not in body
