"""A read-only FUSE passthrough of a folder whose reads hang while a gate file exists: storage that stops answering.

A gate file holding a number slows each read by that many seconds instead (slow storage).

Run as ``python tests/gated_fs.py SOURCE MOUNTPOINT GATE`` (in the foreground, until
unmounted).  Only reads of file data hang (as a hard-mounted NFS server gone does
to the pages not cached): listing, ``stat`` and ``open`` go on.  For tests/test_dead_storage.py.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from mfusepy import FUSE, Operations  # type: ignore[import-untyped]

STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")


class GatedFs(Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, source: str, gate: str) -> None:
        self.source = source
        self.gate = gate

    def _path(self, path: str) -> str:
        return self.source + path

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        found = os.lstat(self._path(path))
        attributes: dict[str, Any] = {name: getattr(found, name) for name in STAT_FIELDS}
        for name in ("st_atime", "st_mtime", "st_ctime"):
            attributes[name] = getattr(found, name + "_ns")
        return attributes

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        try:
            with open(self.gate) as gate:
                delay = gate.read().strip()
        except FileNotFoundError:
            return os.pread(fh, size, offset)
        if delay:  # slow storage: each read (at most 128 KiB) takes this many seconds
            time.sleep(float(delay))
            return os.pread(fh, size, offset)
        # Dead storage, at most a minute: a test that died with the gate shut must not wedge its readers for good.
        give_up = time.monotonic() + 60
        while os.path.exists(self.gate) and time.monotonic() < give_up:
            time.sleep(0.05)
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


if __name__ == "__main__":
    source, mountpoint, gate = sys.argv[1:4]
    # No kernel caching of attributes or names: each open sees the source as it is.
    FUSE(GatedFs(source, gate), mountpoint, foreground=True, ro=True, attr_timeout=0, entry_timeout=0)
