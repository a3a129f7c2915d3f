"""Storage: the only code that turns request names into paths.

An album is a directory directly under the storage root, named by its secret.
``resolve_album`` maps a name to that directory or refuses; ``list_album``
lists what may go into its archive and says what it left out and why.

Policy for what goes in: regular files only.  Symbolic links are left out,
whatever they point to, and the producer opens every file beneath the album
without following a link and checks it is the file listed, so that a file
swapped for a link after the listing fails the download rather than being
followed: nothing outside the storage root can reach an archive, even
through a race.  FIFOs, sockets and devices are left out, as are files the
service cannot read and names with a line break (kept out since the first
version; no reader shows such a name as it is).

A listing is of one moment: if an entry goes away or changes kind while the
album is walked, or a folder changes (an entry added, removed or renamed:
an upload's ``x.tmp`` renamed to ``x.jpg``, a folder moved), the walk starts
again, WALK_ATTEMPTS times at most.  Any other error (out of descriptors or
memory, an I/O error, a stale NFS handle, the album itself unreadable), or
an album that keeps changing, fails the listing (ListingFailed): an archive
of part of the album would end cleanly and look complete.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .real_paths import open_real_directory

logger = logging.getLogger(__name__)

# A secret is a plain directory name: no dots (so no "." or ".."), no
# separators, no escapes.  128 characters is far above the CMS's 32 hex digits.
ALBUM_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


class AlbumNotFound(LookupError):
    """The name is malformed, unknown, or does not lead to a directory inside the root."""


class ListingFailed(RuntimeError):
    """The album could not be listed whole; ``transient`` if the system ran out of something (try again later)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class AlbumKeepsChanging(ListingFailed):
    """The album changed during every walk, or lately (an upload under way): try again in a few seconds.

    ``settles_in``: seconds until its newest change is older than the settle time (0: not known).
    """

    def __init__(self, message: str = "", settles_in: float = 0.0) -> None:
        super().__init__(message or f"changed while listed, {WALK_ATTEMPTS} times", transient=True)
        self.settles_in = settles_in


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


# The entries left out that are logged by name, and the most characters of a path shown: an
# album of 100,000 links logged 100,000 lines, and paths of 4,096 bytes of control characters
# 15 KB a line (escaped), at every request (helper 46: 150 KB of log a HEAD).
SKIPS_LOGGED = 10
PATH_LOGGED = 200
# An entry that vanished or was swapped (for a link, a file for a folder) while walked: left out.
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
# Not the service's to read: left out (the policy above).
_DENIED = frozenset({errno.EACCES, errno.EPERM})
# Out of descriptors, memory or buffers: the same walk may work in a moment.
_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR})


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


class _AlbumChanged(Exception):
    """Something in the album changed while it was walked: walk it again."""


# Walks of an album that keeps changing before its listing fails (as transient: 503).
WALK_ATTEMPTS = 3


def _failed(error: OSError, path: str) -> ListingFailed:
    return ListingFailed(f"{path}: {error.strerror}", transient=error.errno in _TRANSIENT)


def _may_leave_out(error: OSError, path: str) -> None:
    """Return if the entry ``path`` may be left out for ``error`` (denied); else _AlbumChanged or ListingFailed."""
    if error.errno in _GONE:
        raise _AlbumChanged(path) from error
    if error.errno not in _DENIED:
        raise _failed(error, path) from error


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


def resolve_album(root: Path, name: str) -> Path:
    """Return the real path of album ``name`` under ``root``, or raise AlbumNotFound.

    ListingFailed if the storage cannot say (the root not searchable, an I/O error).

    The album may be a symbolic link as long as it resolves to a directory
    strictly inside the root (never the root itself: that would archive every
    album at once).
    """
    if not ALBUM_NAME.fullmatch(name):
        raise AlbumNotFound(name)
    real_root = root.resolve()
    if real_root == Path("/"):  # checked at start too; a link to it swapped in since (helper 55)
        raise ListingFailed("the storage directory is /: its folders are not served", transient=False)
    album = (real_root / name).resolve()
    if album.parent != real_root and real_root not in album.parents:
        raise AlbumNotFound(name)
    try:
        is_directory = stat.S_ISDIR(os.stat(album).st_mode)
    except OSError as error:
        if error.errno in _GONE:
            raise AlbumNotFound(name) from None
        # The root not searchable by the service's user (EACCES), an I/O error: the service's
        # fault, not the link's, and every album's (/healthz says so too).
        raise ListingFailed(f"cannot look it up: {error.strerror}", transient=False) from None
    if not is_directory:
        raise AlbumNotFound(name)
    return album


