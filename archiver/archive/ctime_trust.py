"""When a file's key (device, inode, size, mtime, ctime) says its CRC is still the one read: ctimes and their trust.

The CRC index keys a file by everything that changes when it does.  The
ctime catches a file rewritten in place with its size kept and its mtime
put back (``touch -r``): a ``write`` always moves it, on the filesystems
whose ctimes are trusted (``CtimeTrust``; see ``filesystems`` for those that
are not).  A CRC read while the file may still have been changing (its
ctime less than RACY_NS older than the read: within one tick of the
filesystem's clock, or while one write in place still copies) is "racy", as
git's index calls such entries: used for that download, never kept, because
a later change in the same tick, or the rest of that write, would leave the
key as it was (``is_racy``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .filesystems import KERNEL, MOUNTINFO, Filesystem, filesystem_id, filesystem_name, filesystem_of, on_a_loop_device
from .producer_protocol import SECOND, FileKey

# A file whose ctime lies within this of the moment its read began may change again
# without its ctime moving; such a CRC is not kept in the index.  Linux stamps file
# times from a coarse clock (one tick: 1-10 ms), and stamps a write's as it starts,
# not as it copies: one write in place (the size kept) goes on changing the bytes
# under a key that no longer moves, for as long as it lasts.  A writer the kernel
# throttles on dirty pages waits up to 200 ms a pause; a 1 GiB write copies in
# ~0.3 s.  0.1 s until 2026-12-03: a CRC read 0.15 s into such a write was kept,
# and sent with the new bytes (helper 66).
RACY_NS = 1_000_000_000
# A filesystem that keeps whole seconds (ext4's 128-byte inodes; FAT keeps two) changes a
# file later in the second of its ctime without moving it: a wider window for such ctimes.
# A ctime of whole seconds lies on such a filesystem (the kernel's clock stamps nanoseconds).
COARSE_RACY_NS = 2 * SECOND + RACY_NS


def trusted_ctime(mtime_ns: int, ctime_ns: int) -> bool:
    """Whether a file's ctime, on a filesystem whose ctimes are trusted, moves with every write to it.

    Not when it is a whole second no later than the mtime: sshfs reports the
    mtime, in whole seconds, as the ctime (SFTP version 3 carries no ctime),
    and so might a filesystem not known to (``CtimeTrust``).  There an edit in
    place that keeps the size and puts the mtime back (an FTP client that
    preserves times, ``touch -r``) leaves the whole key as it was.  Nor a ctime
    at or before 1970 (a filesystem that reports none shows 0).  On a
    filesystem of whole seconds that keeps a real ctime, a file written once
    has it equal to its mtime too: its CRC is read again for every download,
    the price of telling the two apart by the key.
    """
    return ctime_ns > 0 and (ctime_ns % SECOND != 0 or ctime_ns > mtime_ns)


class CtimeTrust:
    """Whether a file's ctime moves with every write to it, so that its CRC may be kept by its key.

    Decided per filesystem as walks meet them (``learn``; a device never
    looked at is not trusted): not a FUSE one (its daemon reports what it likes,
    and sshfs and rclone's mount report the mtime) unless its type is in
    ``trusted_fuse`` (``ARCHIVER_TRUSTED_FUSE``: mergerfs passes its branches'
    ctimes through), nor exFAT, FAT or an image filesystem such as erofs
    (``filesystems.MTIME_AS_CTIME``), nor an overlay (composefs is one on erofs),
    nor any filesystem on a loop device (an image); and on any, not
    a ctime ``trusted_ctime`` refuses.  A file not trusted has its CRC read for
    every download and checked against its bytes as they go (racy), and its
    album's archive no ETag (``etag.archive_validator``).
    """

    def __init__(self, trusted_fuse: Iterable[str] = (), mountinfo: Path = MOUNTINFO) -> None:
        self.trusted_fuse = frozenset(trusted_fuse)
        self._mountinfo = mountinfo
        # Device -> its filesystem if trusted, else None, as last looked at (set in walkers'
        # and readers' threads: one store each).
        self._devices: dict[int, Filesystem | None] = {}

    def learn(self, fd: int, device: int) -> Filesystem | None:
        """Look at the filesystem ``fd`` (a folder a walk opened) lies on, ``device``; in a worker thread.

        Every walk calls this for each device it meets: a device number is
        reused by the next mount.  A filesystem that cannot be told is not trusted.
        Returns the filesystem if trusted, else None (``AlbumListing.filesystems``).
        """
        found = self._devices[device] = self._trusted(fd, device)
        return found

    def _trusted(self, fd: int, device: int) -> Filesystem | None:
        try:
            name = filesystem_name(fd, device, bool(self.trusted_fuse), self._mountinfo)
            if (name == KERNEL or name in self.trusted_fuse) and not on_a_loop_device(fd):
                return filesystem_of(fd)
            return None
        except OSError:  # cannot be told (a FUSE daemon gone between the calls)
            return None

    def device(self, device: int) -> bool:
        """Whether ctimes on ``device`` are trusted, as last looked at (never looked at: no)."""
        return self.filesystem(device) is not None

    def filesystem(self, device: int) -> int | None:
        """The id (``filesystems.filesystem_id``) of the trusted filesystem last seen on ``device``, else None.

        A device number names a filesystem only while it is mounted: the next
        mount may get it, and on btrfs every subvolume has one, which a
        snapshot made after one is deleted takes, with the inode numbers and
        times of the subvolume it copies (helper 159: a file of the same inode,
        size, mtime and ctime as one whose CRC was kept, and other bytes, sent
        under that CRC in a clean download).  The CRC index keeps each CRC
        under its filesystem's id too (btrfs: the subvolume's UUID; ext4: the
        filesystem's, which a copy of its blocks keeps), and the ETag covers it.
        """
        found = self._devices.get(device)
        return None if found is None else found.id

    def file(self, fd: int, key: FileKey) -> bool:
        """Whether the ctime in ``key``, of the file open as ``fd``, is trusted; its device looked at if never yet.

        And whether the file lies on the filesystem last seen on its device
        (``filesystem``): a CRC read from a subvolume deleted meanwhile is not
        kept under the id of the one that took its device number.
        """
        if key[0] not in self._devices:
            self.learn(fd, key[0])
        if not self(key):
            return False
        try:
            return filesystem_id(fd) == self.filesystem(key[0])
        except OSError:
            return False

    def __call__(self, key: FileKey) -> bool:
        return trusted_ctime(key[3], key[4]) and self.device(key[0])


def is_racy(key: FileKey, read_started_ns: int) -> bool:
    """Whether a CRC read from ``read_started_ns`` (time.time_ns) may not match every file with ``key``.

    Always, for a key whose ctime is not trusted (``trusted_ctime``).
    """
    return racy_times(key[3], key[4], read_started_ns)


def racy_times(mtime_ns: int, ctime_ns: int, read_started_ns: int) -> bool:
    """``is_racy`` of a file with these times: no key made (a walk's 20,000 files: 10 -> 5 ms)."""
    if not trusted_ctime(mtime_ns, ctime_ns):
        return True
    window = COARSE_RACY_NS if ctime_ns % SECOND == 0 else RACY_NS
    return ctime_ns >= read_started_ns - window
