"""A file's status as its filesystem has it now, past what the kernel keeps of a FUSE or NFS file's attributes.

Standard library only, and no ``typing``: the producer program imports this,
and so does the service (``crc_reads``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

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
_statx = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)
if _statx is not None:
    _statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p)
    _statx.restype = ctypes.c_int


def uncached_status(fd: int) -> tuple[int, FileKey]:
    """``fd``'s mode and key (device, inode, size, mtime_ns, ctime_ns), asked of its filesystem, not the kernel's cache.

    ``fstat``'s where statx is not to be had (an older kernel or C library,
    a sandbox that refuses it).  OSError as ``fstat`` raises it.
    """
    global _statx
    if _statx is not None:
        buffer = ctypes.create_string_buffer(_STATX_SIZE)
        if _statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS, buffer) == 0:
            mask, mode, inode, size, ctime, ctime_ns, mtime, mtime_ns, major, minor = _STATX.unpack_from(buffer)
            if mask & _STATX_NEEDED == _STATX_NEEDED:
                device = os.makedev(major, minor)
                return mode, (device, inode, size, mtime * 1_000_000_000 + mtime_ns, ctime * 1_000_000_000 + ctime_ns)
        else:
            failure = ctypes.get_errno()
            if failure not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                raise OSError(failure, os.strerror(failure))
            _statx = None  # not offered here: fstat from now on
    status = os.fstat(fd)
    return status.st_mode, (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
