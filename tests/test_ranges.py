"""Resumable downloads: ETag, Range, If-Range and 416, checked against the full archive."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
import zoneinfo
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from archiver.archive import ctime_trust
from archiver.archive.ctime_trust import COARSE_RACY_NS, RACY_NS, CtimeTrust
from archiver.archive.entries import EntryPolicy, load_zone
from archiver.archive.etag import FORMAT_VERSION, archive_etag, archive_validator
from archiver.archive.listing import AlbumFile, AlbumListing
from archiver.archive.plan import ArchivePlan
from archiver.archive.producer_protocol import SECOND
from archiver.config import Settings
from archiver.web.ranges import ByteRange, RangeNotSatisfiable, parse_range, surely_a_range

from .conftest import (
    CLIENT_TLS,
    ctimes_settled,
    expected_archive,
    http11_request,
    read_archive,
    running_server,
    server_in_thread,
    write_tree,
)
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
        ("bytes=" + "0" * 191 + "7-8", ByteRange(7, 8)),  # 200 characters: taken
        ("bytes=" + "0" * 192 + "7-8", None),  # 201: not
        ("bytes=\u0663-\u0665", None),  # Arabic-Indic digits are not DIGIT
        ("bytes=1-2\u00a0", None),  # nor is a no-break space whitespace
        ("byte\u017f=1-2", None),  # nor is a long s an "s" (Unicode's case folding matches it)
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


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=-1", "bytes=0-0"])
def test_no_range_holds_a_byte_of_nothing(header: str) -> None:
    # RFC 9110 14.1.1: a suffix of an empty representation is unsatisfiable, as any first byte is.
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 0)


@pytest.mark.parametrize(
    "range_header, if_range, surely",
    [
        ("bytes=0-1", None, True),
        ("bytes=-1", None, True),
        ("bytes=0-1", '"an-etag"', False),  # a range only if the tag is this archive's: known after the walk
        ("bytes=0-1,5-6", None, False),  # several: the whole archive
        ("bytes=" + "9" * 25 + "-", None, False),  # past any archive: a 416
        (None, None, False),
    ],
)
def test_a_request_is_counted_a_range_before_the_walk_only_if_it_surely_is_one(
    range_header: str | None, if_range: str | None, surely: bool
) -> None:
    # The range limit's early look (before the album is walked): a download with an If-Range that
    # turns out not to match is a whole download, and must not be refused as a client's fifth range.
    assert surely_a_range(range_header, if_range) is surely


@pytest.fixture
async def album(storage: Path) -> Path:
    write_tree(storage / "album", {"a.jpg": os.urandom(300_000), "Снимок.jpg": os.urandom(5_000), "empty": b""})
    await ctimes_settled(storage / "album")  # an ETag from the first request
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


async def test_a_range_of_the_central_directory_asked_first_waits_for_its_crcs(
    client: httpx.AsyncClient, album: Path
) -> None:
    # What a download manager asks first: the end.  The service has not read
    # these files yet, so the central headers wait for their CRCs (no producer).
    size = int((await client.head("/archive/album/")).headers["content-length"])
    tail = await client.get("/archive/album/", headers={"Range": "bytes=-150"})
    archive = (await client.get("/archive/album/")).content
    central_offset = int.from_bytes(archive[-6:-2], "little")  # the end record's last field but the comment length
    assert central_offset <= size - 150, "the range must hold generated bytes only"
    assert tail.status_code == 206
    assert tail.content == archive[-150:]


def bytes_read_by_this_process() -> int:
    """What this process (the test and the server in it, with its threads) has read so far (``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


async def test_a_range_that_holds_headers_but_not_their_crc_reads_no_file(
    client: httpx.AsyncClient, storage: Path
) -> None:
    # A range that holds a header but not its CRC field (a probe for range support,
    # ``bytes=0-0``; a resume from just past the field) needs no file read, even for
    # files whose CRC the index has not seen (helper 88: four bytes read the whole
    # first file).  Everything read here is counted: the server is in this process.
    big = 32 << 20
    write_tree(storage / "cold", {"big.bin": os.urandom(big), "small.txt": b"small"})
    name = len("big.bin")
    length = int((await client.head("/archive/cold/")).headers["content-length"])
    before = bytes_read_by_this_process()
    parts = {}
    for start, end in [(0, 0), (0, 13), (18, 29 + name)]:  # around the CRC field, bytes 14-17 of the local header
        response = await client.get("/archive/cold/", headers={"Range": f"bytes={start}-{end}"})
        assert response.status_code == 206
        parts[start, end] = response.content
    end_record = (await client.get("/archive/cold/", headers={"Range": "bytes=-22"})).content
    central = int.from_bytes(end_record[16:20], "little")  # the central directory's offset (APPNOTE 4.3.16)
    for start, end in [(central, central + 15), (central + 20, central + 45 + name)]:  # its CRC: bytes 16-19
        response = await client.get("/archive/cold/", headers={"Range": f"bytes={start}-{end}"})
        assert response.status_code == 206
        parts[start, end] = response.content
    assert bytes_read_by_this_process() - before < big // 4
    archive = (await client.get("/archive/cold/")).content
    assert len(archive) == length and archive[-22:] == end_record
    for (start, end), part in parts.items():
        assert part == archive[start : end + 1], (start, end)


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


async def test_several_range_or_if_range_lines_get_the_whole_archive(server: str, album: Path) -> None:
    async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=server) as client:
        whole = await client.get("/archive/album/")
        two_lines = await client.get("/archive/album/", headers=[("Range", "bytes=0-9"), ("Range", "bytes=20-29")])
    assert two_lines.status_code == 200 and two_lines.content == whole.content  # not the first line's 10 bytes
    # If-Range names one archive: two lines (here the same twice) name none, so no range, whatever their order.
    etag = whole.headers["etag"]
    async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=server) as client:
        two_validators = await client.get(
            "/archive/album/", headers=[("Range", "bytes=0-9"), ("If-Range", etag), ("If-Range", etag)]
        )
    assert two_validators.status_code == 200 and two_validators.content == whole.content


