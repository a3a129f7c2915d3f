"""The CRC index on disk: an SQLite file that keeps CRCs across restarts (``ARCHIVER_INDEX``).

Only a cache.  Deleting the file loses nothing but the time to compute the
CRCs again; a row whose file changed is never used, because the key is the
device, inode, size, mtime and ctime, and the filesystem's id (a ``write`` or chmod always moves the
ctime, even when the mtime is put back, as it starts: see ``ctime_trust.RACY_NS``;
see ``crc_index`` for the one store that does not; nor on storage whose ctime is
not trusted, ``ctime_trust.trusted_ctime``, whose CRCs are never kept).  Each row carries a check (``row_check``): a row
the disk or an edit damaged is not used (a WARNING), and the CRC is read
again and the row written anew.  Rows of earlier versions are ignored: table ``crc``
(no ctime), ``crc_v2`` (kept under a 0.1 s racy window even where ctimes are
whole seconds, and for keys whose ctime is the mtime), ``crc_v3`` (no check) and ``crc_v4`` (kept
under a 0.1 s racy window: a CRC read 0.1-1 s into one long write in place was kept,
``ctime_trust.RACY_NS``) and ``crc_v5`` (no filesystem id: a btrfs snapshot that took a deleted
subvolume's device number matched its rows, ``ctime_trust.CtimeTrust.filesystem``).  A key SQLite's
64-bit integers cannot hold (an mtime past
2262) is neither looked up nor kept.
Rows of files that are gone stay until the file is deleted (e.g. by cron).
Several instances may share the file (SQLite locks it); a read or write that
fails (locked too long, disk full) is logged and skipped, never a download's
failure.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import threading
import time
import zlib
from pathlib import Path

from .producer_protocol import FileKey

# A CRC's key in the index: a file's (``FileKey``) and its filesystem's id (``CtimeTrust.filesystem``).
IndexKey = tuple[int, int, int, int, int, int]


def index_key(key: FileKey, filesystem: int) -> IndexKey:
    """``key`` with ``filesystem``, the id of the filesystem it lies on (``CtimeTrust.filesystem``)."""
    return (*key, filesystem)


logger = logging.getLogger(__name__)

# Rows written in one transaction: one per file would cost a commit per file.
WRITE_BATCH = 512
# Rows a write that would have waited on another process's lock keeps for the next (~60 bytes each);
# past this many, the oldest are given up (a later download reads those files again).
MAX_PENDING = 64 * WRITE_BATCH
# A failing store (a damaged file, a full disk) fails every lookup: a warning at most this
# often (seconds), counting those left out.  One a lookup was 45,000 lines for one album.
WARNING_INTERVAL = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS crc_v6 (
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    filesystem INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    "check" INTEGER NOT NULL,
    PRIMARY KEY (device, inode, size, mtime_ns, ctime_ns, filesystem)
) WITHOUT ROWID
"""
_LOOKUP = (
    'SELECT crc, "check" FROM crc_v6'
    " WHERE device=? AND inode=? AND size=? AND mtime_ns=? AND ctime_ns=? AND filesystem=?"
)
_ROW = struct.Struct("<7q")


def row_check(key: IndexKey, crc: int) -> int:
    """The check kept with a row: the CRC-32 of its key and CRC (little-endian 64-bit integers).

    SQLite keeps no checksum of its own pages: a flipped bit, or an edit,
    in the crc column would be a wrong CRC in a clean archive.  A CRC-32
    catches every change confined to 32 bits, so to the crc column alone.
    """
    return zlib.crc32(_ROW.pack(*key, crc))


