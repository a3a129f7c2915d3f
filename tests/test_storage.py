"""Storage: name checks, containment in the root, and what goes into an archive."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from archiver.archive.listing import PATH_LOGGED, SKIPS_LOGGED, AlbumNotFound, ListingFailed, SkippedLog
from archiver.archive.real_paths import open_real_directory
from archiver.archive.storage import list_album, resolve_album

from .conftest import own_descriptors, write_deep_file, write_tree
from .test_cli import PROJECT


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a.b", "a b", "a\x00b", "a%2fb", "é", "a" * 129, "-/../x"])
def test_malformed_names_are_refused(storage: Path, name: str) -> None:
    with pytest.raises(AlbumNotFound):
        resolve_album(storage, name)


def test_album_resolves_to_its_directory(storage: Path) -> None:
    (storage / "Album_1-x").mkdir()
    assert resolve_album(storage, "Album_1-x") == (storage / "Album_1-x").resolve()


def test_missing_album_and_plain_file_are_not_found(storage: Path) -> None:
    (storage / "file").write_bytes(b"not a directory")
    for name in ("missing", "file"):
        with pytest.raises(AlbumNotFound):
            resolve_album(storage, name)


def test_links_out_of_the_root_or_to_the_root_are_not_found(storage: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (storage / "escape").symlink_to(tmp_path / "outside")
    (storage / "root").symlink_to(".")
    (storage / "dangling").symlink_to("nowhere")
    for name in ("escape", "root", "dangling"):
        with pytest.raises(AlbumNotFound):
            resolve_album(storage, name)


def test_a_folder_on_the_albums_path_swapped_for_a_link_after_resolving_is_not_followed(
    storage: Path, tmp_path: Path
) -> None:
    """``leak`` -> ``x/pub`` resolves inside the root; ``x`` then swapped for a link to a folder
    outside with a ``pub`` of its own.  The walk opens the resolved path a folder at a time, with
    no link followed: O_NOFOLLOW on one open of the whole path guards its last component only."""
    write_tree(tmp_path / "outside" / "pub", {"secret.txt": b"TOP SECRET"})
    write_tree(storage / "x" / "pub", {"public.txt": b"harmless"})
    (storage / "leak").symlink_to("x/pub")
    album = resolve_album(storage, "leak")
    assert album == (storage / "x" / "pub").resolve()
    (storage / "x").rename(storage / "xdir")
    (storage / "x").symlink_to(tmp_path / "outside")
    with pytest.raises(AlbumNotFound):
        list_album(album)
    (storage / "x").unlink()
    (storage / "xdir").rename(storage / "x")
    assert [file.path for file in list_album(album).files] == ["public.txt"]


def test_real_directories_only_open_absolute_real_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    fd = open_real_directory(tmp_path.resolve() / "a")
    os.close(fd)
    for path in ("a", f"{tmp_path.resolve()}/a/../a", f"{tmp_path.resolve()}/./a"):
        with pytest.raises(ValueError):
            open_real_directory(path)
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OSError) as raised:
        open_real_directory(tmp_path.resolve() / "b")
    assert raised.value.errno in (errno.ENOTDIR, errno.ELOOP)  # Linux: ENOTDIR (O_DIRECTORY)


def test_listing_is_sorted_and_recursive(storage: Path) -> None:
    write_tree(storage / "a", {"b/2.jpg": b"22", "b/1.jpg": b"1", "0.jpg": b"", "c/d/e.jpg": b"eee"})
    listing = list_album(storage / "a")
    assert [(file.path, file.size) for file in listing.files] == [
        ("0.jpg", 0),
        ("b/1.jpg", 1),
        ("b/2.jpg", 2),
        ("c/d/e.jpg", 3),
    ]
    assert listing.total_size == 6
    assert listing.skipped == ()


def test_links_and_special_files_are_skipped_with_reasons(storage: Path, tmp_path: Path) -> None:
    album = storage / "a"
    write_tree(album, {"ok.jpg": b"ok", "sub/inside.jpg": b"in"})
    (album / "to-file").symlink_to(album / "ok.jpg")
    (album / "to-dir").symlink_to(tmp_path)
    os.mkfifo(album / "fifo")
    (album / "sub" / "new\nline").write_bytes(b"x")
    listing = list_album(album)
    assert [file.path for file in listing.files] == ["ok.jpg", "sub/inside.jpg"]
    reasons = {entry.path: entry.reason for entry in listing.skipped}
    assert reasons == {
        "fifo": "not a regular file",
        "sub/new\nline": "line break in name",
        "to-dir": "symbolic link",
        "to-file": "symbolic link",
    }


def test_empty_album_lists_nothing(storage: Path) -> None:
    (storage / "empty" / "only-dirs").mkdir(parents=True)
    listing = list_album(storage / "empty")
    assert listing.files == ()


def test_folders_nested_too_deep_are_left_out_and_hold_no_descriptors(tmp_path: Path) -> None:
    from archiver.archive.album_walk import MAX_DEPTH

    album = tmp_path / "album"
    deepest = album
    for _ in range(MAX_DEPTH + 50):  # one mkdir at a time: far past what a path may spell
        deepest = deepest / "d"
    deepest.mkdir(parents=True)
    (deepest / "deep.jpg").write_bytes(b"x")
    (album / "top.jpg").write_bytes(b"y")
    (album / "d" / "one.jpg").write_bytes(b"z")
    descriptors = own_descriptors()
    listing = list_album(album)
    assert own_descriptors() == descriptors
    assert [file.path for file in listing.files] == ["d/one.jpg", "top.jpg"]
    (skip,) = listing.skipped
    assert skip.path.count("/") + 1 == MAX_DEPTH + 1 and "nested deeper" in skip.reason


def test_a_folder_nested_exactly_64_levels_is_archived(tmp_path: Path) -> None:
    from archiver.archive.album_walk import MAX_DEPTH

    album = tmp_path / "album"
    folder = album
    for _ in range(MAX_DEPTH):
        folder = folder / "d"
    folder.mkdir(parents=True)
    (folder / "at-64.jpg").write_bytes(b"x")
    listing = list_album(album)
    assert [file.path.count("/") for file in listing.files] == [MAX_DEPTH]


@pytest.mark.parametrize("over", [0, 1], ids=["fits exactly", "a byte too long"])
def test_a_path_that_fits_path_max_exactly_is_listed_and_one_byte_longer_is_left_out(tmp_path: Path, over: int) -> None:
    # The whole path (the album's, "/", the entry's, and the NUL) must fit PATH_MAX, 4,096 bytes:
    # what checks a file again by its path (listed_files) opens it whole.
    album = tmp_path / "album"
    album.mkdir()
    length = 4096 - len(os.fsencode(album)) - 2 + over  # the entry's relative path, in bytes
    levels = 0
    while length - 201 * levels > 255:  # folders of 200-byte names, then the file's name
        levels += 1
    folders = [b"%03d" % level + b"d" * 197 for level in range(levels)]
    relative = write_deep_file(album, folders, b"f" * (length - 201 * levels))
    assert len(relative) == length
    listing = list_album(album)
    if over:
        assert listing.files == () and [skip.reason for skip in listing.skipped] == [
            "path too long for the system (PATH_MAX)"
        ]
    else:
        assert [os.fsencode(file.path) for file in listing.files] == [relative] and listing.skipped == ()


def test_an_album_of_more_entries_than_the_most_fails_its_listing(tmp_path: Path) -> None:
    # Found by helper 45: a listing and a plan are held in memory, ~650 bytes a file; 250,000
    # files took 150 MB a download. Files, folders and what is left out all count.
    write_tree(tmp_path / "album", {"a.jpg": b"a", "f/b.jpg": b"b", "f/g/c.jpg": b"c"})
    os.symlink("a.jpg", tmp_path / "album" / "link")  # left out, but met
    assert len(list_album(tmp_path / "album", max_entries=6).files) == 3
    with pytest.raises(ListingFailed, match="more than 5 entries") as refused:
        list_album(tmp_path / "album", max_entries=5)
    assert not refused.value.transient
    # A folder of more entries than the most stops its walk while it is read, not once held whole.
    write_tree(tmp_path / "wide", {f"{index}.jpg": b"" for index in range(5000)})
    read = 0
    real_scandir = os.scandir

    def counting_scandir(fd: int) -> Iterator[os.DirEntry[str]]:
        nonlocal read
        with real_scandir(fd) as listing:
            for entry in listing:
                read += 1
                yield entry

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "scandir", lambda fd: contextlib.closing(counting_scandir(fd)))
        with pytest.raises(ListingFailed):
            list_album(tmp_path / "wide", max_entries=1000)
    assert read <= 2048


def test_a_listing_logs_a_few_entries_left_out_by_name_and_counts_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every request walks its album: one line a link, for an album of 100,000, at every HEAD.
    write_tree(tmp_path / "album", {"a.jpg": b"a"})
    for index in range(SKIPS_LOGGED + 5):
        os.symlink("a.jpg", tmp_path / "album" / f"link-{index:02d}")
    long_folder = tmp_path / "album" / ("\x01" * 255) / ("\x01" * 255)
    long_folder.mkdir(parents=True)
    os.symlink("a.jpg", long_folder / "0-link")  # listed first: its path is 511 characters
    skips = SkippedLog(versions=2)
    with caplog.at_level(logging.INFO, logger="archiver.archive.listing"):
        listing = list_album(tmp_path / "album")
        assert not caplog.records  # a listing logs nothing: every request lists its album
        skips.log(listing, '"v1"')
        skips.log(list_album(tmp_path / "album"), '"v1"')  # the same version again: not logged
    assert len(listing.skipped) == SKIPS_LOGGED + 6
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == f"skipped album/…{listing.skipped[0].path[-PATH_LOGGED:]}: symbolic link"
    assert lines[1:SKIPS_LOGGED] == [f"skipped album/link-{index:02d}: symbolic link" for index in range(9)]
    assert lines[SKIPS_LOGGED:] == ["skipped 6 more entries of album"]
    # Helper 47: remembered by version, not by the plan cache, which albums can crowd each other out of.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="archiver.archive.listing"):
        skips.log(listing, '"v2"')  # another version: logged
        skips.log(listing, '"v1"')  # remembered still (the last two)
        os.symlink("a.jpg", tmp_path / "album" / "link-new")
        skips.log(list_album(tmp_path / "album"), '"v2"')  # what is left out changed: logged
    assert sum(record.getMessage() == "skipped 6 more entries of album" for record in caplog.records) == 1
    assert sum(record.getMessage() == "skipped 7 more entries of album" for record in caplog.records) == 1


def test_an_album_the_service_cannot_open_fails_the_listing_rather_than_listing_nothing() -> None:
    """Not an empty archive that looks complete: ListingFailed (a 500), while an unreadable file inside is left out.

    Run as a user the permissions apply to (``nobody`` when the tests run as root).
    """
    root = Path(tempfile.mkdtemp())
    try:
        root.chmod(0o755)
        write_tree(root / "locked", {"a.jpg": b"a"})
        write_tree(root / "open", {"a.jpg": b"a", "secret.jpg": b"s", "closed/c.jpg": b"c", "readonly/r.jpg": b"r"})
        write_tree(root / "unsearchable", {"a.jpg": b"a"})
        write_tree(root / "closed-root" / "album", {"a.jpg": b"a"})
        (root / "closed-root").chmod(0o700)  # a storage root the service's user cannot search (helper 34)
        (root / "unsearchable").chmod(0o644)  # read, not search: every entry would be "denied"
        (root / "locked").chmod(0o000)
        (root / "open" / "secret.jpg").chmod(0o000)
        (root / "open" / "closed").chmod(0o000)  # folders inside left out, not walked into an error
        (root / "open" / "readonly").chmod(0o644)
        check = (
            "import os, sys\n"
            "from pathlib import Path\n"
            "from archiver.archive.listing import ListingFailed\n"
            "from archiver.archive.storage import list_album, resolve_album\n"
            "if os.geteuid() == 0: os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "listing = list_album(Path(sys.argv[1], 'open'))\n"
            "print([f.path for f in listing.files], [(s.path, s.reason) for s in listing.skipped])\n"
            "for name in ('locked', 'unsearchable'):\n"
            "    try:\n"
            "        list_album(Path(sys.argv[1], name))\n"
            "    except ListingFailed as error:\n"
            "        print('failed', error, error.transient)\n"
            "try:\n"
            "    resolve_album(Path(sys.argv[1], 'closed-root'), 'album')\n"
            "except ListingFailed as error:\n"
            "    print('failed', error, error.transient)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", check, str(root)], capture_output=True, text=True, check=True, cwd=PROJECT
        )
    finally:
        (root / "locked").chmod(0o755)
        (root / "unsearchable").chmod(0o755)
        (root / "open" / "closed").chmod(0o755)
        (root / "open" / "readonly").chmod(0o755)
        shutil.rmtree(root)
    files, *failures = result.stdout.splitlines()
    left_out = (
        "[('closed', 'directory not readable'), ('readonly', 'directory not readable'), ('secret.jpg', 'not readable')]"
    )
    assert files == f"['a.jpg'] {left_out}"
    assert failures == ["failed .: Permission denied False"] * 2 + ["failed cannot look it up: Permission denied False"]


def test_folders_above_the_album_need_only_be_searchable() -> None:
    """A storage beneath a folder of mode 0711 (a home directory), with a root of mode 0711 (that
    hides its albums' names): the walk and the producer open the album's path a folder at a time
    (real_paths), and the folders on the way need search permission only, as a lookup by the
    whole path does (helper 43: opened for reading, every download was a 500).  Run as ``nobody``."""
    home = Path(tempfile.mkdtemp())
    try:
        root = home / "cms" / "albums"
        write_tree(root / "album", {"a.jpg": b"a"})
        for folder in (home, home / "cms", root):
            folder.chmod(0o711)
        check = (
            "import os, sys\n"
            "from pathlib import Path\n"
            "from archiver.archive.producer_files import Album\n"
            "from archiver.archive.storage import list_album, resolve_album\n"
            "if os.geteuid() == 0: os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "album = resolve_album(Path(sys.argv[1]), 'album')\n"
            "print([f.path for f in list_album(album).files])\n"
            "Album(os.fsencode(album)).open(b'a.jpg')\n"
            "print('opened')\n"
        )
        result = subprocess.run([sys.executable, "-c", check, str(root)], capture_output=True, text=True, cwd=PROJECT)
    finally:
        shutil.rmtree(home)
    assert result.stdout.splitlines() == ["['a.jpg']", "opened"], result.stderr


def test_a_listing_is_of_one_moment_while_entries_and_folders_are_renamed(tmp_path: Path) -> None:
    """An upload renaming x.tmp to x.jpg, a folder moved: a listing has each exactly once, or the walk fails (503).

    Before, a name looked up after its rename was "vanished" and left out,
    and a folder moved behind the walk was missed: valid archives of no
    moment's state.
    """
    album = tmp_path / "album"
    write_tree(album, {f"m/{n:04}.jpg": b"m" for n in range(500)} | {"moving_A": b"x", "z/sub/s.jpg": b"s"})
    (album / "a").mkdir()
    stop = threading.Event()

    def rename_forever() -> None:
        while not stop.is_set():
            os.rename(album / "moving_A", album / "moving_B")
            os.rename(album / "z" / "sub", album / "a" / "sub")
            os.rename(album / "moving_B", album / "moving_A")
            os.rename(album / "a" / "sub", album / "z" / "sub")

    renamer = threading.Thread(target=rename_forever)
    renamer.start()
    listed = failed = 0
    try:
        for _ in range(20):
            try:
                paths = {file.path for file in list_album(album).files}
            except ListingFailed as error:
                assert error.transient
                failed += 1
                continue
            listed += 1
            assert len(paths & {"moving_A", "moving_B"}) == 1, sorted(paths - {f"m/{n:04}.jpg" for n in range(500)})
            assert len(paths & {"a/sub/s.jpg", "z/sub/s.jpg"}) == 1
    finally:
        stop.set()
        renamer.join()
    assert listed + failed == 20
    paths = {file.path for file in list_album(album).files}  # at rest: whole
    assert len(paths) == 502


def _mount(*arguments: str) -> bool:
    """Run mount(8) with ``arguments``; whether it worked (it needs root, and a system that lets it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *arguments], capture_output=True).returncode == 0


