"""The CRC index: computed right, kept on disk, warmed by `archiver index`, keyed by everything a change moves."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import mmap
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from zlib_ng import zlib_ng

import archiver.archive.crc_index as crc_index_module
import archiver.archive.crc_reads as crc_reads_module
import archiver.archive.crc_source as crc_source_module
import archiver.archive.crc_store as crc_store_module
import archiver.archive.ctime_trust as ctime_trust_module
import archiver.archive.large_file_crc as large_file_crc_module
import archiver.archive.listed_files as listed_files_module
import archiver.archive.plan as plan_module
import archiver.archive.producer as producer_module
import archiver.web.crc_index_file as crc_index_file_module
from archiver.archive import launcher
from archiver.archive.album_crcs import album_crcs
from archiver.archive.crc_index import CrcIndex, PartialCrc
from archiver.archive.crc_reads import HOLE_MIN, READ_SIZE
from archiver.archive.crc_source import CrcSource
from archiver.archive.crc_store import WRITE_BATCH, CrcStore, IndexKey, index_key, row_check
from archiver.archive.ctime_trust import (
    COARSE_RACY_NS,
    RACY_NS,
    CtimeTrust,
    is_racy,
    trusted_ctime,
)
from archiver.archive.filesystems import filesystem_id, read_mount_table
from archiver.archive.large_file_crc import file_crc
from archiver.archive.listed_files import FileUnreadable, failures_named
from archiver.archive.plan import ArchivePlan
from archiver.archive.producer import ProducerFailed
from archiver.archive.producer_protocol import COMPUTED_CRC_LIMIT, SECOND, FileChanged
from archiver.archive.shared_descriptor import SharedDescriptor
from archiver.archive.sparse import crc32_with_zeros
from archiver.archive.storage import list_album
from archiver.archive.store_thread import StoreThread
from archiver.archive.worker_threads import NoThread
from archiver.config import Settings
from archiver.web.pages import ALBUM_CHANGING, MESSAGES

from .conftest import (
    CLIENT_TLS,
    ctimes_settled,
    files_on_disk,
    own_descriptors,
    read_archive,
    running_server,
    sparse_file,
    write_atomically,
    write_tree,
)
from .test_adversarial import address_of
from .test_cli import PROJECT, launched
from .test_dead_storage import fuse_unavailable, gated_mount, served_gated_album, until_held
from .test_failures import HeldLauncher
from .test_observability import samples
from .test_producer import collect
from .test_ranges import bytes_read_by_this_process

ABORTED = (httpx.RemoteProtocolError, httpx.ReadError)
# A file the service reads for its CRC in a cold whole download (a smaller one's, the producer computes).
BIG = COMPUTED_CRC_LIMIT + 1


async def settle() -> None:
    """Let files just written grow older than a clock tick: the index keeps no CRC of a file that may still change.

    Not synchronisation: the age of the files is what is tested.
    """
    await trio.sleep(RACY_NS / 1e9 + 0.05)


async def test_file_crc_is_zlibs_and_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(os.urandom(1_000_000))
    await settle()
    index = CrcIndex(CrcStore(tmp_path / "index.sqlite"))
    key, crc, _ = await file_crc(path, 1_000_000, index)
    assert crc == zlib.crc32(path.read_bytes())
    index.flush()
    # A fresh index over the same file finds it without reading, once a walk has looked at its filesystem.
    fresh = CrcIndex(CrcStore(tmp_path / "index.sqlite"))
    assert fresh.get(key) is None
    list_album(tmp_path, on_device=fresh.trust.learn)
    assert fresh.get(key) == crc


async def test_changed_size_or_a_link_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"12345")
    with pytest.raises(FileChanged):
        await file_crc(path, 4, CrcIndex())
    link = tmp_path / "link.jpg"
    link.symlink_to(path)
    with pytest.raises(FileChanged):
        await file_crc(link, 5, CrcIndex())


async def test_a_folder_swapped_for_a_link_after_the_walk_leads_no_crc_read_out_of_the_album(tmp_path: Path) -> None:
    # Helper 102: the CRC readers opened a file's whole path, so a folder of the album swapped for
    # a link (an FTP user's SITE SYMLINK) after the walk led the open outside the storage.  A
    # download's read was refused by the key check after the open; `archiver index`, which has
    # no key, read the outside file and kept its CRC.  Now no open goes through a link at all.
    write_tree(tmp_path / "album", {"sub/a.jpg": b"12345", "sub/b.jpg": b"678"})
    write_tree(tmp_path / "outside", {"a.jpg": b"abcde", "b.jpg": b"fgh"})
    await settle()
    plan = ArchivePlan(tmp_path / "album", list_album(tmp_path / "album").files)
    shutil.rmtree(tmp_path / "album" / "sub")
    (tmp_path / "album" / "sub").symlink_to(tmp_path / "outside")
    index = CrcIndex()
    done = album_crcs(tmp_path / "album", [("sub/a.jpg", 5), ("sub/b.jpg", 3)], index)
    assert (done.computed, done.changing) == (0, 2)
    outside = tmp_path / "outside" / "a.jpg"
    status = outside.stat()
    assert index.get((status.st_dev, status.st_ino, 5, status.st_mtime_ns, status.st_ctime_ns)) is None
    # A download's reads: the small files' batch (a range's: a whole download leaves a small file
    # the index lacks to the producer), and a large file's own read.
    with pytest.raises(FileChanged, match=r"sub/a\.jpg: Not a directory"):
        await CrcSource(plan, [0], index).compute()
    with pytest.raises(FileChanged, match=r"sub/a\.jpg: Not a directory"):
        await file_crc(tmp_path / "album" / "sub" / "a.jpg", 5, index)
    # The same folder as a real one again: read, through the batch's one held folder.
    (tmp_path / "album" / "sub").unlink()
    write_tree(tmp_path / "album", {"sub/a.jpg": b"12345", "sub/b.jpg": b"678"})
    await settle()
    assert album_crcs(tmp_path / "album", [("sub/a.jpg", 5), ("sub/b.jpg", 3)], index).computed == 2


async def test_a_file_read_with_another_key_than_listed_is_a_change(tmp_path: Path) -> None:
    # Its CRC would not be the CRC of the bytes the producer sends (it checks the listed key).
    write_tree(tmp_path / "album", {"a.jpg": b"a" * 10, "b.jpg": b"b" * 20})
    plan = ArchivePlan(tmp_path / "album", list_album(tmp_path / "album").files)
    same = CrcSource(plan, [0, 1], CrcIndex())
    await same.compute()
    assert [await same.crc(0), await same.crc(1)] == [zlib.crc32(b"a" * 10), zlib.crc32(b"b" * 20)]
    listed = plan.key(1)[3]
    os.utime(tmp_path / "album" / "b.jpg", ns=(listed, listed + 1))
    changed = CrcSource(plan, [0, 1], CrcIndex())
    with pytest.raises(FileChanged, match=r"b\.jpg: not the file listed"):
        await changed.compute()


async def test_a_plan_whose_crcs_were_all_found_in_the_index_looks_none_up_again(tmp_path: Path) -> None:
    # 20,000 keys looked up took ~30 ms before a warm download's first byte.  The plan keeps the
    # CRCs a lookup found; a plan's keys are its files', so they are what the index would say.
    album = tmp_path / "album"
    files = {"a.jpg": b"a" * 10, "b/c.jpg": b"c" * 20, "d.jpg": b"d" * 30}
    write_tree(album, files)
    await settle()
    index = CrcIndex()
    plan = ArchivePlan(album, list_album(album, on_device=index.trust.learn).files)
    assert plan.length is not None
    expected = [zlib.crc32(files[plan.path_str(k)]) for k in range(plan.count)]

    async def crcs_of(entries: Sequence[int], index: CrcIndex) -> tuple[list[int], bool]:
        """The CRCs of ``entries``, and whether any file was read for them."""
        source = CrcSource(plan, entries, index)
        await source.compute()
        return [await source.crc(k) for k in entries], source.reads > 0

    whole = plan.crc_entries(0, plan.length - 1)
    assert await crcs_of(whole, index) == (expected, True)  # cold: read, and kept by the index
    assert plan.indexed_crcs is None
    assert await crcs_of(whole, index) == (expected, False)  # warm: found, and kept by the plan
    # An index that knows none of them (as after a restart with a new plan), the device looked at:
    # nothing read, for a whole download or a range.
    fresh = CrcIndex()
    list_album(album, on_device=fresh.trust.learn)
    assert await crcs_of(whole, fresh) == (expected, False)
    central = plan.crc_entries(plan.central_offset, plan.length - 1)
    assert await crcs_of(central[1:], fresh) == (expected[1:], False)
    # A device the service has not found trusted (a mount came under the same number): read again.
    assert await crcs_of(whole, CrcIndex()) == (expected, True)


def test_store_keeps_and_counts(tmp_path: Path) -> None:
    store = CrcStore(tmp_path / "index.sqlite")
    store.put((1, 2, 3, 4, 7, 0), 99)
    store.put((1, 2, 3, 4, 8, 0), 98)  # the same file after a write that put its mtime back
    assert store.count() == 2
    assert store.get((1, 2, 3, 4, 7, 0)) == 99
    assert store.get((1, 2, 3, 4, 8, 0)) == 98


def test_a_call_to_the_store_thread_after_it_was_idle_waits_and_does_not_spin() -> None:
    # Helper 181: a caller waited until the thread's last progress plus ``stall``, which after an idle
    # spell longer than ``stall`` was already past: it spun on its condition (each wait returning at
    # once) until the thread had the lock to take the call: ~3,000 turns and 4-12 ms of a core a
    # lookup, every first lookup after two idle seconds (a download's, a batch's).
    thread = StoreThread("test store thread", stall=0.5)
    try:
        assert thread.run(lambda _: 1) == 1
        thread._moved -= 10  # idle for ten seconds since its last call
        waits = []
        wait = thread._condition.wait

        def counted(timeout: float | None = None) -> bool:
            if threading.current_thread() is threading.main_thread():
                waits.append(timeout)
            return wait(timeout)

        thread._condition.wait = counted  # type: ignore[method-assign]
        assert thread.run(lambda _: 2) == 2
        assert len(waits) <= 3, f"{len(waits)} waits for one call, the first {waits[:3]}"
    finally:
        assert thread.close(10)


def test_a_write_waiting_on_another_process_holds_up_no_lookup_and_no_other_flush(tmp_path: Path) -> None:
    # Helper 36: with another process holding SQLite's write lock, every download's lookups queued
    # behind writes that waited out the 5 s busy timeout, one after another (first bytes at 5, 10, 15 s).
    path = tmp_path / "index.sqlite"
    store = CrcStore(path, busy_timeout=60.0)
    store.put((1, 1, 1, 1, 1, 0), 11)
    store.flush()
    with sqlite3.connect(path, isolation_level=None) as holder:
        holder.execute("BEGIN IMMEDIATE")
        store.put((2, 2, 2, 2, 2, 0), 22)
        writing = threading.Thread(target=store.flush)  # waits on the holder, up to 60 s
        writing.start()
        try:
            assert store.get((1, 1, 1, 1, 1, 0)) == 11
            store.put((3, 3, 3, 3, 3, 0), 33)
            store.flush(wait=False)  # a download's end: not behind the write that waits
            assert writing.is_alive()  # still waiting: the lookup and the flush above did not wait behind it
        finally:
            holder.execute("ROLLBACK")
            writing.join()
    store.flush()
    assert store.get((3, 3, 3, 3, 3, 0)) == 33  # left for the next write, not lost
    assert store.get((2, 2, 2, 2, 2, 0)) == 22 and store.unwritten == 0  # written once the lock was let go


def test_a_batch_written_from_a_crc_reader_never_waits_on_another_process(tmp_path: Path) -> None:
    # Helper 66: a batch of 512 CRCs is written by the reader thread that read them; with another
    # process holding SQLite's write lock, each batch waited out the busy timeout there (1 s in the
    # service), holding one of the few reader threads: a cold album of 2,000 files took 3.4 s, not
    # 0.37, and its rows were lost.  Now they wait for the next flush.
    path = tmp_path / "index.sqlite"
    store = CrcStore(path, busy_timeout=60.0)
    keys = [(1, inode, 1, 1, 1, 0) for inode in range(WRITE_BATCH * 2)]
    with sqlite3.connect(path, isolation_level=None) as holder:
        holder.execute("BEGIN IMMEDIATE")
        try:
            reader = threading.Thread(target=lambda: [store.put(key, key[1]) for key in keys])
            reader.start()
            reader.join(30)  # a wait on the holder would be 60 s a batch
            assert not reader.is_alive()
        finally:
            holder.execute("ROLLBACK")
        assert holder.execute("SELECT count(*) FROM crc_v6").fetchone()[0] == 0
    store.flush()  # the download's end, or the next one's
    assert all(store.get(key) == key[1] for key in keys) and store.unwritten == 0


def test_a_damaged_store_warns_once_a_minute_not_once_a_lookup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by helper 34: a file overwritten under a running service logged 45,000 lines for one album.
    path = tmp_path / "index.sqlite"
    store = CrcStore(path)
    store.put((1, 2, 3, 4, 5, 0), 99)
    store.flush()
    # Every lookup failing, as on a damaged file (the review overwrote it): the table gone under the service.
    with sqlite3.connect(path) as other:
        other.execute("DROP TABLE crc_v6")
    with caplog.at_level(logging.WARNING, logger="archiver.archive.crc_store"):
        for inode in range(1000):
            assert store.get((1, 100 + inode, 3, 4, 5, 0)) is None
    warnings = [record.getMessage() for record in caplog.records if record.name == "archiver.archive.crc_store"]
    assert len(warnings) == 1 and "read skipped" in warnings[0], warnings


def run_archiver(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "archiver", *arguments], env={**os.environ, **env}, capture_output=True, text=True
    )


def rows(index: Path) -> dict[int, int]:
    """inode -> CRC, from the index file (closed at once: see the test of an index whose filesystem hangs)."""
    with contextlib.closing(sqlite3.connect(index)) as db:
        return dict(db.execute("SELECT inode, crc FROM crc_v6").fetchall())


async def test_archiver_index_warms_the_index_the_service_uses(
    storage: Path, settings: Settings, tmp_path: Path
) -> None:
    write_tree(storage / "one", {"a.jpg": os.urandom(200_000), "sub/b.txt": b"b"})
    write_tree(storage / "two", {"c.jpg": os.urandom(50_000)})
    index = tmp_path / "state" / "index.sqlite"
    env = {"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(index)}
    await settle()
    first = run_archiver("index", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "indexed 2 albums, 3 files (3 computed)"
    assert run_archiver("index", "one", env=env).stdout.strip().endswith("(0 computed, the rest already known)")
    a_jpg = storage / "one" / "a.jpg"
    assert rows(index)[a_jpg.stat().st_ino] == zlib.crc32(a_jpg.read_bytes())

    indexed = replace(settings, index_path=str(index))
    async with running_server(indexed) as url, httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client:
        whole = await client.get("/archive/one/")
    assert read_archive(whole.content) == files_on_disk(storage / "one")
    # Only a cache: without the file, nothing is lost.
    index.unlink()
    async with running_server(indexed) as url, httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client:
        again = await client.get("/archive/one/")
    assert again.content == whole.content


def test_a_damaged_row_is_left_unused_and_written_anew(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CrcStore(tmp_path / "index.sqlite")
    store.put((1, 2, 3, 4, 5, 0), 99)
    store.put((1, 3, 3, 4, 5, 0), 7)
    store.flush()
    with sqlite3.connect(tmp_path / "index.sqlite") as other:
        other.execute("UPDATE crc_v6 SET crc = crc + 1 WHERE inode = 2")
        other.execute('UPDATE crc_v6 SET "check" = "check" + 1 WHERE inode = 3')
    with caplog.at_level(logging.WARNING, logger="archiver.archive.crc_store"):
        assert store.get((1, 2, 3, 4, 5, 0)) is None
    assert "a damaged row left unused (device 1, inode 2)" in caplog.text
    assert store.get((1, 3, 3, 4, 5, 0)) is None
    store.put((1, 2, 3, 4, 5, 0), 99)
    store.flush()
    assert store.get((1, 2, 3, 4, 5, 0)) == 99
    # A CRC past 32 bits, its check made to match (an edit, not a flipped bit): no CRC-32 either.
    with sqlite3.connect(tmp_path / "index.sqlite") as other:
        other.execute(
            'UPDATE crc_v6 SET crc = ?, "check" = ? WHERE inode = 2', (2**32, row_check((1, 2, 3, 4, 5, 0), 2**32))
        )
    assert store.get((1, 2, 3, 4, 5, 0)) is None


def test_a_key_past_sqlites_integers_is_neither_looked_up_nor_kept(tmp_path: Path) -> None:
    # An mtime past 2262 in nanoseconds (touch -d 2300-01-01 on ext4) is 2**63 or more: SQLite's
    # OverflowError would fail the download.  Its CRC is read for each download instead.
    store = CrcStore(tmp_path / "index.sqlite")
    for mtime_ns in (2**63 - 1, 2**63):
        store.put((1, 2, 3, mtime_ns, 5, 0), 99)
    store.flush()
    assert (store.get((1, 2, 3, 2**63 - 1, 5, 0)), store.get((1, 2, 3, 2**63, 5, 0))) == (99, None)
    assert store.count() == 1


async def test_a_crc_damaged_in_the_index_file_is_never_sent(storage: Path, settings: Settings, tmp_path: Path) -> None:
    """A row's CRC changed in the file (a flipped bit on disk, an edit): the download is whole and
    its CRCs right, read from the file again, and the row is written anew.  SQLite keeps no
    checksum of its pages; before each row had its own check, such a CRC went out in a clean
    archive that unzip and 7z then reported as damaged (helper 42, 2026-12-02)."""
    write_tree(storage / "one", {"a.jpg": os.urandom(200_000), "b.jpg": os.urandom(1000)})
    index = tmp_path / "index.sqlite"
    await settle()
    assert run_archiver("index", env={"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(index)}).returncode == 0
    a_jpg = storage / "one" / "a.jpg"
    with sqlite3.connect(index) as db:
        db.execute("UPDATE crc_v6 SET crc = crc + 1 WHERE inode = ?", (a_jpg.stat().st_ino,))
    indexed = replace(settings, index_path=str(index))
    async with running_server(indexed) as url, httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client:
        response = await client.get("/archive/one/")
    assert response.status_code == 200
    assert read_archive(response.content) == files_on_disk(storage / "one")  # every CRC checked
    assert rows(index)[a_jpg.stat().st_ino] == zlib.crc32(a_jpg.read_bytes())


def test_archiver_index_of_every_album_passes_over_what_is_not_one(storage: Path, tmp_path: Path) -> None:
    """A file, a link out of the root and a dangling link beside the albums (names an album could
    have), and entries whose names no album can have: every album is still indexed, and the summary
    counts the rest.  Named, one is an error."""
    write_tree(storage / "one", {"a.jpg": b"a"})
    write_tree(storage / "two", {"b.jpg": b"b"})
    (storage / "README").write_text("not an album")
    (storage / "aaa-out").symlink_to(tmp_path)
    (storage / "dangling").symlink_to("nowhere")
    (storage / "stray.txt").write_text("no album's name")
    write_tree(storage / ".ftpquota-dir", {"c.jpg": b"c"})
    env = {"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(tmp_path / "index.sqlite")}
    result = run_archiver("index", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"indexed 2 albums, 2 files (2 computed); 5 other entries of {storage} are not albums"
    )
    named = run_archiver("index", "README", env=env)
    assert named.returncode == 2 and "no album 'README'" in named.stderr


def test_archiver_index_goes_past_an_album_it_cannot_list_and_fails_at_the_end(storage: Path, tmp_path: Path) -> None:
    """An album of more files than ARCHIVER_MAX_FILES cannot be listed: the others get their CRCs, and the
    exit status says one did not (a hook or cron must not take the run for done)."""
    write_tree(storage / "big", {"a.jpg": b"a", "b.jpg": b"b", "c.jpg": b"c"})
    write_tree(storage / "small", {"d.jpg": b"d"})
    env = {"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(tmp_path / "index.sqlite"), "ARCHIVER_MAX_FILES": "2"}
    result = run_archiver("index", env=env)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "indexed 1 album, 1 file (1 computed)"
    assert "archiver index: cannot list big: more than 2 entries (ARCHIVER_MAX_FILES)" in result.stderr
    assert result.stderr.strip().endswith("archiver index: 1 album(s) could not be listed: big")
    small = storage / "small" / "d.jpg"
    assert rows(tmp_path / "index.sqlite") == {small.stat().st_ino: zlib.crc32(b"d")}


def test_archiver_index_of_a_storage_it_cannot_list_says_so() -> None:
    """A root of mode 0311 hides its albums' names from the service's user: a clear error, exit 2, no traceback."""
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        root = base / "albums"
        write_tree(root / "one", {"a.jpg": b"a"})
        (base / "index").mkdir()
        (base / "index").chmod(0o777)
        root.chmod(0o311)
        check = (
            "import os, sys\n"
            "import encodings.cp1251  # the interpreter may live where nobody cannot read (/root)\n"
            "from archiver.cli import main\n"
            "if os.geteuid() == 0: os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "main(['index'])\n"
        )
        env = {**os.environ, "ARCHIVER_DIR": str(root), "ARCHIVER_INDEX": str(base / "index" / "index.sqlite")}
        result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=PROJECT)
    finally:
        (base / "albums").chmod(0o755)
        shutil.rmtree(base)
    assert result.returncode == 2, result.stderr
    assert "cannot list the storage directory" in result.stderr and "Traceback" not in result.stderr


def test_archiver_index_needs_an_index_file(storage: Path) -> None:
    result = run_archiver("index", env={"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": ""})
    assert result.returncode == 2
    assert "ARCHIVER_INDEX is not set" in result.stderr


# Another instance: opens the index, keeps a CRC, and holds the file until its stdin closes.
OTHER_INSTANCE = (
    "import sys; from pathlib import Path; from archiver.archive.crc_store import WRITE_BATCH, CrcStore; "
    "store = CrcStore(Path(sys.argv[1])); store.put((1, 2, 3, 4, 5, 0), 99); store.flush(); "
    "print('ready', flush=True); sys.stdin.read()"
)


@pytest.mark.parametrize(
    "how", ["cannot be made", "deleted under another instance", "a crc_v6 of another shape", "not an SQLite file"]
)
async def test_an_unusable_index_is_an_error_line_and_the_service_serves(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    # Only a cache: no reason not to start (helper 34: under Restart=always, a loop of failed starts).
    index_path, other = "/proc/no/index.sqlite", None
    if how == "a crc_v6 of another shape":
        # Helper 177: served, every lookup and write failing (a WARNING a minute), no CRC ever kept.
        index_path = str(tmp_path / "index.sqlite")
        with sqlite3.connect(index_path) as db:
            db.execute("CREATE TABLE crc_v6 (inode INTEGER PRIMARY KEY, crc INTEGER)")
    settings_text = "ARCHIVER_DIR=/srv/photos\nARCHIVER_LINK_SECRET=0123456789abcdef0123456789\n"
    if how == "not an SQLite file":
        # Helper 196: the settings file named by mistake; the line advised "delete /etc/archiver.env*".
        index_path = str(tmp_path / "archiver.env")
        Path(index_path).write_text(settings_text)
    if how == "deleted under another instance":
        # Deleted alone, its -wal and -shm left: SQLite's "disk I/O error" for any other process.
        index_path = str(tmp_path / "index.sqlite")
        command = [sys.executable, "-c", OTHER_INSTANCE, index_path]
        other = subprocess.Popen(command, cwd=PROJECT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert other.stdout is not None and other.stdout.readline() == "ready\n"
        Path(index_path).unlink()
    try:
        write_tree(settings.storage_dir / "album", {"a.jpg": os.urandom(50_000)})
        served = replace(settings, index_path=index_path)
        async with running_server(served) as url, httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client:
            response = await client.get("/archive/album/")
    finally:
        if other is not None:
            other.communicate("", timeout=30)
    assert read_archive(response.content) == files_on_disk(settings.storage_dir / "album")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"CRC index {index_path!r} cannot be used" in message for message in errors), errors
    if how == "a crc_v6 of another shape":
        assert any("its table crc_v6 is not this version's (columns inode, crc)" in m for m in errors), errors
    if how == "not an SQLite file":
        (error,) = [message for message in errors if "CRC index" in message]
        assert "not an SQLite file: does ARCHIVER_INDEX name the file meant?" in error
        assert "delete" not in error
        assert Path(index_path).read_text() == settings_text
    else:  # a damaged index, or one deleted under another instance: to be deleted with its -wal and -shm
        assert any(f"delete {index_path}* and start again" in message for message in errors), errors


async def test_the_index_file_is_never_read_on_the_event_loop(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its lookups wait on another process's write lock up to SQLite's 5 s busy timeout: on the
    # event loop, every connection of the service froze with them (helper 34: /healthz in 5.05 s).
    callers: list[threading.Thread] = []
    real_get_many = CrcStore.get_many

    def get_many(store: CrcStore, keys: Sequence[IndexKey]) -> list[int | None]:
        callers.append(threading.current_thread())
        return real_get_many(store, keys)

    monkeypatch.setattr(CrcStore, "get_many", get_many)
    # Cold files, large (read a block a call) and small (a batch a call).
    write_tree(settings.storage_dir / "album", {"big.jpg": os.urandom(6_000_000), "small.jpg": os.urandom(1000)})
    await settle()
    served = replace(settings, index_path=str(tmp_path / "index.sqlite"))
    async with running_server(served) as url, httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client:
        response = await client.get("/archive/album/")
    assert read_archive(response.content) == files_on_disk(settings.storage_dir / "album")
    assert callers and threading.main_thread() not in callers


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("hangs", ["all", "write"])
async def test_an_index_whose_filesystem_hangs_costs_downloads_their_lookups_not_their_archives(
    tmp_path: Path, hangs: str
) -> None:
    # Helper 177: the index's file on a filesystem that stops answering (a hard NFS mount whose
    # server is gone) held the lookup of a cold album's download, and every later one behind its
    # lock, until the storage timeout: a 503 "the storage did not answer", for a cache; a CRC
    # reader that wrote a batch of rows stopped there too ("write": only writes hang), and its
    # download with it.
    storage, source, gate = tmp_path / "storage", tmp_path / "index-source", tmp_path / "gate"
    write_tree(storage / "warm", {"a.jpg": os.urandom(50_000)})
    # Read by the service (over COMPUTED_CRC_LIMIT), more than a batch of rows written from its readers.
    for album in ("cold", "cold2", "later"):
        write_tree(storage / album, {f"{i:03}.jpg": os.urandom(BIG + i) for i in range(WRITE_BATCH + 40)})
    source.mkdir()
    index = tmp_path / "index" / "crc-index.sqlite"
    command = [sys.executable, "-m", "archiver", "-D", str(storage), "-H", "127.0.0.1", "-P", "0"]
    env = {"ARCHIVER_INDEX": str(index), "ARCHIVER_STORAGE_TIMEOUT": "5"}
    async with (
        gated_mount(source, index.parent, gate, "--writable"),
        launched(command, env) as server,
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
    ):
        try:
            for album in ("warm", "cold", "cold2", "later"):
                await ctimes_settled(storage / album)
            assert (await client.get("/archive/warm/")).status_code == 200
            gate.write_text(hangs)  # every call on the index's filesystem hangs, or every write
            began = time.monotonic()
            cold = await client.get("/archive/cold/")
            took = time.monotonic() - began
            assert cold.status_code == 200, server.output.decode()[-2000:]
            assert read_archive(cold.content) == files_on_disk(storage / "cold")
            assert took < 5, took  # not the storage timeout
            warm = await client.get("/archive/warm/")  # from memory: no wait on the index
            assert read_archive(warm.content) == files_on_disk(storage / "warm")
            assert (await client.get("/archive/cold/")).status_code == 200
            # Past the stall, the next cold album's lookups and rows go without the file at once.
            await trio.sleep(crc_store_module.SERVICE_STALL)
            began = time.monotonic()
            cold2 = await client.get("/archive/cold2/")
            assert read_archive(cold2.content) == files_on_disk(storage / "cold2")
            assert time.monotonic() - began < 5
        finally:
            gate.unlink(missing_ok=True)
        # Once it answers again, the index is used again, without a restart.
        later = await client.get("/archive/later/")
        assert read_archive(later.content) == files_on_disk(storage / "later")
        later_inode = (storage / "later" / "000.jpg").stat().st_ino
        # Read through the mount, as the service does: through the source, SQLite's locks and its -shm
        # were another file's to this process, which saw the service hold none; its connection, closed
        # whenever the cyclic GC ran (one is in a reference cycle), checkpointed the -wal into the file
        # and deleted the -wal and -shm under the service: its later lookups "disk I/O error", its rows
        # written to a deleted -wal (helper 184).
        with trio.fail_after(10):
            while later_inode not in rows(index):
                await trio.sleep(0.05)
            gc.collect()  # a connection left to the GC would be closed here
            assert (source / f"{index.name}-wal").exists()  # the service's, in use
            # Logged by the store's thread as its stuck call ends, which may come after the row
            # written by another: and the service's log reaches the test through its pipe.
            while b"CRC index: its file answers again" not in bytes(server.output):
                await trio.sleep(0.05)
        log = server.output.decode()
    # Which: "lookups go without it", or "rows wait to be written" (a lookup SQLite answers from its
    # cache of the file's pages makes no call on it).
    assert "has not answered for" in log
    assert "Traceback" not in log
    assert log.count("CRC index: ") == 2, log  # one line as it stops answering, one as it answers again
    assert "CRC index: its file answers again, after" in log
    # With every call hanging ("all"), the second line did not come in 2 of 5 full runs of the suite
    # (2026-12-06, sessions 34 and 35), while this test read the index through the mount's source,
    # which deleted the service's -wal and -shm (above): its lookups then failed instead of coming
    # back.  Helper 184 never saw it in 129 runs; asserted again since (session 36).


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_an_index_whose_filesystem_hangs_at_the_start_is_an_error_line_and_the_service_serves(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 177: the start waited for the file as long as its filesystem hung (a minute here, the
    # gate's limit; for ever on a hard NFS mount whose server is gone).
    monkeypatch.setattr(crc_index_file_module, "OPEN_TIMEOUT", 1.0)
    write_tree(settings.storage_dir / "album", {"a.jpg": os.urandom(50_000)})
    source, gate = tmp_path / "index-source", tmp_path / "gate"
    source.mkdir()
    index = tmp_path / "index" / "crc-index.sqlite"
    async with gated_mount(source, index.parent, gate, "--writable"):
        gate.write_text("all")
        try:
            began = time.monotonic()
            served = replace(settings, index_path=str(index))
            async with running_server(served) as url, httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client:
                started = time.monotonic() - began
                response = await client.get("/archive/album/")
        finally:
            gate.unlink(missing_ok=True)
        # The open given up on ends once the file answers, and closes what it opened (no descriptor
        # or thread left in this process for the tests after).
        with trio.fail_after(10):
            while any(thread.name == crc_index_file_module.OPENING_THREAD for thread in threading.enumerate()):
                await trio.sleep(0.02)
    assert started < 10, started
    assert read_archive(response.content) == files_on_disk(settings.storage_dir / "album")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"CRC index {str(index)!r} cannot be used (it did not answer in 1 s)" in m for m in errors), errors


def test_archiver_index_without_its_storage_says_so_and_makes_no_index(tmp_path: Path) -> None:
    # Helper 34: a traceback, the index file already made (cron's directory is $HOME: ARCHIVER_DIR unset is ./data).
    index = tmp_path / "index.sqlite"
    result = run_archiver("index", env={"ARCHIVER_DIR": str(tmp_path / "gone"), "ARCHIVER_INDEX": str(index)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a directory (ARCHIVER_DIR)" in result.stderr
    assert not index.exists()


def test_archiver_index_fails_on_an_unusable_index(storage: Path, tmp_path: Path) -> None:
    result = run_archiver("index", env={"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": "/proc/no/index.sqlite"})
    assert result.returncode == 2
    assert "index '/proc/no/index.sqlite'" in result.stderr
    # Helper 177: one whose crc_v6 is another table read nothing and wrote nothing, and said so per album.
    index = tmp_path / "index.sqlite"
    with sqlite3.connect(index) as db:
        db.execute('CREATE TABLE crc_v6 (device, inode, size, mtime_ns, ctime_ns, filesystem, crc, "check")')
    result = run_archiver("index", env={"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(index)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "its table crc_v6 is not this version's" in result.stderr


@pytest.mark.parametrize("command", ["serve", "index"])
@pytest.mark.parametrize("what", ["a directory", "/dev/null"])
def test_an_index_path_that_is_no_file_stops_the_start_naming_the_setting(
    storage: Path, tmp_path: Path, command: str, what: str
) -> None:
    # Helper 171: ARCHIVER_INDEX=/var/lib/archiver (its folder) or /dev/null (meant as "none") started the
    # service with an ERROR line advising to "delete /dev/null*" (or the storage, named by mistake).
    index = str(tmp_path) if what == "a directory" else what
    arguments = ["index"] if command == "index" else ["-H", "127.0.0.1", "-P", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "archiver", *arguments],
        env={**os.environ, "ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": index},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == (2 if command == "index" else 1)
    assert "Traceback" not in result.stderr and "delete" not in result.stderr
    said = result.stderr.strip().splitlines()[-1]
    assert said.startswith(("archiver: ARCHIVER_INDEX: ", "archiver index: error: ARCHIVER_INDEX: ")), said
    assert ("is a directory" if what == "a directory" else "is not a regular file") in said
    assert os.listdir(tmp_path) == [storage.name]


async def test_archiver_index_fails_when_crcs_cannot_be_written(storage: Path, tmp_path: Path) -> None:
    # Helper 34: with the write lock held elsewhere (or a full disk) it said "computed" and exited 0.
    write_tree(storage / "one", {"a.jpg": os.urandom(20_000)})
    index = tmp_path / "index.sqlite"
    CrcStore(index).close()
    await settle()
    with sqlite3.connect(index, isolation_level=None) as holder:
        holder.execute("BEGIN IMMEDIATE")  # an operator's sqlite3 session mid-transaction: SQLite's 5 s, then given up
        result = run_archiver("index", env={"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(index)})
        holder.execute("ROLLBACK")
    assert result.returncode == 1, result.stderr
    assert f"1 CRCs could not be written to {str(index)!r}" in result.stderr
    assert "database is locked" in result.stderr  # the warning that says why


async def test_a_cold_whole_download_reads_each_small_file_once_and_keeps_its_crc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The producer reads a small file the index lacks once, computes its CRC and writes it into the
    # local header; the service learns it from the bytes as they pass, for the central directory
    # and the index.  The service read each such file too: a cold download of 20,000 files of
    # 8 KB cost 1.8-3.0 times a warm one.  A file changed a moment ago is not kept (racy).
    storage, index = tmp_path / "storage", tmp_path / "index.sqlite"
    files = {f"{i:03}.jpg": os.urandom(i * 53) for i in range(300)}  # 0 to 15,847 bytes: all the producer's
    write_tree(storage / "album", files)
    await settle()
    files["fresh.jpg"] = os.urandom(5000)
    (storage / "album" / "fresh.jpg").write_bytes(files["fresh.jpg"])
    # The download asks the index half a racy window after fresh.jpg's write, however long the
    # machine takes to get there (a loaded one took over RACY_NS: fresh.jpg was kept, 301; helper
    # 169): fresh.jpg racy, the others (written over RACY_NS before it: ``settle``) not.
    asked_ns = (storage / "album" / "fresh.jpg").stat().st_ctime_ns + RACY_NS // 2

    class AskedSoon:
        @staticmethod
        def time_ns() -> int:
            return asked_ns

    monkeypatch.setattr(crc_source_module, "time", AskedSoon)
    settings = Settings(settle_time=0, storage_dir=storage, host="127.0.0.1", port=0, index_path=str(index))
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        before = bytes_read_by_this_process()
        cold = await client.get("/archive/album/")
        read = bytes_read_by_this_process() - before  # the server is in this process; the producer is not
    assert cold.status_code == 200
    assert read_archive(cold.content) == files
    assert len(cold.content) <= read < len(cold.content) + 4 * READ_SIZE  # the pipe's bytes, no file read for a CRC
    store = CrcStore(index)
    try:
        assert store.count() == 300  # all but the racy one
        for name in ("000.jpg", "123.jpg", "299.jpg", "fresh.jpg"):
            assert store.get(stored_key_of(storage / "album" / name)) == (
                None if name == "fresh.jpg" else zlib.crc32(files[name])
            )
    finally:
        store.close()


async def test_the_crcs_the_producer_computed_are_kept_when_the_download_is_cut_short(tmp_path: Path) -> None:
    # Its client left: each CRC learnt from the producer's bytes is still its file's, and the
    # resume that follows (a range, whose CRCs the service reads where the index lacks them)
    # needs them (helper 128: a `curl -C -` after a cut read 62.8 MB for a 42 MB album, 8.7 before).
    storage, index = tmp_path / "storage", tmp_path / "index.sqlite"
    files = {f"{i:03}.jpg": os.urandom(12_000) for i in range(400)}
    write_tree(storage / "album", files)
    await settle()
    settings = Settings(
        settle_time=0, storage_dir=storage, host="127.0.0.1", port=0, index_path=str(index), rate_limit=1 << 20
    )
    received = bytearray()
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with client.stream("GET", "/archive/album/") as response:
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) >= 1 << 20:
                    break  # and leave: 1 MiB of 4.8 MB
        store = CrcStore(index)
        try:
            with trio.fail_after(10):
                while store.count() == 0:  # kept in the background once the download's end is seen
                    await trio.sleep(0.01)
            got = [(name, store.get(stored_key_of(storage / "album" / name))) for name in sorted(files)]
        finally:
            store.close()
    # Every file whose entry the client received whole (~80) was learnt and kept, each right; none
    # the producer never reached (the rate holds it to ~1 MiB a second).
    whole = [name for name, crc in got if crc is not None]
    assert 80 <= len(whole) < 400
    assert whole == sorted(files)[: len(whole)]
    assert all(crc == zlib.crc32(files[name]) for name, crc in got if crc is not None)


def key_of(path: Path) -> tuple[int, int, int, int, int]:
    """The file's key, as the CRC index keys it."""
    status = path.stat()
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def stored_key_of(path: Path) -> IndexKey:
    """The file's key with its filesystem's id, as the CRC index's store keeps it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return index_key(key_of(path), filesystem_id(fd))
    finally:
        os.close(fd)


async def test_a_crc_read_while_the_file_may_still_change_is_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "fresh.jpg"
    path.write_bytes(b"x" * 1000)
    index = CrcIndex()
    key, crc, _ = await file_crc(path, 1000, index)  # written a moment ago: within a tick of the read
    assert crc == zlib.crc32(b"x" * 1000)
    assert is_racy(key, time.time_ns()) and index.get(key) is None  # used, not kept
    settled = (*key[:4], key[4] - 2 * RACY_NS)
    assert not is_racy(settled, time.time_ns())


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_a_crc_read_is_racy_by_when_it_began_not_when_it_ended(tmp_path: Path) -> None:
    # A read of slow storage that outlasts the racy window, of a file written a moment before it
    # began: racy.  Judged by its end it was kept, and a write in its first moments went unseen.
    source, mountpoint, gate = tmp_path / "source", tmp_path / "mount", tmp_path / "gate"
    source.mkdir()
    async with gated_mount(source, mountpoint, gate):
        (source / "fresh.jpg").write_bytes(b"x" * 1000)
        gate.write_text(str(RACY_NS / SECOND + 0.5))  # each read of file data takes this long
        index = CrcIndex(trust=CtimeTrust(trusted_fuse=("fuse",)))  # gated_fs passes the ctimes through
        folder = os.open(mountpoint, os.O_RDONLY)
        try:
            index.trust.learn(folder, os.fstat(folder).st_dev)  # as the album's walk does
        finally:
            os.close(folder)
        found = await trio.to_thread.run_sync(
            crc_reads_module.small_file_crc, mountpoint / "fresh.jpg", 1000, index, bytearray(READ_SIZE)
        )
        gate.unlink()
    assert found.crc == zlib.crc32(b"x" * 1000)
    assert index.trust(found.key)  # kept, were it not racy
    assert found.racy and index.get(found.key) is None


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize(
    "into_the_write_ns",
    [
        150_000_000,  # past the 0.1 s window there was
        pytest.param(
            RACY_NS + 100_000_000,
            marks=pytest.mark.xfail(
                strict=True,
                reason="one write in place lasting longer than the racy window is not seen (README, Failure behaviour)",
            ),
            id="past-the-window",
        ),
    ],
    ids=["within-the-window", "past-the-window"],
)
async def test_a_crc_read_during_one_long_write_in_place_is_not_kept(
    storage: Path, settings: Settings, tmp_path: Path, into_the_write_ns: int
) -> None:
    # Linux stamps a write's mtime and ctime as it starts, not as it copies: one write in place
    # (the size kept) that lasts, as a writer the kernel throttles on dirty pages does (up to
    # 200 ms a pause), leaves the key as it will stay while the bytes still change.  A CRC read
    # 0.1 s into it was kept under that key, and every later download sent it with the new
    # bytes: complete, and corrupt (helper 66).  Here the write copies from a FUSE file whose
    # reads are held: it has begun, and none of its bytes are in yet.
    size = 1 << 20
    write_tree(storage / "album", {"photo.jpg": b"a" * size})
    photo = storage / "album" / "photo.jpg"
    source, mountpoint, gate = tmp_path / "source", tmp_path / "mount", tmp_path / "gate"
    source.mkdir()
    (source / "new.bin").write_bytes(b"b" * size)
    gate.write_text("")  # reads of file data hang while it is there
    async with (
        gated_mount(source, mountpoint, gate),
        running_server(settings) as url,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client,
    ):
        with open(mountpoint / "new.bin", "rb") as new, mmap.mmap(new.fileno(), size, prot=mmap.PROT_READ) as bytes_in:
            fd = os.open(photo, os.O_WRONLY)
            try:
                async with trio.open_nursery() as nursery:
                    write = partial(os.pwrite, fd, bytes_in, 0)
                    nursery.start_soon(partial(trio.to_thread.run_sync, write, abandon_on_cancel=True))
                    await until_held(gate)
                    # The write's age when the CRC is read (a time to let pass).
                    await trio.sleep(max(0, photo.stat().st_ctime_ns + into_the_write_ns - time.time_ns()) / SECOND)
                    during = await client.get("/archive/album/")
                    gate.unlink()  # the write goes on, and ends
            finally:
                os.close(fd)
        after = await client.get("/archive/album/")
    assert photo.read_bytes() == b"b" * size
    assert during.status_code == 200
    read_archive(during.content)  # whatever bytes it read, its CRC is theirs
    assert read_archive(after.content) == {"photo.jpg": b"b" * size}


async def test_a_file_modified_while_its_crc_is_read_is_a_change(tmp_path: Path) -> None:
    path = tmp_path / "growing.jpg"
    path.write_bytes(b"x" * 100_000)
    read_block = crc_reads_module._crc_of_block

    def write_meanwhile(fd: int, *rest: Any) -> tuple[int, int]:
        with path.open("r+b") as file:
            file.write(b"y")  # same size, new ctime
        return read_block(fd, *rest)

    index = CrcIndex()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crc_reads_module, "_crc_of_block", write_meanwhile)
        with pytest.raises(FileChanged, match="modified while its CRC was read"):
            await file_crc(path, 100_000, index)


async def test_a_large_file_cut_short_while_its_crc_is_read_is_a_change(tmp_path: Path) -> None:
    # Read a block a thread call: a call that finds the file's end before the size listed ends the read.
    size = 2 * crc_reads_module.BATCH_BYTES
    path = tmp_path / "video.mp4"
    path.write_bytes(os.urandom(size))
    read_block = crc_reads_module._crc_of_block

    def truncate_meanwhile(fd: int, *rest: Any) -> tuple[int, int]:
        os.truncate(path, size // 2)
        return read_block(fd, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crc_reads_module, "_crc_of_block", truncate_meanwhile)
        with trio.fail_after(10), pytest.raises(FileChanged, match=f"shorter than the {size} bytes listed"):
            await file_crc(path, size, CrcIndex())


@given(count=st.integers(0, 3 * HOLE_MIN), crc=st.integers(0, 2**32 - 1))
def test_a_crc_extended_by_zeros_unread_is_zlibs(count: int, crc: int) -> None:
    assert crc32_with_zeros(crc, count) == zlib.crc32(bytes(count), crc)


@pytest.mark.parametrize("count", [2**31 - 1, 2**32 + 7, 2**44 - 12_345, 2**62 + 5])
def test_a_crc_extended_by_many_zeros_is_zlib_ngs(count: int) -> None:
    # Past what a test can write: zlib-ng's crc32_combine with the CRC of 2**i zeros, by doubling.
    zeros, length, doubled, bit = 0, 0, zlib_ng.crc32(b"\0"), 0
    while count >> bit:
        if count >> bit & 1:
            zeros = zlib_ng.crc32_combine(zeros, doubled, 1 << bit)
            length += 1 << bit
        doubled = zlib_ng.crc32_combine(doubled, doubled, 1 << bit)
        bit += 1
    assert crc32_with_zeros(0x1234_5678, count) == zlib_ng.crc32_combine(0x1234_5678, zeros, length)


@given(
    data=st.data(),
    length=st.integers(0, 12 * READ_SIZE).flatmap(lambda n: st.sampled_from([n, n - n % READ_SIZE + READ_SIZE - 1])),
)
@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_sparse_file_s_crc_is_its_bytes_whatever_its_holes(tmp_path: Path, data: st.DataObject, length: int) -> None:
    # Data around HOLE_MIN boundaries (READ_SIZE, each read's, is a multiple), holes between
    # them of every length about HOLE_MIN and its multiples: the CRC folds the long ones unread.
    near = st.integers(0, 12 * READ_SIZE // HOLE_MIN).flatmap(
        lambda blocks: st.integers(-5, 5).map(lambda shift: max(0, blocks * HOLE_MIN + shift))
    )
    offsets = data.draw(st.lists(near, max_size=5))
    pieces = [(offset, data.draw(st.binary(min_size=1, max_size=9000))) for offset in offsets]
    path = tmp_path / "sparse.bin"
    content = sparse_file(path, max(length, 1), pieces)
    assert content is not None
    found = trio.run(partial(file_crc, path, len(content), CrcIndex()))
    assert found.crc == zlib.crc32(content)


async def test_a_sparse_file_s_holes_are_not_read_for_its_crc(tmp_path: Path) -> None:
    # A few bytes written, a GiB long (helper 87: 32 GiB cost 41 CPU-s read).
    length = 1 << 30
    pieces = [(0, b"start"), (length // 2 + 12_345, os.urandom(3 * READ_SIZE)), (length - 3, b"end")]
    path = tmp_path / "sparse.bin"
    sparse_file(path, length, pieces)
    before = bytes_read_by_this_process()
    found = await file_crc(path, length, CrcIndex())
    assert bytes_read_by_this_process() - before < 16 * READ_SIZE
    assert found.crc == sparse_crc(length, pieces)


@pytest.mark.parametrize(("period", "count"), [(HOLE_MIN + HOLE_MIN // 4, 1024), (1024 * 1024, 64)])
async def test_a_read_of_a_sparse_file_stops_where_a_hole_begins(tmp_path: Path, period: int, count: int) -> None:
    # 4 KiB of data every 1.25 HOLE_MIN (helper 91): a read that began in the data ran READ_SIZE
    # into the hole after it, a fifth of every hole read; every 1 MiB (helper 92), the holes
    # were under a HOLE_MIN of 1 MiB: read whole, 256x the disk used.  Now only the data is.
    length = count * period
    pieces = [(offset, os.urandom(4096)) for offset in range(0, length, period)]
    path = tmp_path / "sparse.bin"
    sparse_file(path, length, pieces)
    before = bytes_read_by_this_process()
    found = await file_crc(path, length, CrcIndex())
    assert bytes_read_by_this_process() - before < 2 * count * 4096 + 4 * READ_SIZE
    assert found.crc == sparse_crc(length, pieces)


def test_archiver_index_does_not_read_a_sparse_file_s_holes(tmp_path: Path) -> None:
    # The upload hook's path (helper 89: it read every hole, 2.5 s for 4 GiB, hours for 16 TiB).
    length = 1 << 30
    pieces = [(0, b"head"), (length - 4, b"tail")]
    sparse_file(tmp_path / "big.bin", length, pieces)
    index = CrcIndex()
    before = bytes_read_by_this_process()
    album_crcs(tmp_path, [("big.bin", length)], index)
    assert bytes_read_by_this_process() - before < 16 * READ_SIZE
    status = (tmp_path / "big.bin").stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    assert index.get(key) == sparse_crc(length, pieces)


def sparse_crc(length: int, pieces: list[tuple[int, bytes]]) -> int:
    """The CRC-32 of ``sparse_file``'s bytes (``pieces`` in order, none cut), as zlib reads them."""
    crc, position, zeros = 0, 0, bytes(1 << 24)
    for offset, piece in [*pieces, (length, b"")]:
        while position < offset:
            crc = zlib.crc32(zeros[: offset - position], crc)
            position += min(len(zeros), offset - position)
        crc = zlib.crc32(piece, crc)
        position += len(piece)
    assert position == length
    return crc