def list_album(
    album: Path,
    progress: WalkProgress | None = None,
    on_device: Callable[[int, int], None] | None = None,
    max_entries: int | None = None,
) -> AlbumListing:
    """Walk ``album`` (not following links) and sort what it holds into files and skips.

    Raises AlbumNotFound if the album is gone, ListingFailed if it (or
    anything in it) cannot be listed for another reason than the policy's,
    or holds more than ``max_entries`` entries (files, folders and skips;
    the walk stops there: its lists are what it holds in memory).
    ``progress`` moves on with each answer from the storage; WalkGivenUp once given up on.
    ``on_device(fd, device)`` is called once a walk for each device a folder
    lies on, with the folder open as ``fd`` (``ctime_trust.CtimeTrust.learn``).
    """
    progress = progress or WalkProgress()
    for _ in range(WALK_ATTEMPTS):
        started_ns = time.time_ns()
        try:
            files, skipped = _walk_once(album, progress, _Devices(on_device), max_entries)
            break
        except _AlbumChanged:
            continue
    else:
        raise AlbumKeepsChanging
    files.sort(key=lambda file: file.path)
    return AlbumListing(album, tuple(files), tuple(skipped), started_ns)


class _Devices:
    """Each device a walk meets, shown once to ``on_device`` (if any) with a descriptor on it."""

    def __init__(self, on_device: Callable[[int, int], None] | None) -> None:
        self._on_device = on_device
        self._met: set[int] = set()

    def folder(self, fd: int, device: int) -> None:
        """A folder open as ``fd``, on ``device``."""
        if self._on_device is not None and device not in self._met:
            self._met.add(device)
            self._on_device(fd, device)

    def file(self, name: str, directory_fd: int, device: int) -> None:
        """File ``name`` in folder ``directory_fd`` lies on ``device`` (a bind mount of one file): opened to be shown.

        If it cannot be opened, ``on_device`` is shown -1, which tells nothing:
        a device a walk could not look at is not one the last look vouches for.
        """
        if self._on_device is None or device in self._met:
            return
        self._met.add(device)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory_fd)
        except OSError:
            self._on_device(-1, device)
            return
        try:
            self._on_device(fd, device)
        finally:
            os.close(fd)


def _walk_once(
    album: Path, progress: WalkProgress, devices: _Devices, max_entries: int | None
) -> tuple[list[AlbumFile], list[SkippedEntry]]:
    """One walk of ``album``; _AlbumChanged if any folder in it changed meanwhile (checked again at the end)."""
    files: list[AlbumFile] = []
    skipped: list[SkippedEntry] = []
    folders: list[tuple[str, tuple[int, int, int]]] = []
    try:
        # A component at a time, following no link: a folder on the album's path swapped for a
        # link since resolve_album looked would otherwise lead out of the storage (ENOTDIR: gone).
        album_fd = open_real_directory(album)
        # Read alone is not enough: without search (x) every entry would be "denied" and left out.
        searchable = os.access(".", os.R_OK | os.X_OK, dir_fd=album_fd)
    except OSError as error:
        if error.errno in _GONE:
            raise AlbumNotFound(album.name) from None
        raise _failed(error, ".") from error
    if not searchable:
        os.close(album_fd)
        raise ListingFailed(".: Permission denied", transient=False)
    # Paths are relative, but the CRC reader opens the whole path: it must fit PATH_MAX.
    limit = _EntryLimit(max_entries)
    _walk(album_fd, "", files, skipped, folders, PATH_MAX - len(os.fsencode(album)) - 1, progress, devices, limit)
    for relative, seen in folders:
        progress.step()
        try:
            status = os.stat(album / relative, follow_symlinks=False)
        except OSError as error:
            _may_leave_out(error, relative)
            raise _failed(error, relative) from error
        # Moved by any entry added, removed or renamed in it (and by a chmod, which changes nothing here).
        if (status.st_ino, status.st_mtime_ns, status.st_ctime_ns) != seen:
            raise _AlbumChanged(relative)
    return files, skipped


