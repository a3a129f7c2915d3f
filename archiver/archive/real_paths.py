"""Opening a real path's directory without following a link anywhere in it (the walk's, the producer's, the CRC reads').

``O_NOFOLLOW`` refuses a link only as the last component of a path: one
open of ``/srv/storage/x/pub`` goes through a link put at ``x``.  An album
that is a link inside the storage is resolved first (``storage.resolve_album``)
and checked to lie in the root; a folder on that path swapped for a link
to elsewhere before the album is opened would lead the walk and the
producer out of the storage, where every file they meet is what they
planned.  Opened a component at a time from ``/``, each with
``O_NOFOLLOW``, a real path leads through real folders only.

Standard library only: the producer imports it.
"""

from __future__ import annotations

import contextlib
import os

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The folders on the way are only passed through: O_PATH asks for search (x) permission on
# them, as a lookup of the whole path does, not read (r): storage beneath a folder of mode
# 0711 (a home directory, a root that hides its albums' names) stays reachable.
_PASSAGE_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_real_directory(path: str | bytes | os.PathLike[str], *, passage: bool = False) -> int:
    """A descriptor of the directory at ``path`` (read-only), opened following no link; the caller closes it.

    Only the directory itself must be readable; the folders above it, searchable.
    With ``passage``, it too is only passed through (``O_PATH``: it cannot be
    listed, only opened beneath; no ``opendir`` for a FUSE daemon to answer).

    ``path``: absolute, with no link, ``.`` or ``..`` in it (what
    ``os.path.realpath`` gives).  OSError as ``openat(2)`` gives it: ENOTDIR
    where a component is a link now (ELOOP on some systems) or not a
    directory, ENOENT where it is gone.  ValueError if ``path`` is not
    absolute or holds ``.`` or ``..``.
    """
    encoded = os.fsencode(path)
    if not encoded.startswith(b"/"):
        raise ValueError(f"not an absolute path: {encoded!r}")
    parts = [part for part in encoded.split(b"/") if part]
    if b"." in parts or b".." in parts:
        raise ValueError(f"not a real path: {encoded!r}")
    last_flags = _PASSAGE_FLAGS if passage else DIRECTORY_FLAGS
    fd = os.open(b"/", _PASSAGE_FLAGS if parts else last_flags)
    try:
        for position, part in enumerate(parts, 1):
            child = os.open(part, last_flags if position == len(parts) else _PASSAGE_FLAGS, dir_fd=fd)
            parent, fd = fd, child
            # Freed whatever close says (Linux), and a passage's close has nothing to report.  Passed on,
            # its error had the handler below close it again (helper 193: EBADF, or in a process of
            # threads another thread's file of the same number since) and the child left open.
            with contextlib.suppress(OSError):
                os.close(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd
