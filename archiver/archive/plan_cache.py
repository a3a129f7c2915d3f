"""Plans of recent archives, shared by the downloads of one album while it is unchanged.

A plan costs about 280 bytes a file to hold and ~12 µs a file to compute,
and once a producer has run for it, ~170 more for the producer's
instructions for each whole entry (``instructions._WholeEntries``, kept with it);
downloads of the same album at once (a popular link, a download manager's
eight connections, a hostile client's thousand ranges) share one.  The key
is the album's directory and its ETag, which covers everything the plan is
computed from: a changed album is a new plan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .plan import ArchivePlan

# Entries kept across the plans held: ~50 MB at ~450 bytes each.
CACHED_ENTRIES = 120_000


class PlanCache:
    """The most recently used plans, up to ``entries`` files in all (a larger plan is not kept)."""

    def __init__(self, entries: int = CACHED_ENTRIES) -> None:
        self.entries = entries
        self._plans: OrderedDict[tuple[Path, str], ArchivePlan] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()  # used from the walks' worker threads

    def get(self, directory: Path, etag: str, make: Callable[[], ArchivePlan]) -> ArchivePlan:
        """The plan for ``directory`` at ``etag``: the cached one, or ``make()``'s, kept."""
        key = (directory, etag)
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
