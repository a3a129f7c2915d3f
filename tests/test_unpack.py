"""What the person unpacks: portable names, true times, ordinary modes, and the archive's own file name.

Each of issue 21's findings against the running service, with real readers.
"""

from __future__ import annotations

import calendar
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest
import trio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver.archive.names import entry_names
from archiver.config import Settings
from archiver.web.disposition import MAX_SAVED_NAME_BYTES, DisplayNameRefused, content_disposition, display_name

from .browser import CHROMIUM, saved_download
from .conftest import (
    CLIENT_TLS,
    ctimes_settled,
    http11_request,
    read_archive,
    running_server,
    server_in_thread,
    write_deep_file,
    write_tree,
)
from .test_deploy import needs_nginx, nginx_in_front

NOON_UTC = calendar.timegm((2024, 7, 1, 12, 0, 0))
JAVA_LISTING = """
import java.io.*;
import java.util.zip.*;
public class ListZip {
    public static void main(String[] args) throws Exception {
        var utf8 = java.nio.charset.StandardCharsets.UTF_8;
        try (ZipInputStream zip = new ZipInputStream(new FileInputStream(args[0]), utf8)) {
            for (ZipEntry entry; (entry = zip.getNextEntry()) != null; ) {
                zip.readAllBytes();
                System.out.println(entry.getName());
            }
        }
    }
}
"""


def need(command: str, package: str) -> None:
    if shutil.which(command) is None:
        pytest.skip(f"{command} is not installed (Debian package {package}; .ci/run installs it)")


async def fetch(settings: Settings, path: str = "/archive/album/") -> httpx.Response:
    async with running_server(settings) as url, httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client:
        return await client.get(path)


async def extract(tool: str, archive: Path, target: Path, timezone: str = "UTC") -> set[str]:
    """Extract with ``tool`` under ``TZ=timezone``; the relative paths of the files it made."""
    commands = {
        "unzip": ["unzip", "-q", str(archive), "-d", str(target)],
        "7z": ["7z", "x", "-y", "-bd", f"-o{target}", str(archive)],
        "bsdtar": ["bsdtar", "-xf", str(archive), "-C", str(target)],
        "unar": ["unar", "-q", "-D", "-o", str(target), str(archive)],  # The Unarchiver's engine
    }
    target.mkdir()
    env = {**os.environ, "TZ": timezone, "LC_ALL": "C.UTF-8"}
    await trio.run_process(commands[tool], env=env, capture_stdout=True)
    return {str(Path(directory, name).relative_to(target)) for directory, _, names in os.walk(target) for name in names}


TROUBLESOME = {
    "a*b.jpg": b"1",
    "q?.jpg": b"2",
    "x<y>.jpg": b"3",
    'say "hi".jpg': b"4",
    "pipe|.jpg": b"5",
    "trailing dot.": b"6",
    "trailing space ": b"7",
    "CON.jpg": b"8",
    "C:photo.jpg": b"9",
    "a\\b.jpg": b"10",
    "Café.jpg": b"11",
    "Cafe\u0301.jpg": b"12",
    "IMG_0001.JPG": b"13",
    "img_0001.jpg": b"14",
}


@pytest.mark.parametrize("tool", ["unzip", "7z", "bsdtar", "unar"])
async def test_every_reader_extracts_every_file_under_its_portable_name(
    settings: Settings, tmp_path: Path, tool: str
) -> None:
    need(tool, {"unzip": "unzip", "7z": "p7zip-full", "bsdtar": "libarchive-tools", "unar": "unar"}[tool])
    write_tree(settings.storage_dir / "album", TROUBLESOME)
    response = await fetch(settings)
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    expected = entry_names(sorted(os.fsencode(name) for name in TROUBLESOME))
    assert [info.filename for info in archive.infolist()] == expected
    assert len({name.casefold() for name in expected}) == len(TROUBLESOME)  # one file each, on any system
    (tmp_path / "a.zip").write_bytes(response.content)
    assert await extract(tool, tmp_path / "a.zip", tmp_path / "out") == set(expected)