@pytest.mark.parametrize("http2", [False, True], ids=["HTTP/1.1", "HTTP/2"])
def test_etag_preconditions_answer_412_and_304(range_server: tuple[str, int], http2: bool) -> None:
    host, port = range_server
    url = f"http://{host}:{port}/archive/album/"
    with httpx.Client(verify=CLIENT_TLS, http1=not http2, http2=http2, timeout=30) as client:
        whole = client.get(url)
        etag = whole.headers["etag"]
        for headers, status in [
            ({"If-Match": etag}, 200),
            ({"If-Match": f'"other", {etag}'}, 200),
            ({"If-Match": "*"}, 200),
            ({"If-Match": '"other"'}, 412),  # the archive changed since the client's copy: never its bytes
            ({"If-Match": f"W/{etag}"}, 412),  # If-Match compares strongly
            ({"If-None-Match": etag}, 304),
            ({"If-None-Match": f'"other", W/{etag}'}, 304),  # If-None-Match compares weakly
            ({"If-None-Match": "*"}, 304),
            ({"If-None-Match": '"other"'}, 200),
            ({"If-Match": '"other"', "If-None-Match": etag}, 412),  # If-Match first (RFC 9110 13.2.2)
            ({"If-None-Match": '"a,*,b"'}, 200),  # one tag, commas and all (helper 143: split, it held "*")
            ({"If-Match": 'W/"a, *", "b"'}, 412),
            ({"If-Match": f'"a,b" ,{etag}'}, 200),
            ({"If-Match": f", {etag} ,"}, 200),  # empty list elements are allowed (RFC 9110 5.6.1.2)
            ({"If-None-Match": f",{etag},"}, 304),
            # Neither "*" nor a list of entity tags: If-Match is false, If-None-Match true (RFC 9110 13.1.1-2),
            # as nginx answers them; until 2026-12-06 a tag was found in them (helper 189).
            ({"If-Match": f"{etag}x"}, 412),
            ({"If-Match": f'"other" {etag}'}, 412),
            ({"If-Match": '"other", *'}, 412),
            ({"If-Match": f'"a b", {etag}'}, 412),  # no space in an entity tag (etagc)
            ({"If-None-Match": f"{etag}x"}, 200),
            ({"If-None-Match": f"{etag};"}, 200),
            ({"If-None-Match": f"{etag}{etag}"}, 200),
            ({"If-None-Match": '*, "other"'}, 200),
        ]:
            for method in ("GET", "HEAD"):
                response = client.request(method, url, headers=headers)
                assert response.status_code == status, (method, headers)
                if status == 200 and method == "GET":
                    assert response.content == whole.content
                if status == 304:
                    assert response.content == b"" and response.headers["etag"] == etag
                    assert response.headers["content-type"] == "application/zip"  # a cache updates its copy from it
                    assert "content-length" not in response.headers  # h2 reads it as a body to come
        # With Range: a failed If-Match wins over the range; a range with a matching one is served.
        assert client.get(url, headers={"If-Match": '"other"', "Range": "bytes=0-9"}).status_code == 412
        ranged = client.get(url, headers={"If-Match": etag, "Range": "bytes=0-9"})
        assert ranged.status_code == 206 and ranged.content == whole.content[:10]


