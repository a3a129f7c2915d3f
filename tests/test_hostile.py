"""Hostile input: fuzzed paths never give a 5xx or a byte from outside the storage."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver.config import Settings

from .conftest import CLIENT_TLS, http11_request, server_in_thread, write_tree

SECRET = b"SECRET-OUTSIDE-THE-STORAGE-7f3a"


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The server in a thread, over a storage with a secret outside every album."""
    base = tmp_path_factory.mktemp("hostile")
    storage = base / "storage"
    write_tree(storage / "album", {"photo.jpg": b"photo", "sub/more.jpg": b"more"})
    write_tree(base / "outside", {"secret.txt": SECRET})
    (storage / "album" / "leak").symlink_to(base / "outside" / "secret.txt")
    (storage / "outside").symlink_to(base / "outside")
    (storage / "secret.txt").write_bytes(SECRET)  # in the root, but not in any album
    with server_in_thread(Settings(settle_time=0, storage_dir=storage)) as address:
        yield address


def request(address: tuple[str, int], method: str, target: bytes, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    status, _, body = http11_request(address, method, target, headers)
    return status, body


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
    with httpx.Client(verify=CLIENT_TLS, http1=False, http2=True, timeout=30) as client:
        try:
            response = client.get(f"http://{host}:{port}/archive/{'a' * path_length}/", headers=headers)
        except (httpx.RemoteProtocolError, httpx.WriteError):
            # The server refused the header block outright (a WriteError: it closed the
            # connection while the client was still sending the block): also no 5xx, no bytes.
            return
        assert 400 <= response.status_code < 500


def test_album_archive_still_served_beside_the_fuzzing(threaded_server: tuple[str, int]) -> None:
    status, body = request(threaded_server, "GET", b"/archive/album/", [])
    assert status == 200
    assert body.startswith(b"PK\x03\x04")
    assert SECRET not in body