def test_a_walk_shows_every_device_it_meets_once_even_a_files_of_its_own(tmp_path: Path) -> None:
    # A file bind-mounted from another filesystem (a container's one-file volume) lies on a device
    # no folder of the album is on: the CRC index must be told what that filesystem is too.
    album, other = tmp_path / "album", tmp_path / "other"
    write_tree(album, {"a.jpg": b"a", "sub/b.jpg": b"b", "mounted.jpg": b"placeholder"})
    other.mkdir()
    if not _mount("-t", "tmpfs", "tmpfs", str(other)):
        pytest.skip("cannot mount a tmpfs here (not root, or not allowed)")
    try:
        (other / "real.jpg").write_bytes(b"from another filesystem")
        assert _mount("--bind", str(other / "real.jpg"), str(album / "mounted.jpg"))
        try:
            shown: list[tuple[int, int]] = []
            listing = list_album(album, on_device=lambda fd, device: shown.append((os.fstat(fd).st_dev, device)))
        finally:
            subprocess.run(["umount", str(album / "mounted.jpg")], check=True)
    finally:
        subprocess.run(["umount", str(other)], check=True)
    assert [file.path for file in listing.files] == ["a.jpg", "mounted.jpg", "sub/b.jpg"]
    # Each device once, with a descriptor on it: the album's (its folder), the tmpfs (the file).
    assert shown == [(album.stat().st_dev, album.stat().st_dev), (listing.files[1].device, listing.files[1].device)]
    assert listing.files[1].device != album.stat().st_dev
