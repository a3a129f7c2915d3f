"""Names as people see them: the UTF-8 flag is set, and unzip, bsdtar and 7z agree on names and bytes."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zipfile
from pathlib import Path

import httpx
import pytest
import trio

from .conftest import files_on_disk, write_tree

TREE = {
    "Отпуск/Пляж и море.jpg": os.urandom(20_000),
    "Отпуск/день 2/горы.jpg": os.urandom(5_000),
    "emoji 🌅 sunrise.jpg": b"sunrise",
    "日本語.txt": "テキスト".encode(),
    "plain-ascii.txt": b"ascii",
    "Ёжик.txt": b"",
}

EXTRACTORS = {
    "unzip": lambda archive, target: ["unzip", "-q", str(archive), "-d", str(target)],
    "bsdtar": lambda archive, target: ["bsdtar", "-xf", str(archive), "-C", str(target)],
    "7z": lambda archive, target: ["7z", "x", "-y", "-bd", f"-o{target}", str(archive)],
}


async def test_non_ascii_names_carry_the_utf8_flag(client: httpx.AsyncClient, storage: Path) -> None:
    write_tree(storage / "album", TREE)
    data = (await client.get("/archive/album/")).content
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert {info.filename for info in archive.infolist()} == set(TREE)  # decoded as UTF-8
    for info in archive.infolist():
        local_flags = struct.unpack("<H", data[info.header_offset + 6 : info.header_offset + 8])[0]
        expected = 0x800 if not info.filename.isascii() else 0
        assert info.flag_bits & 0x800 == local_flags & 0x800 == expected, info.filename
    assert archive.testzip() is None


@pytest.mark.parametrize("extractor", sorted(EXTRACTORS))
async def test_extractors_agree_on_names_and_bytes(
    client: httpx.AsyncClient, storage: Path, tmp_path: Path, extractor: str
) -> None:
    if shutil.which(extractor) is None:
        pytest.skip(f"{extractor} is not installed (.ci/run installs unzip, libarchive-tools, p7zip-full)")
    write_tree(storage / "album", TREE)
    archive = tmp_path / "album.zip"
    archive.write_bytes((await client.get("/archive/album/")).content)
    target = tmp_path / "extracted"
    target.mkdir()
    # The server runs in this event loop: trio.run_process, not a blocking subprocess call.
    await trio.run_process(
        EXTRACTORS[extractor](archive, target), env={**os.environ, "LC_ALL": "C.UTF-8"}, capture_stdout=True
    )
    assert files_on_disk(target) == files_on_disk(storage / "album")
