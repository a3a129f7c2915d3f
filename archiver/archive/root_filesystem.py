"""The storage root's filesystem: the one it was on at the start, or one mounted on it since.

A storage on a network mount that is unmounted (by hand, by an automounter, a
lazy ``umount -l``) leaves the service looking at the empty folder beneath it:
every link was a ``404`` "deleted", ``/healthz`` said the storage was fine,
and nothing was logged (helper 155).  So is a root that was removed or moved.
Either is storage that is not there, a ``503`` to come back later (nginx tries
another instance), never a link that is dead.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .listing import ListingFailed

logger = logging.getLogger(__name__)


class StorageUnavailable(ListingFailed):
    """The storage root is gone, or the filesystem it was on is no longer mounted there: try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class RootFilesystem:
    """The device the storage root was on at the start (``device``), and a check that it still is.

    A root whose device changed while it is now a mount point is a filesystem
    mounted on it since (the storage's mount come up after the start): taken,
    with a WARNING.  A root whose device changed while it is not a mount point
    is the folder beneath an unmounted one: refused.
    """

    def __init__(self, root: Path, device: int | None) -> None:
        self.root = root
        # None: the start's look had no answer (a dead mount); learnt at the first look that has one.
        self.device = device

    def check(self) -> None:
        """StorageUnavailable if the root is gone or its filesystem unmounted since the start.

        One ``stat`` of the root (two when its device changed): a worker thread's call.
        OSError of those ``stat`` calls other than the root gone (EIO, ENOTCONN) as raised.
        """
        try:
            found = os.stat(self.root)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                raise StorageUnavailable(f"the storage directory {str(self.root)!r} is gone") from None
            raise
        if self.device is None:
            self.device = found.st_dev
        if found.st_dev == self.device:
            return
        if found.st_dev != os.stat(os.path.join(self.root, "..")).st_dev:
            # Assigned whole: worker threads read it, and a stale read only looks again.
            logger.warning(
                "storage directory %r is now a filesystem mounted since the start (device %d:%d): serving it",
                str(self.root),
                os.major(found.st_dev),
                os.minor(found.st_dev),
            )
            self.device = found.st_dev
            return
        raise StorageUnavailable(
            f"the filesystem the storage directory {str(self.root)!r} was on at the start is no longer mounted "
            "there (restart the service if the storage is now where it should be)"
        )
