"""An album's CRCs read into the index at once (``archiver index``): racy files read again after their window."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .crc_index import CrcIndex, FilesystemView
from .crc_reads import READ_SIZE, small_file_crc
from .ctime_trust import COARSE_RACY_NS, RACY_NS, trusted_ctime
from .listed_files import FileUnreadable, Folders, failures_named, open_listed
from .producer_protocol import SECOND, FileChanged, OutOfResources


class AlbumCrcs(NamedTuple):
    """What ``album_crcs`` did: CRCs computed and kept; files left, their ctimes not trusted (``CtimeTrust``);
    files left as they changed while read, were changed within the racy window, or could not be read."""

    computed: int
    untrusted: int
    changing: int = 0
    unreadable: tuple[str, ...] = ()  # "path: reason" of each file the storage failed to read (EIO)


def album_crcs(
    album: Path,
    files: list[tuple[str, int]],
    index: CrcIndex,
    progress: Callable[[int], None] | None = None,
    view: FilesystemView | None = None,
) -> AlbumCrcs:
    """Put the CRC of each (relative path, size) in ``album`` into ``index``, synchronously.

    For ``archiver index``; a file that changed or vanished meanwhile is
    skipped, and so is one whose CRC would not be kept (read for every
    download anyway).  Files changed within the racy window of their read (an
    upload hook runs a moment after the upload) are read once more when it has
    passed, up to COARSE_RACY_NS later.  ``progress`` is called with the count of files done after each.
    ``view``: the walk's that listed ``files`` (``CrcIndex.read_filesystem``).
    """
    folders = Folders()
    try:
        return _album_crcs(album, files, index, progress, folders, view)
    finally:
        folders.close()


def _album_crcs(
    album: Path,
    files: list[tuple[str, int]],
    index: CrcIndex,
    progress: Callable[[int], None] | None,
    folders: Folders,
    view: FilesystemView | None,
) -> AlbumCrcs:
    buffer = bytearray(READ_SIZE)
    new = untrusted = 0
    racy: dict[tuple[str, int], int] = {}  # (path, size) -> when its read may be kept (time.time_ns)
    unreadable: list[str] = []
    reader = _Reader(index, buffer, racy, unreadable, folders, view)
    for done, (relative, size) in enumerate(files, 1):
        if progress is not None:
            progress(done)
        try:
            fd, key = open_listed(album / relative, size, folders=folders)
            try:
                with failures_named(album / relative):  # its fstatfs (EIO)
                    filesystem = index.read_filesystem(fd, key, view)
            finally:
                os.close(fd)
        except FileChanged:
            racy[relative, size] = 0
            continue
        except (FileUnreadable, OutOfResources) as error:  # at the open (helper 72: a traceback, CRCs lost)
            racy[relative, size] = 0
            unreadable.append(str(error))
            continue
        if filesystem is None:
            untrusted += 1
        elif index.get(key, filesystem) is None:
            new += reader.read_to_keep(album / relative, (relative, size))
    if settles := [when for when in racy.values() if when]:
        # At most the coarse window: a ctime ahead of this host's clock (a file server's) is no reason to wait longer.
        time.sleep(min(COARSE_RACY_NS, max(0, max(settles) - time.time_ns())) / SECOND)
        for relative, size in [file for file, when in racy.items() if when]:
            del racy[relative, size]
            new += reader.read_to_keep(album / relative, (relative, size))
    index.flush()
    # Not "already known" either (helper 70): read again when downloaded.
    return AlbumCrcs(new, untrusted, len(racy) - len(unreadable), tuple(unreadable))


class _Reader(NamedTuple):
    """What reading a file's CRC into the index needs, and where it notes a file to try again or that failed."""

    crcs: CrcIndex
    buffer: bytearray
    racy: dict[tuple[str, int], int]
    unreadable: list[str]
    folders: Folders
    view: FilesystemView | None

    def read_to_keep(self, path: Path, file: tuple[str, int]) -> bool:
        """Read ``path``'s CRC into the index: True if kept; else ``racy[file]`` says when to try again (0: not)."""
        try:
            result = small_file_crc(path, file[1], self.crcs, self.buffer, folders=self.folders, view=self.view)
        except FileChanged:
            self.racy[file] = 0
            return False
        except (FileUnreadable, OutOfResources) as error:  # a failing disk: for the hook's exit status, named
            self.racy[file] = 0
            self.unreadable.append(str(error))
            return False
        if result.racy:
            ctime = result.key[4]
            window = COARSE_RACY_NS if ctime % SECOND == 0 else RACY_NS
            self.racy[file] = ctime + window + 1 if trusted_ctime(*result.key[3:]) else 0  # untrusted: racy for good
        return not result.racy
