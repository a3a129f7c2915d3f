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

from .filesystems import MOUNTINFO, mount_table
from .listing import ListingFailed

logger = logging.getLogger(__name__)


class StorageUnavailable(ListingFailed):
    """The storage root is gone, or the mount that held it is no longer mounted: try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


def holding_mounts(path: str, table: list[tuple[int, int, str]]) -> list[str]:
    """The mount points of the mounts a lookup of the real path ``path`` passes through, the namespace's root first.

    Walked as the kernel does: at each folder of the path, the mount on top of
    the one reached so far (a mount stacked on another, its parent; the last
    such in the table).  A mount hidden by one over a folder above it is not
    reached (helper 157: taken by the length of its path, it was).  Empty if
    the table has no root.
    """
    ids = {mount for mount, _, _ in table}
    roots = [mount for mount, parent, point in table if point == "/" and parent not in ids]
    if not roots:
        return []
    current, chain = roots[-1], ["/"]
    parts = [part for part in path.split("/") if part]
    for prefix in ["/", *("/" + "/".join(parts[: k + 1]) for k in range(len(parts)))]:
        while on_top := [mount for mount, parent, point in table if point == prefix and parent == current]:
            current = on_top[-1]
            chain.append(prefix)
    return chain


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
        self._real: str | None = None  # the root's real path, and the mounts that hold it: at the first look
        self._mounts_held: list[str] = []
        self._refused: str | None = None  # why the root is refused, until the mount table changes again
        try:
            self._mounts: int | None = os.open(mountinfo, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._mounts = None
        self._poller = select.poll()
        if self._mounts is not None:
            self._poller.register(self._mounts, select.POLLPRI)
            if answered:  # the start's mount, not the first request's (the storage may be unmounted by then)
                self._look(os.path.realpath(root))

    def check(self) -> None:
        """StorageUnavailable if the root is gone or the mount that held it is no longer mounted.

        One ``stat`` and one ``realpath`` of the root and one ``poll``; the mount table
        besides when it changed or the real path did (and at the first look: the start's).
        A worker thread's call.  OSError of the ``stat`` other than the root gone (EIO, ENOTCONN) as raised.
        """
        try:
            os.stat(self.root)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                raise StorageUnavailable(f"the storage directory {str(self.root)!r} is gone") from None
            raise
        real = os.path.realpath(self.root)  # outside the lock: a root that hangs holds this thread only
        with self._lock:
            if self._mounts is None:
                return
            # A link at the root led elsewhere since the last look: its mounts learnt now (helper 157: learnt
            # only at the next change of the table, an unmount, the folder beneath was taken for the storage).
            if self._poller.poll(0) or real != self._real:
                self._look(real)
            if self._refused is not None:
                raise StorageUnavailable(self._refused)

    def close(self) -> None:
        """Close the mount table's descriptor (a service's stop; tests make many apps: helper 157 counted one each).

        Not while a check holds it (stuck on a dead mount): left to the process's end then.
        """
        if self._mounts is not None and self._lock.acquire(blocking=False):
            try:
                os.close(self._mounts)
                self._mounts = None
            finally:
                self._lock.release()

    def _look(self, real: str) -> None:
        """Read the mount table; refuse the root's real path ``real``, take it, or learn it (the first look)."""
        assert self._mounts is not None
        held = holding_mounts(real, mount_table(os.fsdecode(_read_all(self._mounts))))
        if self._real is None or real != self._real or not held or not self._mounts_held:
            # The first look, or a link at the root now leading elsewhere: its mounts as they are.
            self._real, self._mounts_held, self._refused = real, held, None
            return
        was, now = self._mounts_held[-1], held[-1]
        stacked_was, stacked_now = self._mounts_held.count(was), held.count(now)
        if (now == was and stacked_now >= stacked_was) or _beneath(was, now):
            if now != was or stacked_now > stacked_was:  # a mount on the root (or between) since: its late mount
                logger.warning(
                    "storage directory %r is now on a filesystem mounted at %r since the start: serving it",
                    str(self.root),
                    now,
                )
            self._mounts_held, self._refused = held, None
            return
        # Held by a mount above the start's, or by fewer stacked on the same folder: the start's is gone.
        self._refused = (
            f"the storage directory {str(self.root)!r} is no longer on the filesystem mounted at "
            f"{was!r} at the start (unmounted: the folder beneath is not the storage)"
        )


def _read_all(fd: int) -> bytes:
    """The whole of ``fd`` from its start (mountinfo is read whole, in pieces, each time)."""
    os.lseek(fd, 0, os.SEEK_SET)
    pieces = []
    while piece := os.read(fd, 65536):
        pieces.append(piece)
    return b"".join(pieces)
