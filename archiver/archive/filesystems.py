"""Which filesystem a directory lies on: ``fstatfs``'s magic number (statfs(2)), and for FUSE its type in
``/proc/self/mountinfo`` (proc(5)).  For what its ctimes are worth (``ctime_trust.CtimeTrust``).

The CRC index keys a file by its ctime, which a ``write`` always moves on most
filesystems of the kernel's own.  Not on all: exFAT and FAT report the mtime
(or, FAT before Linux 6.0, the creation time) as the ctime, and the read-only
image filesystems (erofs, squashfs, ISO 9660, cramfs, romfs) a time stored in
the image, the mtime or none.  A FUSE filesystem reports whatever its daemon
says: sshfs and rclone's mount report the mtime too, so an edit that keeps the
size and puts the mtime back leaves the whole key as it was.  An overlay
reports its layers' times, and which filesystems those are cannot be told
from its mount's options (paths as they were given, "/" for a layer passed by
descriptor, as composefs does: helper 96).  And a filesystem built as an
image (``mkfs.ext4 -d`` copies each file's ctime, in whole seconds) holds
times no write of its own stamped: one on a loop device is taken for an
image (``on_a_loop_device``).  Such an image built again from files edited in
place, their mtimes put back, and mounted on the same loop device shows every
file under its old key (helpers 95, 96).  The kernel's SMB client reports the
server's ChangeTime, which Samba makes the mtime (helper 97).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from .filesystem_uuids import IOC_SIZEBITS, UNKNOWN, filesystem_uuid, names_only_the_device, subvolume_uuid

MOUNTINFO = Path("/proc/self/mountinfo")
# statfs(2) f_type values (linux/magic.h).  fuseblk (ntfs-3g, exfat-fuse) and virtiofs have FUSE's too.
FUSE_SUPER_MAGIC = 0x65735546
EXFAT_SUPER_MAGIC = 0x2011BAB0
MSDOS_SUPER_MAGIC = 0x4D44
OVERLAYFS_SUPER_MAGIC = 0x794C7630
# Kernel filesystems whose ctime does not show every write, by magic: exFAT reports the mtime;
# FAT (vfat, msdos) the mtime since Linux 6.0, and before it the creation time.  The image
# filesystems: erofs and squashfs the image's mtime, ISO 9660 its recording time, cramfs and romfs 0.
MTIME_AS_CTIME = {
    EXFAT_SUPER_MAGIC: "exfat",
    MSDOS_SUPER_MAGIC: "vfat",
    0xE0F5E1E2: "erofs",
    0x73717368: "squashfs",
    0x9660: "isofs",
    0x28CD3D45: "cramfs",
    0x7275: "romfs",
    # The kernel's SMB client reports the server's ChangeTime as the ctime, and Samba sends the mtime
    # as that (helper 97): a NAS's share shows an edit with its mtime put back as no change at all.
    0xFF534D42: "cifs",
    0xFE534D42: "smb3",
    0x517B: "smbfs",
}
OVERLAY = "overlay"
# 9p (QEMU's virtfs) mounted with cache=loose or fscache, or any mode that keeps metadata, answers
# stat from the inode it keeps, whatever the host did, and ignores AT_STATX_FORCE_SYNC
# (fs/9p/vfs_inode_dotl.c): an edit made on the host is never seen, and with its pages dropped
# and read again a file mixes old bytes and new under the old key (helper 150).  How mountinfo
# shows its cache mode: the mode's bare name (",loose", ",fscache", ",mmap": v9fs_show_options
# printed ",%s" until Linux 6.4; Debian 12's 6.1, WSL2's 5.15), then ``cache=`` and its bits in
# hex ("cache=f", since 2025 "cache=0xf"; CACHE_META 0x2 and CACHE_LOOSE 0x8 keep attributes:
# fs/9p/v9fs.h), or, before 9p had show_options, the options as mounted ("cache=loose").
# cache=none (the default, not shown), readahead and mmap do not keep attributes.
V9FS_MAGIC = 0x01021997
NINE_P_CACHED = "9p, attributes kept"
_NINE_P_MODES = {"none": 0x0, "readahead": 0x1, "mmap": 0x5, "loose": 0xF, "fscache": 0x8F}
_NINE_P_KEEPING_ATTRIBUTES = 0x2 | 0x8
# The modes mountinfo names bare, before Linux 6.4 (v9fs_cache_modes: none is never shown).
_NINE_P_BARE_MODES = {"loose", "fscache", "mmap"}
BTRFS_SUPER_MAGIC = 0x9123683E
SYS_BLOCK = Path("/sys/dev/block")
SYS_BTRFS = Path("/sys/fs/btrfs")
# BTRFS_IOC_FS_INFO, _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args): 1,024 bytes, the fsid at 16 (linux/btrfs.h).
_BTRFS_IOC_FS_INFO = (2 << (16 + IOC_SIZEBITS)) | (1024 << 16) | (0x94 << 8) | 31
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


class Filesystem(NamedTuple):
    """A filesystem as a walk saw it: what tells it from another given the same device number later.

    ``fsid``: ``statfs``'s ``f_fsid`` (statfs(2)), unsigned 64 bits; NFS
    reports 0 on every client (nfs_statfs sets none).  ``subvolume``: on
    btrfs the subvolume's UUID (16 bytes), else UNKNOWN: btrfs's ``f_fsid``
    is its UUID with the subvolume's number, which is given again after a
    remount, with its device number (helper 160).  ``uuid``: the
    filesystem's own (``filesystem_uuid``) where ``f_fsid`` is only the
    device's number, as XFS's is (helper 161), else UNKNOWN.  A UUID is
    never given again (``filesystem_uuids``).
    """

    fsid: int
    subvolume: bytes = UNKNOWN
    uuid: bytes = UNKNOWN

    @property
    def id(self) -> int:
        """The id the CRC index keys by and the ETag covers: a signed 64-bit integer."""
        fsid = self.fsid
        if self.subvolume or self.uuid:
            mixed = hashlib.blake2b(fsid.to_bytes(8, "little") + self.subvolume + self.uuid, digest_size=8)
            fsid = int.from_bytes(mixed.digest(), "little")
        return fsid - 2**64 if fsid >= 2**63 else fsid


def trusted_ids(filesystems: Mapping[int, Filesystem | None]) -> dict[int, int]:
    """Device -> id (``Filesystem.id``) of each trusted filesystem of a walk's (``AlbumListing.filesystems``)."""
    return {device: seen.id for device, seen in filesystems.items() if seen is not None}


