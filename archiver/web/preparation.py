"""A download's preparation: its album walked and planned, in a worker thread, and the archive's ETag."""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..archive.ctime_trust import CtimeTrust
from ..archive.entries import EntryPolicy
from ..archive.etag import archive_etag, archive_validator, archive_variant
from ..archive.listing import (
    AlbumKeepsChanging,
    AlbumNotFound,
    AlbumRefused,
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

    started: int  # RecentWalks.ticket() as it began
    plan: weakref.ref[ArchivePlan] | None  # None: refused
    etag: str | None = None
    left_out: int = 0
    refusal: Exception | None = None  # never raised: made again for each request it serves
    settles_at_ns: int | None = None  # an upload under way: time.monotonic_ns() when its album will have settled


def _refusal_kept(error: Exception) -> bool:
    """Whether any walk begun as the one that met ``error`` would meet it too.

    Not an I/O error, nor a failure for want of something (threads,
    descriptors), nor a walk given up on: another walk may not meet them.
    """
    return isinstance(error, (AlbumRefused, AlbumKeepsChanging, AlbumNotFound))


def _again(refusal: Exception, settles_in: float) -> Exception:
    """``refusal`` made anew for another request (``settles_in``: what is left of an upload's settle time)."""
    if isinstance(refusal, AlbumKeepsChanging):
        return AlbumKeepsChanging(str(refusal), settles_in)
    if isinstance(refusal, AlbumRefused):
        return AlbumRefused(str(refusal))
    return AlbumNotFound(*refusal.args)


class RecentWalks:
    """The latest walk of each album, shared with the requests that were already waiting when it began.

    Every request walks its album, so that a file changed since the last
    one never goes out under an old plan: a ``stat`` a file, 0.1-0.35 s for
    20,000 files.  Requests that wait their turn or a walker thread while a
    walk of the same album begins (a download manager's eight connections,
    a popular link, a flood of ``HEAD``) would each walk it again after it,
    though none of them needs anything newer than it saw.  A walk that began
    after a request arrived is as fresh as one the request would have begun
    then: that request, once it has a walker thread, takes its outcome
    (``since``) instead of walking: its plan, or its refusal (more entries
    than allowed, a folder the service may not search, the album gone, or an
    upload under way, until the time it said the album settles), which costs
    a walk as much.  Arrivals and walks' starts are ordered by tickets from
    one counter (``ticket``), not by a clock whose ticks two events may share.
    What a walk found is kept for ``albums`` albums at most, its plan by a
    weak reference (held by the plan cache or a download, or gone, and then
    walked again): a few hundred bytes an album.  A request never takes the
    outcome of a walk that began before it came.  Used from the walks'
    worker threads; ``ticket`` from the event loop too.
    """

    def __init__(self, albums: int = 1024) -> None:
        self.albums = albums
        self._walks: OrderedDict[tuple[Path, int], _Walk] = OrderedDict()
        self._lock = threading.Lock()
        self._tickets = itertools.count()  # next() is atomic: one bytecode call, under the interpreter's lock
        self.walked = 0  # walks whose outcome was kept (also when a later one's replaced it)
        self.shared = 0  # requests another request's walk served

    def ticket(self) -> int:
        """A number larger than every one given before: a request's arrival, a walk's start."""
        return next(self._tickets)

    def since(self, album: Path, compression: int, arrived: int) -> PreparedArchive | None:
        """What a walk of ``album`` begun after ``arrived`` (a ``ticket``) prepared, if any.

        Raises its refusal (AlbumRefused, AlbumKeepsChanging, AlbumNotFound) where it was refused.
        """
        with self._lock:
            walk = self._walks.get((album, compression))
        if walk is None or walk.started < arrived:  # tickets are never equal
            return None
        settles_in = 0.0
        if walk.settles_at_ns is not None:
            settles_in = (walk.settles_at_ns - time.monotonic_ns()) / 1e9
            if settles_in <= 0:
                return None  # settled since, perhaps: walked again
        plan = walk.plan() if walk.plan is not None else None
        if plan is None and walk.refusal is None:
            return None
        with self._lock:
            self.shared += 1
        if walk.refusal is not None:
            raise _again(walk.refusal, settles_in)
        assert plan is not None
        return PreparedArchive(plan, walk.etag, walk.left_out)

    def keep(self, album: Path, compression: int, started: int, prepared: PreparedArchive) -> None:
        """Keep what a walk of ``album`` begun at ``started`` (a ``ticket``) prepared, unless a later one's is kept."""
        walk = _Walk(started, weakref.ref(prepared.plan), prepared.etag, prepared.left_out)
        self._keep((album, compression), walk)

    def refused(self, album: Path, compression: int, started: int, error: Exception) -> None:
        """Keep the refusal a walk of ``album`` begun at ``started`` ended in, if another walk would meet it too."""
        if not _refusal_kept(error):
            return
        settles_at_ns = None
        if isinstance(error, AlbumKeepsChanging) and error.settles_in > 0:
            settles_at_ns = time.monotonic_ns() + round(error.settles_in * 1e9)
        # A copy never raised: the error itself holds the walk's frames, and their partial listing, by its traceback.
        refusal = _again(error, 0.0)
        self._keep((album, compression), _Walk(started, None, refusal=refusal, settles_at_ns=settles_at_ns))

    def _keep(self, key: tuple[Path, int], walk: _Walk) -> None:
        with self._lock:
            self.walked += 1
            kept = self._walks.get(key)
            if kept is not None and kept.started > walk.started:
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
    arrived: int,
) -> PreparedArchive:
    """Walk ``album``, plan its archive at deflate level ``compression`` (0: stored); in a worker thread.

    20,000 files take ~0.2 s.  ``progress`` moves on with the walk.  What the
    walk left out is logged once a version of the album (``skips``).  A walk
    of the album begun since the request arrived (``arrived``, a
    ``recent.ticket()``) serves instead, and this one is kept for the
    requests waiting behind it (``recent``).
    """
    if (shared := recent.since(album, compression, arrived)) is not None:
        return shared
    started = recent.ticket()
    try:
        listing = list_album(album, progress, trust.learn, settings.max_files)
        check_settled(listing, round(settings.settle_time * 1e9))
    except Exception as error:
        recent.refused(album, compression, started, error)
        raise
    # Stored archives have a length known before the first byte: browsers show
    # progress and time left, and ranges resume them.  Deflated ones go chunked.
    policy = EntryPolicy(settings.timezone, settings.keep_modes, settings.name_encoding, settings.oem_names)
    etag = archive_etag(listing, archive_variant(compression, policy))
    skips.log(listing, etag)
    plan = plans.get(
        listing, etag, lambda: ArchivePlan(listing.directory, listing.files, compression, policy, listing.filesystems)
    )
    prepared = PreparedArchive(plan, archive_validator(listing, etag, plan.length), len(listing.skipped))
    recent.keep(album, compression, started, prepared)
    return prepared
