"""The UUIDs that tell one filesystem from another where the numbers do not: btrfs's subvolumes, XFS.

A device number names a filesystem only while it is mounted.  btrfs gives
each subvolume a device number of its own, which a snapshot made after a
subvolume is deleted takes, and its ``f_fsid`` (the filesystem's UUID with
the subvolume's number) is given again after a remount (helpers 159, 160):
a subvolume's UUID is never given again (``BTRFS_IOC_GET_SUBVOL_INFO``,
linux/btrfs.h; Linux 4.18).  XFS's ``f_fsid`` is its block device's number
(xfs_fs_statfs), which any other XFS on that device keeps (helper 161:
an image written over it with ``dd``): its UUID is the filesystem's
(``FS_IOC_GETFSUUID``, linux/fs.h; Linux 6.9).  The service keys CRCs by
them (``filesystems.Filesystem``), and the producer checks by them that a
file lies on the filesystem the walk saw (``producer_files.Album``).

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
# FS_IOC_GETFSUUID, _IOR(0x15, 0, struct fsuuid2): a length byte, then up to 16 bytes (linux/fs.h).  The
# VFS answers it from the superblock, before any filesystem's own ioctls (a FUSE daemon is not asked).
_GETFSUUID = (2 << (16 + IOC_SIZEBITS)) | (17 << 16) | (0x15 << 8) | 0
# What ``subvolume_uuid`` and ``filesystem_uuid`` give where the kernel does not tell.
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


def filesystem_uuid(fd: int) -> bytes:
    """The UUID of the filesystem ``fd`` lies on, as its superblock has it; UNKNOWN where not told (before Linux 6.9).

    Some filesystems keep none (tmpfs, NFS): UNKNOWN.
    """
    arguments = bytearray(17)
    try:
        fcntl.ioctl(fd, _GETFSUUID, arguments)
    except OSError:
        return UNKNOWN
    return bytes(arguments[1 : 1 + min(arguments[0], 16)])


def names_only_the_device(fsid: int, device: int) -> bool:
    """Whether ``fsid`` (``statvfs``'s ``f_fsid``) is only ``device``'s number, as XFS's is (xfs_fs_statfs).

    The kernel's encoding of a device number (huge_encode_dev), which glibc's
    ``f_fsid`` then carries in its low 32 bits.
    """
    major, minor = os.major(device), os.minor(device)
    return fsid == (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
