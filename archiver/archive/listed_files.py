"""A listed file opened for its CRC: through no link, checked to be the one listed, its failures named.

And the files a download sent lately checked again by their paths before it ends
(``check_still_listed``).

The errors here are what a CRC read says of a file: changed or gone
(``FileChanged``), the system out of descriptors or memory
(``OutOfResources``), or the storage's failure (``FileUnreadable``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .producer_protocol import CHANGED_ERRNOS, RESOURCE_ERRNOS, FileChanged, FileKey, OutOfResources
from .real_paths import open_real_directory
from .uncached_status import uncached_path_status
from .worker_threads import NoThread

if TYPE_CHECKING:
    from .plan import ArchivePlan

# O_NONBLOCK: a FIFO put in a file's place must not hang the open; O_NOCTTY: nor a terminal become
# the service's.  Both as the producer's (``producer_files``).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class FileUnreadable(RuntimeError):
    """The storage failed a read of a file (EIO: a bad sector, a network mount's error): ``path: reason``."""


@contextmanager
def failures_named(path: Path | str) -> Iterator[None]:
    """An OSError of an open or read of ``path``: FileChanged (CHANGED_ERRNOS: gone, ESTALE...), else FileUnreadable.

    Named either way: a bare "[Errno 5] Input/output error" named no file, and was a traceback (helper 70).
    """
    try:
        yield
    except NoThread:
        # The system's tasks' limit met by a read's worker thread (an OSError, EAGAIN), not the
        # file's failure: a 503 to try again (helper 104: a large file's read made it a 500).
        raise
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in CHANGED_ERRNOS:
            raise FileChanged(f"{path}: {reason}") from None
        if error.errno in RESOURCE_ERRNOS:
            raise OutOfResources(f"{path}: {reason}") from None
        raise FileUnreadable(f"{path}: {reason}") from None


class Folders:
    """Listed files opened through no link: the folder of the last one held open for the next one in it.

    ``O_NOFOLLOW`` refuses a link only as a path's last component: a folder of
    the album swapped for a link to elsewhere (another album, ``/dev``) would
    lead one open of the whole path out of the storage, and an open alone may
    act (a tape drive rewinds at its close).  A folder is entered a component
    at a time from ``/`` (``real_paths``), as the walk and the producer do;
    ~9 us for six components, so a batch of files keeps its folder.  One
    thread's: ``close`` it in the thread that used it.
    """

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._fd = -1

    def open(self, path: Path) -> int:
        """A descriptor of ``path`` (absolute, real: no ``.``, ``..`` or link in its folders); OSError as ``openat``."""
        folder = path.parent
        if folder != self._folder:
            self.close()
            self._fd = open_real_directory(folder, passage=True)
            self._folder = folder
        return os.open(path.name, _FILE_FLAGS, dir_fd=self._fd)

    def close(self) -> None:
        """Close the folder held, if any; its close failing is no news (the files' own closes are checked).

        Linux frees the descriptor whatever ``close`` says; an error of it passed on was a raw OSError,
        the "unexpected failure" traceback and a 500 after the batch's CRCs were read whole (helper 193).
        """
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._folder, self._fd = None, -1


def open_listed(
    path: Path, size: int, key: FileKey | None = None, folders: Folders | None = None
) -> tuple[int, FileKey]:
    """Open the regular file at ``path`` through no link (``Folders``); FileChanged unless it is the one listed.

    The one listed: ``key`` (device, inode, size, mtime, ctime) if given, else
    ``size`` bytes.  ``folders``: the batch's, else one for this file alone.
    An open or look that fails is named and classed (``failures_named``).
    """
    with failures_named(path):
        if folders is not None:
            fd = folders.open(path)
        else:
            own = Folders()
            try:
                fd = own.open(path)
            finally:
                own.close()
    try:
        # Its look failing is classed as its open's or a read's would be: gone or ESTALE a file changed,
        # EIO the storage's, out of descriptors or memory the system's (helper 172: every error was
        # "not the file listed", an EIO the 503 of an album changing for good).
        with failures_named(path):
            status = os.fstat(fd)
    except Exception:
        _close_quietly(fd)
        raise
    found = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    if not stat.S_ISREG(status.st_mode) or found[2] != size or (key is not None and found != key):
        _close_quietly(fd)
        raise FileChanged(f"{path}: not the file listed")
    return fd, found


def _close_quietly(fd: int) -> None:
    """Close ``fd``, a file given up on: the failure being raised is the news, not the close's (helper 193)."""
    with contextlib.suppress(OSError):
        os.close(fd)


def close_read(fd: int, path: Path) -> None:
    """Close ``fd``, a file read; FileChanged if that fails.

    A FUSE filesystem may report a failed read only at the close: rclone's
    mount answers EIO when the bytes read do not match the checksum it had.
    """
    try:
        os.close(fd)
    except OSError as error:
        raise FileChanged(f"{path}: {error.strerror} when closed after reading") from None


def check_still_listed(plan: ArchivePlan, entries: Sequence[int]) -> None:
    """FileChanged unless each of ``entries`` of ``plan`` is still the file listed (its key), by its path.

    A ``stat`` a file, through no link at the last part (a worker thread's call).  A ``stat`` failing
    is named as ``failures_named`` names it: FileChanged, OutOfResources or FileUnreadable.
    """
    # Paths joined as bytes: a pathlib join and str a file was half the time (20,000 files: 221 -> 100 ms).
    directory = os.fsencode(plan.directory) + b"/"
    for k in entries:
        # Gone or replaced is a file changed; any other error (EIO, ENOMEM) the storage's or the system's,
        # not an upload (helper 152: every error was "changed", logged and counted so).
        with failures_named(plan.path_str(k)):
            # Asked of the filesystem, not the kernel's cached attributes of a FUSE or NFS file (helper 150:
            # an upload's write after the producer's look went out cut, the archive ending cleanly).
            _, found = uncached_path_status(directory + plan.path(k))
        if found != plan.key(k):
            raise FileChanged(f"{plan.path_str(k)}: changed while the archive was sent")