def filesystem_of(fd: int) -> Filesystem:
    """The filesystem ``fd`` lies on; OSError if ``fstatfs`` fails."""
    fsid = os.fstatvfs(fd).f_fsid
    if filesystem_magic(fd) == BTRFS_SUPER_MAGIC:
        return Filesystem(fsid, subvolume_uuid(fd))  # before Linux 4.18: the f_fsid alone
    if names_only_the_device(fsid, os.fstat(fd).st_dev):
        return Filesystem(fsid, uuid=filesystem_uuid(fd))  # before Linux 6.9: the device alone
    return Filesystem(fsid)


def filesystem_id(fd: int) -> int:
    """The id (``Filesystem.id``) of the filesystem ``fd`` lies on; OSError if ``fstatfs`` fails."""
    return filesystem_of(fd).id


def read_mount_table(text: str, field: int = 1) -> dict[int, str]:
    """Device number (``os.makedev``) -> filesystem type, from the text of a mountinfo file.

    A line: ``36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw``;
    field 3 is the device, and the field after the ``-`` separator the type;
    with ``field`` 3, the filesystem's own options (the rest of the line: 9p prints
    its ``uname`` and ``aname`` unescaped, a space and all).  Lines that do not
    parse are skipped.
    """
    types: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            major, minor = fields[2].split(":")
            at = fields.index("-", 6) + field
            types[os.makedev(int(major), int(minor))] = fields[at] if field < 3 else " ".join(fields[at:])
        except (IndexError, ValueError):
            continue
    return types


def mount_table(text: str) -> list[tuple[int, int, str]]:
    """(mount ID, parent ID, mount point) of each line of a mountinfo file's text, in its order (proc(5)).

    The mount point's octal escapes undone (``\\040``: a space); lines that do not parse are skipped.
    """
    table = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            point = re.sub(r"\\([0-7]{3})", lambda escape: chr(int(escape.group(1), 8)), fields[4])
            table.append((int(fields[0]), int(fields[1]), point))
        except (IndexError, ValueError):
            continue
    return table