async def test_names_not_in_utf8_reach_java_and_everyone_as_cyrillic(settings: Settings, tmp_path: Path) -> None:
    album = settings.storage_dir / "album"
    album.mkdir()
    # Sorted first, as the finding had it: Java then read no entry at all.
    for raw in ("Отпуск.jpg".encode("cp1251"), "фото.jpg".encode("cp1251"), b"z.jpg"):
        (album / os.fsdecode(raw)).write_bytes(raw)
    # And in CP866, as 7z, bsdtar or PHP unpack on the server a zip made on a Russian Windows (helper 186:
    # "ДР Маши/Фото.jpg" reached everyone as "„ђ Њ иЁ/”®в®.jpg").
    (album / os.fsdecode("ДР Маши".encode("cp866"))).mkdir()
    (album / os.fsdecode("ДР Маши/Фото.jpg".encode("cp866"))).write_bytes(b"oem")
    expected = {"Отпуск.jpg", "фото.jpg", "z.jpg", "ДР Маши/Фото.jpg"}
    response = await fetch(settings)
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert {info.filename for info in archive.infolist()} == expected
    assert all(info.flag_bits & 0x800 for info in archive.infolist() if not info.filename.isascii())
    assert archive.read("ДР Маши/Фото.jpg") == b"oem"
    (tmp_path / "a.zip").write_bytes(response.content)
    for tool in ("unzip", "7z", "bsdtar", "unar"):
        if shutil.which(tool):
            assert await extract(tool, tmp_path / "a.zip", tmp_path / tool) == expected, tool
    need("java", "openjdk-17-jdk-headless")
    (tmp_path / "ListZip.java").write_text(JAVA_LISTING)
    listed = subprocess.run(
        ["java", str(tmp_path / "ListZip.java"), str(tmp_path / "a.zip")], capture_output=True, text=True, check=True
    )
    assert set(listed.stdout.splitlines()) == expected


def windows_zip(files: dict[str, bytes]) -> bytes:
    """A stored zip as Explorer or 7-Zip make one on a Russian Windows: names in CP866 (its OEM code page),
    no UTF-8 flag, made by MS-DOS."""
    records, central = b"", b""
    for name, data in files.items():
        raw, crc = name.encode("cp866"), zlib.crc32(data)
        fields = (20, 0, 0, 0, 0, crc, len(data), len(data), len(raw))
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, *fields, 0, 0, 0, 0, 0, len(records)) + raw
        records += struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + raw + data
    return (
        records
        + central
        + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(files), len(files), len(central), len(records), 0)
    )


EXTRACT_ALL = "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])"
WINDOWS_UNPACKERS = {
    "bsdtar": ["bsdtar", "-xf", "{zip}", "-C", "{album}"],  # the bytes as they are: CP866 on disk
    "7z": ["7z", "x", "-y", "-bd", "-o{album}", "{zip}"],  # the same
    # Read as CP437 (the zip format's code page), written in UTF-8, as PHP's ZipArchive (libzip) does too.
    "zipfile": [sys.executable, "-c", EXTRACT_ALL, "{zip}", "{album}"],
}


@pytest.mark.parametrize("unpacker", WINDOWS_UNPACKERS)
async def test_a_zip_from_a_russian_windows_unpacked_on_the_server_keeps_its_names(
    settings: Settings, tmp_path: Path, unpacker: str
) -> None:
    # Helper 186: a CMS that unpacks the zip an uploader made on a Russian Windows: read as CP1251, its
    # CP866 names went out as "ЋвЇгбЄ.jpg" (7z, bsdtar), or as "ÄΓ»πß¬.jpg" once read as CP437 (zipfile, PHP).
    if unpacker != "zipfile":
        need(unpacker, {"bsdtar": "libarchive-tools", "7z": "p7zip-full"}[unpacker])
    files = {"Отпуск.jpg": b"1", "ДР Маши/Фото.jpg": b"2", "Свадьба 2024/IMG_0001.JPG": b"3", "Новый год.jpg": b"4"}
    (tmp_path / "w.zip").write_bytes(windows_zip(files))
    album = settings.storage_dir / "album"
    album.mkdir()
    command = [part.format(zip=tmp_path / "w.zip", album=album) for part in WINDOWS_UNPACKERS[unpacker]]
    await trio.run_process(command, capture_stdout=True)
    response = await fetch(settings)
    assert response.status_code == 200, response.text
    assert read_archive(response.content) == files