async def test_the_central_directory_of_a_cold_album_does_not_read_its_sparse_files_holes(
    client: httpx.AsyncClient, storage: Path
) -> None:
    length = 1 << 30
    pieces = [(READ_SIZE * 1000 + 7, b"photo")]
    (storage / "sparse").mkdir()
    sparse_file(storage / "sparse" / "big.bin", length, pieces)
    before = bytes_read_by_this_process()
    tail = await client.get("/archive/sparse/", headers={"Range": "bytes=-300"})  # its central directory, and more
    assert bytes_read_by_this_process() - before < 16 * READ_SIZE  # the server is in this process
    assert tail.status_code == 206
    start = int(tail.headers["content-range"].split()[1].split("-")[0])
    central = int.from_bytes(tail.content[-6:-2], "little") - start  # the end record's (APPNOTE 4.3.16)
    assert tail.content[central : central + 4] == b"PK\x01\x02"
    assert int.from_bytes(tail.content[central + 16 : central + 20], "little") == sparse_crc(length, pieces)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_shared_descriptor_is_closed_by_its_last_user_never_under_a_reading_thread(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"data")
    shared = SharedDescriptor()
    shared.open(tmp_path / "a.jpg", 4, None)
    fd = shared.borrow()  # a worker thread reading it
    assert fd is not None
    shared.drop()  # the download gives up on that thread
    assert _is_open(fd) and shared.borrow() is None  # still open for the thread; no new user
    shared.give_back()  # its read returned
    assert not _is_open(fd)

    late = SharedDescriptor()
    late.drop()  # given up on while a thread opened the file: the thread closes it
    before = own_descriptors()
    with pytest.raises(FileChanged, match="given up on"):
        late.open(tmp_path / "a.jpg", 4, None)
    assert own_descriptors() == before


