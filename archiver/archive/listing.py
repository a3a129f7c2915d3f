"""What a walk of an album finds: its files, what it left out, and the walk's progress and failures.

``storage.list_album`` makes an ``AlbumListing``; the plan, the ETag and the
CRC index take its files (``AlbumFile``: a path and the key of its CRC).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .filesystems import Filesystem

logger = logging.getLogger(__name__)


class AlbumNotFound(LookupError):
    """The name is malformed, unknown, or does not lead to a directory inside the root."""


class ListingFailed(RuntimeError):
    """The album could not be listed whole; ``transient`` if the system ran out of something (try again later)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class AlbumRefused(ListingFailed):
    """The album cannot be served as it stands (more entries than allowed, a folder the service may not search).

    Any walk meets it again until the album changes; not an I/O error, which another walk may not meet.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class AlbumKeepsChanging(ListingFailed):
    """The album changed during every walk, or lately (an upload under way): try again in a few seconds.

    ``settles_in``: seconds until its newest change is older than the settle time (0: not known).
    """

    def __init__(self, message: str, settles_in: float = 0.0) -> None:
        super().__init__(message, transient=True)
        self.settles_in = settles_in


class WalkProgress:
    """How far a walk in a worker thread has got: ``steps`` moves on with every answer from the storage.

    Read from the event loop to tell a slow walk (a large album on NFS, minutes
    cold) from a hung one; an int bumped by one thread and read by another
    needs no lock.  ``given_up``, set by the event loop, stops the walk at its
    next step (WalkGivenUp): a request that gave up on it must not leave it
    walking the rest of a large album.
    """

    __slots__ = ("given_up", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.given_up = False

    def step(self) -> None:
        if self.given_up:
            raise WalkGivenUp
        self.steps += 1


class WalkGivenUp(Exception):
    """The request that asked for this walk gave up on it (raised in its abandoned worker thread)."""


class AlbumFile(NamedTuple):
    """A file to archive: its path relative to the album (the entry name), size, mtime and mode.

    The mode goes into the archive only with ARCHIVER_KEEP_MODES (``entries``).
    Device and inode complete the key of its CRC (``crc_index``).  A named
    tuple: made once a file a walk, it costs a third of a frozen dataclass.
    """

    path: str
    size: int
    mtime_ns: int = 0
    mode: int = stat.S_IFREG | 0o644
    device: int = 0
    inode: int = 0
    # Moved by every write and chmod, even one that restores the mtime after it (the ETag).
    ctime_ns: int = 0

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        return self.device, self.inode, self.size, self.mtime_ns, self.ctime_ns


@dataclass(frozen=True, slots=True)
class SkippedEntry:
    """Something under the album that stays out of the archive, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class AlbumListing:
    """What goes into an album's archive (sorted by path) and what was left out."""

    directory: Path
    files: tuple[AlbumFile, ...]
    skipped: tuple[SkippedEntry, ...]
    # When the walk that listed them began (time.time_ns): a file whose ctime lies within a clock
    # tick of it may change again without its key moving (ctime_trust.is_racy).
    started_ns: int = 0
    # Device -> the filesystem the walk saw on it if its ctimes are trusted, else None
    # (``CtimeTrust.learn``): what the producer checks each file against (``ArchivePlan.filesystems``).
    filesystems: Mapping[int, Filesystem | None] = field(default_factory=dict, hash=False)

    @property
    def total_size(self) -> int:
        return sum(file.size for file in self.files)


class SkippedLog:
    """Logs what a listing leaves out once for each version of an album, not at every request.

    Every request walks its album.  A version is the album's ETag with what
    is left out; the last ``versions`` of them are remembered (a plan cache's
    life is not enough: albums that crowd each other out of it were logged
    again at every request, helper 47).  Used from the walks' worker threads.
    """

    def __init__(self, versions: int = 4096) -> None:
        self.versions = versions
        self._logged: OrderedDict[tuple[Path, str, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def log(self, listing: AlbumListing, etag: str) -> None:
        """Log ``listing``'s skipped entries (the first by name, each path's end; a count of the rest), if new."""
        if not listing.skipped:
            return
        version = (listing.directory, etag, hash(listing.skipped))
        with self._lock:
            if version in self._logged:
                self._logged.move_to_end(version)
                return
            self._logged[version] = None
            if len(self._logged) > self.versions:
                self._logged.popitem(last=False)
        name = listing.directory.name
        for entry in listing.skipped[:SKIPS_LOGGED]:
            logger.info("skipped %s/%s: %s", name, shown_path(entry.path), entry.reason)
        if len(listing.skipped) > SKIPS_LOGGED:
            logger.info("skipped %d more entries of %s", len(listing.skipped) - SKIPS_LOGGED, name)


# The entries left out that are logged by name, and the most characters of a path shown: an
# album of 100,000 links logged 100,000 lines, and paths of 4,096 bytes of control characters
# 15 KB a line (escaped), at every request (helper 46: 150 KB of log a HEAD).
SKIPS_LOGGED = 10
PATH_LOGGED = 200


def shown_path(path: str) -> str:
    """A path in the album for a log line: its end (PATH_LOGGED characters), bytes not UTF-8 as ``\\xNN``."""
    path = os.fsencode(path).decode("utf-8", errors="backslashreplace")
    return path if len(path) <= PATH_LOGGED else "…" + path[-PATH_LOGGED:]


def check_settled(listing: AlbumListing, settle_ns: int, now_ns: int | None = None) -> None:
    """AlbumKeepsChanging if a file of ``listing`` changed less than ``settle_ns`` before ``now_ns`` (the walk's end).

    An upload under way (FTP writes to the final name for minutes): its album is refused at once,
    rather than sent until the file changes under the producer, aborted at ~95 % (helper 70: 23 of
    24 downloads during one upload).  From the walk's end, not its start: a file changed while a
    long walk went on is the newest change of all (helper 71: its negative age was taken for a
    clock ahead, and a half-uploaded file went out in an archive that ended cleanly).  A time
    ahead of now (a file server's clock ahead of this host's) is not counted: it would refuse the
    album for good; one ahead by less than the settle time is a change just made (helper 72: a
    server 50 ms ahead hid every write of an upload).
    """
    if not settle_ns:
        return
    now_ns = time.time_ns() if now_ns is None else now_ns
    # The ctime: every write and every change of metadata moves it (an mtime may be set to anything).
    changed = [file for file in listing.files if -settle_ns < now_ns - file.ctime_ns < settle_ns]
    if changed:
        newest = max(changed, key=lambda file: file.ctime_ns)
        age_ns = now_ns - newest.ctime_ns
        raise AlbumKeepsChanging(
            f"{shown_path(newest.path)} changed {max(age_ns, 0) / 1e9:.1f} s ago (an upload under way?)",
            settles_in=(settle_ns - age_ns) / 1e9,
        )