async def test_oem_names_off_reads_every_name_as_utf8_or_the_encoding(settings: Settings) -> None:
    # Helper 187: the CP866 guess (names.decode_component) changes names people see, and had no way out for
    # an operator whose names it misread but with ARCHIVER_NAME_ENCODING other than cp1251, which reads the
    # CP1251 names wrong.  ARCHIVER_OEM_NAMES=off: every name as it was before 2026-12-06, and another ETag.
    album = settings.storage_dir / "album"
    album.mkdir()
    (album / os.fsdecode("Отпуск.jpg".encode("cp866"))).write_bytes(b"1")
    (album / ("Фото".encode("cp866").decode("cp437") + ".jpg")).write_bytes(b"2")
    (album / os.fsdecode("Дача.jpg".encode("cp1251"))).write_bytes(b"3")
    await ctimes_settled(album)
    guessed, as_written = await fetch(settings), await fetch(replace(settings, oem_names=False))
    assert read_archive(guessed.content).keys() == {"Отпуск.jpg", "Фото.jpg", "Дача.jpg"}
    assert read_archive(as_written.content).keys() == {"ЋвЇгбЄ.jpg", "ö«Γ«.jpg", "Дача.jpg"}
    assert guessed.headers["etag"] != as_written.headers["etag"]


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Moscow", "America/New_York"])
async def test_unzip_restores_the_true_time_in_any_zone(settings: Settings, tmp_path: Path, timezone: str) -> None:
    need("unzip", "unzip")
    write_tree(settings.storage_dir / "album", {"noon.jpg": b"n"})
    os.utime(settings.storage_dir / "album" / "noon.jpg", (NOON_UTC, NOON_UTC))
    (tmp_path / "a.zip").write_bytes((await fetch(settings)).content)
    await extract("unzip", tmp_path / "a.zip", tmp_path / "out", timezone)
    assert (tmp_path / "out" / "noon.jpg").stat().st_mtime == NOON_UTC


async def test_dos_times_are_in_the_configured_zone_and_clamped(settings: Settings) -> None:
    times = {
        "noon.jpg": NOON_UTC,
        "2108.jpg": calendar.timegm((2108, 1, 1, 0, 0, 0)),
        "2110.jpg": calendar.timegm((2110, 6, 15, 0, 0, 0)),
        "1970.jpg": 0,
    }
    write_tree(settings.storage_dir / "album", dict.fromkeys(times, b"t"))
    for name, seconds in times.items():
        os.utime(settings.storage_dir / "album" / name, (seconds, seconds))
    for timezone, noon in (("UTC", (2024, 7, 1, 12, 0, 0)), ("Asia/Tokyo", (2024, 7, 1, 21, 0, 0))):
        response = await fetch(replace(settings, timezone=timezone))
        dates = {info.filename: info.date_time for info in zipfile.ZipFile(io.BytesIO(response.content)).infolist()}
        assert dates["noon.jpg"] == noon
        assert dates["2108.jpg"] == dates["2110.jpg"] == (2107, 12, 31, 23, 59, 58)  # never wrapped to 1980
        assert dates["1970.jpg"] == (1980, 1, 1, 0, 0, 0)


async def test_one_etag_per_archive_across_instances_with_other_zones(settings: Settings) -> None:
    write_tree(settings.storage_dir / "album", {"noon.jpg": os.urandom(5000)})
    os.utime(settings.storage_dir / "album" / "noon.jpg", (NOON_UTC, NOON_UTC))
    await ctimes_settled(settings.storage_dir / "album")
    utc, tokyo = await fetch(settings), await fetch(replace(settings, timezone="Asia/Tokyo"))
    assert utc.content != tokyo.content
    assert utc.headers["etag"] != tokyo.headers["etag"]
    async with (
        running_server(replace(settings, timezone="Asia/Tokyo")) as url,
        httpx.AsyncClient(verify=CLIENT_TLS) as client,
    ):
        resumed = await client.get(
            f"{url}/archive/album/", headers={"Range": "bytes=100-", "If-Range": utc.headers["etag"]}
        )
    assert resumed.status_code == 200 and resumed.content == tokyo.content  # starts over, never spliced


