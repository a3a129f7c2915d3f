"""Which filesystem type holds a device, from ``/proc/self/mountinfo`` (proc(5)): for what its ctimes are worth.

The CRC index keys a file by its ctime, which a ``write`` always moves on a
filesystem of the kernel's own (ext4, xfs, btrfs, tmpfs, overlay, NFS, CIFS).
A FUSE filesystem reports whatever its daemon says: sshfs and rclone's mount
report the mtime as the ctime, so an edit that keeps the size and puts the
mtime back leaves the whole key as it was (``crc_index.CtimeTrust``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# Seconds a reading of the mount table is used for.  A device number is reused once its
# filesystem is unmounted (a FUSE mount's 0:N by the next one): read again, it names the new one.
FRESH_FOR = 1.0


def is_fuse(fs_type: str) -> bool:
    """Whether ``fs_type`` (mountinfo's name: ``fuse``, ``fuse.sshfs``, ``fuseblk``) is a FUSE filesystem."""
    return fs_type in ("fuse", "fuseblk") or fs_type.startswith("fuse.")


def read_mount_table(text: str) -> dict[int, str]:
    """Device number (``os.makedev``) -> filesystem type, from the text of a mountinfo file.

    A line: ``36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw``;
    field 3 is the device, and the field after the ``-`` separator the type.
    Where a device is mounted more than once, the last line counts (they
    name one filesystem).  Lines that do not parse are skipped.
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


class FilesystemTypes:
    """The filesystem type of a device, from a mount table read at most once every FRESH_FOR seconds; thread-safe."""

    def __init__(self, mountinfo: Path = MOUNTINFO) -> None:
        self._mountinfo = mountinfo
        self._lock = threading.Lock()
        self._types: dict[int, str] = {}
        self._read_at = -FRESH_FOR

    def of(self, device: int) -> str | None:
        """``device``'s filesystem type, or None if no mount names it (a btrfs subvolume's own, say)."""
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= FRESH_FOR:
                try:
                    self._types = read_mount_table(self._mountinfo.read_text(errors="replace"))
                except OSError:  # no /proc: nothing is known, as before this module
                    self._types = {}
                self._read_at = now
            return self._types.get(device)
