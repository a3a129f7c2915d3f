"""A listed file opened for its CRC: without following a link, checked to be the one listed, its failures named.

The errors here are what a CRC read says of a file: changed or gone
(``FileChanged``), the system out of descriptors or memory
(``OutOfResources``), or the storage's failure (``FileUnreadable``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .ctime_trust import FileKey
from .producer_protocol import CHANGED_ERRNOS, RESOURCE_ERRNOS


class FileChanged(RuntimeError):
    """A file is not what was listed any more (another size, or no longer a regular file)."""


class OutOfResources(RuntimeError):
    """The system ran out of descriptors or memory opening or reading a file (RESOURCE_ERRNOS): ``path: reason``."""


class FileUnreadable(RuntimeError):
    """The storage failed a read of a file (EIO: a bad sector, a network mount's error): ``path: reason``."""


@contextmanager
def failures_named(path: Path) -> Iterator[None]:
    """An OSError of an open or read of ``path``: FileChanged (CHANGED_ERRNOS: gone, ESTALE...), else FileUnreadable.

    Named either way: a bare "[Errno 5] Input/output error" named no file, and was a traceback (helper 70).
    """
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in CHANGED_ERRNOS:
            raise FileChanged(f"{path}: {reason}") from None
        if error.errno in RESOURCE_ERRNOS:
            raise OutOfResources(f"{path}: {reason}") from None
        raise FileUnreadable(f"{path}: {reason}") from None


def open_listed(path: Path, size: int, key: FileKey | None = None) -> tuple[int, FileKey]:
    """Open the regular file at ``path`` without following a link; FileChanged unless it is the one listed.

    The one listed: ``key`` (device, inode, size, mtime, ctime) if given, else ``size`` bytes.
    """
    with failures_named(path):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise FileChanged(f"{path}: not the file listed") from None
    found = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    if not stat.S_ISREG(status.st_mode) or found[2] != size or (key is not None and found != key):
        os.close(fd)
        raise FileChanged(f"{path}: not the file listed")
    return fd, found


def close_read(fd: int, path: Path) -> None:
    """Close ``fd``, a file read; FileChanged if that fails.

    A FUSE filesystem may report a failed read only at the close: rclone's
    mount answers EIO when the bytes read do not match the checksum it had.
    """
    try:
        os.close(fd)
    except OSError as error:
        raise FileChanged(f"{path}: {error.strerror} when closed after reading") from None