async def test_read_only_files_arrive_writable_unless_modes_are_kept(settings: Settings, tmp_path: Path) -> None:
    write_tree(
        settings.storage_dir / "album", {"ro.jpg": b"r", "x.sh": b"x", "suid": b"s", "shared": b"w", "group": b"g"}
    )
    (settings.storage_dir / "album" / "ro.jpg").chmod(0o444)
    (settings.storage_dir / "album" / "x.sh").chmod(0o755)
    (settings.storage_dir / "album" / "suid").chmod(0o6755)
    (settings.storage_dir / "album" / "shared").chmod(0o1777)
    (settings.storage_dir / "album" / "group").chmod(0o664)
    ordinary = zipfile.ZipFile(io.BytesIO((await fetch(settings)).content))
    assert {info.external_attr for info in ordinary.infolist()} == {0o100644 << 16}  # no read-only bit either
    kept = zipfile.ZipFile(io.BytesIO((await fetch(replace(settings, keep_modes=True))).content))
    attributes = {info.filename: info.external_attr for info in kept.infolist()}
    # Kept, but never set-ID, sticky or writable by anyone but the owner: bsdtar run as root restores what it is given.
    assert attributes == {
        "ro.jpg": (0o100444 << 16) | 1,
        "x.sh": 0o100755 << 16,
        "suid": 0o100755 << 16,
        "shared": 0o100755 << 16,
        "group": 0o100644 << 16,
    }
    if shutil.which("unzip"):
        (tmp_path / "a.zip").write_bytes((await fetch(settings)).content)
        await extract("unzip", tmp_path / "a.zip", tmp_path / "out")
        assert os.access(tmp_path / "out" / "ro.jpg", os.W_OK)


async def test_a_display_name_names_the_saved_file(settings: Settings) -> None:
    write_tree(settings.storage_dir / "3bea29ccabbbf64bdebcc055319c5745", {"a.jpg": b"a"})
    secret_name = "/archive/3bea29ccabbbf64bdebcc055319c5745/"
    plain = await fetch(settings, secret_name)
    assert plain.headers["content-disposition"] == 'attachment; filename="3bea29ccabbbf64bdebcc055319c5745.zip"'
    named = await fetch(settings, f"{secret_name}?filename={quote('Отпуск 2024')}")
    assert named.headers["content-disposition"] == (
        "attachment; filename=\"Otpusk 2024.zip\"; filename*=UTF-8''%D0%9E%D1%82%D0%BF%D1%83%D1%81%D0%BA%202024.zip"
    )
    assert named.content == plain.content
    ukrainian = await fetch(settings, f"{secret_name}?filename={quote('Їжак і Ґава, Євпаторія, Ўсход')}")
    assert ukrainian.headers["content-disposition"].startswith(
        'attachment; filename="Yizhak i Gava, Yevpatoriya, Usxod.zip"'
    )
    risky = await fetch(settings, f"{secret_name}?filename={quote('a/b:c*.zip')}")
    assert risky.headers["content-disposition"] == 'attachment; filename="a_b_c_.zip"'
    for refused in ("x" * 200, "tab\there", "photo\u202egpj.exe", "in\u200bvisible", "日本" * 50, "\u3164.bashrc"):
        answer = await fetch(settings, f"{secret_name}?filename={quote(refused)}")
        assert answer.status_code == 400 and "имя файла" in answer.text, refused
    # Bytes that are not UTF-8 (Werkzeug would keep them as "%FF%FE"); a literal "%FF" is a name,
    # its "%" made "_" (wget decodes filename* twice: "%2e" would be a dot).
    not_utf8 = await fetch(settings, f"{secret_name}?filename=%ff%fe")
    assert not_utf8.status_code == 400 and "имя файла" in not_utf8.text
    escaped_name = await fetch(settings, f"{secret_name}?fil%65name=%ff%fe")  # the parameter's name %-escaped too
    assert escaped_name.status_code == 400 and "имя файла" in escaped_name.text
    other = await fetch(settings, f"{secret_name}?x=%ff&filename=ok")  # only the filename is a name
    assert other.status_code == 200
    literal = await fetch(settings, f"{secret_name}?filename={quote('%FF')}")
    assert literal.status_code == 200 and literal.headers["content-disposition"] == 'attachment; filename="_FF.zip"'
    for nothing in ("...", "", ". ."):  # not the album's name, the link's secret (helper 51)
        empty = await fetch(settings, f"{secret_name}?filename={quote(nothing)}")
        assert empty.headers["content-disposition"] == 'attachment; filename="archive.zip"', nothing
    hidden = await fetch(settings, f"{secret_name}?filename={quote('../../evil')}")
    assert hidden.headers["content-disposition"] == 'attachment; filename="_.._evil.zip"'  # no leading dot
    # A Unicode space before the dots hid them from a strip of " ." (curl -J saved ".bashrc.zip").
    # And the ASCII fallback (curl -J's) brought dots back: "\u2026" is "...", "\uff0e" is ".".
    for disguised in ("\u00a0.bashrc", "\u3000../.bashrc", "\u2003 .\u00a0.profile", "\u2026bashrc", "\uff0ebashrc"):
        answer = await fetch(settings, f"{secret_name}?filename={quote(disguised)}")
        saved = re.search(r'filename="([^"]*)"', answer.headers["content-disposition"])
        assert saved is not None and saved.group(1)[0] not in ". " and saved.group(1).endswith(".zip"), disguised


