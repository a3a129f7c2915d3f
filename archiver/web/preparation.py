"""A download's preparation: its album walked and planned, in a worker thread, and the archive's ETag."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..archive.ctime_trust import CtimeTrust
from ..archive.entries import EntryPolicy
from ..archive.etag import archive_etag, archive_validator, archive_variant
from ..archive.listing import (
    AlbumKeepsChanging,
    AlbumNotFound,
    ListingFailed,
    SkippedLog,
    WalkProgress,
    check_settled,
)
from ..archive.plan import ArchivePlan
from ..archive.plan_cache import PlanCache
from ..archive.storage import list_album
from ..config import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedArchive:
    """What a download needs from its album: the archive's plan, and its ETag (``archive_validator``)."""

    plan: ArchivePlan
    etag: str | None
    left_out: int  # entries the walk passed over (links, unreadable files...: logged once a version)


@dataclass(frozen=True)
class _Walk:
    """A walk's outcome, kept for the requests that arrived before it began: a plan (held by others, or gone) or a
    refusal."""

    started_ns: int  # time.monotonic_ns()
    plan: weakref.ref[ArchivePlan] | None  # None: refused
    etag: str | None = None
    left_out: int = 0
    refusal: Callable[[], Exception] | None = None  # makes the refusal again, for another request


def _refusal_again(error: Exception) -> Callable[[], Exception] | None:
    """What makes ``error`` again for another request, if any walk begun as it was would meet it too.

    Not a failure for want of something (threads, descriptors: transient), nor a walk given up on.
    """
    if isinstance(error, AlbumKeepsChanging):  # an upload under way: a ListingFailed, transient
        return partial(AlbumKeepsChanging, str(error), error.settles_in)
    if isinstance(error, ListingFailed) and not error.transient:  # too many entries, a folder it may not read
        return partial(ListingFailed, str(error), transient=False)
    if isinstance(error, AlbumNotFound):  # gone since its name was looked up
        return partial(AlbumNotFound, *error.args)
    return None


class RecentWalks:
    """The latest walk of each album, shared with the requests that were already waiting when it began.

    Every request walks its album, so that a file changed since the last
    one never goes out under an old plan: a ``stat`` a file, 0.1-0.35 s for
    20,000 files.  Requests that wait their turn or a walker thread while a
    walk of the same album begins (a download manager's eight connections,
    a popular link, a flood of ``HEAD``) would each walk it again after it,
    none of them seeing anything newer than it saw.  A walk that began after
    a request arrived is as fresh as one the request would have begun then:
    that request, once it has a walker thread, takes its outcome (``since``)
    instead of walking: its plan, or its refusal (an upload under way, more
    entries than allowed, a folder the service may not read), which costs
    a walk as much.  What a walk found is kept for ``albums`` albums at most,
    its plan by a weak reference (held by the plan cache or a download, or
    gone, and then walked again): a few hundred bytes an album.  A request
    never takes the outcome of a walk that began before it came.  Used from
    the walks' worker threads.
    """

    def __init__(self, albums: int = 1024) -> None:
        self.albums = albums
        self._walks: OrderedDict[tuple[Path, int], _Walk] = OrderedDict()
        self._lock = threading.Lock()
        self.walked = 0  # walks whose outcome was kept
        self.shared = 0  # requests another request's walk served

    def since(self, album: Path, compression: int, arrived_ns: int) -> PreparedArchive | None:
        """What a walk of ``album`` begun at ``arrived_ns`` (``time.monotonic_ns()``) or later prepared, if any.

        Raises its refusal (AlbumKeepsChanging, ListingFailed, AlbumNotFound) where it was refused.
        """
        with self._lock:
            walk = self._walks.get((album, compression))
        if walk is None or walk.started_ns < arrived_ns:
            return None
        plan = walk.plan() if walk.plan is not None else None
        if plan is None and walk.refusal is None:
            return None
        with self._lock:
            self.shared += 1
        if walk.refusal is not None:
            raise walk.refusal()
        assert plan is not None
        return PreparedArchive(plan, walk.etag, walk.left_out)

    def keep(self, album: Path, compression: int, started_ns: int, prepared: PreparedArchive) -> None:
        """Keep what a walk of ``album`` begun at ``started_ns`` prepared, unless a later one's is kept."""
        walk = _Walk(started_ns, weakref.ref(prepared.plan), prepared.etag, prepared.left_out)
        self._keep((album, compression), walk)

    def refused(self, album: Path, compression: int, started_ns: int, error: Exception) -> None:
        """Keep the refusal a walk of ``album`` begun at ``started_ns`` ended in, if another walk would meet it too."""
        if (again := _refusal_again(error)) is not None:
            self._keep((album, compression), _Walk(started_ns, None, refusal=again))

    def _keep(self, key: tuple[Path, int], walk: _Walk) -> None:
        with self._lock:
            self.walked += 1
            kept = self._walks.get(key)
            if kept is not None and kept.started_ns > walk.started_ns:
                return
            self._walks[key] = walk
            self._walks.move_to_end(key)
            if len(self._walks) > self.albums:
                self._walks.popitem(last=False)


def prepare_archive(
    album: Path,
    settings: Settings,
    plans: PlanCache,
    skips: SkippedLog,
    compression: int,
    progress: WalkProgress,
    trust: CtimeTrust,
    recent: RecentWalks,
    arrived_ns: int,
) -> PreparedArchive:
    """Walk ``album``, plan its archive at deflate level ``compression`` (0: stored); in a worker thread.

    20,000 files take ~0.2 s.  ``progress`` moves on with the walk.  What the
    walk left out is logged once a version of the album (``skips``).  A walk
    of the album begun since the request arrived (``arrived_ns``,
    ``time.monotonic_ns()``) serves instead, and this one is kept for the
    requests waiting behind it (``recent``).
    """
    if (shared := recent.since(album, compression, arrived_ns)) is not None:
        return shared
    started_ns = time.monotonic_ns()
    try:
        listing = list_album(album, progress, trust.learn, settings.max_files)
        check_settled(listing, round(settings.settle_time * 1e9))
    except Exception as error:
        recent.refused(album, compression, started_ns, error)
        raise
    # Stored archives have a length known before the first byte: browsers show
    # progress and time left, and ranges resume them.  Deflated ones go chunked.
    policy = EntryPolicy(settings.timezone, settings.keep_modes, settings.name_encoding)
    etag = archive_etag(listing, archive_variant(compression, policy))
    skips.log(listing, etag)
    plan = plans.get(listing, etag, lambda: ArchivePlan(listing.directory, listing.files, compression, policy))
    prepared = PreparedArchive(plan, archive_validator(listing, etag, plan.length, trust), len(listing.skipped))
    recent.keep(album, compression, started_ns, prepared)
    return prepared
