"""The producer's files: each opened beneath the album without following a link, and checked to be the one planned.

A file is the one planned if it is a regular file with the planned device,
inode, size, mtime and ctime (its ``FileKey``): checked before
any of its bytes goes out, and after, the check after asked of the filesystem
itself, past the attributes the kernel keeps of a FUSE or NFS file (``uncached_status``).

Standard library only, and no ``typing``: the producer program imports this.
"""

from __future__ import annotations

import contextlib
import os
import stat

from archiver.archive.filesystem_uuids import filesystem_uuid, subvolume_uuid
from archiver.archive.producer_protocol import CHANGED_ERRNOS, RESOURCE_ERRNOS, FileChanged, FileKey, OutOfResources
from archiver.archive.real_paths import open_real_directory
from archiver.archive.sparse import Holes
from archiver.archive.uncached_status import uncached_status

# A path's parts that would not name an entry of the directory they are in.
_NOT_NAMES = (b"", b".", b"..")


class Album:
    """The album's directory, and files opened beneath it without following a link.

    ``filesystems``: device -> (f_fsid, btrfs subvolume's UUID or b"", the filesystem's UUID or b""), the
    trusted filesystem the walk saw on it (``ArchivePlan.filesystems``).  A
    device number names a filesystem only while it is mounted, and on btrfs a
    snapshot made after a subvolume is deleted takes its number, with the
    inode numbers and times of what it copies: an album swapped for such a
    snapshot between the walk and the producer kept every key, and its files
    were sent under the CRCs the index kept for the other's (helper 160).
    FileChanged unless the album lies on the filesystem seen on its device.
    """

    def __init__(self, directory: bytes, filesystems: dict[int, tuple[int, bytes, bytes]] | None = None) -> None:
        # The album's real path (the service resolved it), opened a folder at a time: a link put
        # in its place, or in the place of any folder on its path, is refused (real_paths).
        self._filesystems = filesystems or {}
        try:
            self.root = open_real_directory(directory)
            # Checked once: while the album is held open its filesystem stays mounted (a subvolume
            # is not freed), and no other is given its device number.  Files on other devices: each.
            self._root_device = os.fstat(self.root).st_dev
            on_filesystem_seen = self._on_filesystem_seen(self.root, self._root_device)
        except OSError as error:
            reason = f"the album {os.fsdecode(directory)}: {error.strerror or error}"
            if error.errno in RESOURCE_ERRNOS:  # no descriptor left: a moment's, not the album's
                raise OutOfResources(reason) from None
            if error.errno not in CHANGED_ERRNOS:
                raise OSError(error.errno, reason) from None  # the storage's (EIO...), named
            raise FileChanged(reason) from None
        self._directory = b""  # the directory of the last file opened ("a/b/"), and its descriptor
        self._directory_fd = self.root
        if not on_filesystem_seen:
            raise FileChanged(f"the album {os.fsdecode(directory)}: on another filesystem than the one listed")

    def check_filesystem(self, fd: int, device: int) -> None:
        """FileChanged unless ``fd``, a file planned on ``device``, lies on the filesystem the walk saw there."""
        if device != self._root_device and not self._on_filesystem_seen(fd, device):
            raise FileChanged("on another filesystem than the one listed")

    def _on_filesystem_seen(self, fd: int, device: int) -> bool:
        seen = self._filesystems.get(device)
        if seen is None:  # not trusted: its files' CRCs are read again and checked against their bytes
            return True
        fsid, subvolume, uuid = seen
        if (
            not fsid and not subvolume and not uuid
        ):  # NFS, FUSE: an id of 0, which tells nothing (and costs a round trip)
            return True
        return (
            os.fstatvfs(fd).f_fsid == fsid
            and (not subvolume or subvolume_uuid(fd) == subvolume)
            and (not uuid or filesystem_uuid(fd) == uuid)
        )

    def open(self, path: bytes) -> int:
        """A descriptor of what ``path`` (relative) names, never through a link; FileChanged if it cannot be opened.

        Not yet checked to be the file planned: the caller checks it
        (``check_identity``) before any of its bytes goes out.
        """
        name = path.rpartition(b"/")[2]
        directory = path[: len(path) - len(name)]  # with its last "/": "" is the album, "/" no directory
        if name in _NOT_NAMES:
            raise FileChanged("not a plain relative path")
        try:
            if directory != self._directory:  # its parts checked once, as it is entered
                parts = directory[:-1].split(b"/") if directory else []
                if any(part in _NOT_NAMES for part in parts):
                    raise FileChanged("not a plain relative path")
                self._enter(parts)
                self._directory = directory
            # O_NONBLOCK: a FIFO put in the file's place must not hang the open (regular files ignore it).
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            return os.open(name, flags, dir_fd=self._directory_fd)
        except OSError as error:
            if error.errno not in CHANGED_ERRNOS:
                raise  # the storage's error, named by the caller (helper 71: an EIO was "changed", a 503)
            raise FileChanged(error.strerror or str(error)) from None

    def _enter(self, parts: list[bytes]) -> None:
        if self._directory_fd != self.root:
            os.close(self._directory_fd)
            self._directory_fd = self.root
        fd = self.root
        for part in parts:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                child = os.open(part, flags, dir_fd=fd)
            finally:
                if fd != self.root:
                    os.close(fd)
            fd = child
        self._directory_fd = fd


