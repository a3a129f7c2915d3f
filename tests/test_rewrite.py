"""Descriptor-free stored entries: byte for byte what zip writes to a file, and readers that read front to back.

zip writing to a regular file seeks back and puts each CRC in its local
header: that file is the oracle for what the service sends.  Readers that
refuse data descriptors (Java's ZipInputStream, busybox unzip from a pipe,
stream-unzip) then read every archive.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from archiver.config import Settings
from archiver.crc_index import RACY_NS
from archiver.producer import find_zip, zip_arguments, zip_input
from archiver.storage import list_album

from .conftest import files_on_disk, http11_request, read_archive, server_in_thread, write_tree

ZIP_TO_FILE = [arg for arg in zip_arguments(find_zip("zip"), 0) if arg != "-"]


def zip_to_file(album: Path, target: Path) -> bytes:
    """What zip writes for ``album`` to a regular file (no data descriptors), with the UTF-8 flag the service sets."""
    names = zip_input(list_album(album)).take_names()
    subprocess.run([*ZIP_TO_FILE, str(target)], cwd=album, input=names, check=True)
    return with_utf8_flags(target.read_bytes())


def with_utf8_flags(archive: bytes) -> bytes:
    """``archive`` with bit 11 set on every non-ASCII UTF-8 name (zip 3.0 never sets it), found by walking it."""
    patched = bytearray(archive)
    end = archive.rfind(b"PK\x05\x06")
    count, _, central = struct.unpack_from("<HII", archive, end + 10)
    for _ in range(count):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", archive, central + 28)
        (local,) = struct.unpack_from("<I", archive, central + 42)
        name = archive[central + 46 : central + 46 + name_length]
        if not name.isascii():
            try:
                name.decode()
            except UnicodeDecodeError:
                pass
            else:
                patched[central + 9] |= 0x08
                patched[local + 7] |= 0x08
        central += 46 + name_length + extra_length + comment_length
    return bytes(patched)


@pytest.fixture(scope="module")
def rewrite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[str, int], Path]]:
    storage = tmp_path_factory.mktemp("rewrite")
    with server_in_thread(Settings(storage_dir=storage)) as address:
        yield address, storage


def new_album(storage: Path, tmp_path_factory: pytest.TempPathFactory, tree: dict[str, bytes]) -> Path | None:
    """A fresh album under ``storage`` holding ``tree``, or None if ``tree`` is not one ("a" and "a/b" both files)."""
    album = Path(tmp_path_factory.mktemp("album", numbered=True))
    album = album.rename(storage / album.name)
    try:
        write_tree(album, tree)
    except (NotADirectoryError, FileExistsError, IsADirectoryError):
        return None
    return album


def download(address: tuple[str, int], name: str) -> bytes:
    status, headers, body = http11_request(address, "GET", f"/archive/{name}/".encode(), [])
    assert status == 200
    assert int(headers["content-length"]) == len(body)
    return body


NAMES = st.text(alphabet=st.sampled_from("abc-_. Яё日1"), min_size=1, max_size=12).filter(
    lambda name: name not in (".", "..")
)
TREES = st.dictionaries(
    st.lists(NAMES, min_size=1, max_size=3).map("/".join),
    st.binary(max_size=3000),
    max_size=8,
)


@given(tree=TREES)
@example(tree={"-": b"dash", "Фото/пляж.jpg": b"x" * 5000, "empty": b""})
@example(tree={})
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sent_archive_is_what_zip_writes_to_a_file(
    rewrite_server: tuple[tuple[str, int], Path], tmp_path_factory: pytest.TempPathFactory, tree: dict[str, bytes]
) -> None:
    address, storage = rewrite_server
    album = new_album(storage, tmp_path_factory, tree)
    if album is None:
        return
    name = album.name
    sent = download(address, name)
    if not files_on_disk(album):
        assert read_archive(sent) == {}
        return
    assert sent == zip_to_file(album, album.parent / f"{name}.zip")
    assert b"PK\x07\x08" not in sent or b"PK\x07\x08" in b"".join(tree.values())


READER_TREE = {
    "photo.jpg": os.urandom(300_000),
    "Фото/пляж.jpg": os.urandom(70_000),
    "deep/er/notes.txt": b"notes\n",
    "empty": b"",
    "-": b"a file named dash",
}


@pytest.fixture
def reader_album(rewrite_server: tuple[tuple[str, int], Path]) -> tuple[bytes, dict[str, bytes]]:
    address, storage = rewrite_server
    write_tree(storage / "readers", READER_TREE)
    return download(address, "readers"), files_on_disk(storage / "readers")


JAVA_READER = """
import java.util.zip.*;
class ReadZipStream {
    public static void main(String[] args) throws Exception {
        ZipInputStream zip = new ZipInputStream(System.in, java.nio.charset.StandardCharsets.UTF_8);
        ZipEntry entry;
        byte[] buffer = new byte[65536];
        while ((entry = zip.getNextEntry()) != null) {
            CRC32 crc = new CRC32();
            long size = 0;
            int read;
            while ((read = zip.read(buffer)) > 0) { crc.update(buffer, 0, read); size += read; }
            System.out.println(entry.getName() + "\\t" + size + "\\t" + Long.toHexString(crc.getValue()));
        }
    }
}
"""


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed (openjdk-17-jdk-headless)")
def test_java_zipinputstream_reads_every_entry(reader_album: tuple[bytes, dict[str, bytes]], tmp_path: Path) -> None:
    archive, expected = reader_album
    source = tmp_path / "ReadZipStream.java"
    source.write_text(JAVA_READER)
    result = subprocess.run(["java", str(source)], input=archive, capture_output=True, check=True)
    listed = {}
    for line in result.stdout.decode().splitlines():
        name, size, crc = line.split("\t")
        listed[name] = (int(size), int(crc, 16))
    assert listed == {name: (len(data), zlib.crc32(data)) for name, data in expected.items()}


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
def test_busybox_unzip_from_a_pipe(reader_album: tuple[bytes, dict[str, bytes]], tmp_path: Path) -> None:
    archive, expected = reader_album
    target = tmp_path / "out"
    target.mkdir()
    subprocess.run(["busybox", "unzip", "-q", "-"], cwd=target, input=archive, check=True, capture_output=True)
    assert files_on_disk(target) == expected


def test_stream_unzip_reads_every_entry(reader_album: tuple[bytes, dict[str, bytes]]) -> None:
    stream_unzip = pytest.importorskip("stream_unzip")
    archive, expected = reader_album
    found = {
        name.decode(): b"".join(chunks)
        for name, _, chunks in stream_unzip.stream_unzip(
            [archive[i : i + 65536] for i in range(0, len(archive), 65536)]
        )
    }
    assert found == expected


def test_files_rewritten_in_place_with_size_and_mtime_kept_are_whole_on_the_next_download(
    rewrite_server: tuple[tuple[str, int], Path],
) -> None:
    address, storage = rewrite_server
    album = storage / "changing"
    write_tree(album, {f"{name}.jpg": name.encode() * 100_000 for name in "abc"})
    time.sleep(2 * RACY_NS / 1e9)  # older than a clock tick: their CRCs are kept (the age is the point)
    download(address, "changing")  # the CRCs are in the index now
    for name in "abc":
        # dd conv=notrunc, then touch -r: the same inode, size and mtime, other bytes.
        path = album / f"{name}.jpg"
        status = path.stat()
        with open(path, "r+b") as file:
            file.write(b"B")
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
        assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == (
            status.st_ino,
            status.st_size,
            status.st_mtime_ns,
        )
    # The ctime moved, so the index's key tells: the very next download is whole (it used to
    # fail three times, each failure dropping one stale CRC).
    assert read_archive(download(address, "changing")) == files_on_disk(album)


def test_70000_entries_the_zip64_end_record_moves_too(
    rewrite_server: tuple[tuple[str, int], Path], tmp_path: Path
) -> None:
    # More entries than a plain end record counts: zip adds a ZIP64 end record and its locator,
    # whose offsets move back like every other.
    address, storage = rewrite_server
    album = storage / "many"
    for index in range(70_000):
        folder = album / f"d{index // 1000:02d}"
        if not index % 1000:
            folder.mkdir(parents=True)
        (folder / f"{index:05d}.jpg").write_bytes(b"%d" % index)
    sent = download(address, "many")
    assert b"PK\x06\x06" in sent[-200:]  # ZIP64 end record
    assert sent == zip_to_file(album, tmp_path / "many.zip")
    # Ranges in the tail are generated (``central``), the ZIP64 end record and locator too;
    # one from the middle runs zip over the second half of the files.
    for start in (len(sent) - 120, len(sent) // 2):
        status, _, tail = http11_request(address, "GET", b"/archive/many/", [("Range", f"bytes={start}-")])
        assert (status, tail) == (206, sent[start:])
    if shutil.which("java") is not None:
        source = tmp_path / "ReadZipStream.java"
        source.write_text(JAVA_READER)
        result = subprocess.run(["java", str(source)], input=sent, capture_output=True, check=True)
        assert len(result.stdout.decode().splitlines()) == 70_000
    if shutil.which("busybox") is not None:
        target = tmp_path / "busybox"
        target.mkdir()
        subprocess.run(["busybox", "unzip", "-q", "-"], cwd=target, input=sent, check=True, capture_output=True)
        assert (target / "d69" / "69999.jpg").read_bytes() == b"69999"
        assert sum(len(files) for _, _, files in os.walk(target)) == 70_000
    stream_unzip = pytest.importorskip("stream_unzip")
    entries = {name: b"".join(chunks) for name, _, chunks in stream_unzip.stream_unzip([sent])}
    assert len(entries) == 70_000
    assert entries[b"d12/12345.jpg"] == b"12345"


# Archives over 4 GiB, on sparse files (zeros that cost no disk).  a.bin ends where b.txt's local
# header lies 8 bytes under 4 GiB without descriptors and 8 bytes over with a.bin's: the entry
# that loses its ZIP64 offset field in zip's file output.  c.bin is over 4 GiB itself.
STRADDLE = 0xFFFFFFFF - 8 - (30 + len("a.bin"))
HUGE_TREE = {"a.bin": STRADDLE, "b.txt": b"after the straddle\n", "c.bin": 4_500_000_000, "d.txt": b"the last\n"}
ORACLE_READERS = {
    # What reads zip's file output must read the same bytes, sent: compared with cmp first.
    "unzip": ["unzip", "-tq"],
    "7z": ["7z", "t", "-bd"],
    "bsdtar": ["bsdtar", "-tvf"],
}


def make_sparse_album(album: Path, tree: dict[str, int | bytes]) -> None:
    album.mkdir()
    for name, content in tree.items():
        with open(album / name, "wb") as file:
            if isinstance(content, bytes):
                file.write(content)
            else:
                file.truncate(content)


def curl(address: tuple[str, int], name: str, *options: str) -> subprocess.Popen[bytes]:
    url = f"http://{address[0]}:{address[1]}/archive/{name}/"
    return subprocess.Popen(["curl", "-sSf", *options, url], stdout=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.timeout(600)  # 8.8 GB read a few times: about 2 minutes
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_archives_over_4_gib_go_without_descriptors_too(
    rewrite_server: tuple[tuple[str, int], Path], tmp_path: Path
) -> None:
    address, storage = rewrite_server
    album = storage / "huge"
    make_sparse_album(album, HUGE_TREE)
    oracle = tmp_path / "huge.zip"
    subprocess.run([*ZIP_TO_FILE, str(oracle)], cwd=album, input=zip_input(list_album(album)).take_names(), check=True)
    size = oracle.stat().st_size
    # Byte for byte, streamed (8.8 GB): cmp reads the download from a pipe.
    download = curl(address, "huge", "-D", str(tmp_path / "headers"))
    compared = subprocess.run(["cmp", "-", str(oracle)], stdin=download.stdout, capture_output=True)
    assert download.wait() == 0
    assert compared.returncode == 0, compared.stdout
    assert f"content-length: {size}" in (tmp_path / "headers").read_text().lower()
    with open(oracle, "rb") as file:
        archive_end = file.seek(size - 300) and file.read()
    assert b"PK\x07\x08" not in archive_end and b"PK\x06\x06" in archive_end  # no descriptor; a ZIP64 end record
    expected = {"a.bin": STRADDLE, "b.txt": 19, "c.bin": 4_500_000_000, "d.txt": 9}
    # Readers that read front to back, from a pipe.
    if shutil.which("java") is not None:
        source = tmp_path / "ReadZipStream.java"
        source.write_text(JAVA_READER)
        with open(oracle, "rb") as stdin:
            result = subprocess.run(["java", str(source)], stdin=stdin, capture_output=True, check=True)
        listed = dict(line.split("\t")[:2] for line in result.stdout.decode().splitlines())
        assert {name: int(size) for name, size in listed.items()} == expected
    stream_unzip = pytest.importorskip("stream_unzip")
    with open(oracle, "rb") as file:
        found = {
            name.decode(): sum(len(chunk) for chunk in chunks)
            for name, _, chunks in stream_unzip.stream_unzip(iter(lambda: file.read(1 << 20), b""))
        }
    assert found == expected
    for reader, command in ORACLE_READERS.items():
        if shutil.which(command[0]) is not None:
            assert subprocess.run([*command, str(oracle)], capture_output=True).returncode == 0, reader
    # Ranges: the generated tail (ZIP64 fields, end record and locator), and one across the
    # straddling entry into c.bin's data.
    central = size - 300
    for start, end in [(central, size - 1), (size - 1, size - 1), (STRADDLE + 30, STRADDLE + 30 + 200)]:
        part = curl(address, "huge", "-r", f"{start}-{end}")
        body, _ = part.communicate()
        with open(oracle, "rb") as file:
            file.seek(start)
            assert body == file.read(end - start + 1), (start, end)