def test_a_whole_second_ctime_is_racy_for_two_seconds_and_one_equal_to_the_mtime_always() -> None:
    now = time.time_ns()
    second = now - now % SECOND
    # Whole seconds (ext4's small inodes, FAT's two): a change later in that second keeps the ctime.
    assert is_racy((1, 2, 3, second - 5 * SECOND, second - SECOND), now)
    assert not is_racy((1, 2, 3, second - 5 * SECOND, second - 3 * SECOND), now)
    # The windows' edges, to the nanosecond: a ctime the window before the read is racy, a
    # nanosecond older is not (a nanosecond clock's ctime, and a whole second's).
    assert is_racy((1, 2, 3, 0, now - RACY_NS), now) and not is_racy((1, 2, 3, 0, now - RACY_NS - 1), now)
    assert is_racy((1, 2, 3, 0, second), second + COARSE_RACY_NS)
    assert is_racy((1, 2, 3, second - 5 * SECOND, second - 2 * SECOND), now)  # FAT keeps two seconds
    assert not is_racy((1, 2, 3, 0, second), second + COARSE_RACY_NS + 1)
    # The mtime reported as the ctime (sshfs): an edit with its mtime put back moves neither.
    assert is_racy((1, 2, 3, second - 3600 * SECOND, second - 3600 * SECOND), now)
    assert not trusted_ctime(second, second) and not trusted_ctime(second + SECOND, second) and not trusted_ctime(0, 0)
    assert trusted_ctime(second, second + SECOND) and trusted_ctime(second + 7, second + 7)
    # Such keys are never looked up either: a row kept by an older version is not used.
    index = CrcIndex()
    index._remember((1, 2, 3, second, second), 42)
    assert index.get((1, 2, 3, second, second)) is None


