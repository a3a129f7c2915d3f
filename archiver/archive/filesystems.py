"""Which filesystem a directory lies on: ``fstatfs``'s magic number (statfs(2)), and for FUSE its type in
``/proc/self/mountinfo`` (proc(5)).  For what its ctimes are worth (``ctime_trust.CtimeTrust``).

The CRC index keys a file by its ctime, which a ``write`` always moves on most
filesystems of the kernel's own.  Not on all: exFAT and FAT report the mtime
(or, FAT before Linux 6.0, the creation time) as the ctime.  A FUSE filesystem
reports whatever its daemon says: sshfs and rclone's mount report the mtime
too, so an edit that keeps the size and puts the mtime back leaves the whole
key as it was.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# statfs(2) f_type values (linux/magic.h).  fuseblk (ntfs-3g, exfat-fuse) and virtiofs have FUSE's too.
FUSE_SUPER_MAGIC = 0x65735546
EXFAT_SUPER_MAGIC = 0x2011BAB0
MSDOS_SUPER_MAGIC = 0x4D44
# Kernel filesystems whose ctime does not show every write, by magic: exFAT reports the mtime;
# FAT (vfat, msdos) the mtime since Linux 6.0, and before it the creation time.
MTIME_AS_CTIME = {EXFAT_SUPER_MAGIC: "exfat", MSDOS_SUPER_MAGIC: "vfat"}
# What ``filesystem_name`` calls any other filesystem of the kernel's.
KERNEL = "kernel"


class _Statfs(ctypes.Structure):
    # Linux's struct statfs begins with f_type, a long (__fsword_t), but for s390x's unsigned int.
    # The rest (at most 120 bytes on 64-bit systems) is room for the kernel to write into.
    _fields_ = [
        ("f_type", ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_long),
        ("rest", ctypes.c_byte * 256),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def filesystem_magic(fd: int) -> int:
    """The f_type of the filesystem ``fd`` lies on (``fstatfs``); OSError if it cannot be had."""
    found = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(found)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(found.f_type) & 0xFFFFFFFF


def is_fuse(fs_type: str) -> bool:
    """Whether ``fs_type`` (mountinfo's name: ``fuse``, ``fuse.sshfs``, ``fuseblk``) is a FUSE filesystem."""
    return fs_type in ("fuse", "fuseblk") or fs_type.startswith("fuse.")


def read_mount_table(text: str) -> dict[int, str]:
    """Device number (``os.makedev``) -> filesystem type, from the text of a mountinfo file.

    A line: ``36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw``;
    field 3 is the device, and the field after the ``-`` separator the type.
    Lines that do not parse are skipped.
    """
    types: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            major, minor = fields[2].split(":")
            types[os.makedev(int(major), int(minor))] = fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue
    return types


def filesystem_name(directory_fd: int, device: int, fuse_type_wanted: bool, mountinfo: Path = MOUNTINFO) -> str:
    """What the filesystem of ``directory_fd`` (on ``device``) is, as far as its ctimes go.

    For FUSE, ``fuse`` or mountinfo's type for it (``fuse.sshfs``, ``virtiofs``;
    looked up only if ``fuse_type_wanted``, in the table as it is now: a device
    number is reused by the next mount); ``exfat`` or ``vfat``; else ``KERNEL``.
    OSError if ``fstatfs`` fails (on FUSE, its daemon is asked, and may not answer).
    """
    magic = filesystem_magic(directory_fd)
    if magic != FUSE_SUPER_MAGIC:
        return MTIME_AS_CTIME.get(magic, KERNEL)
    if not fuse_type_wanted:
        return "fuse"
    try:
        return read_mount_table(mountinfo.read_text(errors="replace")).get(device, "fuse")
    except OSError:  # no /proc: its type cannot be told
        return "fuse"
