"""``archiver index [NAME...]``: the albums' CRCs computed into ARCHIVER_INDEX ahead of downloads.

For an upload hook or cron: a first download then reads each file once, not
twice (README, Performance).  The exit status is 0 only if every album was
listed, every file read and every CRC written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .archive.album_crcs import AlbumCrcs, album_crcs
from .archive.crc_index import CrcIndex, FilesystemView
from .archive.crc_store import CrcStore
from .archive.ctime_trust import CtimeTrust
from .archive.filesystems import trusted_ids
from .archive.listing import AlbumNotFound, ListingFailed
from .archive.storage import ALBUM_NAME, list_album, resolve_album
from .config import Settings, SettingsError
from .web.crc_index_file import open_crc_store


@dataclass
class IndexTotals:
    """What a run did, over every album: files met, CRCs computed, and what was left or failed."""

    files: int = 0
    computed: int = 0
    untrusted: int = 0  # not kept: their ctimes may not show an edit (sshfs, rclone: README, What it answers)
    changing: int = 0  # changed while read, or within the racy window: read when downloaded
    unreadable: list[str] = field(default_factory=list)  # "path: reason" (EIO)
    failed: list[str] = field(default_factory=list)  # albums that could not be listed
    not_albums: int = 0  # other entries of the root, when every album is indexed

    def add(self, done: AlbumCrcs, files: int) -> None:
        """One album's ``files`` and what ``album_crcs`` did with them."""
        self.files += files
        self.computed += done.computed
        self.untrusted += done.untrusted
        self.changing += done.changing
        self.unreadable += done.unreadable

    def summary(self, asked: int, root: Path) -> str:
        """The run's one line on stdout: ``asked`` albums named, or entries of ``root`` (every album)."""
        indexed = asked - len(self.failed) - self.not_albums
        left_out = f", {self.untrusted} not kept as their ctimes may not show an edit" if self.untrusted else ""
        if self.changing:
            left_out += f", {self.changing} changing (read when downloaded)"
        if self.unreadable:
            left_out += f", {len(self.unreadable)} unreadable"
        skipped = f"; {self.not_albums} other entries of {root} are not albums" if self.not_albums else ""
        rest = self.files - self.computed - self.untrusted - self.changing - len(self.unreadable)
        known = f"{self.computed} computed{left_out}" + (", the rest already known" if rest > 0 else "")
        return f"indexed {_counted(indexed, 'album')}, {_counted(self.files, 'file')} ({known}){skipped}"

    def problems(self, unwritten: int, index_path: str) -> list[str]:
        """Why the run must not be taken for done (a hook or cron reads the exit status), if it must not."""
        problems = [f"{len(self.failed)} album(s) could not be listed: {', '.join(self.failed)}"] if self.failed else []
        if self.unreadable:  # a failing disk
            problems.append(f"{len(self.unreadable)} files could not be read (above)")
        if unwritten:  # the warnings above say why (a full disk, a lock held too long)
            problems.append(f"{unwritten} CRCs could not be written to {index_path!r}")
        return problems


def _counted(count: int, noun: str) -> str:
    """``1 album``, ``2 albums``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def index_albums(argv: Sequence[str]) -> None:
    """``archiver index [NAME...]``: compute the CRCs of the albums' files into ARCHIVER_INDEX ahead of downloads."""
    parser = argparse.ArgumentParser(
        prog="archiver index",
        description="Warm the CRC index (ARCHIVER_INDEX) for the named albums, or all of them: "
        "for an upload hook or cron.  Progress on a terminal.",
    )
    parser.add_argument("names", nargs="*", help="album names (default: every album in ARCHIVER_DIR)")
    args = parser.parse_args(argv)
    settings, store = _open_index(parser)
    index = CrcIndex(store, trust=CtimeTrust(settings.trusted_fuse))
    root = settings.storage_dir
    try:
        entries = [] if args.names else sorted(entry.name for entry in root.iterdir())
    except OSError as error:  # a root that hides its albums' names (mode 0711): they can still be named
        parser.error(f"cannot list the storage directory {str(root)!r}: {error.strerror}; name the albums")
    names = args.names or [name for name in entries if ALBUM_NAME.fullmatch(name)]
    # Every album: an entry whose name no album can have (".ftpquota", "notes.txt") is passed
    # over and counted too, as the README says (helper 103: only the ones found below were).
    totals = IndexTotals(not_albums=len(entries) - len(names) if entries else 0)
    for name in names:
        try:
            listing = list_album(resolve_album(root, name), on_device=index.trust.learn, max_entries=settings.max_files)
        except AlbumNotFound:
            if args.names:
                parser.error(f"no album {name!r} in {root}")
            # Every album: what else lies in the root (a file, a link leading out or nowhere,
            # an album removed meanwhile) is no album and no reason to leave the others cold.
            totals.not_albums += 1
            continue
        except ListingFailed as error:
            # The other albums still get their CRCs; the exit status says one did not.
            print(f"archiver index: cannot list {name}: {error}", file=sys.stderr)
            totals.failed.append(name)
            continue
        files = [(file.path, file.size) for file in listing.files]
        _index_album(name, listing.directory, files, trusted_ids(listing.filesystems), index, totals)
    store.close()
    print(totals.summary(len(entries) or len(names), root))
    if problems := totals.problems(store.unwritten, settings.index_path):
        sys.exit(f"archiver index: {'; '.join(problems)}")


def _open_index(parser: argparse.ArgumentParser) -> tuple[Settings, CrcStore]:
    """The settings (ARCHIVER_*) and the index's file; the parser's error (exit 2) if either cannot be had."""
    try:
        settings = Settings.from_env()
        if not settings.storage_dir.is_dir():  # before the index file is made (cron's directory is $HOME)
            raise SettingsError(f"storage directory {str(settings.storage_dir)!r} is not a directory (ARCHIVER_DIR)")
        store = open_crc_store(settings, required=True)
    except (SettingsError, OSError) as error:
        parser.error(str(error))
    if store is None:
        parser.error("ARCHIVER_INDEX is not set: the index would be in memory and gone at exit")
    return settings, store


def _index_album(
    name: str,
    directory: Path,
    files: list[tuple[str, int]],
    view: FilesystemView,
    index: CrcIndex,
    totals: IndexTotals,
) -> None:
    """The CRCs of one album's ``files`` (path, size) into ``index``, with its progress on a terminal.

    ``view``: the filesystems its walk saw (``CrcIndex.read_filesystem``).
    """
    on_terminal = sys.stderr.isatty()

    def show(done: int) -> None:
        if on_terminal and (done == len(files) or done % 100 == 0):
            print(f"\r{name}: {done}/{len(files)} files", end="", file=sys.stderr, flush=True)

    done = album_crcs(directory, files, index, show, view)
    totals.add(done, len(files))
    for failure in done.unreadable:
        print(f"archiver index: cannot read {failure}", file=sys.stderr)
    if on_terminal:
        print(file=sys.stderr)
