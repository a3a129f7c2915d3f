"""A read-only FUSE passthrough of a folder whose reads hang while a gate file exists: storage that stops answering.

The gate file's text says what hangs, for how long, and where: ``[listing|metadata|flush|files] [seconds]
[/path ...]``.

- What: nothing named, reads of file data (as a hard-mounted NFS server gone does to
  the pages not cached; listing, ``stat`` and ``open`` go on); ``listing``, reading
  folders; ``metadata``, reading folders, ``stat`` and ``access`` (the album's name
  cannot even be resolved); ``flush``, closing a file (the FLUSH every ``close`` sends);
  ``files``, reading and closing files (a dead sshfs: what is open stays stuck).
- How long: with a number, each such call takes that many seconds (slow storage);
  without, it waits while the gate is there (dead storage), at most a minute.
- Where: with paths (from the mount's root, ``/b``), only calls on them hang; without, all do.

While a file named as the gate with ``-fail-closes`` added exists, every close fails with EIO;
while one with ``-fail-reads`` exists, every read fails, with the errno written in it (EIO if empty);
while one with ``-fail-stats`` exists, every ``stat`` of a file fails so (ESTALE if empty: NFS's file
replaced on the server, met at the next look at its attributes); with paths after the errno
(from the mount's root: ``5 a.bin``), only those files' stats fail.  While one with ``-short-reads``
exists, a file's data ends at half its size, its attributes unchanged (a file cut short on a network
server whose daemon still reports its old attributes: sshfs's own cache keeps them 20 s); with
paths in it (from the mount's root: ``/a.bin``), only those files'.

With ``--sftp-times`` it reports times as sshfs does (SFTP version 3 carries whole
seconds, and no ctime): every time is the mtime, in whole seconds.  With
``--mtime-as-ctime``, as rclone's mount does: the mtime, to the nanosecond, as the ctime.  With
``--an-hour-back``, every time an hour earlier than the source's: files the service takes as settled.
With ``--cached-attributes`` the kernel keeps what it is told of a file's attributes and names for
a minute, as libfuse and mergerfs do for a second by default: ``stat`` answers from there.

Run as ``python tests/gated_fs.py SOURCE MOUNTPOINT GATE [--sftp-times | --mtime-as-ctime | --an-hour-back]
[--cached-attributes] [--writable]`` (in the foreground, until unmounted).  For tests/test_dead_storage.py and
tests/test_crc_index.py.

With ``--writable`` the mount can be written (files made, written, cut, renamed and removed, as the
CRC index's SQLite file and its ``-wal`` and ``-shm`` need), and the gate's ``write`` holds each
such change and ``fsync``; ``all`` holds every call (an NFS server gone under a file written).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import sys
import time
from typing import Any

# libfuse 3, whose options these are (max_threads): mfusepy takes libfuse 2 where both are installed
# (Debian's mergerfs package brings it), and every mount failed with "unknown option".
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
from mfusepy import FUSE, FuseOSError, Operations, fuse_get_context  # type: ignore[import-untyped]

STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
# The calls each gate text holds.
# Beside the gate: a line for each call held, the calling thread's id (for a test to know what is held).
HELD = "-held"
# Beside the gate: every close(2) of a file fails with EIO while it exists.
FAIL_CLOSES = "-fail-closes"
# Beside the gate: every read of a file fails while it exists, with the errno written in it (EIO if empty).
FAIL_READS = "-fail-reads"
# Beside the gate: every stat of a file fails while it exists, with the errno written in it (ESTALE if empty);
# after the errno, the files' paths to fail (from the mount's root), if only those.
FAIL_STATS = "-fail-stats"
# Beside the gate: a file's data ends at half its size while it exists (the files named in it, if any).
SHORT_READS = "-short-reads"
HOUR_NS = 3600 * 1_000_000_000
CACHED_ATTRIBUTES = "--cached-attributes"
WRITABLE = "--writable"
GATED = {
    "read": {"read"},
    "listing": {"listing"},
    "metadata": {"listing", "metadata"},
    "flush": {"flush"},
    "files": {"read", "flush"},
    "write": {"write"},
    "all": {"read", "listing", "metadata", "flush", "write"},
}


class GatedFs(Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, source: str, gate: str, times: str = "", writable: bool = False) -> None:
        self.writable = writable
        self.source = source
        self.gate = gate
        self.times = times  # "", "--sftp-times", "--mtime-as-ctime" or "--an-hour-back"

    def _path(self, path: str) -> str:
        return self.source + path

    def _gate(self, kind: str, path: str = "") -> None:
        """Hold a call of ``kind`` (read, listing, metadata) on ``path`` as the gate says."""
        try:
            with open(self.gate) as gate:
                words = gate.read().split()
        except FileNotFoundError:
            return
        what = words.pop(0) if words and words[0] in GATED else "read"
        paths = [word for word in words if word.startswith("/")]
        words = [word for word in words if not word.startswith("/")]
        if kind not in GATED[what] or (paths and path not in paths):
            return
        with open(self.gate + HELD, "a") as held:  # for the test: a call is held now, from this thread
            held.write(f"{fuse_get_context()[2]}\n")
        if words:  # slow storage: each call (a read asks at most 128 KiB) takes this many seconds
            time.sleep(float(words[0]))
            return
        # Dead storage, at most a minute: a test that died with the gate shut must not wedge its readers for good.
        give_up = time.monotonic() + 60
        while os.path.exists(self.gate) and time.monotonic() < give_up:
            time.sleep(0.05)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        self._gate("metadata", path)
        found = os.lstat(self._path(path))
        attributes: dict[str, Any] = {name: getattr(found, name) for name in STAT_FIELDS}
        for name in ("st_atime", "st_mtime", "st_ctime"):
            attributes[name] = getattr(found, name + "_ns")
        if self.times == "--sftp-times":
            whole_seconds = found.st_mtime_ns - found.st_mtime_ns % 1_000_000_000
            attributes.update(st_atime=whole_seconds, st_mtime=whole_seconds, st_ctime=whole_seconds)
        elif self.times == "--mtime-as-ctime":
            attributes["st_ctime"] = found.st_mtime_ns
        elif self.times == "--an-hour-back":
            for name in ("st_atime", "st_mtime", "st_ctime"):
                attributes[name] -= HOUR_NS
        if stat.S_ISREG(found.st_mode):
            try:
                with open(self.gate + FAIL_STATS) as failure:
                    words = failure.read().split()
            except FileNotFoundError:
                words = None
            if words is not None and (len(words) < 2 or path.lstrip("/") in words[1:]):
                raise FuseOSError(int(words[0]) if words else errno.ESTALE)
        return attributes

    def access(self, path: str, amode: int) -> int:
        self._gate("metadata", path)
        return 0

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        self._gate("listing", path)
        # With use_ino each entry carries its inode (an entry of inode 0 is one readdir(3) passes over).
        folder = self._path(path)
        entries = [(name, os.lstat(os.path.join(folder, name))) for name in os.listdir(folder)]
        listed = [(name, {"st_ino": found.st_ino, "st_mode": found.st_mode}, 0) for name, found in entries]
        return [(".", {"st_ino": os.lstat(folder).st_ino, "st_mode": os.lstat(folder).st_mode}, 0), *listed]

    def open(self, path: str, flags: int) -> int:
        if not self.writable:
            return os.open(self._path(path), os.O_RDONLY)
        self._gate("metadata", path)
        return os.open(self._path(path), flags & ~(os.O_CREAT | os.O_EXCL))

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._gate("read")
        try:
            with open(self.gate + FAIL_READS) as failure:  # a bad sector, a network mount's error
                raise FuseOSError(int(failure.read().strip() or errno.EIO))
        except FileNotFoundError:
            pass
        try:
            with open(self.gate + SHORT_READS) as short:
                paths = short.read().split()
        except FileNotFoundError:
            return os.pread(fh, size, offset)
        data = os.pread(fh, size, offset)
        if paths and path not in paths:
            return data
        return data[: max(0, os.fstat(fh).st_size // 2 - offset)]

    def flush(self, path: str, fh: int) -> int:
        self._gate("flush")  # every close(2) of a file sends one
        if os.path.exists(self.gate + FAIL_CLOSES):  # as rclone's mount does when a file's checksum fails
            raise FuseOSError(errno.EIO)
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


class WritableGatedFs(GatedFs):
    """``GatedFs`` that can be written (``--writable``): the gate's ``write`` holds the changes."""

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._gate("write", path)
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._gate("write", path)
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._gate("write", path)
        if fh is None:
            os.truncate(self._path(path), length)
        else:
            os.ftruncate(fh, length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._gate("write", path)
        (os.fdatasync if datasync else os.fsync)(fh)
        return 0

    def unlink(self, path: str) -> int:
        self._gate("write", path)
        os.unlink(self._path(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        self._gate("write", new)
        os.rename(self._path(old), self._path(new))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._gate("write", path)
        os.mkdir(self._path(path), mode)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self._gate("write", path)
        os.chmod(self._path(path), mode)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._gate("write", path)
        os.utime(self._path(path), ns=times)
        return 0


def end_with_parent() -> None:
    """Have a SIGTERM sent here when the test run that started this dies: libfuse then unmounts.

    A run killed (a timeout, a session's end) otherwise left this daemon running, then a
    dead mount once it was killed in turn: one was found at the start of sessions 33 to 35.
    """
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    source, mountpoint, gate = sys.argv[1:4]
    end_with_parent()
    options = sys.argv[4:]
    times = next((option for option in options if option not in (CACHED_ATTRIBUTES, WRITABLE)), "")
    writable = WRITABLE in options
    # No kernel caching of attributes or names unless asked: each open sees the source as it is.
    cached = 60 if CACHED_ATTRIBUTES in options else 0
    # Up to 64 calls held at once (libfuse's default is 10 threads: more would queue unseen in the kernel).
    # The source's inode numbers (use_ino), as NFS and mergerfs show them: a file keeps its inode across mounts.
    FUSE(
        (WritableGatedFs if writable else GatedFs)(source, gate, times, writable),
        mountpoint,
        foreground=True,
        ro=not writable,
        attr_timeout=cached,
        entry_timeout=cached,
        max_threads=64,
        use_ino=True,
    )
