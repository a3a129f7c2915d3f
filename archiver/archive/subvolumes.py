"""The UUID of the btrfs subvolume a file lies on (``BTRFS_IOC_GET_SUBVOL_INFO``, linux/btrfs.h; Linux 4.18).

btrfs gives each subvolume a device number of its own, which a snapshot
made after a subvolume is deleted takes, and its ``f_fsid`` (the
filesystem's UUID with the subvolume's number) is given again after a
remount (helpers 159, 160).  A subvolume's UUID is never given again: the
service keys CRCs by it (``filesystems.filesystem_id``), and the producer
checks by it that a file lies on the subvolume the walk saw
(``producer_files.Album``).

Standard library only, and no ``typing``: the producer program imports this.
"""

from __future__ import annotations

import fcntl
import os

# _IOR's read bit lies above 14 bits of size, but for powerpc's, mips's and sparc's 13 (asm/ioctl.h).
IOC_SIZEBITS = 13 if os.uname().machine.startswith(("ppc", "powerpc", "mips", "sparc")) else 14
# BTRFS_IOC_GET_SUBVOL_INFO, _IOR(0x94, 60, struct btrfs_ioctl_get_subvol_info_args): 504 bytes, the
# subvolume's UUID at 296.
_GET_SUBVOL_INFO = (2 << (16 + IOC_SIZEBITS)) | (504 << 16) | (0x94 << 8) | 60
_UUID_AT = 296
# What ``subvolume_uuid`` gives where the kernel does not tell.
UNKNOWN = b""


def subvolume_uuid(fd: int) -> bytes:
    """The UUID (16 bytes) of the btrfs subvolume ``fd`` lies on; UNKNOWN where the ioctl fails (before Linux 4.18).

    Only for a descriptor on btrfs (``f_type`` BTRFS_SUPER_MAGIC): on another
    filesystem an ioctl of this number may mean anything, and a FUSE daemon
    is asked it.
    """
    arguments = bytearray(504)
    try:
        fcntl.ioctl(fd, _GET_SUBVOL_INFO, arguments)
    except OSError:
        return UNKNOWN
    return bytes(arguments[_UUID_AT : _UUID_AT + 16])
