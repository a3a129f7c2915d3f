"""The CRC index's file (ARCHIVER_INDEX): opened at the start, or the index kept in memory if it cannot be."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path

from ..archive.crc_store import CrcStore
from ..config import Settings, SettingsError

logger = logging.getLogger(__name__)


SERVICE_BUSY_TIMEOUT = 1.0


def open_crc_store(settings: Settings, *, required: bool = False) -> CrcStore | None:
    """The CRC index's file (ARCHIVER_INDEX), or None to keep it in memory.

    One that cannot be used is, for the service, an ERROR line and the index
    in memory: it is only a cache, and a damaged or locked file must not keep
    the service from starting (under systemd's ``Restart=always``, a loop).
    ``required`` (``archiver index``, whose only work it is): SettingsError.
    A path that is no file (a folder, a device) is a SettingsError either way.
    """
    if not settings.index_path:
        return None
    _check_is_a_file(settings.index_path)
    try:
        # The service's writes wait 1 s at most on another process's lock (the CRCs are only lost
        # for the next start); ``archiver index``'s, SQLite's usual 5 s.
        return CrcStore(Path(settings.index_path), busy_timeout=5.0 if required else SERVICE_BUSY_TIMEOUT)
    except (sqlite3.Error, OSError) as error:
        if required:
            raise SettingsError(f"index {settings.index_path!r}: {error}") from None
        logger.error(
            "CRC index %r cannot be used (%s): CRCs are kept in memory only, until a restart. If it is damaged, "
            "or was deleted while another instance used it, stop the instances using it, delete %s* and start again",
            settings.index_path,
            error,
            settings.index_path,
        )
        return None


def _check_is_a_file(index_path: str) -> None:
    """SettingsError if ARCHIVER_INDEX names something that is no file: a folder, ``/dev/null``.

    Either can never be the index, whatever is done to it: not a damaged file to
    delete, which the service's ERROR line advised (helper 171: "delete
    /dev/null*", or the storage's folder named by mistake, "delete /srv/photos*").
    Not there (yet) is no error: the file is made.
    """
    try:
        found = os.stat(index_path)
    except OSError:
        return  # made, or CrcStore says why it cannot be
    if stat.S_ISDIR(found.st_mode):
        raise SettingsError(
            f"ARCHIVER_INDEX: {index_path!r} is a directory, not a file: name a file in it, "
            f"e.g. {os.path.join(index_path, 'crc-index.sqlite')!r}"
        )
    if not stat.S_ISREG(found.st_mode):
        raise SettingsError(
            f"ARCHIVER_INDEX: {index_path!r} is not a regular file (leave it empty to keep the CRCs in memory only)"
        )
