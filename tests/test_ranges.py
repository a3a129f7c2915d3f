"""Resumable downloads: ETag, Range, If-Range and 416, checked against the full archive."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from archiver.config import Settings
from archiver.web.ranges import ByteRange, RangeNotSatisfiable, parse_range

from .conftest import http11_request, read_archive, server_in_thread, write_tree
from .test_observability import samples


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
        # Past 19 digits: read as "past any archive", never converted (int() refuses 4,300 digits).
        ("bytes=" + "9" * 150 + "-", "416"),
        ("bytes=-" + "9" * 150, ByteRange(0, 999)),
        ("bytes=0-" + "9" * 150, ByteRange(0, 999)),
        ("bytes=" + "0" * 150 + "7-8", ByteRange(7, 8)),  # leading zeros are not a large number
        # A header over 200 characters is ignored whatever it says (issue 23: parsing cost).
        ("bytes=" + "9" * 5000 + "-", None),
        ("bytes=" + "0" * 5000 + "7-8", None),
        ("bytes=\u0663-\u0665", None),  # Arabic-Indic digits are not DIGIT
        ("bytes=1-2\u00a0", None),  # nor is a no-break space whitespace
    ],
)
def test_parse_range(header: str, expected: ByteRange | str | None) -> None:
    if expected == "416":
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, 1000)
    else:
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


async def test_a_file_rewritten_in_place_with_its_mtime_restored_changes_the_etag(
    client: httpx.AsyncClient, album: Path
) -> None:
    # Issue 23: same size, same mtime, other bytes; If-Range matched and a resume spliced two archives.
    before = (await client.head("/archive/album/")).headers["etag"]
    path = album / "a.jpg"
    status = path.stat()
    with path.open("r+b") as file:
        file.write(bytes(b ^ 0xFF for b in path.read_bytes()[:16]))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (status.st_size, status.st_mtime_ns)
    head = await client.head("/archive/album/")
    assert head.headers["etag"] != before
    async with client.stream("GET", "/archive/album/", headers={"Range": "bytes=100-", "If-Range": before}) as resumed:
        assert resumed.status_code == 200  # the whole new archive, not a 206 spliced onto the old one


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


@pytest.fixture(scope="module")
def range_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    storage = tmp_path_factory.mktemp("range-fuzz")
    write_tree(storage / "album", {"a.jpg": os.urandom(20_000), "b.jpg": b"b"})
    with server_in_thread(Settings(storage_dir=storage)) as address:
        yield address


# Header values as a careless or hostile client may send them: numbers past
# every limit, odd whitespace, other digits, several ranges, other units.
NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(str),
    # Around int()'s 4,300-digit limit: hypothesis favours small integers, so name the sizes.
    st.sampled_from([19, 20, 4300, 4301, 5000]).map(lambda digits: "9" * digits),
    st.sampled_from([20, 4300, 5000]).map(lambda zeros: "0" * zeros + "1"),
    st.just(""),
    st.text(alphabet="0123456789\u0663\u0665\uff11", max_size=8),
)
BLANKS = st.sampled_from(["", " ", "\t", "  ", "\u00a0", "\u3000"])
RANGE_VALUES = st.one_of(
    st.builds(
        lambda unit, b1, first, b2, last, tail: f"{unit}{b1}={first}{b2}-{last}{tail}",
        st.sampled_from(["bytes", "BYTES", "Bytes", "items", "bytes "]),
        BLANKS,
        NUMBERS,
        BLANKS,
        NUMBERS,
        st.sampled_from(["", ",0-1", ", -5", " ", "\u00e9"]),
    ),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_characters="\x7f"), max_size=40),
)
IF_RANGE_VALUES = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_characters="\x7f"), max_size=40),
    st.sampled_from(['W/"x"', '""', "Wed, 25 Nov 2026 00:00:00 GMT"]),
)


@given(range_value=RANGE_VALUES, if_range=IF_RANGE_VALUES)
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_range_headers_never_5xx(range_server: tuple[str, int], range_value: str, if_range: str | None) -> None:
    # Header values cannot begin or end with whitespace on the wire: strip as a client must.
    headers = [("Range", range_value.strip(" \t").encode())]
    if if_range is not None:
        headers.append(("If-Range", if_range.strip(" \t").encode()))
    status, response_headers, body = http11_request(range_server, "GET", b"/archive/album/", headers)  # type: ignore[arg-type]
    assert status in (200, 206, 416), (range_value, if_range, status)
    if status == 206:
        assert len(body) == int(response_headers["content-length"])
    host, port = range_server
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        response = client.get(f"http://{host}:{port}/archive/album/", headers=headers)
    assert response.status_code == status, (range_value, if_range)


def test_range_sent_whole_is_complete_even_when_the_client_leaves_at_once(range_server: tuple[str, int]) -> None:
    # A client that closes the connection as soon as the range is out cancels
    # the download from outside while its producer is being reaped: not a
    # failure (it used to be logged as one, by chance).
    for _ in range(30):
        status, _, body = http11_request(range_server, "GET", b"/archive/album/", [("Range", "bytes=0-0")])
        assert (status, body) == (206, b"P")
    _, _, metrics = http11_request(range_server, "GET", b"/metrics", [])
    outcomes = samples(metrics.decode())
    assert outcomes['archiver_downloads_finished_total{outcome="failed"}'] == 0
    assert outcomes['archiver_downloads_finished_total{outcome="completed"}'] >= 30


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed (apt-get install aria2)")
async def test_aria2c_with_eight_connections_gets_the_same_archive(server: str, storage: Path, tmp_path: Path) -> None:
    # A download manager: 8 ranged connections at once, then a resume of a cut-off file.
    write_tree(storage / "album", {f"{index}.jpg": os.urandom(400_000) for index in range(8)})
    url = f"{server}/archive/album/"
    whole = tmp_path / "whole.zip"
    await trio.run_process(["curl", "-sS", "-o", str(whole), url])
    common = ["aria2c", "-q", "--allow-overwrite=false", "--auto-file-renaming=false", "-d", str(tmp_path)]
    await trio.run_process([*common, "-x8", "-s8", "-k1M", "-o", "parallel.zip", url])
    assert (tmp_path / "parallel.zip").read_bytes() == whole.read_bytes()
    # aria2c's resume (-c) of a file cut off at 1 MB.
    (tmp_path / "resumed.zip").write_bytes(whole.read_bytes()[:1_000_000])
    await trio.run_process([*common, "-c", "-o", "resumed.zip", url])
    assert (tmp_path / "resumed.zip").read_bytes() == whole.read_bytes()
    assert read_archive(whole.read_bytes()).keys() == {f"{index}.jpg" for index in range(8)}