@pytest.fixture
def zone_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Gives the zone "Test/Zone" the rules of another (an Etc/GMT offset), as a tzdata update would."""
    system = next((Path(folder) for folder in zoneinfo.TZPATH if (Path(folder) / "Etc" / "GMT-6").is_file()), None)
    if system is None:
        pytest.skip("no system tz database to copy zones from")

    def use(rules: str) -> None:
        folder = tmp_path / f"zoneinfo-{rules.replace('/', '-')}"
        (folder / "Test").mkdir(parents=True)
        shutil.copyfile(system / rules, folder / "Test" / "Zone")
        zoneinfo.reset_tzpath([str(folder)])
        load_zone.cache_clear()  # a restart: a process reads a zone's rules once

    yield use
    zoneinfo.reset_tzpath()
    load_zone.cache_clear()


async def test_if_range_across_new_rules_of_the_zone_is_a_new_archive(
    settings: Settings, album: Path, zone_rules: Callable[[str], None]
) -> None:
    # The DOS times depend on the zone's rules, not only its name: a tzdata update that moves an
    # offset (Asia/Almaty, 2024a) changes the bytes, and a resume must not join the two (helper 95).
    archives = []
    for rules in ("Etc/GMT-6", "Etc/GMT-5"):
        zone_rules(rules)
        zoned = replace(settings, timezone="Test/Zone")
        async with running_server(zoned) as url, httpx.AsyncClient(base_url=url) as client:
            whole = await client.get("/archive/album/")
            resumed = None
            if archives:
                resumed = await client.get(
                    "/archive/album/", headers={"Range": "bytes=100-", "If-Range": archives[0].headers["etag"]}
                )
        archives.append(whole)
        assert whole.status_code == 200
    first, second = archives
    hours = [zipfile.ZipFile(io.BytesIO(archive.content)).getinfo("a.jpg").date_time[3] for archive in archives]
    assert (hours[0] - hours[1]) % 24 == 1  # the rules changed the bytes
    assert first.headers["etag"] != second.headers["etag"]
    assert resumed is not None and resumed.status_code == 200 and resumed.content == second.content


async def test_if_range_resumes_the_same_archive_only(client: httpx.AsyncClient, album: Path) -> None:
    first = await client.get("/archive/album/")
    etag = first.headers["etag"]
    same = await client.get("/archive/album/", headers={"Range": "bytes=100-", "If-Range": etag})
    assert same.status_code == 206
    assert same.content == first.content[100:]
    (album / "new.jpg").write_bytes(b"added after the first download")
    await ctimes_settled(album)
    changed = await client.get("/archive/album/", headers={"Range": "bytes=100-", "If-Range": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert "new.jpg" in read_archive(changed.content)
    dated = await client.get(
        "/archive/album/", headers={"Range": "bytes=100-", "If-Range": "Wed, 25 Nov 2026 00:00:00 GMT"}
    )
    assert dated.status_code == 200


def test_another_file_in_a_files_place_changes_the_etag_whatever_its_times() -> None:
    # Renamed over it in the same clock tick: name, size, mtime, mode and ctime may all agree.
    listed = AlbumFile("a.jpg", 10, mtime_ns=5, ctime_ns=7, device=1, inode=100)
    other = listed._replace(inode=101)
    etags = {archive_etag(AlbumListing(Path("/album"), (file,), ()), "v") for file in (listed, other)}
    assert len(etags) == 2
    # The device is left out: hosts sharing one storage over NFS number it differently.
    moved = listed._replace(device=2)
    assert archive_etag(AlbumListing(Path("/album"), (moved,), ()), "v") in etags


def test_each_field_of_a_files_part_of_the_etag_is_kept_apart_from_the_next() -> None:
    # Fields run together would make "a1" of 23 bytes and "a12" of 3 one tag for two archives
    # (helper 185's mutation testing: the path's separator taken out passed every test).
    base = AlbumFile("a1", 23, mtime_ns=1, ctime_ns=5, device=1, inode=12, mode=0o644)
    for one, other in [
        (base, base._replace(path="a12", size=3)),
        (base._replace(size=12, mtime_ns=3), base._replace(size=1, mtime_ns=23)),
        (base, base._replace(mtime_ns=16, mode=0o44)),
        (base, base._replace(mode=0o64, ctime_ns=45)),
        (base, base._replace(ctime_ns=51, inode=2)),
    ]:
        tags = {archive_etag(AlbumListing(Path("/album"), (file,), ()), "v") for file in (one, other)}
        assert len(tags) == 2, (one, other)


def test_no_etag_while_a_file_may_change_again_in_its_clock_tick(tmp_path: Path) -> None:
    # Found by helper 45: on ext4 with whole-second times, a file written again within the second
    # of an ETag kept every field of its key, so the ETag stayed, and If-Range spliced two archives.
    trust, folder = CtimeTrust(), os.open(tmp_path, os.O_RDONLY)
    filesystems = {(device := tmp_path.stat().st_dev): trust.learn(folder, device)}
    os.close(folder)
    started = 10 * SECOND + 500_000_000  # when the walk began

    def validator(ctime_ns: int) -> str | None:
        listed = AlbumFile("a.jpg", 10, mtime_ns=SECOND + 1, ctime_ns=ctime_ns, device=device, inode=100)
        return archive_validator(AlbumListing(Path("/album"), (listed,), (), started, filesystems), '"tag"', 10)

    assert validator(started - RACY_NS + 50_000_000) is None  # within the racy window (RACY_NS) of the walk
    assert validator(11 * SECOND + 1) is None  # after it began: changed while it ran
    assert validator(started - RACY_NS - 50_000_000) == '"tag"'
    # Whole seconds: a filesystem of seconds (FAT: two), a wider window.
    assert validator(started - COARSE_RACY_NS + SECOND // 2) is None
    assert validator(started - COARSE_RACY_NS - SECOND // 2) == '"tag"'


async def test_an_album_within_a_clock_tick_of_its_walk_is_sent_without_etag(
    client: httpx.AsyncClient, album: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ctime_trust, "RACY_NS", 3600 * SECOND)  # every ctime here is "within a tick" of the walk
    head = await client.head("/archive/album/")
    assert "etag" not in head.headers and "content-length" in head.headers
    whole = await client.get("/archive/album/")
    resumed = await client.get("/archive/album/", headers={"Range": "bytes=100-", "If-Range": '"any"'})
    assert (resumed.status_code, resumed.content) == (200, whole.content)
    assert read_archive(whole.content).keys() == {"a.jpg", "Снимок.jpg", "empty"}
    monkeypatch.setattr(ctime_trust, "RACY_NS", 0)
    assert (await client.head("/archive/album/")).headers["etag"].startswith('"')


async def test_touching_a_file_changes_the_etag(client: httpx.AsyncClient, album: Path) -> None:
    before = (await client.head("/archive/album/")).headers["etag"]
    os.utime(album / "a.jpg", ns=(0, 10**18))
    await ctimes_settled(album)
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
    await ctimes_settled(album)
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
    trio.run(ctimes_settled, storage / "album")  # its ETag, for the preconditions
    with server_in_thread(Settings(settle_time=0, storage_dir=storage)) as address:
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
    with httpx.Client(verify=CLIENT_TLS, http1=False, http2=True, timeout=30) as client:
        response = client.get(f"http://{host}:{port}/archive/album/", headers=headers)
    assert response.status_code == status, (range_value, if_range)


def test_range_sent_whole_is_complete_even_when_the_client_leaves_at_once(range_server: tuple[str, int]) -> None:
    # A client that closes the connection as soon as the range is out cancels
    # the download from outside while its producer is being reaped: not a
    # failure (it used to be logged as one, by chance).  The module's server has served other
    # tests' requests: what these 30 add is counted (helper 90).
    def outcomes() -> dict[str, float]:
        _, _, metrics = http11_request(range_server, "GET", b"/metrics", [])
        found = samples(metrics.decode())
        return {
            outcome: found.get(f'archiver_downloads_finished_total{{outcome="{outcome}"}}', 0) for outcome in OUTCOMES
        }

    before = outcomes()
    for _ in range(30):
        status, _, body = http11_request(range_server, "GET", b"/archive/album/", [("Range", "bytes=0-0")])
        assert (status, body) == (206, b"P")
    after = outcomes()
    assert {outcome: after[outcome] - before[outcome] for outcome in OUTCOMES} == {
        "completed": 30,
        "failed": 0,
        "cancelled": 0,
    }


OUTCOMES = ("completed", "failed", "cancelled")


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


# The SHA-256 of the stored archive of PINNED_ALBUM for each FORMAT_VERSION that wrote it.
PINNED_ARCHIVES = {"archiver-zip-15": "1e7c18bcce72eb2ccee05281ee57c0587ed0903d954e4d09b123c4e45cd5718f"}
PINNED_ALBUM = {
    "Photog~1.jpg": b"a",
    "Фотогр~1.jpg": b"b",
    "CON.jpg": b"c",
    "a\u2215b.jpg": b"d",
    "Cafe\u0301.jpg": b"e",
    "A.jpg": b"f",
    "a.jpg": b"g",
    "b.jpg": b"h",
    "b\uff0ejpg": b"i",  # one file with b.jpg once best fit has written it (format 9)
    "I.jpg": b"j",
    "\u0131.jpg": b"k",  # one file with I.jpg to NTFS
    "a\u200b.jpg": b"l",  # one file with a.jpg to Linux's case folding (format 10)
    os.fsdecode("Фото.jpg".encode("cp866")): b"m",  # read as CP866 (format 11)
    "Отпуск".encode("cp866").decode("cp437") + ".jpg": b"n",  # CP866 read as CP437: read as CP866 (format 12)
    os.fsdecode("Јелена.jpg".encode("cp1251")): b"o",  # Serbian in CP1251: read as CP1251 again (format 13)
    "ΣΩ.txt": b"p",  # Greek that CP437 holds: UTF-8 as it is again (format 14)
    os.fsdecode("отчёт.doc".encode("cp866")): b"q",  # "®взсв" to CP1251: read as CP866 (format 15)
    "folder/empty.bin": b"",
    "folder/Отпуск 2024.jpg": bytes(range(256)) * 40,
}


def test_the_etags_format_version_moves_with_the_archives_bytes(tmp_path: Path) -> None:
    # An ETag names a version of the bytes: a client resuming with If-Range must never get the rest
    # of other bytes. The ETag covers the files and FORMAT_VERSION, so a change to the records or
    # the naming must raise FORMAT_VERSION (helper 59: f45d91d renamed entries under the same ETag,
    # and a resume across it gave a corrupt archive). A fixed album, its archive's hash pinned.
    album = tmp_path / "album"
    write_tree(album, PINNED_ALBUM)
    for path in sorted(album.rglob("*"), reverse=True):  # the files, then their folders
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, ns=(1_717_243_200_000_000_000, 1_717_243_200_000_000_000))  # 2024-06-01 12:00 UTC
    os.utime(album, ns=(1_717_243_200_000_000_000, 1_717_243_200_000_000_000))
    digest = hashlib.sha256(expected_archive(album)).hexdigest()
    assert PINNED_ARCHIVES.get(FORMAT_VERSION) == digest, (
        f"the archive's bytes are not those {FORMAT_VERSION} pinned: raise FORMAT_VERSION "
        f"(archiver/archive/etag.py) and pin {digest} for it here"
    )


# The SHA-256 of every record of PINNED_LISTINGS' plans for each FORMAT_VERSION that wrote them.
PINNED_RECORDS = {"archiver-zip-15": "b6024bdec8e9bd4da9f6634a72eabca993c46f864519ed2b4f51f556aa5ef4ce"}
GiB = 1 << 30


def pinned_listings() -> Iterator[tuple[EntryPolicy, list[AlbumFile]]]:
    """What PINNED_ALBUM leaves out: ZIP64, kept modes, another zone, times clamped or without a UT field, CP866.

    Listings, not files: a 5 GiB file and 70,000 entries cost nothing to plan.
    """
    at = 1_717_243_201_123_456_789  # 2024-06-01 12:00:01.12 UTC: an odd second, a fraction
    times = [at, 315_532_799 * SECOND, -SECOND, (2**31 - 1) * SECOND, 2**31 * SECOND, 4_354_819_200 * SECOND]
    modes = [0o100644, 0o100600, 0o104755, 0o100444, 0o100666, 0o102750]
    sizes = [5 * GiB, 0xFFFFFFFF, 0, 1, 0xFFFFFFFE, 3]  # the first pushes every later offset past 4 GiB
    names = ["big.mov", "edge.bin", "empty", "Фото.jpg", os.fsdecode("Отпуск".encode("cp866")) + ".jpg", "a/b.jpg"]
    files = [
        AlbumFile(name, size, mtime, mode) for name, size, mtime, mode in zip(names, sizes, times, modes, strict=True)
    ]
    for policy in (
        EntryPolicy(),
        EntryPolicy(zone="Asia/Tokyo", keep_modes=True),
        EntryPolicy(name_encoding="cp866", keep_modes=True),
    ):
        yield policy, files
    # 65,535 entries or more: the ZIP64 end records (APPNOTE 4.4.1.4).
    yield EntryPolicy(), [AlbumFile(f"{index:05}.jpg", index % 3, at) for index in range(70_000)]


def test_the_etags_format_version_moves_with_every_record(tmp_path: Path) -> None:
    # PINNED_ALBUM's archive is written with the default policy, small files and times of today:
    # no record of ZIP64, a kept mode, another zone, a clamped time or CP866 is in it, and a change
    # to any of those went out under the ETag of the old bytes, unseen by its pin (helper 188: the
    # read-only bit of a kept mode, or a ZIP64 field's order, changed, and that test passed). The
    # records are the bytes the service sends beside the files' own (every CRC here a fixed one).
    digest = hashlib.sha256()
    for policy, files in pinned_listings():
        plan = ArchivePlan(tmp_path, files, 0, policy)
        assert plan.length is not None
        digest.update(b"%d" % plan.length)
        crcs = [(k * 0x9E3779B1) & 0xFFFFFFFF for k in range(plan.count)]
        for k in range(plan.count):
            digest.update(plan.local_header(k, crcs[k]))
        digest.update(plan.central_headers(0, plan.count, crcs))
        digest.update(plan.end_records())
    assert PINNED_RECORDS.get(FORMAT_VERSION) == digest.hexdigest(), (
        f"the archive's records are not those {FORMAT_VERSION} pinned: raise FORMAT_VERSION "
        f"(archiver/archive/etag.py) and pin {digest.hexdigest()} for it here"
    )