def test_a_crc_kept_while_its_filesystem_was_trusted_is_not_found_once_it_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A device number is reused by the next mount, which a walk looks at anew: every lookup asks
    # whether the device is trusted now (the index's, the memory's alone, a read cut short's).
    index = CrcIndex()
    trusted = [True]
    monkeypatch.setattr(index.trust, "filesystem", lambda device: 0 if trusted[0] else None)
    now = time.time_ns()
    key = (7, 1, 10, now - 5 * SECOND, now - 5 * SECOND + 1)
    index.put(key, 42)
    index.keep_partial(key, PartialCrc(42, 5, now - 5 * SECOND))
    assert (index.get(key), index.remembered(key)) == (42, 42)
    trusted[0] = False
    assert (index.get(key), index.remembered(key), index.take_partial(key)) == (None, None, None)


def test_the_index_keeps_at_most_its_entries_and_reads_cut_short_the_most_recent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The memory's bounds (``INDEX_ENTRIES``, ``PARTIAL_ENTRIES``): the least recently used go first.
    monkeypatch.setattr(crc_index_module, "PARTIAL_ENTRIES", 3)
    monkeypatch.setattr(crc_index_module.CtimeTrust, "filesystem", lambda self, device: 0)
    index = CrcIndex(entries=3)
    now = time.time_ns()
    keys = [(7, inode, 10, now - 5 * SECOND, now - 5 * SECOND + 1) for inode in range(5)]
    for inode, key in enumerate(keys[:3]):
        index.put(key, inode)
    assert index.get(keys[0]) == 0  # used: now the most recent
    index.put(keys[3], 3)
    assert [index.remembered(key) for key in keys[:4]] == [0, None, 2, 3]
    for inode, key in enumerate(keys):
        index.keep_partial(key, PartialCrc(inode, 1, now - 5 * SECOND))
    assert [index.take_partial(key) is not None for key in keys] == [False, False, True, True, True]


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize(
    "times, env",
    [
        # sshfs: the mtime in whole seconds as the ctime (SFTP version 3 has none), on a FUSE type trusted.
        ("--sftp-times", {}),
        # rclone's mount: the mtime to the nanosecond as the ctime, on a FUSE type not trusted (the default).
        ("--mtime-as-ctime", {"ARCHIVER_TRUSTED_FUSE": ""}),
    ],
)
async def test_storage_whose_ctime_is_its_mtime_never_sends_a_stale_crc(
    tmp_path: Path, times: str, env: dict[str, str]
) -> None:
    # An edit in place that keeps the size and puts the mtime back (an FTP client preserving
    # times) leaves every part of the key as it was.  Each download must read the CRCs again.
    files = {"small.jpg": os.urandom(300_000), "large.jpg": os.urandom(6 * 1024 * 1024)}
    async with served_gated_album(tmp_path, files, env, times) as album:
        first = await album.client.get("/archive/album/")
        assert read_archive(first.content) == files
        # No ETag either: an edit would keep it, and a resume across the edit would splice two archives.
        assert "etag" not in first.headers and first.headers["content-length"] == str(len(first.content))
        resumed = await album.client.get("/archive/album/", headers={"Range": "bytes=100-", "If-Range": '"x"'})
        assert resumed.status_code == 200 and resumed.content == first.content
        ranged = await album.client.get("/archive/album/", headers={"Range": "bytes=100-"})
        assert ranged.status_code == 206 and ranged.content == first.content[100:]
        edited = {}
        for name, data in files.items():
            path = album.source / name
            before = path.stat()
            with open(path, "r+b") as file:  # dd conv=notrunc
                file.write(b"edited")
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -r
            edited[name] = b"edited" + data[6:]
        again = await album.client.get("/archive/album/")
        assert again.status_code == 200 and read_archive(again.content) == edited


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_a_fuse_type_the_operator_trusts_keeps_its_crcs_and_etag(tmp_path: Path) -> None:
    files = {"a.jpg": os.urandom(1000)}
    (tmp_path / "untrusted").mkdir()
    (tmp_path / "trusted").mkdir()
    async with served_gated_album(tmp_path / "untrusted", files, {"ARCHIVER_TRUSTED_FUSE": ""}) as album:
        untrusted = await album.client.head("/archive/album/")
    async with served_gated_album(tmp_path / "trusted", files, {"ARCHIVER_TRUSTED_FUSE": "fuse.other,fuse"}) as album:
        trusted = await album.client.head("/archive/album/")
    assert "etag" not in untrusted.headers and "content-length" in untrusted.headers
    assert trusted.headers["etag"].startswith('"')


def test_the_mount_table_names_each_devices_filesystem_type() -> None:
    table = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:39 / /srv/photos ro,nosuid shared:9 master:2 - fuse.sshfs host:/photos ro,user_id=0\n"
        "41 22 0:40 / /srv/pool rw - fuse.mergerfs a:b rw\n"
        "garbage line\n"
    )
    assert read_mount_table(table) == {
        os.makedev(8, 1): "ext4",
        os.makedev(0, 39): "fuse.sshfs",
        os.makedev(0, 40): "fuse.mergerfs",
    }


