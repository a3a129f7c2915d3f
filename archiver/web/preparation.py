"""A download's preparation: its album walked and planned, in a worker thread, and the archive's ETag."""

from __future__ import annotations

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
from ..archive.listing import SkippedLog, WalkProgress, check_settled
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
    """A walk's outcome, kept for the requests that arrived before it began; its plan is held by others or gone."""

    started_ns: int  # time.monotonic_ns()
    plan: weakref.ref[ArchivePlan]
    etag: str | None
    left_out: int


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
    instead of walking.  What a
    walk found is kept for ``albums`` albums at most, its plan by a weak
    reference (held by the plan cache or a download, or gone, and then
    walked again): a few hundred bytes an album.  Only walks that ended in
    a plan are kept; a request never takes one that began before it came.
    Used from the walks' worker threads and the event loop.
    """

    def __init__(self, albums: int = 1024) -> None:
        self.albums = albums
        self._walks: OrderedDict[tuple[Path, int], _Walk] = OrderedDict()
        self._lock = threading.Lock()
        self.walked = 0  # walks that ended in a plan
        self.shared = 0  # requests another request's walk served

    def since(self, album: Path, compression: int, arrived_ns: int) -> PreparedArchive | None:
        """What a walk of ``album`` begun at ``arrived_ns`` (``time.monotonic_ns()``) or later prepared, if any."""
        with self._lock:
            walk = self._walks.get((album, compression))
        if walk is None or walk.started_ns < arrived_ns:
            return None
        plan = walk.plan()
        if plan is None:
            return None
        with self._lock:
            self.shared += 1
        return PreparedArchive(plan, walk.etag, walk.left_out)

    def keep(self, album: Path, compression: int, started_ns: int, prepared: PreparedArchive) -> None:
        """Keep what a walk of ``album`` begun at ``started_ns`` prepared, unless a later one's is kept."""
        key = (album, compression)
        walk = _Walk(started_ns, weakref.ref(prepared.plan), prepared.etag, prepared.left_out)
        with self._lock:
            self.walked += 1
            kept = self._walks.get(key)
            if kept is not None and kept.started_ns > started_ns:
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
    listing = list_album(album, progress, trust.learn, settings.max_files)
    check_settled(listing, round(settings.settle_time * 1e9))
    # Stored archives have a length known before the first byte: browsers show
    # progress and time left, and ranges resume them.  Deflated ones go chunked.
    policy = EntryPolicy(settings.timezone, settings.keep_modes, settings.name_encoding)
    etag = archive_etag(listing, archive_variant(compression, policy))
    skips.log(listing, etag)
    plan = plans.get(listing, etag, lambda: ArchivePlan(listing.directory, listing.files, compression, policy))
    prepared = PreparedArchive(plan, archive_validator(listing, etag, plan.length, trust), len(listing.skipped))
    recent.keep(album, compression, started_ns, prepared)
    return prepared
