"""A file's status as its filesystem has it now, past what the kernel keeps of a FUSE or NFS file's attributes.

Standard library only, and no ``typing``: the producer program imports this,
and so does the service (``crc_reads``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import threading

from archiver.archive.producer_protocol import FileKey

# statx(2) (Linux 4.11, glibc 2.28) with AT_STATX_FORCE_SYNC: FUSE and NFS answer fstat from the
# attributes the kernel keeps (libfuse's and mergerfs's attr_timeout, 1 s; NFS's acregmin, 3 s),
# which hide a change made beneath the mount (on a branch, on the server) meanwhile: the old key
# passed every check while the new bytes went out under the old CRC (helper 148).  Filesystems
# of the kernel's own ignore the flag.  Fields: stx_mask, stx_mode, stx_ino, stx_size, stx_ctime
# and stx_mtime (seconds, nanoseconds), stx_dev_major and stx_dev_minor (linux/stat.h).
_STATX = struct.Struct("<I24xH2xQQ48xqI4xqI4x8xII")
_STATX_SIZE = 256
_AT_EMPTY_PATH, _AT_STATX_FORCE_SYNC = 0x1000, 0x2000
_STATX_BASIC_STATS = 0x7FF
# What the key needs: STATX_MODE, STATX_INO, STATX_SIZE, STATX_MTIME and STATX_CTIME.
_STATX_NEEDED = 0x2 | 0x100 | 0x200 | 0x40 | 0x80
_AT_FDCWD, _AT_SYMLINK_NOFOLLOW = -100, 0x100


def _offered_statx() -> ctypes._CFunctionType | None:
    """The C library's statx, or None where it is refused: decided once, at import."""
    # int statx(int, const char *, int, unsigned int, struct statx *): called without argtypes, whose
    # conversions cost more than the call (every argument an int, bytes or a buffer, the result int).
    function: ctypes._CFunctionType | None = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)
    if function is None:
        return None
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    # Asked of "/" (a local filesystem, where the flag costs nothing): an old kernel (ENOSYS, which
    # glibc then emulates), a sandbox that refuses the call (EPERM) or the flag (EINVAL).  Never
    # decided by a file's own answer: a FUSE daemon or an NFS server may answer EPERM or EINVAL
    # for one file, which must fail that file's check, not turn every later check to the kernel's
    # cached attributes (helper 150: a clean 200, the edited file under its old CRC).
    if function(_AT_FDCWD, b"/", _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS, buffer) != 0:
        return None
    return function


# Never reassigned: the service calls uncached_status from worker threads (helper 150: a
# reassignment between its test and the call was a TypeError).
_statx = _offered_statx()
# Each thread's own buffer for statx to fill (the CRC reads run in the service's worker threads).
_buffers = threading.local()


def _status(fd: int, path: bytes, flags: int) -> tuple[int, FileKey] | None:
    """(mode, key) by statx, asked of the filesystem; None where statx is not offered or left a field out."""
    if _statx is None:
        return None
    try:
        buffer = _buffers.statx
    except AttributeError:
        buffer = _buffers.statx = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, path, flags | _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS, buffer) != 0:
        failure = ctypes.get_errno()
        raise OSError(failure, os.strerror(failure))
    fields: tuple[int, ...] = _STATX.unpack_from(buffer)
    mask, mode, inode, size, ctime, ctime_ns, mtime, mtime_ns, major, minor = fields
    if mask & _STATX_NEEDED != _STATX_NEEDED:
        return None
    device = os.makedev(major, minor)
    return mode, (device, inode, size, mtime * 1_000_000_000 + mtime_ns, ctime * 1_000_000_000 + ctime_ns)


def statx_offered() -> bool:
    """Whether this process asks files' filesystems (statx), or only the kernel's copy (fstat: said at start)."""
    return _statx is not None


def uncached_status(fd: int) -> tuple[int, FileKey]:
    """``fd``'s mode and key (device, inode, size, mtime_ns, ctime_ns), asked of its filesystem, not the kernel's cache.

    ``fstat``'s where statx is not to be had (an older kernel or C library,
    a sandbox that refuses it).  OSError as ``fstat`` raises it.
    """
    found = _status(fd, b"", _AT_EMPTY_PATH)
    if found is not None:
        return found
    status = os.fstat(fd)
    return status.st_mode, (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def uncached_path_status(path: bytes) -> tuple[int, FileKey]:
    """``uncached_status`` of what ``path`` names, a link at its last part not followed (``os.lstat`` without statx)."""
    found = _status(_AT_FDCWD, path, _AT_SYMLINK_NOFOLLOW)
    if found is not None:
        return found
    status = os.lstat(path)
    return status.st_mode, (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def refresh_attributes(fd: int) -> None:
    """Have the kernel fetch a FUSE or NFS file's attributes anew: a file found short or long before its check."""
    with contextlib.suppress(OSError):  # the change found is the news
        uncached_status(fd)