# Each directory is listed through a descriptor, and its entries looked at relative to it:
# a name is looked up once, not the whole path again for every file (half the walk's time).
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Folders nested deeper than this are left out: the walk holds a descriptor a level (an
# album 1,000 levels deep, one mkdir away for an uploader, would take the descriptors
# other downloads need, and Python's recursion limit).  No camera or CMS nests so deep.
MAX_DEPTH = 64
# The longest path the system takes (with its terminating NUL), Linux's.
PATH_MAX = 4096


class _EntryLimit:
    """The most entries a walk may meet in the album's folders (files, folders and what is left out)."""

    def __init__(self, most: int | None) -> None:
        self.most = most
        self.met = 0

    def check(self, reading: int) -> None:
        """ListingFailed if the entries met, and ``reading`` more of the folder being read, are more than the most."""
        if self.most is not None and self.met + reading > self.most:
            raise ListingFailed(f"more than {self.most} entries (ARCHIVER_MAX_FILES)", transient=False)

    def add(self, read: int) -> None:
        """A folder's ``read`` entries met (ListingFailed past the most)."""
        self.met += read
        self.check(0)


def _walk(
    directory_fd: int,
    prefix: str,
    files: list[AlbumFile],
    skipped: list[SkippedEntry],
    folders: list[tuple[str, tuple[int, int, int]]],
    room: int,
    progress: WalkProgress,
    devices: _Devices,
    limit: _EntryLimit,
) -> None:
    """List the directory open as ``directory_fd`` (closed here) into ``files`` and ``skipped``.

    Each folder walked goes into ``folders`` with its inode, mtime and ctime
    as they were before it was read.  ``room``: the bytes a relative path may
    take (it is opened as the album's path, "/", and it).
    """
    try:
        progress.step()  # opened
        status = os.fstat(directory_fd)
        folders.append((prefix.rstrip("/") or ".", (status.st_ino, status.st_mtime_ns, status.st_ctime_ns)))
        folder_device = status.st_dev
        devices.folder(directory_fd, folder_device)
        progress.step()
        entries = []
        with os.scandir(directory_fd) as listing:
            for entry in listing:  # a large folder is read in many calls
                progress.step()
                entries.append(entry)
                if len(entries) % 1024 == 0:  # a folder of millions stops early, not once read whole
                    limit.check(len(entries))
        limit.add(len(entries))
        entries.sort(key=lambda entry: entry.name)
        for entry in entries:
            relative = prefix + entry.name
            # Through descriptors the walk reaches any depth; a path the system cannot open whole
            # is left out, as a walk by whole paths did ("File name too long").
            if len(relative) * 4 >= room and len(os.fsencode(relative)) >= room:
                skipped.append(SkippedEntry(relative, "path too long for the system (PATH_MAX)"))
                continue
            reason, status = _exclusion_reason(entry, directory_fd, relative)
            progress.step()
            if reason is not None:
                skipped.append(SkippedEntry(relative, reason))
            elif stat.S_ISDIR(status.st_mode):
                if relative.count("/") + 1 > MAX_DEPTH:
                    skipped.append(SkippedEntry(relative, f"nested deeper than {MAX_DEPTH} folders"))
                    continue
                try:
                    child = os.open(entry.name, _DIRECTORY_FLAGS, dir_fd=directory_fd)
                except OSError as error:
                    _may_leave_out(error, relative)
                    skipped.append(SkippedEntry(relative, f"cannot list: {error.strerror}"))
                else:
                    _walk(child, relative + "/", files, skipped, folders, room, progress, devices, limit)
            else:
                if status.st_dev != folder_device:
                    devices.file(entry.name, directory_fd, status.st_dev)
                files.append(
                    AlbumFile(
                        relative,
                        status.st_size,
                        status.st_mtime_ns,
                        status.st_mode,
                        status.st_dev,
                        status.st_ino,
                        status.st_ctime_ns,
                    )
                )
    except OSError as error:
        # Reading a directory already open: nothing here is the policy's to leave out.
        raise _failed(error, prefix.rstrip("/") or ".") from error
    finally:
        os.close(directory_fd)


_NO_STATUS = os.stat_result((0,) * 10)


def _exclusion_reason(entry: os.DirEntry[str], directory_fd: int, relative: str) -> tuple[str | None, os.stat_result]:
    """Why ``entry`` stays out of the archive, or None if it may go in (or be walked); and its status.

    ListingFailed if that cannot be told (``_may_leave_out``).
    """
    if "\n" in entry.name or "\r" in entry.name:
        return "line break in name", _NO_STATUS
    try:
        status = entry.stat(follow_symlinks=False)
    except OSError as error:
        _may_leave_out(error, relative)
        return f"cannot stat: {error.strerror}", _NO_STATUS
    mode = status.st_mode
    if stat.S_ISLNK(mode):
        return "symbolic link", status
    if stat.S_ISDIR(mode):
        readable = _readable(entry.name, directory_fd, relative, os.R_OK | os.X_OK)
        return (None if readable else "directory not readable"), status
    if not stat.S_ISREG(mode):
        return "not a regular file", status
    if not _readable(entry.name, directory_fd, relative, os.R_OK):
        return "not readable", status
    return None, status


def _readable(name: str, directory_fd: int, relative: str, mode: int) -> bool:
    """Whether the service may read (``mode``) entry ``name``; ListingFailed if an error other than denial says no."""
    if os.access(name, mode, dir_fd=directory_fd, follow_symlinks=False):
        return True
    # access() answers False for any error, EMFILE or EIO too: an open tells them apart (rare: unreadable entries only).
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory_fd)
    except OSError as error:
        _may_leave_out(error, relative)
        return False
    os.close(fd)
    return False  # readable but not searchable (a folder without x): left out, as access() says
