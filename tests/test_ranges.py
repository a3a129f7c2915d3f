"""Resumable downloads: ETag, Range, If-Range and 416, checked against the full archive."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
import trio

from archiver.ranges import ByteRange, RangeNotSatisfiable, parse_range

from .conftest import read_archive, write_tree


@pytest.mark.parametrize(
    "header, expected",
    [
        ("bytes=0-99", ByteRange(0, 99)),
        ("bytes=100-", ByteRange(100, 999)),
        ("bytes=-1", ByteRange(999, 999)),
        ("bytes=-5000", ByteRange(0, 999)),
        ("bytes=990-5000", ByteRange(990, 999)),
        ("BYTES = 1 - 2", ByteRange(1, 2)),
        ("bytes=0-1,5-6", None),  # several ranges: the whole archive
        ("items=0-1", None),
        ("bytes=5-1", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header: str, expected: ByteRange | None) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 1000)


@pytest.fixture
def album(storage: Path) -> Path:
    write_tree(storage / "album", {"a.jpg": os.urandom(300_000), "Снимок.jpg": os.urandom(5_000), "empty": b""})
    return storage / "album"


async def test_ranges_are_slices_of_the_whole_archive(client: httpx.AsyncClient, album: Path) -> None:
    full = await client.get("/archive/album/")
    archive = full.content
    size = len(archive)
    assert full.headers["accept-ranges"] == "bytes"
    etag = full.headers["etag"]
    for header, start, end in [
        ("bytes=0-99", 0, 99),  # the start: inside the first local header
        ("bytes=10-40", 10, 40),  # inside a header
        (f"bytes={size // 2}-{size // 2 + 70_000}", size // 2, size // 2 + 70_000),  # the middle, across chunks
        ("bytes=-1", size - 1, size - 1),  # the last byte
        (f"bytes={size - 100}-", size - 100, size - 1),  # open-ended
    ]:
        response = await client.get("/archive/album/", headers={"Range": header})
        assert response.status_code == 206, header
        assert response.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert int(response.headers["content-length"]) == end - start + 1
        assert response.headers["etag"] == etag
        assert response.content == archive[start : end + 1], header


async def test_range_past_the_end_is_416(client: httpx.AsyncClient, album: Path) -> None:
    size = len((await client.get("/archive/album/")).content)
    response = await client.get("/archive/album/", headers={"Range": f"bytes={size}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"


async def test_several_ranges_get_the_whole_archive(client: httpx.AsyncClient, album: Path) -> None:
    response = await client.get("/archive/album/", headers={"Range": "bytes=0-1,5-6"})
    assert response.status_code == 200
    assert "content-range" not in response.headers
    assert read_archive(response.content).keys() == {"a.jpg", "Снимок.jpg", "empty"}


async def test_if_range_resumes_the_same_archive_only(client: httpx.AsyncClient, album: Path) -> None:
    first = await client.get("/archive/album/")
    etag = first.headers["etag"]
    same = await client.get("/archive/album/", headers={"Range": "bytes=100-", "If-Range": etag})
    assert same.status_code == 206
    assert same.content == first.content[100:]
    (album / "new.jpg").write_bytes(b"added after the first download")
    changed = await client.get("/archive/album/", headers={"Range": "bytes=100-", "If-Range": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert "new.jpg" in read_archive(changed.content)
    dated = await client.get(
        "/archive/album/", headers={"Range": "bytes=100-", "If-Range": "Wed, 25 Nov 2026 00:00:00 GMT"}
    )
    assert dated.status_code == 200


async def test_touching_a_file_changes_the_etag(client: httpx.AsyncClient, album: Path) -> None:
    before = (await client.head("/archive/album/")).headers["etag"]
    os.utime(album / "a.jpg", ns=(0, 10**18))
    assert (await client.head("/archive/album/")).headers["etag"] != before


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_resumes_an_interrupted_download(server: str, album: Path, tmp_path: Path) -> None:
    url = f"{server}/archive/album/"
    partial, whole = tmp_path / "partial.zip", tmp_path / "whole.zip"
    # The server runs in this event loop: trio.run_process, not a blocking subprocess call.
    await trio.run_process(["curl", "-sS", "-o", str(whole), url])
    # What an interrupted download leaves behind: the first part of the file.
    partial.write_bytes(whole.read_bytes()[:123_457])
    resumed = await trio.run_process(
        ["curl", "-sS", "-C", "-", "-o", str(partial), "-w", "%{http_code}", url], capture_stdout=True
    )
    assert resumed.stdout == b"206"
    assert partial.read_bytes() == whole.read_bytes()
    assert read_archive(whole.read_bytes()).keys() == {"a.jpg", "Снимок.jpg", "empty"}


async def test_download_cut_off_and_resumed_is_the_whole_archive(client: httpx.AsyncClient, album: Path) -> None:
    received = b""
    async with client.stream("GET", "/archive/album/") as response:
        etag = response.headers["etag"]
        async for chunk in response.aiter_raw():
            received += chunk
            if len(received) > 50_000:
                break  # the connection is cut here
    rest = await client.get("/archive/album/", headers={"Range": f"bytes={len(received)}-", "If-Range": etag})
    assert rest.status_code == 206
    whole = received + rest.content
    assert whole == (await client.get("/archive/album/")).content
    assert read_archive(whole).keys() == {"a.jpg", "Снимок.jpg", "empty"}