def close_read(fd: int, path: bytes) -> None:
    """Close a file read; FileChanged, naming ``path``, if that fails.

    A FUSE mount may report a failed read only at the close: rclone's answers EIO when the bytes
    read did not match its checksum.  As the service's CRC reads take it (``listed_files.close_read``):
    a failure that named no file, a 500, before (helper 72).
    """
    try:
        os.close(fd)
    except OSError as error:
        raise FileChanged(f"{os.fsdecode(path)}: {error.strerror or error} when closed after reading") from None


def named_failure(path: bytes, error: OSError) -> Exception:
    """An OSError of an open, read or ``fstat`` of ``path``, named and classed: FileChanged, OutOfResources or OSError.

    ESTALE is a file changed (replaced on an NFS server) wherever it comes: at the open, a read, or
    the check once its bytes were read (helper 147: that ``fstat`` failed unnamed, a 500).
    """
    reason = f"{os.fsdecode(path)}: {error.strerror or error}"
    if error.errno in CHANGED_ERRNOS:
        return FileChanged(reason)
    if error.errno in RESOURCE_ERRNOS:
        return OutOfResources(reason)
    return OSError(error.errno, reason)


def close_quietly(fd: int) -> None:
    """Close ``fd``, whatever the close says: for a file already failed, whose failure is the news."""
    with contextlib.suppress(OSError):
        os.close(fd)


def check_identity(fd: int, key: FileKey, uncached: bool = False) -> None:
    """FileChanged unless ``fd`` is a regular file whose device, inode, size, mtime and ctime are ``key``.

    ``uncached``: as the filesystem has them now (``uncached_status``), for the
    check after a file's bytes were read, which a clean end stands on.
    OSError as ``fstat`` raises it (ESTALE, EIO).
    """
    if uncached:
        mode, found = uncached_status(fd)
    else:
        status = os.fstat(fd)
        mode = status.st_mode
        found = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    if not stat.S_ISREG(mode):
        raise FileChanged("not a regular file")
    if found != key:
        raise FileChanged(f"changed: {_describe_change(key, found)}")


def _describe_change(planned: FileKey, found: FileKey) -> str:
    if planned[:2] != found[:2]:
        return "another file"
    if planned[2] != found[2]:
        return f"{found[2]} bytes, {planned[2]} planned"
    return "modified"


class FileBlocks:
    """Reads the whole file into ``buffer`` a block at a time, yielding each count; FileChanged unless ``size``.

    With ``holes`` (a length), a hole that long or longer is skipped unread, yielded as
    minus its length, and a read stops where one begins (``sparse.Holes``).
    """

    def __init__(self, fd: int, size: int, buffer: bytearray | memoryview, holes: int = 0) -> None:
        self.fd, self.size, self.view = fd, size, memoryview(buffer)
        self.holes = Holes(fd, holes) if holes else None

    def __iter__(self) -> FileBlocks:
        self.read = 0
        return self

    def __next__(self) -> int:
        view = self.view
        if self.holes is not None and self.read < self.size:
            step = self.holes.next(self.size - self.read)
            if step < 0:
                self.read -= step
                return step
            view = view[:step]
        count = os.readv(self.fd, [view])
        if not count:
            if self.read != self.size:
                raise FileChanged(f"{self.read} bytes, {self.size} planned")
            raise StopIteration
        self.read += count
        if self.read > self.size:
            raise FileChanged(f"longer than the {self.size} bytes planned")
        return count