def test_ctimes_are_trusted_on_a_filesystem_looked_at_and_found_the_kernels(tmp_path: Path) -> None:
    trust = CtimeTrust()
    device = tmp_path.stat().st_dev
    now = time.time_ns()
    assert not trust((device, 1, 2, now, now))  # never looked at: not trusted
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        trust.learn(fd, device)
    finally:
        os.close(fd)
    assert trust((device, 1, 2, now, now))
    assert not trust((device, 1, 2, now - now % SECOND, now - now % SECOND))  # whole seconds, the mtime
    assert not trust((device, 1, 2, -SECOND, 0))  # no ctime at all
    trust.learn(-1, device)  # cannot be told (fstatfs fails): no longer trusted
    assert not trust((device, 1, 2, now, now))


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_archiver_index_leaves_out_files_whose_ctimes_are_not_trusted(tmp_path: Path) -> None:
    source, storage, index = tmp_path / "source", tmp_path / "storage", tmp_path / "index.sqlite"
    write_tree(source, {"a.jpg": b"a", "b.jpg": b"b"})
    storage.mkdir()
    env = {"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(index)}
    async with gated_mount(source, storage / "album", tmp_path / "gate"):
        await settle()
        untrusted = run_archiver("index", env=env | {"ARCHIVER_TRUSTED_FUSE": ""})
        trusted = run_archiver("index", env=env | {"ARCHIVER_TRUSTED_FUSE": "fuse"})
    assert untrusted.returncode == 0, untrusted.stderr
    assert untrusted.stdout.strip() == (
        "indexed 1 album, 2 files (0 computed, 2 not kept as their ctimes may not show an edit)"
    )
    assert trusted.stdout.strip() == "indexed 1 album, 2 files (2 computed)"


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_a_close_that_fails_after_a_crc_read_fails_the_download_cleanly(tmp_path: Path) -> None:
    # rclone's mount answers EIO at the close when the bytes read did not match its checksum.
    # It was an error out of the app, with a traceback; now a failed download, logged with the file.
    files = {"a.jpg": os.urandom(1000), "b.jpg": os.urandom(300_000)}
    async with served_gated_album(tmp_path, files, {}) as album:
        (tmp_path / "gate-fail-closes").touch()
        failed = await album.client.get("/archive/album/")
        (tmp_path / "gate-fail-closes").unlink()
        whole = await album.client.get("/archive/album/")
    assert failed.status_code == 503  # as any file not the one listed before the first byte (README, Failure behaviour)
    assert failed.headers["retry-after"] == "5"
    assert read_archive(whole.content) == files
    assert b"when closed after reading" in bytes(album.server.output)
    assert b"Traceback" not in bytes(album.server.output)


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize(
    ("compression", "sizes", "failure", "status", "said"),
    [
        # A cold download: the service's read of a file for its CRC (a small file's is the producer's:
        # the first file here is larger, so that it is the service's read that fails first).
        ("0", (BIG, BIG), errno.EIO, 500, b"ERROR archiver.web.download: download album for 127.0.0.1: failed: "),
        # The CRCs known: the producer's read of a small file, copied (helper 71: an EIO was "changed", a 503).
        (
            "warm",
            (1000, BIG),
            errno.EIO,
            500,
            b"ERROR archiver.web.download: download album for 127.0.0.1: failed: the producer",
        ),
        # A cold download of small files: the producer's read of a file for the CRC it computes.
        (
            "0",
            (1000, 3000),
            errno.EIO,
            500,
            b"ERROR archiver.web.download: download album for 127.0.0.1: failed: the producer",
        ),
        # Out of descriptors or memory: no fault of the file's, a 503 to try again (helper 72: a 500).
        ("0", (BIG, BIG), errno.EMFILE, 503, b"ERROR archiver.web.download: download album for 127.0.0.1: failed: "),
        (
            "warm",
            (1000, BIG),
            errno.EMFILE,
            503,
            b"ERROR archiver.web.download: download album for 127.0.0.1: failed: the producer",
        ),
        # NFS's answer for a file replaced on the server, as an upload does: the album is changing.
        (
            "0",
            (BIG, BIG),
            errno.ESTALE,
            503,
            b"WARNING archiver.web.download: download album for 127.0.0.1: album changed: ",
        ),
        # And met by the producer's read of a small file, copied or read for the CRC it computes
        # (``producer_program._read_copy``; found by helper 169's coverage run: untested).
        (
            "warm",
            (1000, BIG),
            errno.ESTALE,
            503,
            b"WARNING archiver.web.download: download album for 127.0.0.1: album changed: the producer",
        ),
        (
            "0",
            (1000, 3000),
            errno.ESTALE,
            503,
            b"WARNING archiver.web.download: download album for 127.0.0.1: album changed: the producer",
        ),
        (
            "6",
            (1000, BIG),
            errno.EIO,
            500,
            b"ERROR archiver.web.download: download album for 127.0.0.1: failed: the producer",
        ),
    ],
    ids=[
        "crc-read-eio",
        "producer-copy-eio",
        "producer-crc-eio",
        "crc-read-emfile",
        "producer-copy-emfile",
        "crc-read-estale",
        "producer-copy-estale",
        "producer-crc-estale",
        "deflated-eio",
    ],
)
async def test_a_read_the_storage_fails_is_a_refusal_naming_the_file(
    tmp_path: Path, compression: str, sizes: tuple[int, int], failure: int, status: int, said: bytes
) -> None:
    # Helper 70: EIO (a bad sector, a network mount's error) from a CRC read was a 500 with no
    # body and a traceback, from the producer a line naming no file.
    files = {"a.jpg": os.urandom(sizes[0]), "b.jpg": os.urandom(sizes[1])}
    env = {"ARCHIVER_COMPRESSION": "0" if compression == "warm" else compression}
    async with served_gated_album(tmp_path, files, env) as album:
        if compression == "warm":
            assert (await album.client.get("/archive/album/")).status_code == 200  # the CRCs read and kept
        (tmp_path / "gate-fail-reads").write_text(str(failure))
        failed = await album.client.get("/archive/album/")
        (tmp_path / "gate-fail-reads").unlink()
        whole = await album.client.get("/archive/album/")
    assert failed.status_code == status
    if status == 500:
        assert failed.text == MESSAGES[500].sentence + "\n"  # the page, not an empty 500
    elif failure == errno.EMFILE:
        assert failed.headers["retry-after"] == "5" and failed.text == MESSAGES[503].sentence + "\n"
    else:
        assert failed.headers["retry-after"] == "5" and failed.text == ALBUM_CHANGING.sentence + "\n"
    assert read_archive(whole.content) == files
    output = bytes(album.server.output)
    (line,) = [line for line in output.splitlines() if said in line]
    assert b"a.jpg: " + os.strerror(failure).encode() in line, line
    assert b"(refused before the head), 0 bytes sent" in line, line
    assert b"Traceback" not in output


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("crc", ["computed by the producer", "known"])
@pytest.mark.parametrize("when", ["before the head", "after the head"])
async def test_a_small_file_whose_data_ends_short_of_its_unchanged_size_is_a_change(
    tmp_path: Path, crc: str, when: str
) -> None:
    """A small file is copied by the producer (read, then checked once): a read that comes back
    short while the file's attributes still say its planned size (a file cut short on a network
    server whose daemon still reports its old attributes, as sshfs's cache does) is a file
    changed: the 503 "album changing" before the head, an aborted transfer after it, the file
    named; never its short bytes under a CRC of them, nor a 500.  Copied in a cold whole download
    (its CRC the producer's to compute) and with its CRC known.  Found by helper 169's coverage
    run: ``producer_program._read_copy``'s "shorter than planned" was reached by no test (every
    shrink moved the attributes first)."""
    files = {"b.jpg": os.urandom(5_000)}  # under the producer's copy limit
    if when == "after the head":
        files["a.jpg"] = os.urandom(2_000_000)  # sent first, by sendfile: the head goes out
    async with served_gated_album(tmp_path, files, {}) as album:
        if crc == "known":
            assert (await album.client.get("/archive/album/")).status_code == 200  # the CRCs read and kept
        (tmp_path / "gate-short-reads").write_text("/b.jpg")
        status, body, clean = await _transfer(album.client)
        (tmp_path / "gate-short-reads").unlink()
        whole = await album.client.get("/archive/album/")
    if when == "before the head":
        assert clean and status == 503 and body.decode() == ALBUM_CHANGING.sentence + "\n"
    else:
        assert not clean and len(body) > 1_000_000  # aborted, after most of a.jpg
    assert read_archive(whole.content) == files
    output = bytes(album.server.output)
    (line,) = [line for line in output.splitlines() if b"album changed: the producer" in line]
    assert b"archiver-producer: b.jpg: shorter than planned" in line, line
    assert (b"(refused before the head)" in line) == (when == "before the head"), line
    assert b"Traceback" not in output


def _names_a_jpg(fd: str) -> bool:
    with contextlib.suppress(OSError):  # closed meanwhile
        return os.readlink(f"/proc/self/fd/{fd}").endswith("/album/a.jpg")
    return False


@pytest.mark.parametrize(
    ("size", "failure", "status"),
    [
        (100_000, errno.EIO, 500),
        (5_000_000, errno.EIO, 500),
        (100_000, errno.ESTALE, 503),
        (100_000, errno.EMFILE, 503),
    ],
    ids=["small-eio", "large-eio", "small-estale", "small-emfile"],
)
async def test_a_files_look_failing_once_opened_for_its_crc_is_classed_by_its_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    size: int, failure: int, status: int
) -> None:  # fmt: skip
    """The service opens a file for its CRC, then looks at it (``listed_files.open_listed``'s
    fstat): that look failing is classed as any failure of its open or read (README, Failure
    behaviour): EIO the storage's (500), ESTALE a file changed (the 503 "album changing"), out of
    descriptors or memory the system's (the 503 to try again).  Every error there was "not the
    file listed": an EIO the 503 of an album changing for good, logged at WARNING as an upload's
    doing, and counted by ``archiver index`` as changing, not unreadable.  A look that fails only
    after the open succeeded cannot be timed on real storage: its fstat is made to fail.  Found by
    helper 169's coverage run: no test reached it."""
    files = {"a.jpg": os.urandom(size)}  # read by the service for its CRC (a batch's, or alone)
    write_tree(settings.storage_dir / "album", files)

    class LookFails:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        @staticmethod
        def fstat(fd: int) -> os.stat_result:
            if os.readlink(f"/proc/self/fd/{fd}").endswith("/album/a.jpg"):
                raise OSError(failure, os.strerror(failure))
            return os.fstat(fd)

    async with running_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        with monkeypatch.context() as patch:
            patch.setattr(listed_files_module, "os", LookFails())
            failed = await client.get("/archive/album/")
        # The file it opened is closed (the server is in this process).
        assert not [fd for fd in os.listdir("/proc/self/fd") if _names_a_jpg(fd)]
        whole = await client.get("/archive/album/")
    assert failed.status_code == status
    if failure == errno.EIO:
        assert failed.text == MESSAGES[500].sentence + "\n"
    elif failure == errno.EMFILE:
        assert failed.headers["retry-after"] == "5" and failed.text == MESSAGES[503].sentence + "\n"
    else:
        assert failed.headers["retry-after"] == "5" and failed.text == ALBUM_CHANGING.sentence + "\n"
    assert whole.status_code == 200 and read_archive(whole.content) == files
    (line,) = [r for r in caplog.records if r.getMessage().startswith("download album for")][:1]
    level, said = (logging.WARNING, "album changed: ") if failure == errno.ESTALE else (logging.ERROR, "failed: ")
    assert line.levelno == level and said in line.getMessage(), line.getMessage()
    assert f"a.jpg: {os.strerror(failure)} (refused before the head)" in line.getMessage()


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("compression", ["0", "6"])
async def test_a_close_failing_in_the_producer_is_as_in_a_crc_read(tmp_path: Path, compression: str) -> None:
    # Helper 72: with the CRCs known (or deflating), the producer's close of a file failing was a
    # 500 naming no file, where the CRC read's is the 503 of a file changed, named.
    files = {"a.jpg": os.urandom(1000), "b.jpg": os.urandom(300_000)}
    async with served_gated_album(tmp_path, files, {"ARCHIVER_COMPRESSION": compression}) as album:
        assert (await album.client.get("/archive/album/")).status_code == 200  # the CRCs read and kept
        (tmp_path / "gate-fail-closes").touch()
        failed = await album.client.get("/archive/album/")
        (tmp_path / "gate-fail-closes").unlink()
    assert failed.status_code == 503 and failed.headers["retry-after"] == "5"
    assert b"a.jpg: Input/output error when closed after reading" in bytes(album.server.output)
    assert b"Traceback" not in bytes(album.server.output)


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize(("failure", "status"), [(errno.ESTALE, 503), (errno.EIO, 500)], ids=["estale", "eio"])
async def test_a_file_whose_check_once_sent_fails_is_named(tmp_path: Path, failure: int, status: int) -> None:
    # Helper 147: a file sent by sendfile is checked again once the service has read its bytes;
    # the fstat of that check failing (ESTALE: the file replaced on an NFS server) went up unnamed,
    # the producer's exit 2: a 500 naming no file, where ESTALE is a file changed, a 503 to retry.
    files = {"a.jpg": os.urandom(32_768)}  # over the producer's copy limit: sent by sendfile
    # An hour old: settled, so sent as its CRC is known (not read again for the CRC as it is sent).
    async with served_gated_album(tmp_path, files, {}, "--an-hour-back") as album:
        whole = await album.client.get("/archive/album/")  # the CRC read and kept
        name_length, extra_length = struct.unpack_from("<HH", whole.content, 26)
        data_at = 30 + name_length + extra_length  # the first entry's data (APPNOTE 4.3.7)
        album.gate.write_text("read")  # its data's reads wait: checked once, then sent
        responses: list[httpx.Response] = []

        async def segment() -> None:  # a download manager's: the file's data alone
            headers = {"Range": f"bytes={data_at}-{data_at + 32_767}"}
            responses.append(await album.client.get("/archive/album/", headers=headers))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(segment)
            await until_held(album.gate)
            write_atomically(tmp_path / "gate-fail-stats", str(failure))
            album.gate.unlink()
        (tmp_path / "gate-fail-stats").unlink()
        again = await album.client.get("/archive/album/")
    (response,) = responses
    assert response.status_code == status
    assert read_archive(again.content) == files
    output = bytes(album.server.output)
    assert b"a.jpg: " + os.strerror(failure).encode() in output
    assert b"Traceback" not in output


CACHED_ATTRIBUTES = "--an-hour-back --cached-attributes"


def _in_place(path: Path) -> bytes:
    """``path`` rewritten with other bytes, its inode and size kept; its new bytes."""
    new = os.urandom(path.stat().st_size)
    with open(path, "r+b") as file:
        file.write(new)
    return new


