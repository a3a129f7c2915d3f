"""Known limits of integrity, pinned: each test fails while the limit stands (strict xfail)."""

from __future__ import annotations

import io
import mmap
import os
import zipfile
from pathlib import Path

import httpx
import pytest
import trio

from archiver.archive.ctime_trust import RACY_NS
from archiver.archive.producer_protocol import SECOND

from .conftest import read_archive, write_tree


async def test_a_file_written_through_a_shared_mapping_never_ends_cleanly_with_a_stale_crc(
    client: httpx.AsyncClient, storage: Path
) -> None:
    album = storage / "album"
    write_tree(album, {"db.bin": os.urandom(200_000)})
    path = album / "db.bin"
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as mapping:
        # Its blocks allocated and written first: ext4 (data=ordered) writes the dirty pages of a file
        # whose blocks a transaction allocated when it commits, and another process's fsync commits.
        os.fsync(file.fileno())
        for _ in range(3):
            mapping[:4] = b"AAAA"  # the write fault moves the ctime now
            await trio.sleep(RACY_NS / SECOND + 0.2)  # the clock past the index's racy window: the CRC is kept
            first = await client.get("/archive/album/")
            assert read_archive(first.content)
            before = path.stat()
            mapping[:4] = b"BBBB"  # the page is still dirty and writable: no fault, no time moves
            second = await client.get("/archive/album/")
            if path.stat().st_ctime_ns == before.st_ctime_ns:
                break
            # Written back meanwhile (a sync, memory pressure): the store faulted and moved the ctime,
            # and the download must then be right.  Once more.
            assert read_archive(second.content) == {"db.bin": path.read_bytes()}
        else:
            pytest.fail("the page was written back each time: the limit could not be shown")
    # The known limit, and only it, is an expected failure: any other failure above is one
    # (a strict xfail marker took any exception for it; helper 90).
    if second.status_code == 200 and len(second.content) == int(second.headers["content-length"]):
        archive = zipfile.ZipFile(io.BytesIO(second.content))
        if archive.testzip() is not None:
            pytest.xfail(
                "a store through a shared mapping to a dirty page moves neither mtime nor ctime "
                "(README, Failure behaviour): a clean end with a CRC that the bytes sent do not match"
            )
    pytest.fail("the known limit did not show: say so in the README, and make this an ordinary test")
