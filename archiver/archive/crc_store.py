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
failure; nor is a file that does not answer (``store_thread``).
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from .producer_protocol import FileKey
from .store_thread import StallReport, StoreStalled, StoreThread

# A CRC's key in the index: a file's (``FileKey``) and its filesystem's id (``CtimeTrust.filesystem``).
IndexKey = tuple[int, int, int, int, int, int]


def index_key(key: FileKey, filesystem: int) -> IndexKey:
    """``key`` with ``filesystem``, the id of the filesystem it lies on (``CtimeTrust.filesystem``)."""
    return (*key, filesystem)


logger = logging.getLogger(__name__)

# The key's columns, in order.
KEY_COLUMNS = ("device", "inode", "size", "mtime_ns", "ctime_ns", "filesystem")
# A lookup by a download goes without the index's file once the file has not answered for this long
# (its filesystem hangs: a hard NFS mount whose server is gone): its CRCs are read from the files.
SERVICE_STALL = 2.0
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
# crc_v6's columns as ``PRAGMA table_info`` lists them: name, type, place in the primary key.
_COLUMNS = [
    *((name, "INTEGER", place) for place, name in enumerate(KEY_COLUMNS, 1)),
    ("crc", "INTEGER", 0),
    ("check", "INTEGER", 0),
]


def row_check(key: IndexKey, crc: int) -> int:
    """The check kept with a row: the CRC-32 of its key and CRC (little-endian 64-bit integers).

    SQLite keeps no checksum of its own pages: a flipped bit, or an edit,
    in the crc column would be a wrong CRC in a clean archive.  A CRC-32
    catches every change confined to 32 bits, so to the crc column alone.
    """
    return zlib.crc32(_ROW.pack(*key, crc))


