"""Plans of recent archives, shared by the downloads of one album while it is unchanged.

A plan costs about 280 bytes a file to hold and ~12 µs a file to compute,
and once a producer has run for it, ~170 more for the producer's
instructions for each whole entry (``instructions._WholeEntries``, kept with it);
downloads of the same album at once (a popular link, a download manager's
eight connections, a hostile client's thousand ranges) share one.  The key
is the album's directory, its ETag, which covers everything the plan is
computed from but the devices (hosts sharing an NFS storage number them
differently, and must give one archive one tag), and the device of each
file, which the plan names and the producer checks: a remount that
renumbers a device (NFS, a disk plugged in again) is a new plan, not a
download refused as "not the file listed" until a restart.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .plan import ArchivePlan
from .storage import AlbumListing

# Entries kept across the plans held: ~50 MB at ~450 bytes each.
CACHED_ENTRIES = 120_000


class PlanCache:
    """The most recently used plans, up to ``entries`` files in all (a larger plan is not kept)."""

    def __init__(self, entries: int = CACHED_ENTRIES) -> None:
        self.entries = entries
        self._plans: OrderedDict[tuple[Path, str, bytes], ArchivePlan] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()  # used from the walks' worker threads

    def get(self, listing: AlbumListing, etag: str, make: Callable[[], ArchivePlan]) -> ArchivePlan:
        """The plan for ``listing`` (whose archive has ``etag``): the cached one, or ``make()``'s, kept."""
        devices = hashlib.blake2b(array("Q", [file.device for file in listing.files]).tobytes(), digest_size=16)
        key = (listing.directory, etag, devices.digest())
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = make()
        with self._lock:
            if plan.count <= self.entries and key not in self._plans:
                self._plans[key] = plan
                self._held += plan.count
                while self._held > self.entries:
                    _, dropped = self._plans.popitem(last=False)
                    self._held -= dropped.count
        return plan