# What a saved name must not start with, and characters whose compatibility forms (the ASCII
# fallback's NFKD) are dots, slashes or what Windows forbids.
LEADING_DOTS_AND_SPACES = st.text(
    st.sampled_from(
        ". /\\\u00a0\u2003\u3000\u200a\u0307\uff0e\u2024\ufe52\u2026\u2025\uff0f\uff3c\uff1a\uff1c"
        "\u200d\ufe0f\u0f73\u2215\U000e0067"
    ),
    max_size=6,
)
# Names near the limits, of characters that grow: NFC makes "\u0958" 6 bytes, "\U0001d160" 12;
# transliterated, "щ" is "shh"; a reserved name takes a "_".
LONG_NAMES = st.tuples(
    st.sampled_from(["", "CON.", "nul "]),
    st.text(st.sampled_from("\u0958\ufb2c\U0001d160日щa."), min_size=50, max_size=116),
).map("".join)


# Escapes in the name itself: wget 1.21 decodes filename* twice (helper 44).
ESCAPES = st.sampled_from(["", "%2e", "%2E%2e%2F", "%252e", "%"])


@given(st.tuples(ESCAPES, LEADING_DOTS_AND_SPACES, st.one_of(st.text(max_size=20), LONG_NAMES)).map("".join))
def test_a_display_name_is_never_hidden_and_never_a_path_in_either_form(requested: str) -> None:
    try:
        name = display_name(requested, "album")
    except DisplayNameRefused:
        return
    header = content_disposition(name)
    fallback = re.search(r'filename="([^"]*)"', header)
    encoded = re.search(r"filename\*=UTF-8''(\S+)", header)
    assert fallback is not None
    assert fallback.group(1).isascii() and not set(fallback.group(1)) & set('<>:"|?*'), header
    twice = unquote(unquote(encoded.group(1))) if encoded else name
    for saved in (fallback.group(1), unquote(encoded.group(1)) if encoded else name, twice):
        assert saved.lower().endswith(".zip") and "/" not in saved and "\\" not in saved, header
        assert len(saved.encode()) <= MAX_SAVED_NAME_BYTES, header  # room for Chromium's ".crdownload"
        # Its first character shows, and is no dot: nothing reads as, or is, a hidden file.
        first = saved[0]
        assert first != "." and not first.isspace() and not unicodedata.category(first).startswith(("M", "C")), header
        assert first not in "\u200d\ufe0f", header


def test_a_transliterated_display_name_still_fits_a_file_system() -> None:
    fallback = re.search(r'filename="([^"]*)"', content_disposition(display_name("щ" * 116, "album")))
    assert fallback is not None and fallback.group(1).endswith(".zip")
    assert len(fallback.group(1)) == MAX_SAVED_NAME_BYTES


def test_a_display_name_is_taken_up_to_its_limits_exactly() -> None:
    # 116 characters and 251 bytes in UTF-8 (with ".zip", 120 and 255): taken; one more, refused.
    assert display_name("a" * 116, "album") == "a" * 116 + ".zip"
    with pytest.raises(DisplayNameRefused):
        display_name("a" * 117, "album")
    at_the_limit = "日" * 83 + "ab"  # 85 characters, 251 bytes
    assert len(at_the_limit.encode()) == 251 and display_name(at_the_limit, "album").endswith(".zip")
    with pytest.raises(DisplayNameRefused):
        display_name(at_the_limit + "c", "album")
    # A name that ends in ".zip", in any case, gets no second one.
    assert display_name("Фото.ZIP", "album") == "Фото.ZIP"