class CrcStore:
    """CRCs in an SQLite file, safe to use from several threads; writes are batched.

    Lookups and writes each have a connection and a thread of their own
    (``StoreThread``): in WAL mode a read never waits for a writer, so a write
    waiting out ``busy_timeout`` (seconds) on another process's lock (an
    operator's ``sqlite3`` mid-transaction, ``archiver index``) holds up no
    lookup (before, every download's lookups queued behind such writes, 5 s
    each: helper 36); and no caller's thread waits on the file: a write is
    only asked for (``put``, ``flush(wait=False)``), and a lookup waits
    ``stall`` seconds at most without an answer (None: as long as it takes),
    then goes without: a filesystem that hangs under the file held a CRC
    reader, and failed its download, for as long as it hung (helper 177).
    """

    def __init__(self, path: Path, busy_timeout: float = 5.0, stall: float | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._writer = _connect(path, busy_timeout)
        try:
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.execute("PRAGMA synchronous=NORMAL")
            self._writer.execute(_SCHEMA)
            _check_schema(self._writer)
            self._reader = _connect(path, busy_timeout)
        except BaseException:
            self._writer.close()
            raise
        report = StallReport(logger, "CRC index: its file")
        self._lookups = StoreThread("archiver CRC index lookups", stall, report)
        self._writes = StoreThread("archiver CRC index writes", stall, report)
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[int, ...]] = []
        self._write_asked = False  # a write asked for (``_ask_write``) that has not taken its rows yet
        # Rows that could not be written, in all (``archiver index`` fails if any).
        self.unwritten = 0
        self._warning_lock = threading.Lock()
        self._quiet_until = -float("inf")
        self._quieted = 0

    def get(self, key: IndexKey) -> int | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[IndexKey]) -> list[int | None]:
        """Each key's CRC, None where none is kept (or it could not be looked up: a WARNING a minute at most)."""
        storable = [(position, key) for position, key in enumerate(keys) if _storable(key)]
        if not storable:
            return [None] * len(keys)

        def look_up(progress: Callable[[], None]) -> list[int | None]:
            found: list[int | None] = [None] * len(keys)
            for position, key in storable:
                try:
                    found[position] = self._look_up(key)
                except sqlite3.Error as error:  # the rest too (a lock: each would wait out the busy timeout)
                    self._warn(f"read skipped: {error}")
                    return found
                progress()
            return found

        try:
            return self._lookups.run(look_up)
        except StoreStalled as stalled:
            self._warn(f"lookups go without it, and their CRCs are read from the files: {stalled}")
            return [None] * len(keys)

    def put(self, key: IndexKey, crc: int) -> None:
        if not _storable(key):
            return
        with self._pending_lock:
            self._pending.append((*key, crc, row_check(key, crc)))
            full = len(self._pending) >= WRITE_BATCH
        if full:  # in a CRC reader's thread, say: the store's writes thread writes them
            self._ask_write()

    def flush(self, *, wait: bool = True) -> None:
        """Write the rows put so far.

        ``wait=False``: only asks the store's writes thread to: the caller waits
        neither for it nor for another process's lock (an operator's ``sqlite3``,
        ``archiver index``, another instance); rows that met that lock stay for
        the next flush.  Waiting out the busy timeout in a CRC reader's thread
        held it 1 s a batch of 512 files (helper 66).  ``wait=True``: until they
        are written, or given up (counted in ``unwritten``, a WARNING), or the
        file has not answered for ``stall`` seconds (they stay, to be written
        when it does).
        """
        if not wait:
            self._ask_write()
            return
        try:
            self._writes.run(partial(self._write_pending, waited=True))
        except StoreStalled as stalled:
            with self._pending_lock:
                left = len(self._pending)
            self._warn(f"{left} rows not written yet: {stalled}")

    def count(self) -> int:
        self.flush()
        query = "SELECT count(*) FROM crc_v6"
        return int(self._lookups.run(lambda _: self._reader.execute(query).fetchone()[0]))

    def close(self) -> None:
        """Write what is left, then close the file (if its threads end: a file that hangs keeps them)."""
        self.flush()
        if self._writes.close(self._lookups.stall) and self._lookups.close(self._lookups.stall):
            self._writer.close()
            self._reader.close()

    def _look_up(self, key: IndexKey) -> int | None:
        """In the lookups thread: ``key``'s CRC if kept, and its row undamaged; sqlite3.Error if it cannot be read."""
        row = self._reader.execute(_LOOKUP, key).fetchone()
        if row is None:
            return None
        crc, check = row
        if not (isinstance(crc, int) and 0 <= crc < 2**32 and check == row_check(key, crc)):
            self._warn(f"a damaged row left unused (device {key[0]}, inode {key[1]}): its CRC is read again")
            return None
        return crc

    def _ask_write(self) -> None:
        """Have the writes thread write the pending rows, unless it is asked to already.

        While its file does not answer, the rows wait (MAX_PENDING at most: the oldest are given up).
        """
        with self._pending_lock:
            lost = max(0, len(self._pending) - MAX_PENDING)
            del self._pending[:lost]
            self.unwritten += lost
            # (Without a thread, each asks: a write in another's thread at the time is not waited for.)
            asked, self._write_asked = self._write_asked, self._writes.threaded
        if not asked:
            self._writes.start(self._write_pending)
        elif (stalled := self._writes.stalled()) is not None:
            given_up = f" ({lost} given up)" if lost else ""
            self._warn(f"rows wait to be written{given_up}: {StoreStalled(stalled)}")

    def _write_pending(self, progress: Callable[[], None], waited: bool = False) -> None:
        """In the writes thread: the rows put so far, in one transaction.

        ``waited`` (a caller waits: ``flush``): rows another process's lock kept
        out over the busy timeout are given up, counted in ``unwritten``;
        otherwise they stay for the next write.
        """
        with self._pending_lock:
            rows, self._pending = self._pending, []
            self._write_asked = False
        if not rows:
            return
        # Without a thread of its own, a write not waited for is in a CRC reader's thread: it must not
        # wait on another process's lock (helper 66).
        at_once = not waited and not self._writes.threaded
        try:
            if at_once:
                self._writer.execute("PRAGMA busy_timeout = 0")
            try:
                with self._writer:
                    self._writer.execute("BEGIN")
                    self._writer.executemany("INSERT OR REPLACE INTO crc_v6 VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            finally:
                if at_once:
                    self._writer.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        except sqlite3.Error as error:
            lost = len(rows)
            if not waited and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                with self._pending_lock:  # for the next write, oldest first
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


def _check_schema(connection: sqlite3.Connection) -> None:
    """sqlite3.DatabaseError unless table crc_v6 is this version's (not one made by hand, or by another program).

    With other columns, every lookup and write of the service failed (a
    WARNING a minute, no CRC ever kept); without this primary key, each
    lookup read the whole table (helper 177).
    """
    columns = [row[1:3] + row[5:6] for row in connection.execute("PRAGMA table_info(crc_v6)")]
    if columns != _COLUMNS:
        found = ", ".join(name for name, _, _ in columns)
        raise sqlite3.DatabaseError(f"its table crc_v6 is not this version's (columns {found})")


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False, isolation_level=None)


def _storable(key: IndexKey) -> bool:
    """Whether every part of ``key`` fits an SQLite integer (signed 64 bits)."""
    return all(-(2**63) <= part < 2**63 for part in key)
