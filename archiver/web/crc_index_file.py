"""The CRC index's file (ARCHIVER_INDEX): opened at the start, or the index kept in memory if it cannot be."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from pathlib import Path

from ..archive.crc_store import SERVICE_STALL, CrcStore
from ..config import Settings, SettingsError

logger = logging.getLogger(__name__)


SERVICE_BUSY_TIMEOUT = 1.0
# The service's start waits this long (seconds) for the file to be opened: a filesystem that hangs
# leaves the index in memory (an ERROR line).
OPEN_TIMEOUT = 10.0
OPENING_THREAD = "archiver CRC index open"
# How every SQLite database file begins (its header string, https://www.sqlite.org/fileformat.html).
SQLITE_HEADER = b"SQLite format 3\x00"


class NotAnIndexFile(sqlite3.DatabaseError):
    """ARCHIVER_INDEX names a file with bytes that do not begin as SQLite's: another file, named by mistake."""


def open_crc_store(settings: Settings, *, required: bool = False) -> CrcStore | None:
    """The CRC index's file (ARCHIVER_INDEX), or None to keep it in memory.

    One that cannot be used is, for the service, an ERROR line and the index
    in memory: it is only a cache, and a damaged or locked file must not keep
    the service from starting (under systemd's ``Restart=always``, a loop);
    nor one whose filesystem does not answer (OPEN_TIMEOUT: the start waited
    for it as long as it hung, helper 177).
    ``required`` (``archiver index``, whose only work it is): SettingsError,
    and it waits for the file as long as it takes.
    A path that is no file (a folder, a device) is a SettingsError either way.
    """
    if not settings.index_path:
        return None
    if required:
        try:
            return _open(settings.index_path, required)
        except (sqlite3.Error, OSError) as error:
            raise SettingsError(f"index {settings.index_path!r}: {error}") from None
    opened: list[CrcStore | SettingsError | sqlite3.Error | OSError] = []
    given_up = threading.Event()
    lock = threading.Lock()

    def open_it() -> None:
        result: CrcStore | SettingsError | sqlite3.Error | OSError
        try:
            result = _open(settings.index_path, required)
        except (SettingsError, sqlite3.Error, OSError) as error:
            result = error
        with lock:
            if not given_up.is_set():
                opened.append(result)
                return
        if isinstance(result, CrcStore):  # opened once the start had gone on without it: unused
            result.close()

    # A thread it may be left in: a daemon, as the store's own.
    opening = threading.Thread(target=open_it, name=OPENING_THREAD, daemon=True)
    opening.start()
    opening.join(OPEN_TIMEOUT)
    with lock:
        if not opened:
            given_up.set()
    if given_up.is_set():
        _unusable(settings.index_path, f"it did not answer in {OPEN_TIMEOUT:g} s")
        return None
    if isinstance(result := opened[0], SettingsError):
        raise result
    if isinstance(result, CrcStore):
        return result
    if isinstance(result, NotAnIndexFile):
        # Not "delete <path>*" (helper 196: ARCHIVER_INDEX=/etc/archiver.env advised deleting the settings).
        kept = "CRCs are kept in memory only, until a restart"
        logger.error("CRC index %r cannot be used (%s): %s", settings.index_path, result, kept)
        return None
    _unusable(settings.index_path, str(result))
    return None


def _open(index_path: str, required: bool) -> CrcStore:
    _check_is_a_file(index_path)
    # The service's writes wait 1 s at most on another process's lock (the CRCs are only lost
    # for the next start); ``archiver index``'s, SQLite's usual 5 s.  Its lookups wait as long as
    # they take; the service's, SERVICE_STALL without an answer.
    try:
        if required:
            return CrcStore(Path(index_path), busy_timeout=5.0)
        return CrcStore(Path(index_path), busy_timeout=SERVICE_BUSY_TIMEOUT, stall=SERVICE_STALL)
    except sqlite3.DatabaseError:
        if _begins_unlike_sqlite(index_path):
            raise NotAnIndexFile("not an SQLite file: does ARCHIVER_INDEX name the file meant?") from None
        raise


def _begins_unlike_sqlite(index_path: str) -> bool:
    """Whether the file has bytes and they do not begin as every SQLite database's (SQLITE_HEADER).

    SQLite says "file is not a database" for such a file and for a damaged index alike, and the
    ERROR line advised deleting it: a file of value named by mistake (the settings file, a photo)
    is told apart, as a folder or a device is (``_check_is_a_file``).  Read in the opening thread.
    """
    try:
        with open(index_path, "rb") as file:
            head = file.read(len(SQLITE_HEADER))
    except OSError:
        return False
    return bool(head) and not SQLITE_HEADER.startswith(head)


def _unusable(index_path: str, reason: str) -> None:
    logger.error(
        "CRC index %r cannot be used (%s): CRCs are kept in memory only, until a restart. If it is damaged, "
        "or was deleted while another instance used it, stop the instances using it, delete %s* and start again",
        index_path,
        reason,
        index_path,
    )


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
