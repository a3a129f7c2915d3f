"""The storage root's mount: the one that held it at the start, or one mounted on it since.

A storage on a network mount that is unmounted (by hand, by an automounter, a
lazy ``umount -l``) leaves the service looking at the folder beneath it:
every link was a ``404`` "deleted", ``/healthz`` said the storage was fine,
and nothing was logged (helper 155).  So is a root that was removed or moved.
Either is storage that is not there, a ``503`` to come back later (nginx tries
another instance), never a link that is dead.

The mount is told by its mount point (``/proc/self/mountinfo``), not by the
root's device number: a filesystem mounted again may come back on another
device (a loop device, an anonymous one taken meanwhile), and a bind mount
of a folder of the same filesystem has the same one (helper 156: the first
kept the storage refused until a restart, the second went unseen).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from pathlib import Path

from .filesystems import MOUNTINFO, mount_points
from .listing import ListingFailed

logger = logging.getLogger(__name__)


class StorageUnavailable(ListingFailed):
    """The storage root is gone, or the mount that held it is no longer mounted: try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


def holding_mount(path: str, points: list[str]) -> str:
    """The deepest of the mount points ``points`` that holds the real path ``path`` ("/" at least)."""
    held = [point for point in points if point == "/" or path == point or path.startswith(point.rstrip("/") + "/")]
    return max(held, key=len, default="/")


def _beneath(point: str, other: str) -> bool:
    """Whether the mount point ``other`` lies strictly beneath ``point``."""
    return other != point and (point == "/" or other.startswith(point.rstrip("/") + "/"))


class RootFilesystem:
    """The mount that held the storage root at the start, and a check that it still does.

    The root's real path held by a shallower mount than at the start (the
    mount is gone: the folder beneath is seen) is refused; by the same mount
    or a deeper one (a filesystem mounted on the root since: its mount late at
    boot) it is taken, with a WARNING for the deeper one.  The mount table is
    read again only when the kernel says it changed (``poll`` on mountinfo,
    proc(5)); where there is none (no ``/proc``), only a root gone is seen.
    """

    def __init__(self, root: Path, answered: bool, mountinfo: Path = MOUNTINFO) -> None:
        """``answered``: whether the root answered the start's look (its mount learnt now; else at the first check)."""
        self.root = root
        self._lock = threading.Lock()  # worker threads check at once
        self._real: str | None = None  # the root's real path, and the mount point that held it: at the first look
        self._mount_point = "/"
        self._refused: str | None = None  # why the root is refused, until the mount table changes again
        try:
            self._mounts: int | None = os.open(mountinfo, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._mounts = None
        self._poller = select.poll()
        if self._mounts is not None:
            self._poller.register(self._mounts, select.POLLPRI)
            if answered:  # the start's mount, not the first request's (the storage may be unmounted by then)
                self._look()

    def check(self) -> None:
        """StorageUnavailable if the root is gone or the mount that held it is no longer mounted.

        One ``stat`` of the root and one ``poll``; the root's real path and the mount
        table besides when the table changed (and at the first look: the start's).
        A worker thread's call.  OSError of the ``stat`` other than the root gone (EIO, ENOTCONN) as raised.
        """
        try:
            os.stat(self.root)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                raise StorageUnavailable(f"the storage directory {str(self.root)!r} is gone") from None
            raise
        with self._lock:
            if self._mounts is None:
                return
            if self._real is not None and not self._poller.poll(0):
                if self._refused is not None:
                    raise StorageUnavailable(self._refused)
                return
            self._look()
            if self._refused is not None:
                raise StorageUnavailable(self._refused)

    def _look(self) -> None:
        """Read the mount table and the root's real path; refuse it, take it, or learn it (the first look)."""
        assert self._mounts is not None
        real = os.path.realpath(self.root)
        table = os.fsdecode(_read_all(self._mounts))
        mount_point = holding_mount(real, mount_points(table))
        if self._real is None or real != self._real:  # the first look, or a link at the root now leads elsewhere
            self._real, self._mount_point, self._refused = real, mount_point, None
            return
        if mount_point == self._mount_point:
            self._refused = None
        elif _beneath(mount_point, self._mount_point):
            self._refused = (
                f"the storage directory {str(self.root)!r} is no longer on the filesystem mounted at "
                f"{self._mount_point!r} at the start (unmounted: the folder beneath is not the storage)"
            )
        else:
            logger.warning(
                "storage directory %r is now on a filesystem mounted at %r since the start: serving it",
                str(self.root),
                mount_point,
            )
            self._mount_point, self._refused = mount_point, None


def _read_all(fd: int) -> bytes:
    """The whole of ``fd`` from its start (mountinfo is read whole, in pieces, each time)."""
    os.lseek(fd, 0, os.SEEK_SET)
    pieces = []
    while piece := os.read(fd, 65536):
        pieces.append(piece)
    return b"".join(pieces)
