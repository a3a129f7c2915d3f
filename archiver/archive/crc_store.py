"""The CRC index on disk: an SQLite file that keeps CRCs across restarts (``ARCHIVER_INDEX``).

Only a cache.  Deleting the file loses nothing but the time to compute the
CRCs again; a row whose file changed is never used, because the key is the
device, inode, size, mtime and ctime (a ``write`` or chmod always moves the
ctime, even when the mtime is put back; see ``crc_index`` for the one store
that does not; nor on storage whose ctime is not trusted, ``ctime_trust.trusted_ctime``,
whose CRCs are never kept).  Rows of earlier versions are ignored: table ``crc``
(no ctime) and ``crc_v2`` (kept under a 0.1 s racy window even where ctimes are
whole seconds, and for keys whose ctime is the mtime).  A key SQLite's 64-bit integers cannot
hold (an mtime past 2262) is neither looked up nor kept.
Rows of files that are gone stay until the file is deleted (e.g. by cron).
Several instances may share the file (SQLite locks it); a read or write that
fails (locked too long, disk full) is logged and skipped, never a download's
failure.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from .ctime_trust import FileKey

logger = logging.getLogger(__name__)

# Rows written in one transaction: one per file would cost a commit per file.
WRITE_BATCH = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS crc_v3 (
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    PRIMARY KEY (device, inode, size, mtime_ns, ctime_ns)
) WITHOUT ROWID
"""


class CrcStore:
    """CRCs in an SQLite file, safe to use from several threads; writes are batched."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()
        self._pending: list[tuple[int, int, int, int, int, int]] = []

    def get(self, key: FileKey) -> int | None:
        if not _storable(key):
            return None
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT crc FROM crc_v3 WHERE device=? AND inode=? AND size=? AND mtime_ns=? AND ctime_ns=?", key
                ).fetchone()
            except sqlite3.Error as error:
                logger.warning("CRC index: read skipped: %s", error)
                return None
        return None if row is None else int(row[0])

    def put(self, key: FileKey, crc: int) -> None:
        if not _storable(key):
            return
        with self._lock:
            self._pending.append((*key, crc))
            if len(self._pending) >= WRITE_BATCH:
                self._write()

    def forget(self, key: FileKey) -> None:
        if not _storable(key):
            return
        with self._lock:
            self._pending = [row for row in self._pending if row[:5] != key]
            try:
                self._db.execute(
                    "DELETE FROM crc_v3 WHERE device=? AND inode=? AND size=? AND mtime_ns=? AND ctime_ns=?", key
                )
            except sqlite3.Error as error:
                logger.warning("CRC index: a changed file's row could not be dropped: %s", error)

    def flush(self) -> None:
        with self._lock:
            self._write()

    def count(self) -> int:
        with self._lock:
            self._write()
            return int(self._db.execute("SELECT count(*) FROM crc_v3").fetchone()[0])

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()

    def _write(self) -> None:
        if self._pending:
            rows, self._pending = self._pending, []
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany("INSERT OR REPLACE INTO crc_v3 VALUES (?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.Error as error:
                logger.warning("CRC index: %d rows not written: %s", len(rows), error)


def _storable(key: FileKey) -> bool:
    """Whether every part of ``key`` fits an SQLite integer (signed 64 bits)."""
    return all(-(2**63) <= part < 2**63 for part in key)