def _truncated(path: Path) -> bytes:
    os.truncate(path, path.stat().st_size // 2)
    return path.read_bytes()


def _renamed(path: Path) -> bytes:
    """Another file renamed over ``path``, as an upload's last step: a new inode."""
    new = os.urandom(path.stat().st_size)
    path.with_name("upload.part").write_bytes(new)
    os.rename(path.with_name("upload.part"), path)
    return new


async def _transfer(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> tuple[int, bytes, bool]:
    """An archive's download: its status, its body, and whether the transfer ended cleanly."""
    body = b""
    try:
        async with client.stream("GET", "/archive/album/", headers=headers) as response:
            async for data in response.aiter_raw():
                body += data
    except httpx.RemoteProtocolError:  # aborted after its head: a failure the client sees
        return 0, body, False
    return response.status_code, body, True


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("times", ["", CACHED_ATTRIBUTES], ids=["attributes asked", "attributes kept by the kernel"])
async def test_a_file_whose_crc_read_ends_short_of_its_size_is_a_change_and_no_crc_of_it_is_kept(
    tmp_path: Path, times: str
) -> None:
    """The service's own CRC read of a file (larger than the producer computes, a batch's at
    most: ``crc_reads.small_file_crc``) that ends short of its listed size, its attributes
    unchanged (a file cut short on a network server whose daemon still reports its old
    attributes, as sshfs's cache does): a file changed, the 503 "album changing" before the
    first byte, named; no CRC of the bytes read is kept (the next download would send the whole
    file under it, a clean 200), and the kernel's copy of the file's attributes, which the short
    read cut, is fetched anew (kept by the kernel, the next walk would plan the cut size: helper
    150).  Found by helper 169's coverage run: no test reached the check."""
    files = {"a.jpg": os.urandom(100_000)}
    async with served_gated_album(tmp_path, files, {}, times) as album:
        (tmp_path / "gate-short-reads").touch()
        failed = await album.client.get("/archive/album/")
        (tmp_path / "gate-short-reads").unlink()
        whole = await album.client.get("/archive/album/")
    assert failed.status_code == 503 and failed.headers["retry-after"] == "5"
    assert failed.text == ALBUM_CHANGING.sentence + "\n"
    assert whole.status_code == 200 and read_archive(whole.content) == files  # each CRC checked
    output = bytes(album.server.output)
    (line,) = [line for line in output.splitlines() if b"album changed: " in line]
    assert b"a.jpg: read 50000 bytes, 100000 listed (refused before the head)" in line, line
    assert b"Traceback" not in output


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("edit", [_in_place, _truncated, _renamed], ids=["in-place", "truncated", "renamed"])
@pytest.mark.parametrize(("compression", "size"), [("0", 4_000), ("0", 100_000), ("6", 100_000)])
async def test_an_edit_the_kernels_attribute_cache_hides_is_no_clean_end(
    tmp_path: Path, compression: str, size: int, edit: Callable[[Path], bytes]
) -> None:
    # Helper 148: libfuse and mergerfs keep a file's attributes in the kernel (attr_timeout: 1 s by
    # default; a minute here, for a test with no race against it), so every fstat showed the old
    # key of a file rewritten beneath the mount (on a branch, on the NAS): its new bytes went out
    # under its old CRC, a clean 200.  The checks after a read ask the filesystem itself.  A small
    # file is copied (read, then checked), a larger one sent by sendfile (checked once taken).
    # Helper 150: a file found short before that check left the kernel's copy stale, and the next
    # download was refused too.
    files = {"a.bin": os.urandom(size), "b.txt": b"b" * 100}
    env = {"ARCHIVER_COMPRESSION": compression}
    async with served_gated_album(tmp_path, files, env, CACHED_ATTRIBUTES) as album:
        first = await album.client.get("/archive/album/")  # its attributes kept by the kernel, its CRC by the index
        new = files | {"a.bin": edit(album.source / "a.bin")}
        status, _, clean = await _transfer(album.client)
        third = await album.client.get("/archive/album/")
    assert read_archive(first.content) == files
    assert not clean or status == 503  # refused before its head, or aborted: never a whole archive
    assert b"a.bin: " in bytes(album.server.output)
    assert read_archive(third.content) == new  # the look that found it refreshed the kernel's copy


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("moved", ["X.bin", "sub"], ids=["file", "folder"])
async def test_an_entry_moved_between_folders_during_the_walk_is_in_the_archive(tmp_path: Path, moved: str) -> None:
    # Helper 164: the walk's look at its folders after reading them (had one changed meanwhile?)
    # asked the kernel's copy of their attributes, which a FUSE mount keeps (attr_timeout; NFS's
    # acdirmin): b/X.bin moved into a/ once a/ was read and before b/ was, the archive ended
    # cleanly without it, though the album held it throughout.  The walk asks the filesystem.
    files = {"a/1.bin": os.urandom(5000), "b/X.bin": os.urandom(7000), "b/sub/s.bin": os.urandom(300), "b/y.bin": b"y"}
    async with served_gated_album(tmp_path, {}, {}, CACHED_ATTRIBUTES) as album:
        write_tree(album.source, files)
        first = await album.client.get("/archive/album/")  # the folders' attributes now kept by the kernel
        album.gate.write_text("listing /b")  # b/'s listing waits: the walk has read a/
        transfers: list[tuple[int, bytes, bool]] = []

        async def download() -> None:
            transfers.append(await _transfer(album.client))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            await until_held(album.gate)
            os.rename(album.source / "b" / moved, album.source / "a" / moved)
            album.gate.unlink()
    ((status, body, clean),) = transfers
    assert read_archive(first.content) == files
    moved_files = {name.replace(f"b/{moved}", f"a/{moved}"): data for name, data in files.items()}
    assert (status, clean) == (200, True)  # walked again, the album at rest once more
    assert read_archive(body) == moved_files


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_a_folder_moved_between_its_open_and_the_walks_look_at_it_is_walked_again(tmp_path: Path) -> None:
    # Helper 166: asked of the filesystem, the look at a folder the walk has just opened fails with
    # ENOENT once a path-based daemon (sshfs, mergerfs, rclone) no longer finds it: a 500, where a
    # folder moved is the album changing (walk again).
    files = {"a/1.bin": os.urandom(5000), "b/X.bin": os.urandom(7000)}
    async with served_gated_album(tmp_path, {}, {}, CACHED_ATTRIBUTES) as album:
        write_tree(album.source, files)
        first = await album.client.get("/archive/album/")  # b/'s name now kept by the kernel: opened unasked
        album.gate.write_text("metadata /b")  # the look at b/, once opened, waits
        transfers: list[tuple[int, bytes, bool]] = []

        async def download() -> None:
            transfers.append(await _transfer(album.client))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            await until_held(album.gate)
            os.rename(album.source / "b", album.source / "c")
            album.gate.unlink()
    ((status, body, clean),) = transfers
    assert read_archive(first.content) == files
    assert (status, clean) == (200, True)
    assert read_archive(body) == {"a/1.bin": files["a/1.bin"], "c/X.bin": files["b/X.bin"]}


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_an_entry_moved_into_a_folder_read_in_the_tick_of_its_last_change_is_in_the_archive(
    tmp_path: Path,
) -> None:
    # A folder's times come from a coarse clock: a whole second here (sshfs's, ext4's 128-byte
    # inodes; a 1-10 ms tick on any filesystem before Linux 6.13).  a/ changed (a.old deleted), its
    # walk read it in the same second, then b/X.bin moved into it before b/ was read: a/'s times
    # did not move, and the archive ended cleanly without X.bin.  A folder whose times lie within a
    # tick of the walk's look at it has its names read again at the end.
    files = {"a/1.bin": b"1" * 5000, "b/X.bin": b"X" * 7000, "b/y.bin": b"y"}
    async with served_gated_album(tmp_path, {}, {"ARCHIVER_SETTLE_TIME": "0"}, "--sftp-times") as album:
        a = album.source / "a"
        transfers: list[tuple[int, bytes, bool]] = []

        async def download() -> None:
            transfers.append(await _transfer(album.client))

        for _ in range(20):
            write_tree(album.source, files | {"a/a.old": b"old"})
            album.gate.write_text("listing /b")  # b/'s listing waits: the walk has read a/
            transfers.clear()
            async with trio.open_nursery() as nursery:
                (a / "a.old").unlink()
                changed = a.stat().st_mtime_ns // SECOND
                nursery.start_soon(download)
                await until_held(album.gate)
                os.rename(album.source / "b" / "X.bin", a / "X.bin")
                moved_in_the_same_second = a.stat().st_mtime_ns // SECOND == changed
                album.gate.unlink()
            if moved_in_the_same_second:
                break
            (a / "X.bin").rename(album.source / "b" / "X.bin")  # a second began between the two: again
        else:
            pytest.fail("no second held both changes: the case could not be staged")
    ((status, body, clean),) = transfers
    assert (status, clean) == (200, True)  # walked again, a/ read whole
    assert read_archive(body) == {"a/1.bin": files["a/1.bin"], "a/X.bin": files["b/X.bin"], "b/y.bin": b"y"}


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("failure", [errno.EPERM, errno.EINVAL], ids=["eperm", "einval"])
async def test_a_files_look_refused_does_not_turn_the_checks_to_the_kernels_copy(tmp_path: Path, failure: int) -> None:
    # Helper 150: statx refused (EPERM, EINVAL) was taken for statx not offered, and every check of
    # the process after it read the kernel's cached attributes: a FUSE daemon or an NFS server may
    # answer so for one file, and the edit it hid went out under the old CRC, a clean 200.
    files = {"a.bin": os.urandom(100_000)}
    async with served_gated_album(tmp_path, files, {}, CACHED_ATTRIBUTES) as album:
        first = await album.client.get("/archive/album/")
        _in_place(album.source / "a.bin")
        write_atomically(tmp_path / "gate-fail-stats", str(failure))
        status, _, clean = await _transfer(album.client)
        (tmp_path / "gate-fail-stats").unlink()
    assert read_archive(first.content) == files
    assert not clean or status in (500, 503)
    output = bytes(album.server.output)
    assert b"a.bin: " + os.strerror(failure).encode() in output and b"Traceback" not in output  # named, not a crash


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_a_recent_file_written_again_after_its_check_is_seen_through_the_kernels_copy(tmp_path: Path) -> None:
    # The end's look at the files changed lately (listed_files.check_still_listed, helper 72's
    # upload still under way) asked the kernel's cached attributes: the write went out unseen,
    # the archive ending cleanly with the file cut short (helper 150).  a.bin is recent (no
    # --an-hour-back); z.bin, holes, is more than the pipe, the channel and the server's socket
    # hold (the client's holds 64 KiB at most): the end's look comes only once the client reads on.
    files = {"a.bin": os.urandom(4000), "z.bin": b""}
    async with served_gated_album(tmp_path, files, {"ARCHIVER_SETTLE_TIME": "0"}, "--cached-attributes") as album:
        os.truncate(album.source / "z.bin", 16 << 20)
        first = await album.client.get("/archive/album/")
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # before connect: its window stays small
        await sock.connect(address_of(album.server.url))
        await sock.send(b"GET /archive/album/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with trio.fail_after(30):
            received = await sock.recv(65536)  # the head and a.bin, read and checked by the producer
        with open(album.source / "a.bin", "ab") as file:
            file.write(b"more of the upload")
        with trio.fail_after(60):
            while data := await sock.recv(1 << 20):
                received += data
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert read_archive(first.content)["a.bin"] == files["a.bin"]
    assert head.startswith(b"HTTP/1.1 200 ")
    (length,) = [line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    assert len(body) < int(length)  # aborted: never ended as if whole
    assert b"a.bin: changed while the archive was sent" in bytes(album.server.output)


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize(
    ("failure", "outcome"), [(errno.EIO, "failed"), (errno.ESTALE, "changed")], ids=["eio", "estale"]
)
async def test_a_recent_files_look_before_the_end_failing_is_classed_by_its_error(
    tmp_path: Path, failure: int, outcome: str
) -> None:
    # The end's look at the files changed lately counted any error of its stat as the file changed
    # (helper 152): a disk's EIO logged and counted as an upload ("changed").  Gone or replaced
    # (ESTALE) is a file changed; EIO the storage's failure.  Aborted either way.  Staged as the test
    # above: a.bin recent and read whole by the producer, then its stats (only its) fail.
    files = {"a.bin": os.urandom(4000), "z.bin": b""}
    async with served_gated_album(tmp_path, files, {"ARCHIVER_SETTLE_TIME": "0"}) as album:
        os.truncate(album.source / "z.bin", 16 << 20)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # before connect: its window stays small
        await sock.connect(address_of(album.server.url))
        await sock.send(b"GET /archive/album/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with trio.fail_after(30):
            received = await sock.recv(65536)  # the head and a.bin, read and checked by the producer
        write_atomically(tmp_path / "gate-fail-stats", f"{failure} a.bin")
        with trio.fail_after(60):
            while data := await sock.recv(1 << 20):
                received += data
        sock.close()
        (tmp_path / "gate-fail-stats").unlink()
        again = await album.client.get("/archive/album/")
        # The aborted download's outcome is counted as its nursery ends, which may be after its client
        # saw the connection close (helper 183: once 0 in a full run).  Any outcome but the next one's.
        with trio.fail_after(10):
            while True:
                figures = samples((await album.client.get("/metrics")).text)
                finished = {name: value for name, value in figures.items() if "downloads_finished_total{" in name}
                if sum(finished.values()) >= 2:
                    break
                await trio.sleep(0.05)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    (length,) = [line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    assert len(body) < int(length)  # aborted: never ended as if whole
    assert figures[f'archiver_downloads_finished_total{{outcome="{outcome}"}}'] == 1, finished
    assert figures['archiver_downloads_finished_total{outcome="completed"}'] == 1  # the next one, whole
    assert read_archive(again.content)["a.bin"] == files["a.bin"]
    assert b"a.bin: " + os.strerror(failure).encode() in bytes(album.server.output)


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_a_crc_read_failing_before_the_producer_has_started_is_a_failed_download_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The test above meets either order of the CRC's failure and the producer's start; here the
    # producer never starts.  The 500 used to go out with no line and no outcome.  A file larger
    # than the producer computes the CRC of: read by the service.
    source, storage, gate = tmp_path / "source", tmp_path / "storage", tmp_path / "gate"
    write_tree(source, {"a.jpg": os.urandom(BIG)})
    storage.mkdir()
    settings = Settings(settle_time=0, storage_dir=storage, host="127.0.0.1", port=0, trusted_fuse=("fuse",))
    async with (
        gated_mount(source, storage / "album", gate),
        running_server(settings) as url,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=url, timeout=30) as client,
    ):
        monkeypatch.setattr(launcher, "current", HeldLauncher())  # after the start-up's own start of it
        (tmp_path / "gate-fail-closes").touch()
        response = await client.get("/archive/album/")
        (tmp_path / "gate-fail-closes").unlink()
        figures = samples((await client.get("/metrics")).text)
    assert response.status_code == 503
    assert figures['archiver_downloads_finished_total{outcome="changed"}'] == 1  # rclone: the file changed
    assert figures["archiver_downloads_in_flight"] == 0
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("download album for" in m and "Input/output error when closed after reading" in m for m in failures)


def test_no_thread_for_a_files_read_is_the_systems_limit_not_the_files_failure(tmp_path: Path) -> None:
    # Helper 104: a large file's block reads are awaited inside ``failures_named``, which named the
    # NoThread of a read at the tasks' limit (an OSError, EAGAIN) as the storage's failure to read
    # the file: a 500, where the limit is a 503 to try again.  Met only between a file's open and its
    # read, so its naming is tested here; the limit itself by test_launcher's tasks-limit tests.
    with pytest.raises(NoThread), failures_named(tmp_path / "big.mov"):
        raise NoThread(errno.EAGAIN, "no thread could be started (can't start new thread)")
    with pytest.raises(FileUnreadable, match=r"big\.mov: Input/output error"), failures_named(tmp_path / "big.mov"):
        raise OSError(errno.EIO, "Input/output error")


async def test_no_thread_for_the_crc_lookup_is_a_503_to_try_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The tasks' limit met by a download's first thread of its own (the CRC index's lookup), before
    # the head: a 503 with Retry-After, as the limit met anywhere else; without its own refusal it
    # went out as Quart's 500 with a traceback.  The limit itself: test_launcher's tasks-limit tests
    # (a cgroup), which meet it at the walk, before the download.
    files = {"a.jpg": os.urandom(1000)}
    write_tree(tmp_path / "storage" / "album", files)
    settings = Settings(settle_time=0, storage_dir=tmp_path / "storage", host="127.0.0.1", port=0)
    in_thread = crc_source_module.in_thread

    async def no_thread_for_a_lookup(function: Any, *args: object, limiter: Any = None) -> Any:
        if getattr(function, "__name__", None) == "known":
            raise NoThread(errno.EAGAIN, "no thread could be started (can't start new thread)")
        return await in_thread(function, *args, limiter=limiter)

    async with running_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        monkeypatch.setattr(crc_source_module, "in_thread", no_thread_for_a_lookup)
        refused = await client.get("/archive/album/")
        monkeypatch.undo()
        whole = await client.get("/archive/album/")
    assert (refused.status_code, refused.headers["Retry-After"]) == (503, "5")
    assert refused.text == MESSAGES[503].sentence + "\n"
    assert read_archive(whole.content) == files
    (line,) = [m for r in caplog.records if "download album for" in (m := r.getMessage()) and "failed" in m]
    assert "no thread could be started" in line and "(refused before the head), 0 bytes sent" in line, line
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


async def test_no_thread_to_keep_the_crcs_the_producer_computed_leaves_the_download_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CRCs of a cold whole download's small files, learnt from the producer's bytes, are kept
    # in a worker thread after the last byte came: a cache, whose want of a thread must not cost
    # the download its end (they are learnt again next time).
    files = {"a.jpg": os.urandom(1000), "b.jpg": os.urandom(2000)}
    write_tree(tmp_path / "storage" / "album", files)
    settings = Settings(settle_time=0, storage_dir=tmp_path / "storage", host="127.0.0.1", port=0)
    in_thread = producer_module.in_thread
    refused: list[str] = []

    async def no_thread_to_keep(function: Any, *args: object, limiter: Any = None) -> Any:
        if getattr(function, "__name__", None) == "keep_learnt":
            refused.append(function.__name__)
            raise NoThread(errno.EAGAIN, "no thread could be started (can't start new thread)")
        return await in_thread(function, *args, limiter=limiter)

    monkeypatch.setattr(producer_module, "in_thread", no_thread_to_keep)
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        first, second = await client.get("/archive/album/"), await client.get("/archive/album/")
    assert first.status_code == second.status_code == 200
    assert read_archive(first.content) == read_archive(second.content) == files
    # Not kept (tried again in the background, refused again): the second learnt them again.
    assert len(refused) >= 2 and set(refused) == {"keep_learnt"}


def test_a_file_whose_close_finds_no_thread_is_closed_once_one_can_be_had() -> None:
    # Helper 49: at the tasks' limit a large file's CRC read got NoThread, and the close in its
    # ``finally`` then raised threading's RuntimeError: a 500 with a traceback, and the file's
    # descriptor open for good.  Run as nobody (the limit does not bind root), the soft limit
    # lowered to one task (its own) and raised again.
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        (base / "photo.jpg").write_bytes(b"x" * 1000)
        (base / "photo.jpg").chmod(0o644)
        program = (
            "import os, resource, sys, trio\n"
            "from pathlib import Path\n"
            "from archiver.archive.shared_descriptor import SharedDescriptor\n"
            "if os.geteuid() == 0: os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "path = Path(sys.argv[1])\n"
            "shared = SharedDescriptor()\n"
            "shared.open(path, 1000, None)  # here: a worker thread's work, without one\n"
            "def opened():\n"
            "    links = []\n"
            "    for fd in os.listdir('/proc/self/fd'):\n"
            "        try:\n"
            "            links.append(os.readlink(f'/proc/self/fd/{fd}'))\n"
            "        except OSError:  # closed meanwhile (the listing's own)\n"
            "            pass\n"
            "    return str(path) in links\n"
            "_, hard = resource.getrlimit(resource.RLIMIT_NPROC)\n"
            "async def main():\n"
            "    resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))\n"
            "    shared.drop()  # no thread to close it in: must not raise\n"
            "    await trio.sleep(1.5)  # a retry or so at the limit\n"
            "    print('open at the limit', opened())\n"
            "    resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))\n"
            "    with trio.fail_after(10):\n"
            "        while opened():\n"
            "            await trio.sleep(0.05)\n"
            "    print('closed once a thread could be had')\n"
            "trio.run(main)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", program, str(base / "photo.jpg")], capture_output=True, text=True, timeout=60
        )
    finally:
        shutil.rmtree(base)
    assert result.stdout.splitlines() == ["open at the limit True", "closed once a thread could be had"], result.stderr


def test_archiver_index_counts_what_it_could_not_keep_apart_from_what_it_knew(tmp_path: Path) -> None:
    # Helper 70: files changed while read, or within the racy window, were "already known".
    album = tmp_path / "album"
    write_tree(album, {"old.jpg": b"o" * 100, "new.jpg": b"n" * 100})
    new_inode = (album / "new.jpg").stat().st_ino
    files = [("old.jpg", 100), ("new.jpg", 100), ("gone.jpg", 100)]
    with pytest.MonkeyPatch.context() as patch:  # only new.jpg changed within the window, whenever this runs
        patch.setattr(crc_reads_module, "is_racy", lambda key, read_started_ns: key[1] == new_inode)
        done = album_crcs(album, files, CrcIndex())
    assert done == (1, 0, 2, ())  # old.jpg computed; new.jpg racy, gone.jpg gone: read when downloaded


def test_archiver_index_run_from_an_upload_hook_waits_out_the_racy_window_and_keeps_the_crcs(tmp_path: Path) -> None:
    # A hook runs a moment after the upload: every file was changed within the racy window of its
    # read, and none was kept (the summary now says so).  Read once more when it has passed.
    files = {"a.jpg": b"a" * 100, "b.jpg": b"b" * 100}
    write_tree(tmp_path / "album", files)
    index = CrcIndex()
    started = time.monotonic()
    done = album_crcs(tmp_path / "album", [(name, 100) for name in files], index)
    assert done == (2, 0, 0, ())
    assert time.monotonic() - started < RACY_NS / SECOND + 2  # the window, waited once for all
    for name, data in files.items():
        status = (tmp_path / "album" / name).stat()
        key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        assert index.get(key) == zlib.crc32(data)


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
async def test_archiver_index_names_the_files_the_storage_cannot_read_and_fails(tmp_path: Path) -> None:
    # Helper 71: an EIO was counted with the files changing, exit 0: a failing disk unseen by the hook.
    source, storage, gate = tmp_path / "source", tmp_path / "storage", tmp_path / "gate"
    write_tree(source, {"a.jpg": b"a" * 100, "b.jpg": b"b" * 100})
    storage.mkdir()
    await ctimes_settled(source)
    env = {"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(tmp_path / "index.sqlite")}
    env["ARCHIVER_TRUSTED_FUSE"] = "fuse"
    async with gated_mount(source, storage / "album", gate):
        (tmp_path / "gate-fail-reads").write_text(str(errno.EIO))
        result = await trio.to_thread.run_sync(partial(run_archiver, "index", env=env))
    assert result.returncode == 1
    assert f"cannot read {storage}/album/a.jpg: Input/output error" in result.stderr
    assert "2 unreadable" in result.stdout and "2 files could not be read" in result.stderr


def _changed(path: Path, change: str) -> None:
    """Change the file at ``path`` as an upload or an edit would, by ``change``."""
    if change == "grown":
        with path.open("ab") as file:
            file.write(b"more")
    elif change == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif change == "rewritten in place":  # the same size, its mtime put back: its ctime moves all the same
        status = path.stat()
        with path.open("r+b") as file:
            file.write(b"x" * status.st_size)
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    else:
        path.unlink()


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("change", ["grown", "truncated", "rewritten in place", "deleted"])
async def test_archiver_index_leaves_a_file_changed_while_its_crc_is_read_to_the_downloads(
    tmp_path: Path, change: str
) -> None:
    # album_crcs: a file found the one listed at its open, then changed while its bytes are read (held by
    # the mount until the test has changed it): counted as changing, no CRC kept for it, exit 0 (untested
    # until helper 176, by coverage).
    source, storage, gate, index = tmp_path / "source", tmp_path / "storage", tmp_path / "gate", tmp_path / "index"
    write_tree(source, {"a.jpg": b"a" * 1000, "b.jpg": b"b" * 1000})
    storage.mkdir()
    await ctimes_settled(source)
    env = {"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(index), "ARCHIVER_TRUSTED_FUSE": "fuse"}
    results: list[subprocess.CompletedProcess[str]] = []
    async with gated_mount(source, storage / "album", gate), trio.open_nursery() as nursery:
        gate.write_text("read")  # the first read of a file's bytes (a.jpg's: the walk's order) waits
        nursery.start_soon(lambda: trio.to_thread.run_sync(lambda: results.append(run_archiver("index", env=env))))
        await until_held(gate)
        _changed(source / "a.jpg", change)
        gate.unlink()
    (result,) = results
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "indexed 1 album, 2 files (1 computed, 1 changing (read when downloaded))"
    assert list(rows(index)) == [(source / "b.jpg").stat().st_ino]


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("failure", [errno.EIO, errno.ENOMEM])
async def test_archiver_index_names_a_file_the_storage_fails_to_open_and_fails(tmp_path: Path, failure: int) -> None:
    # album_crcs: an open failing after the walk (the mount's look at the file: EIO, or out of memory)
    # is the file's line and exit 1, the other files' CRCs kept (untested until helper 176, by coverage;
    # a traceback and no CRC kept until helper 72).
    source, storage, gate, index = tmp_path / "source", tmp_path / "storage", tmp_path / "gate", tmp_path / "index"
    write_tree(source, {"a.jpg": b"a" * 1000, "b.jpg": b"b" * 1000})
    storage.mkdir()
    await ctimes_settled(source)
    env = {"ARCHIVER_DIR": str(storage), "ARCHIVER_INDEX": str(index), "ARCHIVER_TRUSTED_FUSE": "fuse"}
    results: list[subprocess.CompletedProcess[str]] = []
    async with gated_mount(source, storage / "album", gate), trio.open_nursery() as nursery:
        gate.write_text("read")  # a.jpg's read waits: the walk is over, b.jpg not yet opened
        nursery.start_soon(lambda: trio.to_thread.run_sync(lambda: results.append(run_archiver("index", env=env))))
        await until_held(gate)
        write_atomically(tmp_path / "gate-fail-stats", f"{failure} b.jpg")
        gate.unlink()
    (result,) = results
    assert result.returncode == 1
    reason = os.strerror(failure)
    assert result.stderr.splitlines()[0] == f"archiver index: cannot read {storage}/album/b.jpg: {reason}"
    assert result.stdout.strip() == "indexed 1 album, 2 files (1 computed, 1 unreadable)"
    assert "1 files could not be read" in result.stderr and "Traceback" not in result.stderr
    assert list(rows(index)) == [(source / "a.jpg").stat().st_ino]


def blocks_read(patch: pytest.MonkeyPatch, pause: float = 0.0) -> list[int]:
    """Offsets of the blocks ``crc_reads`` reads for CRCs, in order (``pause``: seconds a block, slow storage)."""
    offsets: list[int] = []
    read_block = crc_reads_module._crc_of_block

    def noted(fd: int, *rest: Any) -> tuple[int, int]:
        offsets.append(os.lseek(fd, 0, os.SEEK_CUR))
        time.sleep(pause)
        return read_block(fd, *rest)

    patch.setattr(crc_reads_module, "_crc_of_block", noted)
    return offsets


def trusted_index(folder: Path) -> CrcIndex:
    """A CrcIndex that has looked at ``folder``'s filesystem, as an album's walk does first."""
    index = CrcIndex()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        index.trust.learn(fd, os.fstat(fd).st_dev)
    finally:
        os.close(fd)
    assert index.trust.device(folder.stat().st_dev), "tmp_path's filesystem should be trusted"
    return index


def large_cold_file(
    folder: Path, patch: pytest.MonkeyPatch, size: int, pause: float = 0.0
) -> tuple[Path, bytes, CrcIndex, list[int]]:
    """A file of ``size`` random bytes in ``folder``, an index that trusts its filesystem, and ``blocks_read``.

    Its CRC not racy, though written a moment ago: it does not change.
    """
    content = os.urandom(size)
    path = folder / "video.mp4"
    path.write_bytes(content)
    patch.setattr(ctime_trust_module, "RACY_NS", 0)
    return path, content, trusted_index(folder), blocks_read(patch, pause)


BLOCK = crc_reads_module.BATCH_BYTES


async def crc_and_whether_racy(path: Path, size: int, index: CrcIndex, found: list[tuple[int, bool]]) -> None:
    """``file_crc`` of ``path``: its CRC and whether it is racy, appended to ``found``."""
    result = await file_crc(path, size, index)
    found.append((result.crc, result.racy))


async def read_cut_short(path: Path, size: int, index: CrcIndex, offsets: list[int], block: int) -> None:
    """``file_crc`` of ``path``, cancelled as its ``block``th block (``blocks_read``'s ``offsets``) is being read.

    After the second read of that block, the thread held until the cancellation is through: the
    read then stands at the first read's end (``FileRead.covered``), as with storage slower than that.
    """
    reads_in_block: list[int] = []
    through = threading.Event()
    with trio.CancelScope() as scope:
        cancel = scope.cancel

        def progress() -> None:  # in the reading thread, after each read of READ_SIZE
            if len(offsets) == block:
                reads_in_block.append(1)
                if len(reads_in_block) == 2:
                    trio.from_thread.run_sync(cancel)
                    through.wait(10)

        await file_crc(path, size, index, progress=progress)
    through.set()
    assert scope.cancelled_caught
    with trio.fail_after(10):  # the thread given up on ends (its reader's place is given back)...
        while index.readers.borrowed_tokens:
            await trio.sleep(0.01)
    assert len(reads_in_block) == 2  # ...with no read after the one it was at


async def test_a_large_file_s_crc_read_cut_short_is_resumed_not_read_from_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 111: a client that asked for the first bytes of a large cold file, and left before
    # its CRC was read, had it read from its start each time: a 4 GiB file, 1.8 GB read and
    # 0.5 CPU-s for each request of 79 bytes, as long as it went on.
    block = crc_reads_module.BATCH_BYTES
    path, content, index, offsets = large_cold_file(tmp_path, monkeypatch, 6 * block)
    await read_cut_short(path, len(content), index, offsets, 3)  # the first two blocks done
    found = await file_crc(path, len(content), index)
    assert found.crc == zlib.crc32(content) and not found.racy
    # The third block was being read when the first read was given up on: it goes on from where
    # that read stood.
    resumed = 2 * block + READ_SIZE
    assert offsets == [0, block, 2 * block, *range(resumed, len(content), block)]
    assert index.get(found.key) == found.crc


async def test_a_crc_read_cut_short_inside_a_block_goes_on_from_its_last_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 113: kept only at a block's end (4 MiB), a read of storage slower than a client's
    # patience (~20 MB/s, a client leaving after 0.5 s) never got past its first block.
    block = crc_reads_module.BATCH_BYTES
    path, content, index, offsets = large_cold_file(tmp_path, monkeypatch, 2 * block)
    await read_cut_short(path, len(content), index, offsets, 1)  # cut in the first block, after a read
    found = await file_crc(path, len(content), index)
    assert found.crc == zlib.crc32(content)
    assert offsets == [0, READ_SIZE, READ_SIZE + block]


async def test_a_crc_read_cut_short_for_want_of_a_thread_goes_on_from_where_it_stood(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tasks' limit met (NoThread) is no fault of the file's: what was read is kept, as for a cancellation.
    block = crc_reads_module.BATCH_BYTES
    path, content, index, offsets = large_cold_file(tmp_path, monkeypatch, 3 * block)
    read_shared_block = large_file_crc_module.crc_of_shared_block

    def no_thread_for_the_third(*args: object) -> tuple[int, int]:
        if len(offsets) == 2:
            raise NoThread(errno.EAGAIN, "no thread")
        return read_shared_block(*args)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(large_file_crc_module, "crc_of_shared_block", no_thread_for_the_third)
        with pytest.raises(NoThread):
            await file_crc(path, len(content), index)
    found = await file_crc(path, len(content), index)
    assert found.crc == zlib.crc32(content)
    assert offsets == [0, block, 2 * block]


async def test_a_large_file_read_by_three_downloads_at_once_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 111: four ranges of a cold album's central directory at once read it four times.
    block = crc_reads_module.BATCH_BYTES
    path, content, index, offsets = large_cold_file(tmp_path, monkeypatch, 3 * block + 5)
    found: list[int] = []

    async def read() -> None:
        found.append((await file_crc(path, len(content), index)).crc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(read)
    assert found == [zlib.crc32(content)] * 3
    assert offsets == [0, block, 2 * block, 3 * block]


async def test_a_large_file_whose_key_is_not_trusted_read_by_three_at_once_is_read_once_racy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 113: its CRC is never kept, and the downloads waiting for the first read each read it
    # again after it, one after another.  They take its CRC, racy: checked against the bytes as they go.
    path, content, index, offsets = large_cold_file(tmp_path, monkeypatch, 2 * BLOCK, pause=0.2)  # all at once
    monkeypatch.setattr(index.trust, "filesystem", lambda device: None)
    found: list[tuple[int, bool]] = []
    read = partial(crc_and_whether_racy, path, len(content), index, found)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(read)
    assert found == [(zlib.crc32(content), True)] * 3
    assert offsets == [0, BLOCK]


async def test_a_client_that_leaves_before_a_large_file_s_crc_is_read_cannot_make_it_read_again(
    storage: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hostile client of helper 111, over HTTP/1.1: the first 100 bytes of an album whose first
    # file is large and cold (its local header needs its CRC), the connection closed 0.1 s later,
    # again and again, on storage that reads a block in 0.05 s.  Each block is read once, but the
    # one in flight as a request left.
    block = crc_reads_module.BATCH_BYTES
    content = os.urandom(8 * block)
    write_tree(storage / "album", {"video.mp4": content})
    monkeypatch.setattr(ctime_trust_module, "RACY_NS", 0)
    offsets = blocks_read(monkeypatch, pause=0.05)
    request = b"GET /archive/album/ HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\n\r\n"
    async with running_server(settings) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        leaving = 0
        while (not offsets or offsets[-1] < 7 * block) and leaving < 40:  # 8 blocks: at most 9 requests
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(request)
            await trio.sleep(0.1)  # the client's own impatience, not a synchronisation
            await stream.aclose()
            leaving += 1
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/archive/album/")
    assert leaving >= 3  # the read outlasted several requests
    assert read_archive(response.content) == {"video.mp4": content}
    # Not read from its start again by each request (helper 111: every one of them did).  Twice
    # if the first request left before its first block was read: on a loaded machine (CI beside
    # four other workers, 2026-12-05) its read began past the 0.1 s, and each block went twice.
    assert offsets.count(0) <= 2, offsets
    assert len(offsets) <= 8 + leaving, offsets
    # A read was cut short and resumed (not merely followed by the next request's).
    assert len(offsets) > len(set(offsets)) or any(offset % block for offset in offsets), offsets


async def test_a_download_waiting_for_another_s_read_that_hangs_meets_the_storage_timeout(
    storage: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 112: a download waiting for another download's read of a file it needs counted every
    # download's reads as its progress.  That read hanging (one file stuck) while another album's
    # download read on, and the reading download alive (its client still taking earlier files),
    # the waiter was never cut: now that read's reads are its progress, as they would be its own.
    mib = 1 << 20
    # The first large enough that its download stays blocked on sending it (pipe, channel, socket buffers).
    first, stuck = os.urandom(32 * mib), os.urandom(8 * mib)
    write_tree(storage / "a", {"0first.bin": first, "1stuck.bin": stuck})
    write_tree(storage / "b", {f"{i:02}.bin": os.urandom(8 * mib) for i in range(8)})
    stuck_inode = (storage / "a" / "1stuck.bin").stat().st_ino
    slow_inodes = {path.stat().st_ino for path in (storage / "b").iterdir()}
    hung, release = threading.Event(), threading.Event()
    monkeypatch.setattr(ctime_trust_module, "RACY_NS", 0)
    read_block = crc_reads_module._crc_of_block

    def storage_reads(fd: int, *rest: Any) -> tuple[int, int]:
        inode = os.fstat(fd).st_ino
        if inode == stuck_inode:
            hung.set()
            release.wait(60)  # a file whose read hangs (a FUSE file stuck, a bad sector retried)
        elif inode in slow_inodes:
            time.sleep(0.25)  # slow storage that answers
        return read_block(fd, *rest)

    monkeypatch.setattr(crc_reads_module, "_crc_of_block", storage_reads)
    timeout = 2.0
    header_of_stuck = ArchivePlan(storage / "a", list_album(storage / "a").files).local_offsets[1]
    try:
        async with (
            running_server(replace(settings, storage_timeout=timeout)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as reader,
            httpx.AsyncClient(base_url=url, timeout=30) as other,
            httpx.AsyncClient(base_url=url, timeout=30) as waiter,
            reader.stream("GET", "/archive/a/"),  # reads 0first.bin, then 1stuck.bin, which hangs
            other.stream("GET", "/archive/b/") as moving,  # every download's reads move on meanwhile
        ):
            await trio.to_thread.run_sync(hung.wait, 10)
            moving_bytes = moving.aiter_raw()  # kept: a generator dropped closes the response
            await anext(moving_bytes)
            started = trio.current_time()
            waited = await waiter.get(
                "/archive/a/", headers={"Range": f"bytes={header_of_stuck}-{header_of_stuck + 60}"}
            )
            took = trio.current_time() - started
    finally:
        release.set()
    assert waited.status_code == 503
    assert took < timeout * 1.25 + 1.5, took


@pytest.mark.parametrize("resumed_on", ["its filesystem", "another filesystem", "a filesystem not trusted"])
async def test_a_read_cut_short_is_resumed_only_on_the_filesystem_it_was_read_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resumed_on: str
) -> None:
    # A device number is reused by the next mount (a walk looks at it anew): what was read of "the
    # same key" may be another file's. A read is tied to the filesystem its descriptor lies on, as
    # the download's walk saw it (helper 161: by the trust's latest look, a read of one filesystem's
    # file was kept under another's id): cut short, it is resumed only on that filesystem.
    block = crc_reads_module.BATCH_BYTES
    path, content, index, offsets = large_cold_file(tmp_path, monkeypatch, 3 * block)
    await read_cut_short(path, len(content), index, offsets, 2)
    cut = len(offsets)
    device, fd = path.stat().st_dev, os.open(path, os.O_RDONLY)
    read_on = filesystem_id(fd)
    os.close(fd)
    view: dict[int, int] | None = {device: read_on}
    if resumed_on == "another filesystem":  # the walk saw another on its device: the file is not the one listed
        with pytest.raises(FileChanged, match="on another filesystem than the one listed"):
            await file_crc(path, len(content), index, view={device: read_on + 1})
        assert len(offsets) == cut  # not read
    if resumed_on == "a filesystem not trusted":
        view = None  # the trust's latest look
        monkeypatch.setattr(index.trust, "filesystem", lambda device: None)
    found = await file_crc(path, len(content), index, view=view)
    assert found.crc == zlib.crc32(content)
    if resumed_on != "a filesystem not trusted":
        assert not found.racy and offsets[cut] > 0  # resumed where the first read stopped
        assert index.get(found.key, read_on) == found.crc
    else:
        assert found.racy and offsets[cut:] == [0, block, 2 * block]  # read again whole, not kept
        assert index.get(found.key, read_on) is None


async def test_a_download_asking_after_a_read_of_a_file_not_trusted_began_does_not_take_its_crc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 114: the key of a file not trusted does not move with an edit in place, so a CRC read
    # before a download asked may be older than the file it would read; a range of headers only
    # sends it unchecked.  It reads the file itself, as it did before reads were shared.
    path, content, index, offsets = large_cold_file(tmp_path, monkeypatch, 2 * BLOCK, pause=0.2)
    monkeypatch.setattr(index.trust, "filesystem", lambda device: None)
    found: list[tuple[int, bool]] = []
    read = partial(crc_and_whether_racy, path, len(content), index, found)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        with trio.fail_after(10):
            while not offsets:  # the first read has begun
                await trio.sleep(0.01)
        nursery.start_soon(read)
    assert found == [(zlib.crc32(content), True)] * 2
    assert offsets.count(0) == 2


@pytest.mark.parametrize(
    ("compression", "size"),
    [(0, 100), (0, 3 * READ_SIZE), (6, 3 * READ_SIZE)],
    ids=["copied", "sendfile", "stored in a deflated archive"],
)
async def test_a_racy_crc_that_is_not_the_bytes_sent_fails_the_transfer(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, compression: int, size: int
) -> None:
    """A CRC read while its file may still change within one clock tick (racy) goes out only checked
    against the bytes sent: one that does not match them aborts the transfer, never a clean end.

    A write that keeps the key (the same tick) cannot be made on demand, so the CRC read of one
    file is made to disagree with it: what such a write would leave.  Every way the producer sends
    a stored entry's data: copied with its header (small: in a range, as a whole download leaves a
    small file's CRC to the producer, which computes it from the bytes it sends), by sendfile, and
    in a deflated archive (a file near 4 GiB, ``zipformat.stored_when_deflating``: the rule's size
    made small here); after a first file, so that the headers went out (before them, it is a 503,
    "album changing").  Helper 118: with the producer's comparison, or the verification asked of
    it, taken out, every other test passed.
    """
    if compression:
        settings = replace(settings, compression=compression)
        monkeypatch.setattr(plan_module, "stored_when_deflating", lambda file_size: file_size == size)
    album = settings.storage_dir / "album"
    marked = b"\xaa" * size
    write_tree(album, {"0.jpg": os.urandom(2 * READ_SIZE), "a.jpg": marked, "b.jpg": b"b" * 10})  # racy

    class OtherBytes:
        @staticmethod
        def crc32(data: bytes | memoryview, crc: int = 0) -> int:
            right = zlib.crc32(data, crc)
            return right ^ 1 if bytes(data[:16]) == marked[:16] else right

    async with running_server(settings) as url, httpx.AsyncClient(base_url=url) as client:
        # All but the last byte: not a whole download.
        length = int((await client.head("/archive/album/")).headers["content-length"]) if size < READ_SIZE else 0
        with monkeypatch.context() as patch, pytest.raises(ABORTED):
            patch.setattr(crc_reads_module, "zlib_ng", OtherBytes)
            # Racy however long the machine took to get here: the files were written less than RACY_NS
            # (1 s) before their CRC reads only if it was quick (a loaded machine, or coverage's tracing,
            # took longer: the wrong CRC was kept as settled, and the transfer ended cleanly; helper 169).
            patch.setattr(ctime_trust_module, "RACY_NS", 3600 * SECOND)
            await client.get("/archive/album/", headers={"Range": f"bytes=0-{length - 2}"} if length else {})
        # Not kept (a racy CRC never is): read again, right, the next download is whole.
        monkeypatch.setattr(ctime_trust_module, "RACY_NS", 0)
        whole = await client.get("/archive/album/")
    assert whole.status_code == 200 and read_archive(whole.content) == files_on_disk(album)


ZRAM_CONTROL = Path("/sys/class/zram-control")


@contextmanager
def zram_device(size: str = "256M") -> Iterator[str]:
    """A fresh zram device (a block device, not a loop: ctimes trusted) of ``size``: its path."""
    number = int((ZRAM_CONTROL / "hot_add").read_text())
    try:
        (Path("/sys/block") / f"zram{number}" / "disksize").write_text(size)
        yield f"/dev/zram{number}"
    finally:
        (ZRAM_CONTROL / "hot_remove").write_text(str(number))


@contextmanager
def mounted(device: str, mountpoint: Path) -> Iterator[None]:
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(["mount", device, str(mountpoint)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True)


@contextmanager
def btrfs_on_zram(mountpoint: Path) -> Iterator[str]:
    """A fresh btrfs mounted at ``mountpoint``, on a zram device.

    Yields the device's path, to mount it again.
    """
    with zram_device() as device:
        subprocess.run(["mkfs.btrfs", "-q", device], check=True, capture_output=True)
        with mounted(device, mountpoint):
            yield device


def btrfs(*arguments: str) -> None:
    subprocess.run(["btrfs", *arguments], check=True, capture_output=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None or not ZRAM_CONTROL.exists(),
    reason="needs root, btrfs-progs and zram",
)
@pytest.mark.parametrize("remounted", [False, True], ids=["mounted", "remounted and restarted"])
async def test_a_snapshot_given_a_deleted_subvolumes_device_number_is_not_sent_its_crcs(
    tmp_path: Path, remounted: bool
) -> None:
    # Helper 159: btrfs numbers each subvolume's inodes from 257 and gives each subvolume a device
    # number of its own, which a snapshot made after a subvolume is deleted takes, with the inodes
    # and times of what it copies. Two files written in one clock tick, one in each of two
    # subvolumes: the same key but for the device. The album's was downloaded (its CRC kept); the
    # album's subvolume deleted and the other snapshotted in its place: a clean 200 carried the
    # other file's bytes under the first file's CRC, with the same ETag. Helper 160: after a
    # remount, the number of the subvolume deleted last is given again, and with it btrfs's
    # f_fsid (its UUID with that number): only the subvolume's own UUID tells the two apart.
    mountpoint = tmp_path / "mnt"
    with btrfs_on_zram(mountpoint) as block_device:
        storage = mountpoint / "storage"
        storage.mkdir()
        # The freed device number goes to the next mount of any kind (the lowest free): under
        # parallel tests another worker's tmpfs may take it between the deletion and the snapshot.
        for attempt in range(5):
            if attempt:
                btrfs("subvolume", "delete", "-c", str(storage / "album"), str(storage / "other"))
            x, y = same_key_files_in_two_subvolumes(storage)
            device = key_of(storage / "album" / "f.bin")[0]
            await settle()
            index = tmp_path / f"index-{attempt}.sqlite"
            settings = Settings(settle_time=0, storage_dir=storage, host="127.0.0.1", port=0, index_path=str(index))
            async with running_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
                before = await client.get("/archive/album/")
                assert read_archive(before.content) == {"f.bin": x}
                if not remounted:
                    swap_album_for_a_snapshot_of_other(storage, None)
                    after = await client.get("/archive/album/")
            if remounted:  # the index's rows kept in its file, the service started again
                swap_album_for_a_snapshot_of_other(storage, block_device)
                async with running_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
                    after = await client.get("/archive/album/")
            if key_of(storage / "album" / "f.bin")[0] == device:
                break
        else:
            pytest.fail("the device number went to another mount each time")
    assert after.status_code == 200
    assert read_archive(after.content) == {"f.bin": y}  # each CRC checked: before, y's bytes under x's CRC
    assert after.headers["etag"] != before.headers["etag"]


@pytest.mark.parametrize("crc", ["kept for the other", "computed by the producer", "read by the service"])
async def test_a_download_looks_up_and_keeps_crcs_under_the_filesystem_its_walk_saw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crc: str
) -> None:
    # Helper 161: the index looked CRCs up and kept them under the filesystem the trust saw last on
    # a device, by any walk. Two btrfs subvolumes mounted in turn on one device number, a file of
    # the same key in each: a download of one was sent the other's CRC (a walk of the other
    # between its walk and its lookup), and a CRC the producer computed from one's file was kept
    # under the other's id, then sent with the other's bytes on every download, across restarts.
    album = tmp_path / "album"
    album.mkdir()
    (album / "f.jpg").write_bytes(b"the album's file")
    await settle()
    index = CrcIndex()
    listing = list_album(album, on_device=index.trust.learn)
    plan = ArchivePlan(album, listing.files, 0, filesystems=listing.filesystems)
    key = plan.key(0)
    assert plan.filesystem_ids is not None
    seen, other = plan.filesystem_ids[key[0]], plan.filesystem_ids[key[0]] + 1
    monkeypatch.setattr(index.trust, "filesystem", lambda device: other)  # another walk's look since
    if crc == "kept for the other":
        index.put(key, zlib.crc32(b"the other's file"), other)
    archive = await collect(plan, index=index, whole_download=crc == "computed by the producer")
    assert read_archive(archive) == {"f.jpg": b"the album's file"}  # its CRC checked
    assert index.get(key, seen) == zlib.crc32(b"the album's file")
    if crc != "kept for the other":
        assert index.get(key, other) is None


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None or not ZRAM_CONTROL.exists(),
    reason="needs root, btrfs-progs and zram",
)
@pytest.mark.parametrize("remounted", [False, True], ids=["mounted", "remounted"])
@pytest.mark.parametrize("nested", [False, True], ids=["the album a subvolume", "a subvolume in the album"])
async def test_a_subvolume_swapped_for_a_snapshot_between_the_walk_and_the_producer_is_not_sent(
    tmp_path: Path, remounted: bool, nested: bool
) -> None:
    # Helper 160: the walk of a download sees the album's subvolume, and its CRCs are found under
    # that subvolume's id; then the subvolume is deleted and the other snapshotted in its place,
    # taking its device number, and the producer opens the snapshot. It checked each file's fstat
    # (the same key) but not its filesystem: the other file's bytes went out under the first's CRC.
    # After a remount the f_fsid is the same too: only the subvolume's UUID tells them apart.
    # Nested: the album a folder holding both subvolumes (each file checked, not the album's once).
    mountpoint = tmp_path / "mnt"
    with btrfs_on_zram(mountpoint) as block_device:
        storage = mountpoint / "storage"
        storage.mkdir()
        album, swapped = (storage, "album/f.bin") if nested else (storage / "album", "f.bin")
        for attempt in range(5):  # the freed device number may go to another worker's mount
            if attempt:
                btrfs("subvolume", "delete", "-c", str(storage / "album"), str(storage / "other"))
            x, y = same_key_files_in_two_subvolumes(storage)
            device = key_of(album / swapped)[0]
            await settle()
            index = CrcIndex()
            listing = list_album(album, on_device=index.trust.learn)
            warmed = await collect(ArchivePlan(album, listing.files, 0, filesystems=listing.filesystems), index=index)
            assert read_archive(warmed)[swapped] == x
            assert index.get(key_of(album / swapped)) == zlib.crc32(x)
            listing = list_album(album, on_device=index.trust.learn)  # the next download's walk
            plan = ArchivePlan(album, listing.files, 0, filesystems=listing.filesystems)
            swap_album_for_a_snapshot_of_other(storage, block_device if remounted else None)
            if key_of(album / swapped)[0] == device:
                break
        else:
            pytest.fail("the device number went to another mount each time")
        assert key_of(album / swapped) == plan.key(0)  # the same key: only its filesystem tells
        with pytest.raises(BaseExceptionGroup) as raised:
            await collect(plan, index=index)
        failure = raised.value.exceptions[0]
        assert isinstance(failure, ProducerFailed), failure
        assert "another filesystem than the one listed" in str(failure)
        # Helper 162: a resume of the central directory alone (If-Range, the walk's ETag), its CRCs
        # read by the service (not in the index): the snapshot's was sent unchecked, a clean 206.
        with pytest.raises(BaseExceptionGroup) as raised:
            await collect(plan, start=plan.local_offsets[plan.count], index=CrcIndex())
        failure = raised.value.exceptions[0]
        assert isinstance(failure, FileChanged), failure
        assert "another filesystem than the one listed" in str(failure)
        # The next download's walk sees the snapshot: its CRC read, its archive whole.
        listing = list_album(album, on_device=index.trust.learn)
        after = await collect(ArchivePlan(album, listing.files, 0, filesystems=listing.filesystems), index=index)
        assert read_archive(after)[swapped] == y


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.xfs") is None or not ZRAM_CONTROL.exists(),
    reason="needs root, xfsprogs and zram",
)
async def test_another_xfs_on_the_same_device_is_not_sent_the_first_ones_crcs(tmp_path: Path) -> None:
    # Helper 161: XFS's f_fsid is its block device's number, which any other XFS on that device
    # keeps. Two XFS, a file written in each in one clock tick (the same inode number in both): the
    # first's album downloaded, then the second's image written over the first's device and mounted
    # in its place. A clean 200 sent the second's bytes under the first's CRC. Its UUID tells them,
    # to the index and to the producer.
    album, other = tmp_path / "storage" / "album", tmp_path / "other"
    album.parent.mkdir()
    with zram_device("512M") as first, zram_device("512M") as second:
        for device in (first, second):
            subprocess.run(["mkfs.xfs", "-q", device], check=True, capture_output=True)
        with mounted(first, album), mounted(second, other):
            for _ in range(50):
                contents = os.urandom(5000), os.urandom(5000)
                paths = album / "f.bin", other / "f.bin"
                descriptors = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for path in paths]
                for fd, content in zip(descriptors, contents, strict=True):
                    os.write(fd, content)
                for fd in descriptors:
                    os.close(fd)
                if key_of(paths[0])[1:] == key_of(paths[1])[1:]:  # one clock tick: all but the device
                    break
                for path in paths:
                    path.unlink()
            else:
                pytest.fail("no two files written within one clock tick in 50 tries")
            key = key_of(paths[0])
            await settle()
            index = CrcIndex()
            listing = list_album(album, on_device=index.trust.learn)
            before = await collect(ArchivePlan(album, listing.files, 0, filesystems=listing.filesystems), index=index)
            assert read_archive(before) == {"f.bin": contents[0]}
            listing = list_album(album, on_device=index.trust.learn)  # the next download's walk
        subprocess.run(["dd", f"if={second}", f"of={first}", "bs=1M", "conv=fsync"], check=True, capture_output=True)
        with mounted(first, album):
            assert key_of(album / "f.bin") == key  # the same key, on the same device
            # Swapped between that walk and its producer: not sent (the producer checks the UUID).
            with pytest.raises(BaseExceptionGroup) as raised:
                await collect(ArchivePlan(album, listing.files, 0, filesystems=listing.filesystems), index=index)
            assert "another filesystem than the one listed" in str(raised.value.exceptions[0])
            listing = list_album(album, on_device=index.trust.learn)
            after = await collect(ArchivePlan(album, listing.files, 0, filesystems=listing.filesystems), index=index)
    assert read_archive(after) == {"f.bin": contents[1]}  # its CRC checked


def same_key_files_in_two_subvolumes(storage: Path) -> tuple[bytes, bytes]:
    """Subvolumes ``other`` and ``album`` (its number the last), with files ``f.bin`` of the same key but the device.

    Returns their contents (album's, other's).
    """
    for _ in range(50):
        btrfs("subvolume", "create", str(storage / "other"))
        btrfs("subvolume", "create", str(storage / "album"))  # the last number: given again
        x, y = os.urandom(5000), os.urandom(5000)
        first, second = storage / "album" / "f.bin", storage / "other" / "f.bin"
        # Both opened, then both written, before either is looked at: one clock tick for both.
        descriptors = [os.open(path, os.O_WRONLY | os.O_CREAT, 0o644) for path in (first, second)]
        for fd, content in zip(descriptors, (x, y), strict=True):
            os.write(fd, content)
        for fd in descriptors:
            os.close(fd)
        if key_of(first)[1:] == key_of(second)[1:]:
            return x, y
        btrfs("subvolume", "delete", "-c", str(storage / "album"), str(storage / "other"))
    pytest.fail("no two files written within one clock tick in 50 tries")


def swap_album_for_a_snapshot_of_other(storage: Path, remount: str | None) -> None:
    """Delete subvolume ``album``, mount ``remount`` (a device) again if given, and snapshot ``other`` as ``album``."""
    mountpoint = storage.parent
    btrfs("subvolume", "delete", "-c", str(storage / "album"))
    btrfs("subvolume", "sync", str(mountpoint))
    if remount is not None:
        subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True)
        subprocess.run(["mount", remount, str(mountpoint)], check=True, capture_output=True)
    btrfs("subvolume", "snapshot", str(storage / "other"), str(storage / "album"))