def test_an_album_with_a_reserved_name_is_saved_under_a_portable_one() -> None:
    # The album's name is the default, and Windows cannot save "CON.zip" either.
    for album in ("CON", "nul", "com1"):
        assert content_disposition(display_name(None, album)) == f'attachment; filename="_{album}.zip"'
    # A display name of nothing is not the album's name, the link's secret (helper 51).
    for nothing in (" ..", "...", ". .", "\u3000."):
        assert display_name(nothing, "3bea29ccabbbf64bdebcc055319c5745") == "archive.zip"


def test_emoji_keep_what_shows_and_nothing_hides_text() -> None:
    # Helpers 51, 53, 54, 57: a joiner, tags or variation selectors outside an emoji showed nothing
    # and hid text (tags spelling words after a black flag, a selector a byte after each letter);
    # rules of our own refused real emoji (U+2194 joined, Emoji 15.1; Unicode 15's pink heart,
    # unassigned to Python 3.11); and Chromium saves a joiner or a tag as "_".  Joiners and tags are
    # dropped, a family saved as its people; Unicode's data (the emoji library) says where a
    # variation selector belongs, and which unassigned code points are emoji.
    family, rainbow_flag = "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f3f3\ufe0f\u200d\U0001f308"
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    worker = "\U0001f469\U0001f3fd\u200d\U0001f4bb"  # after a skin tone modifier
    shaking, newer = "\U0001f642\u200d\u2194\ufe0f", "\U0001fa77\U0001fae8\U0001fae9"
    keycap, russia, variant = "1\ufe0f\u20e3", "\U0001f1f7\U0001f1fa", "\u845b\U000e0100"  # variant: IVS
    for kept in (newer, keycap, russia, variant, "\u2764\ufe0f"):
        assert display_name(f"Отпуск {kept}", "album") == f"Отпуск {kept}.zip"
    hidden_words = "".join(
        "\U0001f3f4" + "".join(chr(0xE0000 + ord(letter)) for letter in word) + "\U000e007f"
        for word in ("run", "payload", "exe")
    )
    one_a_byte = "".join(letter + chr(0xE0100 + ord(hidden)) for letter, hidden in zip("Отпуск", "rm -rf", strict=True))
    dropped = {
        family: "\U0001f468\U0001f469\U0001f467",
        rainbow_flag: "\U0001f3f3\ufe0f\U0001f308",
        england: "\U0001f3f4",
        worker: "\U0001f469\U0001f3fd\U0001f4bb",
        shaking: "\U0001f642\u2194\ufe0f",
        "abc\u200d": "abc",
        "C+\u200d+": "C++",  # looked like "C++", was another name
        "a\U000e0067b": "ab",
        england[1:]: "archive",  # nothing left
        hidden_words: "\U0001f3f4" * 3,
        one_a_byte: "Отпуск",
        "photo" + "\U000e0100" * 40: "photo",
        "\ufe0fМама": "Мама",  # taken before the rules above: a link already handed out
        "\u2764\ufe0f\ufe0f": "\u2764\ufe0f",
        "*\ufe0f\u20e3": "_",  # "*" is no name's: the keycap mark left on "_" went too (helper 58)
    }
    for name, shown in dropped.items():
        assert display_name(name, "album") == f"{shown}.zip", ascii(name)
    for refused in ("\U0001f266", "\U000e0080", "in\u200bvisible"):  # unassigned, and a zero-width space
        with pytest.raises(DisplayNameRefused):
            display_name(refused, "album")


@pytest.fixture(scope="module")
def names_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[str, int], Path]]:
    storage = tmp_path_factory.mktemp("names-storage")
    with server_in_thread(Settings(settle_time=0, storage_dir=storage)) as address:
        yield address, storage