class CrcStore:
    """CRCs in an SQLite file, safe to use from several threads; writes are batched.

    Lookups and writes use a connection each: in WAL mode a read never waits
    for a writer, so a write waiting out ``busy_timeout`` (seconds) on another
    process's lock (an operator's ``sqlite3`` mid-transaction, ``archiver
    index``) holds up no lookup; before, every download's lookups queued
    behind such writes, 5 s each (found by helper 36).
    """

    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._writer = _connect(path, busy_timeout)
        try:
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.execute("PRAGMA synchronous=NORMAL")
            self._writer.execute(_SCHEMA)
            self._reader = _connect(path, busy_timeout)
        except BaseException:
            self._writer.close()
            raise
        self._read_lock = threading.Lock()  # the reader connection's
        self._write_lock = threading.Lock()  # the writer connection's: a write at a time
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[int, ...]] = []
        # Rows that could not be written, in all (``archiver index`` fails if any).
        self.unwritten = 0
        self._warning_lock = threading.Lock()
        self._quiet_until = -float("inf")
        self._quieted = 0

    def get(self, key: IndexKey) -> int | None:
        if not _storable(key):
            return None
        with self._read_lock:
            try:
                row = self._reader.execute(_LOOKUP, key).fetchone()
            except sqlite3.Error as error:
                self._warn(f"read skipped: {error}")
                return None
        if row is None:
            return None
        crc, check = row
        if not (isinstance(crc, int) and 0 <= crc < 2**32 and check == row_check(key, crc)):
            self._warn(f"a damaged row left unused (device {key[0]}, inode {key[1]}): its CRC is read again")
            return None
        return crc

    def put(self, key: IndexKey, crc: int) -> None:
        if not _storable(key):
            return
        with self._pending_lock:
            self._pending.append((*key, crc, row_check(key, crc)))
            full = len(self._pending) >= WRITE_BATCH
        if full:  # in a CRC reader's thread: one of the few, and a download waits on it
            self.flush(wait=False)

    def flush(self, *, wait: bool = True) -> None:
        """Write the rows put so far.

        ``wait=False``: waits neither for another thread's write nor for another
        process's lock (an operator's ``sqlite3``, ``archiver index``, another
        instance): the rows stay for the next flush.  Waiting out the busy timeout
        there held a CRC reader thread 1 s a batch of 512 files (helper 66).
        """
        if not self._write_lock.acquire(blocking=wait):
            return
        try:
            with self._pending_lock:
                rows, self._pending = self._pending, []
            if rows:
                self._write(rows, wait)
        finally:
            self._write_lock.release()

    def count(self) -> int:
        self.flush()
        with self._read_lock:
            return int(self._reader.execute("SELECT count(*) FROM crc_v6").fetchone()[0])

    def close(self) -> None:
        self.flush()
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()

    def _write(self, rows: list[tuple[int, ...]], wait: bool) -> None:
        """Under ``_write_lock``: the rows in one transaction, or counted as unwritten with a warning.

        ``wait=False``: if another process holds the lock, at once, and the rows stay pending.
        """
        try:
            if not wait:
                self._writer.execute("PRAGMA busy_timeout = 0")
            try:
                with self._writer:
                    self._writer.execute("BEGIN")
                    self._writer.executemany("INSERT OR REPLACE INTO crc_v6 VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            finally:
                if not wait:
                    self._writer.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        except sqlite3.Error as error:
            lost = len(rows)
            if not wait and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                with self._pending_lock:  # for the next flush, oldest first
                    self._pending[:0] = rows
                    lost = max(0, len(self._pending) - MAX_PENDING)
                    del self._pending[:lost]
                if not lost:
                    return
            self.unwritten += lost
            self._warn(f"{lost} rows not written: {error}")

    def _warn(self, message: str) -> None:
        """Log ``message`` as a warning unless one was logged in the last WARNING_INTERVAL s."""
        with self._warning_lock:
            now = time.monotonic()
            if now < self._quiet_until:
                self._quieted += 1
                return
            quieted = f" ({self._quieted} more such failures since the last line)" if self._quieted else ""
            self._quiet_until, self._quieted = now + WARNING_INTERVAL, 0
        logger.warning("CRC index: %s%s", message, quieted)


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False, isolation_level=None)


def _storable(key: IndexKey) -> bool:
    """Whether every part of ``key`` fits an SQLite integer (signed 64 bits)."""
    return all(-(2**63) <= part < 2**63 for part in key)
