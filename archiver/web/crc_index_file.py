"""The CRC index's file (ARCHIVER_INDEX): opened at the start, or the index kept in memory if it cannot be."""

from __future__ import annotations

import logging
import sqlite3
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
    """
    if not settings.index_path:
        return None
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