@given(
    names=st.lists(
        st.lists(
            st.sampled_from(["a", "A", "я", "Я", "e\u0301", "é", ".", " ", "*", ":", "\\", "?", "😀", "CON", "x"]),
            min_size=1,
            max_size=5,
        )
        .map("".join)
        .filter(lambda name: name not in (".", "..")),
        min_size=1,
        max_size=8,
        unique=True,
    )
)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_drawn_names_are_unique_utf8_and_extracted_alike_by_every_reader(
    names_server: tuple[tuple[str, int], Path], tmp_path_factory: pytest.TempPathFactory, names: list[str]
) -> None:
    address, storage = names_server
    album = tmp_path_factory.mktemp("album", numbered=True).rename(storage / f"n{len(os.listdir(storage))}")
    for index, name in enumerate(names):
        (album / name).write_bytes(b"%d" % index)
    status, _, body = http11_request(address, "GET", f"/archive/{album.name}/".encode(), [])
    assert status == 200
    archive = zipfile.ZipFile(io.BytesIO(body))
    entries = [info.filename for info in archive.infolist()]
    keys = [unicodedata.normalize("NFC", entry).casefold() for entry in entries]
    assert len(set(keys)) == len(names)  # one file each, even on Windows and macOS
    assert all(info.flag_bits & 0x800 or info.filename.isascii() for info in archive.infolist())
    scratch = tmp_path_factory.mktemp("extract", numbered=True)
    (scratch / "a.zip").write_bytes(body)
    for tool in ("unzip", "7z", "bsdtar", "unar"):
        if shutil.which(tool):
            assert trio.run(extract, tool, scratch / "a.zip", scratch / tool) == set(entries), tool


@needs_nginx
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
async def test_chromium_through_tls_nginx_saves_the_display_name(
    settings: Settings, tmp_path: Path, tls_files: tuple[trustme.CA, Path, Path]
) -> None:
    _, certfile, keyfile = tls_files
    write_tree(settings.storage_dir / "3bea29ccabbbf64bdebcc055319c5745", {"Фото.jpg": os.urandom(50_000)})
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    async with (
        running_server(settings) as service,
        nginx_in_front(service, tmp_path / "nginx", tls=(certfile, keyfile)) as front,
    ):
        base = f"{front}/archive/3bea29ccabbbf64bdebcc055319c5745/"
        named = await trio.to_thread.run_sync(
            saved_download, f"{base}?filename={quote('Отпуск 2024')}", downloads, tmp_path / "profile"
        )
        plain = await trio.to_thread.run_sync(saved_download, base, downloads, tmp_path / "profile")
        # Helper 57: Chromium saved a family's joiners as "_" ("\U0001f468_\U0001f469_\U0001f467"): none are sent.
        family = "Семья \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f3f3\ufe0f\u200d\U0001f308"
        emoji = await trio.to_thread.run_sync(
            saved_download, f"{base}?filename={quote(family)}", downloads, tmp_path / "profile"
        )
    assert emoji[0] == "Семья \U0001f468\U0001f469\U0001f467 \U0001f3f3\ufe0f\U0001f308.zip"
    assert named[0] == "Отпуск 2024.zip"
    assert zipfile.ZipFile(named[1]).namelist() == ["Фото.jpg"]
    assert plain[0] == "3bea29ccabbbf64bdebcc055319c5745.zip"  # no display name: the album's, as before


def _deep_path_album(album: Path, levels: int = 20) -> bytes:
    """``album`` with top.jpg, and deep.jpg under ``levels`` folders of 200-character names (past PATH_MAX)."""
    write_tree(album, {"top.jpg": b"top" * 100})
    relative = write_deep_file(album, [b"d%02d" % level + b"x" * 200 for level in range(levels)], b"deep.jpg", b"deep")
    assert len(os.fsencode(album) + b"/" + relative) > 4096  # PATH_MAX
    return relative


async def test_a_path_longer_than_path_max_does_not_make_the_album_undownloadable(
    client: httpx.AsyncClient, storage: Path
) -> None:
    """The walk now lists beneath directory descriptors, so it reaches files whose whole path is
    longer than PATH_MAX (the old walk skipped them: "cannot stat: File name too long"); the CRC
    reader still opens the whole path, fails with ENAMETOOLONG, and every download is a 500."""
    _deep_path_album(storage / "album")
    response = await client.get("/archive/album/")
    assert response.status_code == 200, response.text
    assert read_archive(response.content) == {"top.jpg": b"top" * 100}  # the deep one left out, logged