def nine_p_keeps_attributes(options: str) -> bool:
    """Whether a 9p mount with these options (mountinfo's last field) answers stat from what it keeps.

    True where its ``cache=`` cannot be read; no ``cache=`` is cache=none.
    """
    for option in options.split(","):
        if option in _NINE_P_BARE_MODES:  # before Linux 6.4: ",loose", not ",cache=loose"
            return bool(_NINE_P_MODES[option] & _NINE_P_KEEPING_ATTRIBUTES)
        name, _, value = option.partition("=")
        if name != "cache":
            continue
        try:
            bits = _NINE_P_MODES[value] if value in _NINE_P_MODES else int(value, 16)
        except ValueError:
            return True
        return bool(bits & _NINE_P_KEEPING_ATTRIBUTES)
    return False


def filesystem_name(directory_fd: int, device: int, fuse_type_wanted: bool, mountinfo: Path = MOUNTINFO) -> str:
    """What the filesystem of ``directory_fd`` (on ``device``) is, as far as its ctimes go.

    For FUSE, ``fuse`` or mountinfo's type for it (``fuse.sshfs``, ``virtiofs``;
    looked up only if ``fuse_type_wanted``, in the table as it is now: a device
    number is reused by the next mount); ``OVERLAY``; a name of ``MTIME_AS_CTIME``;
    ``NINE_P_CACHED`` for a 9p mount that keeps attributes (mountinfo's options);
    else ``KERNEL``.
    OSError if ``fstatfs`` fails (on FUSE, its daemon is asked, and may not answer).
    """
    magic = filesystem_magic(directory_fd)
    if magic == OVERLAYFS_SUPER_MAGIC:
        return OVERLAY
    if magic == V9FS_MAGIC:
        try:
            options = read_mount_table(mountinfo.read_text(errors="replace"), field=3).get(device)
        except OSError:  # no /proc: its cache cannot be told
            options = None
        return NINE_P_CACHED if options is None or nine_p_keeps_attributes(options) else KERNEL
    if magic != FUSE_SUPER_MAGIC:
        return MTIME_AS_CTIME.get(magic, KERNEL)
    if not fuse_type_wanted:
        return "fuse"
    try:
        return read_mount_table(mountinfo.read_text(errors="replace")).get(device, "fuse")
    except OSError:  # no /proc: its type cannot be told
        return "fuse"


def on_a_loop_device(fd: int, sys_block: Path = SYS_BLOCK, sys_btrfs: Path = SYS_BTRFS) -> bool:
    """Whether the filesystem of ``fd`` lies on a loop device (a file's image), or on a device stacked on one.

    Its device is ``fd``'s; for btrfs, which numbers each subvolume anew,
    every device sysfs lists for its fsid (``BTRFS_IOC_FS_INFO``).  A
    device-mapper or md device is stacked on what sysfs lists as its slaves.
    True where it cannot be told: no sysfs (a chroot), a btrfs not listed.
    """
    if not sys_block.is_dir():
        return True
    device = os.fstat(fd).st_dev
    if os.major(device) != 0:
        return loop_backed(sys_block / f"{os.major(device)}:{os.minor(device)}")
    if filesystem_magic(fd) != BTRFS_SUPER_MAGIC:
        return False  # tmpfs, NFS, overlay, FUSE...: numbered anew, on no block device
    arguments = bytearray(1024)
    try:
        fcntl.ioctl(fd, _BTRFS_IOC_FS_INFO, arguments)
        members = list((sys_btrfs / str(uuid.UUID(bytes=bytes(arguments[16:32]))) / "devices").iterdir())
    except OSError:
        return True
    return not members or any(loop_backed(member) for member in members)


def loop_backed(device: Path, depth: int = 0) -> bool:
    """Whether block device ``device`` (sysfs's ``dev/block/M:m``) is a loop device, or a partition of one, or on one.

    True where sysfs does not say (a sandbox's partial ``/sys``): it is a block device's number.
    """
    try:
        folder = device.resolve(strict=True)
    except OSError:
        return True
    if (folder / "partition").is_file():  # loop0p1, md0p1: what its disk is
        folder = folder.parent
    if (folder / "loop").is_dir():
        return True
    try:
        slaves = os.listdir(folder / "slaves")
    except OSError:
        return False  # a disk of its own
    # Device-mapper (dm-crypt, LVM) and md name the devices they stand on; a few levels at most.
    return depth >= 8 or any(loop_backed(folder / "slaves" / slave, depth + 1) for slave in slaves)
