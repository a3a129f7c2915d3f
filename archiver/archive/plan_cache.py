"""Plans of recent archives, shared by the downloads of one album while it is unchanged.

A plan costs about 280 bytes a file to hold and ~12 µs a file to compute,
and once a producer has run for it, ~170 more for the producer's
instructions for each whole entry (``instructions._WholeEntries``, kept with it), and 8
for its CRC once a lookup found them all (``ArchivePlan.indexed_crcs``);
downloads of the same album at once (a popular link, a download manager's
eight connections, a hostile client's thousand ranges) share one.  The key
is the album's directory, its ETag, which covers everything the plan is
computed from but the devices (hosts sharing an NFS storage number them
differently, and must give one archive one tag), and the device of each
file and the filesystem the walk saw on each, which the plan names and the
producer checks: a remount that renumbers a device (NFS, a disk plugged in
again) is a new plan, not a download refused as "not the file listed" until
a restart.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .listing import AlbumListing
from .plan import ArchivePlan

# Entries kept across the plans held: ~50 MB at ~450 bytes each.
CACHED_ENTRIES = 120_000


_Key = tuple[Path, str, bytes]


class _Making:
    """A plan being made by one walk's thread, which the others for the same key wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.plan: ArchivePlan | None = None


class PlanCache:
    """The most recently used plans, up to ``entries`` files in all (a larger plan is not kept).

    One plan a key while any is alive: two walks of one album at once wait for
    one plan, and a plan pushed out of the cache while downloads hold it is
    still the one a new download gets (``live``).  Two plans for one album held
    twice the memory, and were two plans to the planned-files bound, which
    refused the second download of an album on an idle service (helper 53).
    """

    def __init__(self, entries: int = CACHED_ENTRIES) -> None:
        self.entries = entries
        self._plans: OrderedDict[_Key, ArchivePlan] = OrderedDict()
        self._live: weakref.WeakValueDictionary[_Key, ArchivePlan] = weakref.WeakValueDictionary()
        self._making: dict[_Key, _Making] = {}
        self._held = 0
        self._lock = threading.Lock()  # used from the walks' worker threads

    def get(self, listing: AlbumListing, etag: str, make: Callable[[], ArchivePlan]) -> ArchivePlan:
        """The plan for ``listing`` (whose archive has ``etag``): the live one, or ``make()``'s, kept.

        Runs in a walk's worker thread; may wait there for another's ``make()``.
        """
        devices = hashlib.blake2b(array("Q", [file.device for file in listing.files]).tobytes(), digest_size=16)
        devices.update(repr(sorted(listing.filesystems.items())).encode())  # what the producer checks them against
        key = (listing.directory, etag, devices.digest())
        with self._lock:
            plan = self._plans.get(key) or self._live.get(key)
            if plan is not None:
                self._keep(key, plan)
                return plan
            making = self._making.get(key)
            if making is None:
                making = self._making[key] = _Making()
                mine = True
            else:
                mine = False
        if not mine:
            making.done.wait()
            return making.plan or self.get(listing, etag, make)  # its maker failed: make it here
        try:
            plan = making.plan = make()
        finally:
            with self._lock:
                del self._making[key]
                if making.plan is not None:
                    self._live[key] = making.plan
                    self._keep(key, making.plan)
            making.done.set()
        return plan

    def _keep(self, key: _Key, plan: ArchivePlan) -> None:
        """Make ``plan`` the most recently used, in the cache if it fits (under the lock)."""
        if key in self._plans:
            self._plans.move_to_end(key)
            return
        if plan.count > self.entries:
            return
        self._plans[key] = plan
        self._held += plan.count
        while self._held > self.entries:
            _, dropped = self._plans.popitem(last=False)
            self._held -= dropped.count
