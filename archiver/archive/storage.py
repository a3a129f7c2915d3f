"""Storage: the only code that turns request names into paths.

An album is a directory directly under the storage root, named by its secret.
``resolve_album`` maps a name to that directory or refuses; ``list_album``
lists what may go into its archive and says what it left out and why
(``album_walk``: the policy, and a walk of one moment), walking it again
while it changes, WALK_ATTEMPTS times at most: an album that keeps changing
fails the listing (AlbumKeepsChanging).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

from .album_walk import GONE, TRANSIENT, AlbumChanged, Devices, walk_once
from .filesystems import Filesystem
from .listing import AlbumKeepsChanging, AlbumListing, AlbumNotFound, ListingFailed, WalkProgress
from .root_filesystem import RootFilesystem

# A secret is a plain directory name: no dots (so no "." or ".."), no
# separators, no escapes.  128 characters is far above the CMS's 32 hex digits.
ALBUM_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Walks of an album that keeps changing before its listing fails (as transient: 503).
WALK_ATTEMPTS = 3


def resolve_album(root: Path, name: str, filesystem: RootFilesystem | None = None) -> Path:
    """Return the real path of album ``name`` under ``root``, or raise AlbumNotFound.

    ListingFailed if the storage cannot say (the root not searchable, an I/O error);
    StorageUnavailable if the root is gone or, by ``filesystem``, its filesystem unmounted.

    The album may be a symbolic link as long as it resolves to a directory
    strictly inside the root (never the root itself: that would archive every
    album at once).
    """
    if not ALBUM_NAME.fullmatch(name):
        raise AlbumNotFound(name)
    if filesystem is not None:
        try:
            filesystem.check()  # before the album: beneath an unmounted storage every album is "not found"
        except OSError as error:
            raise ListingFailed(f"cannot look at the storage directory: {error.strerror}", transient=False) from None
    real_root = root.resolve()
    if real_root == Path("/"):  # checked at start too; a link to it swapped in since (helper 55)
        raise ListingFailed("the storage directory is /: its folders are not served", transient=False)
    album = (real_root / name).resolve()
    if album.parent != real_root and real_root not in album.parents:
        raise AlbumNotFound(name)
    try:
        is_directory = stat.S_ISDIR(os.stat(album).st_mode)
    except OSError as error:
        if error.errno in GONE:
            raise AlbumNotFound(name) from None
        # The root not searchable by the service's user (EACCES), an I/O error: the service's
        # fault, not the link's, and every album's (/healthz says so too).  Out of memory or
        # descriptors: a moment, a 503 as in the walk after it (a 500 until 2026-12-07: helper 193).
        raise ListingFailed(f"cannot look it up: {error.strerror}", transient=error.errno in TRANSIENT) from None
    if not is_directory:
        raise AlbumNotFound(name)
    return album


def list_album(
    album: Path,
    progress: WalkProgress | None = None,
    on_device: Callable[[int, int], Filesystem | None] | None = None,
    max_entries: int | None = None,
) -> AlbumListing:
    """Walk ``album`` (not following links) and sort what it holds into files and skips.

    Raises AlbumNotFound if the album is gone, ListingFailed if it (or
    anything in it) cannot be listed for another reason than the policy's,
    or holds more than ``max_entries`` entries (files, folders and skips;
    the walk stops there: its lists are what it holds in memory).
    ``progress`` moves on with each answer from the storage; WalkGivenUp once given up on.
    ``on_device(fd, device)`` is called once a walk for each device a folder
    lies on, with the folder open as ``fd`` (``ctime_trust.CtimeTrust.learn``);
    what it returns for each is the listing's ``filesystems``.
    """
    progress = progress or WalkProgress()
    for _ in range(WALK_ATTEMPTS):
        started_ns = time.time_ns()
        devices = Devices(on_device)
        try:
            files, skipped = walk_once(album, progress, devices, max_entries)
            break
        except AlbumChanged:
            continue
    else:
        raise AlbumKeepsChanging(f"changed while listed, {WALK_ATTEMPTS} times")
    files.sort(key=lambda file: file.path)
    return AlbumListing(album, tuple(files), tuple(skipped), started_ns, devices.filesystems)
