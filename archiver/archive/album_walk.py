"""One walk of an album: what may go into its archive, what is left out and why, as of one moment.

Policy for what goes in: regular files only.  Symbolic links are left out,
whatever they point to, and the producer opens every file beneath the album
without following a link and checks it is the file listed, so that a file
swapped for a link after the listing fails the download rather than being
followed: nothing outside the storage root can reach an archive, even
through a race.  FIFOs, sockets and devices are left out, as are files the
service cannot read and names with a line break (kept out since the first
version; no reader shows such a name as it is).

A walk is of one moment, or AlbumChanged: if an entry goes away or changes
kind while the album is walked, or a folder changes (an entry added, removed
or renamed: an upload's ``x.tmp`` renamed to ``x.jpg``, a folder moved).  A
folder is looked at before and after it is read, as its filesystem has it
(not a FUSE or NFS mount's cached attributes), and one that may have changed
unseen since the first look (``_may_change_unseen``) has its names read again
too.  Any other error (out of descriptors or memory, an I/O error, a stale
NFS handle, the album itself unreadable) fails it (ListingFailed): an archive
of part of the album would end cleanly and look complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from .ctime_trust import COARSE_RACY_NS, RACY_NS
from .filesystems import Filesystem
from .listing import AlbumFile, AlbumNotFound, AlbumRefused, ListingFailed, SkippedEntry, WalkProgress
from .producer_protocol import SECOND
from .real_paths import open_real_directory
from .uncached_status import uncached_path_status, uncached_status

# An entry that vanished or was swapped (for a link, a file for a folder) while walked: left out.
GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
# Not the service's to read: left out (the policy above).
_DENIED = frozenset({errno.EACCES, errno.EPERM})
# Out of descriptors, memory or buffers: the same walk may work in a moment.
TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR})


class AlbumChanged(Exception):
    """Something in the album changed while it was walked: walk it again."""


def _failed(error: OSError, path: str) -> ListingFailed:
    return ListingFailed(f"{path}: {error.strerror}", transient=error.errno in TRANSIENT)


def _may_leave_out(error: OSError, path: str) -> None:
    """Return if the entry ``path`` may be left out for ``error`` (denied); else AlbumChanged or ListingFailed."""
    if error.errno in GONE:
        raise AlbumChanged(path) from error
    if error.errno not in _DENIED:
        raise _failed(error, path) from error


class Devices:
    """Each device a walk meets, shown once to ``on_device`` (if any) with a descriptor on it."""

    def __init__(self, on_device: Callable[[int, int], Filesystem | None] | None) -> None:
        self._on_device = on_device
        self._met: set[int] = set()
        self.filesystems: dict[int, Filesystem | None] = {}  # what ``on_device`` said of each

    def folder(self, fd: int, device: int) -> None:
        """A folder open as ``fd``, on ``device``."""
        if self._on_device is not None and device not in self._met:
            self._met.add(device)
            self.filesystems[device] = self._on_device(fd, device)

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
            self.filesystems[device] = self._on_device(-1, device)
            return
        try:
            self.filesystems[device] = self._on_device(fd, device)
        finally:
            _close(fd)


# A folder walked: its path relative to the album, its inode, mtime and ctime before it was read,
# and the names read in it (sorted) if it may have changed unseen since that look (``_may_change_unseen``; else None).
_Folder = tuple[str, tuple[int, int, int], tuple[str, ...] | None]


def _may_change_unseen(mtime_ns: int, ctime_ns: int, looked_ns: int) -> bool:
    """Whether a folder with these times when looked at (``looked_ns``, time.time_ns) may change again unseen.

    Linux stamps times from a coarse clock: a tick of 1-10 ms (but for a
    change after a look on the filesystems with 6.13's fine-grained
    timestamps), a whole second on ext4's 128-byte inodes and on sshfs, two
    on FAT.  An entry moved in after the look, within the tick of a change
    before it, leaves both times as they were.  The windows are the CRC
    index's (``ctime_trust.racy_times``), wider than any tick: RACY_NS (1 s),
    COARSE_RACY_NS (3 s) for times of whole seconds.  A time ahead of the
    look is within them.
    """
    newest = max(mtime_ns, ctime_ns)  # the mtime too: a filesystem whose ctime is not real (sshfs)
    window = COARSE_RACY_NS if newest % SECOND == 0 else RACY_NS
    return newest >= looked_ns - window


def _names(folder: Path, progress: WalkProgress) -> tuple[str, ...]:
    """The names in ``folder``, sorted, as its filesystem lists them now (``progress`` moved on with each).

    By path, where the walk read it through a descriptor: only compared with
    what the walk read, just after the folder's inode was found unchanged at
    that path.
    """
    names = []
    with os.scandir(folder) as listing:
        for entry in listing:  # a large folder on slow storage is read in many calls: each is progress
            progress.step()
            names.append(entry.name)
    return tuple(sorted(names))


def walk_once(
    album: Path, progress: WalkProgress, devices: Devices, max_entries: int | None
) -> tuple[list[AlbumFile], list[SkippedEntry]]:
    """One walk of ``album``; AlbumChanged if any folder in it changed meanwhile (checked again at the end)."""
    files: list[AlbumFile] = []
    skipped: list[SkippedEntry] = []
    folders: list[_Folder] = []
    try:
        # A component at a time, following no link: a folder on the album's path swapped for a
        # link since resolve_album looked would otherwise lead out of the storage (ENOTDIR: gone).
        album_fd = open_real_directory(album)
    except OSError as error:
        if error.errno in GONE:
            raise AlbumNotFound(album.name) from None
        raise _failed(error, ".") from error
    try:
        # Read alone is not enough: without search (x) every entry would be "denied" and left out.
        searchable = os.access(".", os.R_OK | os.X_OK, dir_fd=album_fd) or _searchable(album_fd, ".")
    except BaseException:  # ListingFailed, AlbumChanged
        _close(album_fd)
        raise
    if not searchable:
        _close(album_fd)
        raise AlbumRefused(".: Permission denied")
    # Paths are relative, but a plan's check that its files are unchanged (listed_files.check_still_listed) stats the
    # whole path: it must fit PATH_MAX.
    limit = _EntryLimit(max_entries)
    _walk(album_fd, "", files, skipped, folders, PATH_MAX - len(os.fsencode(album)) - 1, progress, devices, limit)
    for relative, seen, names in folders:
        progress.step()
        try:
            _, (_, inode, _, mtime_ns, ctime_ns) = uncached_path_status(os.fsencode(album / relative))
            # Moved by any entry added, removed or renamed in it (and by a chmod, which changes nothing here),
            # unless a change came within the clock tick of the look before it: then its names say.
            if (inode, mtime_ns, ctime_ns) != seen or (
                names is not None and _names(album / relative, progress) != names
            ):
                raise AlbumChanged(relative)
        except OSError as error:
            _may_leave_out(error, relative)
            raise _failed(error, relative) from error
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
        """AlbumRefused if the entries met, and ``reading`` more of the folder being read, are more than the most."""
        if self.most is not None and self.met + reading > self.most:
            raise AlbumRefused(f"more than {self.most} entries (ARCHIVER_MAX_FILES)")

    def add(self, read: int) -> None:
        """A folder's ``read`` entries met (AlbumRefused past the most)."""
        self.met += read
        self.check(0)


def _walk(
    directory_fd: int,
    prefix: str,
    files: list[AlbumFile],
    skipped: list[SkippedEntry],
    folders: list[_Folder],
    room: int,
    progress: WalkProgress,
    devices: Devices,
    limit: _EntryLimit,
) -> None:
    """List the directory open as ``directory_fd`` (closed here) into ``files`` and ``skipped``.

    Each folder walked goes into ``folders`` with its inode, mtime and ctime
    as they were before it was read, and if they had changed within a clock
    tick of that look, the names read in it.  ``room``: the bytes a relative
    path may take (it is opened as the album's path, "/", and it).
    """
    try:
        progress.step()  # opened
        # As the filesystem has it, as at the end's look: the kernel's copy of a FUSE or NFS folder's
        # attributes (attr_timeout, acdirmin) hid a folder changed while the walk read others, and
        # a file moved from a folder not yet read into one already read was in no listing, the
        # archive of no moment's album ending cleanly (helper 164).
        try:
            _, (folder_device, inode, _, mtime_ns, ctime_ns) = uncached_status(directory_fd)
        except OSError as error:
            # Moved or removed since it was opened: asked of the filesystem, a path-based FUSE
            # daemon (sshfs, mergerfs, rclone) no longer finds it (helper 166: a 500, not a walk again).
            if error.errno in GONE:
                raise AlbumChanged(prefix.rstrip("/") or ".") from error
            raise
        recent = _may_change_unseen(mtime_ns, ctime_ns, time.time_ns())
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
        names = tuple(entry.name for entry in entries) if recent else None
        folders.append((prefix.rstrip("/") or ".", (inode, mtime_ns, ctime_ns), names))
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
        _close(directory_fd)


def _close(fd: int) -> None:
    """Close ``fd``, a folder or an entry only looked at: nothing to report, and freed whatever close says.

    An error of it passed on was a raw OSError out of the walk: the route's traceback, a 500 with no
    line of the download's (the folder's, once listed whole), or a descriptor left open (helper 193).
    """
    with contextlib.suppress(OSError):
        os.close(fd)


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
    """Whether the service may read (``mode``) entry ``name``; ListingFailed if an error other than denial says no.

    ``mode`` is R_OK for a file, R_OK | X_OK for a folder (read and searched).
    """
    if os.access(name, mode, dir_fd=directory_fd, follow_symlinks=False):
        return True
    # access() answers False for any error, EMFILE or EIO too: an open tells them apart (rare: unreadable entries only).
    folder = mode != os.R_OK
    flags = _DIRECTORY_FLAGS if folder else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=directory_fd)
    except OSError as error:
        _may_leave_out(error, relative)
        return False
    try:
        # A file opened for reading is readable: access() failed otherwise (a FUSE daemon's ACCESS answered
        # EIO, no memory for its credentials), and the file went out of an archive that ended cleanly (helper
        # 193).  A folder opened is readable, but may not be searchable (no x): a look up in it says.  Until
        # 2026-12-07 such a folder was left out whatever access() had met, from an archive ending cleanly
        # (helper 197).
        return not folder or _searchable(fd, relative)
    finally:
        _close(fd)


def _searchable(fd: int, relative: str) -> bool:
    """Whether the folder open as ``fd`` may be searched (x); ListingFailed if an error other than denial says no.

    A look up of "." in it: the kernel checks search permission on a folder
    for every name looked up in it, "." too (path_resolution(7)): EACCES
    without x, as access() would say.
    """
    try:
        os.stat(".", dir_fd=fd, follow_symlinks=False)
    except OSError as error:
        _may_leave_out(error, relative)
        return False
    return True
