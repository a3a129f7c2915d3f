"""The storage root: checked once at the start (its device kept), and looked at by /healthz."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from pathlib import Path

from ..archive.root_filesystem import RootFilesystem, StorageUnavailable
from ..config import SettingsError

logger = logging.getLogger(__name__)

# /healthz says the storage fails if its root does not answer within this (or the storage timeout, if
# shorter); the start waits as long for it before it starts anyway.
HEALTH_STORAGE_TIMEOUT = 2.0


def root_timeout(storage_timeout: float) -> float:
    """Seconds a look at the root gets, at the start and for /healthz: HEALTH_STORAGE_TIMEOUT, or less."""
    return min(storage_timeout, HEALTH_STORAGE_TIMEOUT)


# What a look at the storage root may say that no later moment will change: the start stops.
# Anything else (ENOTCONN of a FUSE mount whose daemon died, an NFS server's ESTALE or EIO) is
# storage that may come back: the service starts, and /healthz says "storage": false (helper 55).
_ROOT_REFUSED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENAMETOOLONG})


def check_storage_root(root: Path, timeout: float) -> bool:
    """Whether ``root`` answered (``RootFilesystem`` learns its mount then).

    SettingsError if ``root`` is not a folder the service may search, is / (by a link or a bind
    mount), or no thread can be started to look; if it does not answer within ``timeout`` s, or
    answers an error the storage may recover from, an ERROR only.

    A mount that does not answer (a dead NFS server at boot) is no reason not
    to start: ``/healthz`` says ``storage: false`` until it answers.  The
    look runs in a daemon thread, left stuck if it is.
    """
    answer: list[tuple[os.stat_result, bool] | OSError] = []  # (what it is, searchable), or the error

    def look() -> None:
        try:
            found = os.stat(root)  # os.path.isdir would say False for ENOTCONN
            answer.append((found, os.access(root, os.X_OK)))
        except OSError as error:  # an error is an answer too: not "did not answer" (helper 54)
            answer.append(error)

    looker = threading.Thread(target=look, name="archiver storage root", daemon=True)
    try:
        looker.start()
    except RuntimeError as error:  # at the tasks' limit (TasksMax, ulimit -u): nothing else would start either
        raise SettingsError(
            f"cannot look at the storage directory {str(root)!r}: no thread could be started ({error})"
        ) from None
    looker.join(timeout)
    if not answer:
        logger.error("storage directory %r did not answer in %.0f s: starting anyway", str(root), timeout)
        return False
    if isinstance(answer[0], OSError):
        failure = answer[0]
        if failure.errno not in _ROOT_REFUSED:
            logger.error("storage directory %r: %s: starting anyway", str(root), failure.strerror)
            return False
        if failure.errno in (errno.ENOENT, errno.ENOTDIR):
            raise SettingsError(f"storage directory {str(root)!r} does not exist or is not a directory")
        raise SettingsError(f"storage directory {str(root)!r}: {failure.strerror}")
    found, searchable = answer[0]
    if not stat.S_ISDIR(found.st_mode):
        raise SettingsError(f"storage directory {str(root)!r} does not exist or is not a directory")
    # Its own mode 000 (or 0600): every download was a 500, and the start said nothing (helper 56).
    if not searchable:
        raise SettingsError(f"storage directory {str(root)!r}: the service's user may not search it")
    # / by any way there, a link or a bind mount: the same folder, so its device and inode (helpers
    # 52-54).  Another system's root mounted in (a container's -v /:/host) is a folder like any: the
    # root an operator names is trusted to be the storage.
    system_root = os.stat("/")
    if (found.st_dev, found.st_ino) == (system_root.st_dev, system_root.st_ino):
        raise SettingsError(f"storage directory {str(root)!r} is / (each folder in it would be served as an album)")
    return True


def storage_root_searchable(root: Path, filesystem: RootFilesystem) -> bool:
    """Whether albums can be reached under ``root``: a folder the service may search (x), not /, held
    by the mount that held it at the start or one mounted on it since (``filesystem``).

    Not read (r): a root of mode 0711 hides the albums' names and serves them
    all (README, Deploying); /healthz asked for both, and said "storage": false
    for ever on such a root (helper 52).  Not /: a link swapped for one to it
    since the start makes every download a 500 (``resolve_album``).
    """
    try:
        filesystem.check()
    except (StorageUnavailable, OSError):
        return False
    return os.access(root, os.X_OK) and root.is_dir() and os.path.realpath(root) != "/"
