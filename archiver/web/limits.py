"""Limits on what one client may hold: archive jobs, planned files, connections, how long it may stall, its rate.

The global job limit (``Settings.max_jobs``) keeps the machine from running
more producers than it can feed; its fair share (``JobSlots``) keeps one client
from taking all of them once the service is busy.  A client is its address
(``clients``); its album walks wait their turn in ``walk_turns``.  A download
whose client stops accepting bytes is ended after ``stall_timeout``, so a
reader that never reads holds its job slot, its producer and its buffers for that
long and no longer.
"""

from __future__ import annotations

import logging
import math
import resource
from collections import Counter
from collections.abc import Callable

import trio

from ..archive.album_walk import MAX_DEPTH
from ..archive.plan import ArchivePlan

logger = logging.getLogger(__name__)

# Albums walked at once, in worker threads.  A walk is bound by the disk and
# the CPU, so more at once finishes no sooner, and every listing in progress
# is whole in memory (~200 bytes a file): 32 requests for a 20,000-file album
# at once would hold 130 MB.
WALKERS = 2

# Descriptors kept free for everything but client connections: the listening
# sockets, the event loop, logging, the CRC readers; album walks (a directory
# each level, the album's own too); and six per archive job (the service holds
# four: the producer's pidfd and its three pipes; the rest leaves room for the
# killed producers still waiting on the storage, 16 at most, four each).
RESERVED_DESCRIPTORS = 64
# Client connections allowed however few descriptors the limit leaves for them.
MIN_CONNECTIONS = 16
WALK_DESCRIPTORS = WALKERS * (MAX_DEPTH + 1)
DESCRIPTORS_PER_JOB = 6


class JobLimitReached(RuntimeError):
    """Every archive job slot is taken: the request must be refused, not queued."""


class FairShareExceeded(RuntimeError):
    """The service is busy and this client already holds its fair share of the job slots."""


class RangeLimitReached(RuntimeError):
    """This client already runs as many ranges at once as one client may."""


class WalkLimitReached(RuntimeError):
    """This client already has as many album walks waiting as one client may."""


class PlanLimitReached(RuntimeError):
    """The downloads in flight already hold plans of as many files as the service keeps planned."""


# The stall timeout is the time a client may take to accept each this many bytes
# (a chunk may hold several: 512 KiB over HTTP/1.1).
STALL_UNIT = 256 * 1024


class DownloadStalled(RuntimeError):
    """The client took less than STALL_UNIT bytes a ``stall_timeout``: the download is aborted."""


class SlotReclaimed(RuntimeError):
    """Every slot was taken, and this download gave its slot to a client holding fewer than its share (``JobSlots``)."""


# How long a request waits for the slot of the download reclaimed for it: the download's producer
# killed and reaped, a few ms (a producer stuck on dead storage is let go once killed).
RECLAIM_WAIT = 5.0


class Job:
    """A job slot held by ``client``; ``end`` aborts the download that holds it (called once at most, on the loop)."""

    __slots__ = ("claim", "client", "end", "ranged", "reclaimed", "reclaimed_at")

    def __init__(self, client: str, ranged: bool, end: Callable[[], None] | None) -> None:
        self.client = client
        self.ranged = ranged
        self.end = end
        self.reclaimed = False  # ``end`` called: aborted for another client
        self.reclaimed_at = math.inf  # trio time of that call
        self.claim: _Claim | None = None  # while reclaimed: who takes its slot as it is released


class _Claim:
    """A request waiting for a reclaimed job's slot: ``job`` is set, then ``granted``, as the slot is handed over."""

    def __init__(self, client: str, ranged: bool, end: Callable[[], None] | None) -> None:
        self.client = client
        self.ranged = ranged
        self.end = end
        self.job: Job | None = None
        self.granted = trio.Event()


class JobSlots:
    """Archive jobs (``total`` at once), shared among clients once the service is busy.

    While more than ``reserve`` slots are free, any client may take one: 16
    downloads at once from one address (an office behind NAT, a browser
    opening every album of a page) are all served by an idle service.  Once
    the free slots are down to the reserve, a client is admitted only while
    it holds fewer than ``min_share`` (its share of a busy service; a slot
    being handed to it, ``take``, counted as held): the
    heaviest clients are refused first, and the reserve is shared by
    ``reserve / min_share`` clients at least.  Until 2026-12-05 a client's
    share there was the slots outside the reserve divided among the clients
    holding any, and a second address, its share 48 // 2 = 24, took the whole
    reserve: two addresses reading at just above the stall rate held all 64
    slots for as long as their albums lasted, everyone else refused (helper
    126).  O(1) a request while a slot is free: the active clients are the
    keys of a counter.

    Once every slot is taken, a client holding fewer than ``min_share`` may
    still start (``take``): the newest download of the client holding the
    most slots above ``min_share`` is aborted (SlotReclaimed) and its slot
    handed over.  Slots taken while the service was idle are given back, one
    a newcomer, until every client holds its share at most: five addresses
    reading just above the stall rate held all 64 slots before (the first
    the 48 above the reserve, four 4 each); it now takes 64 / ``min_share``
    = 16.  O(clients) a reclaim.

    Worked example, 64 slots, reserve 16, ``min_share`` 4: one client opens
    70 downloads.  The first 48 take the slots above the reserve; at the
    49th the client holds 48: refused (FairShareExceeded).  Twenty other
    clients then ask for 5 each: each is admitted up to 4, its fifth refused
    (FairShareExceeded); once four of them hold the reserve's 16, each next
    download of the others takes one of the first client's, until it holds 4
    and sixteen clients hold 4 each: everyone is then refused (JobLimitReached).

    Ranges take slots like downloads, and one client runs at most
    ``min_share`` of them at once (RangeLimitReached), however idle the
    service: each holds a producer process and a job slot while it runs.
    A download manager's 8 connections get 4 at once and retry the rest, as
    they do on any 503.
    """

    def __init__(self, total: int, min_share: int, reserve: int | None = None) -> None:
        self.total = total
        self.min_share = min_share
        self.reserve = -(-total // 4) if reserve is None else reserve  # a quarter, rounded up
        self.in_use = 0
        self._held: Counter[str] = Counter()
        self._ranges: Counter[str] = Counter()
        self._jobs: dict[str, dict[Job, None]] = {}  # each client's jobs, oldest first
        self._reclaimed: Counter[str] = Counter()  # jobs of a client's being aborted for another's
        self._claims: Counter[str] = Counter()  # slots a client waits to be handed
        self._range_claims: Counter[str] = Counter()  # of those, ranges'
        self._unclaimed: dict[Job, None] = {}  # reclaimed jobs whose askers left or gave up: the next asker's

    @property
    def free(self) -> int:
        return self.total - self.in_use

    @property
    def active_clients(self) -> int:
        return len(self._held)

    def held_by(self, client: str) -> int:
        """The slots ``client`` holds now (0 for one that holds none)."""
        return self._held[client]

    def largest_share(self) -> int:
        """The most slots one client holds (for the metrics: O(clients), read at a scrape, not a request)."""
        return max(self._held.values(), default=0)

    def check(self, client: str, ranged: bool = False) -> None:
        """Raise JobLimitReached, FairShareExceeded or RangeLimitReached if ``client`` may not start a job now.

        Nothing is taken.  ``ranged``: the job is a range.  A client for whom
        a slot could be reclaimed (``take``) passes.
        """
        if self.in_use >= self.total and self._reclaimable_for(client) is None:
            raise JobLimitReached(f"all {self.total} archive jobs are busy")
        # A slot on its way to the client (``take``) is its own: one waiting for a reclaimed slot was
        # admitted to a slot freed meanwhile at the reserve, and held twice its share once the
        # reclaimed one came (helper 194).
        if ranged and self._ranges[client] + self._range_claims[client] >= self.min_share:
            raise RangeLimitReached(f"{client} already runs {self.min_share} ranges")
        held = self._held[client] + self._claims[client]
        if self.free <= self.reserve and held >= self.min_share:
            raise FairShareExceeded(
                f"{client} holds {held} archive jobs, its fair share of {self.min_share} while {self.free} of "
                f"{self.total} are free"
            )

    def acquire(self, client: str, ranged: bool = False, end: Callable[[], None] | None = None) -> Job:
        """Take a free slot for ``client``, or raise as ``check`` does, JobLimitReached if none is free.

        ``end``: called to abort the job if its slot is reclaimed (None: never).
        """
        if self.in_use >= self.total:
            raise JobLimitReached(f"all {self.total} archive jobs are busy")
        self.check(client, ranged)
        self.in_use += 1
        return self._hold(client, ranged, end)

    async def take(self, client: str, ranged: bool = False, end: Callable[[], None] | None = None) -> Job:
        """``acquire``, or with every slot taken a slot reclaimed for ``client``: waits for it, RECLAIM_WAIT s at most.

        Raises as ``acquire`` does (JobLimitReached also if the reclaimed slot
        did not come in time).  A checkpoint only when a slot is reclaimed.
        """
        if self.in_use < self.total:
            return self.acquire(client, ranged, end)
        self.check(client, ranged)  # JobLimitReached unless a slot can be reclaimed for this client
        victim = self._reclaimable_for(client)
        assert victim is not None and victim.end is not None
        claim = victim.claim = _Claim(client, ranged, end)
        self._claims[client] += 1
        if ranged:
            self._range_claims[client] += 1
        if victim.reclaimed:  # aborted for an asker that is gone: its slot is this one's when it comes
            del self._unclaimed[victim]
        else:
            victim.reclaimed = True
            victim.reclaimed_at = trio.current_time()
            self._reclaimed[victim.client] += 1
            victim.end()
        try:
            with trio.move_on_after(RECLAIM_WAIT):
                await claim.granted.wait()
        except BaseException:
            if claim.job is not None:  # handed over as this request was cancelled
                self.release(claim.job)
            else:  # the asker left: its slot is the next asker's (helper 134), or everyone's as it ends
                self._withdraw(victim)
                self._unclaimed[victim] = None
            raise
        if claim.job is None:  # not given back in time, and maybe not soon: everyone's as it ends
            self._withdraw(victim)
            raise JobLimitReached(f"all {self.total} archive jobs are busy, and the one reclaimed was not given back")
        return claim.job

    def _withdraw(self, victim: Job) -> None:
        assert victim.claim is not None
        self._unclaim(victim.claim)
        victim.claim = None

    def _unclaim(self, claim: _Claim) -> None:
        _decrement(self._claims, claim.client)
        if claim.ranged:
            _decrement(self._range_claims, claim.client)

    def release(self, job: Job) -> None:
        """Give ``job``'s slot back, or to the client it was reclaimed for."""
        self._drop(job)
        if job.reclaimed:
            _decrement(self._reclaimed, job.client)
            self._unclaimed.pop(job, None)
        claim = job.claim
        if claim is None:
            self.in_use -= 1
            return
        self._unclaim(claim)
        claim.job = self._hold(claim.client, claim.ranged, claim.end)
        claim.granted.set()

    def _hold(self, client: str, ranged: bool, end: Callable[[], None] | None) -> Job:
        job = Job(client, ranged, end)
        self._held[client] += 1
        if ranged:
            self._ranges[client] += 1
        self._jobs.setdefault(client, {})[job] = None
        return job

    def _drop(self, job: Job) -> None:
        _decrement(self._held, job.client)
        if job.ranged:
            _decrement(self._ranges, job.client)
        jobs = self._jobs[job.client]
        del jobs[job]
        if not jobs:
            del self._jobs[job.client]

    def _reclaimable_for(self, client: str) -> Job | None:
        """The job to abort for ``client`` while every slot is taken: the newest of the client holding the most
        slots above ``min_share`` (those being reclaimed not counted), or None (``client`` holds, or waits for,
        ``min_share`` already, or no client holds more)."""
        if self._held[client] + self._claims[client] >= self.min_share:
            return None
        # Aborted already, for an asker that left (helper 134); not once RECLAIM_WAIT has passed since: it
        # may be stuck, and askers that each leave sooner would wait on it for ever (helper 135).
        now = trio.current_time() if self._unclaimed else math.inf
        for job in list(self._unclaimed):
            if now - job.reclaimed_at < RECLAIM_WAIT:
                return job
            del self._unclaimed[job]
        heaviest, most = None, self.min_share
        for holder, jobs in self._jobs.items():
            keeps = len(jobs) - self._reclaimed[holder]
            if keeps > most:
                heaviest, most = holder, keeps
        if heaviest is None:
            return None
        for job in reversed(self._jobs[heaviest]):
            if not job.reclaimed and job.end is not None:
                return job
        return None


class PlannedFiles:
    """The files in the plans that archive jobs hold, each plan counted once, at most ``budget`` in all.

    A plan costs ~450 bytes a file (``archive.plan_cache``) and is held by its
    downloads for as long as they run (hours, on a slow link).  The downloads
    of one album share one plan, which costs nothing more; but 64 job slots on
    64 different albums of ARCHIVER_MAX_FILES files held ~3.5 GB.  A plan that
    does not fit is refused (PlanLimitReached: 503, never queued), unless no
    plan is held: an album no larger than ``budget`` is always served by an
    idle service.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._holders: dict[int, tuple[ArchivePlan, int]] = {}  # id(plan) -> (plan, jobs holding it)

    def acquire(self, plan: ArchivePlan) -> None:
        """Count ``plan`` as held by one more job; PlanLimitReached if it is new and does not fit."""
        key = id(plan)
        if key in self._holders:
            self._holders[key] = (plan, self._holders[key][1] + 1)
            return
        if self.held and self.held + plan.count > self.budget:
            raise PlanLimitReached(
                f"the plans in flight hold {self.held} files, and this one's {plan.count} would pass {self.budget}"
            )
        self._holders[key] = (plan, 1)
        self.held += plan.count

    def release(self, plan: ArchivePlan) -> None:
        key = id(plan)
        _, jobs = self._holders[key]
        if jobs > 1:
            self._holders[key] = (plan, jobs - 1)
        else:
            del self._holders[key]
            self.held -= plan.count


def _decrement(counts: Counter[str], client: str) -> None:
    counts[client] -= 1
    if counts[client] <= 0:
        del counts[client]


def connection_limit(max_connections: int, max_jobs: int) -> int:
    """Client connections one process may hold: ``max_connections``, or (0) what the descriptor limit leaves.

    Past the limit a connection is closed as soon as it is accepted, so that a
    flood of idle connections can never take the descriptors a download in
    progress needs for its producer, nor drive ``accept`` into EMFILE.
    """
    if max_connections:
        return max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    left = soft - RESERVED_DESCRIPTORS - WALK_DESCRIPTORS - DESCRIPTORS_PER_JOB * max_jobs
    if left < MIN_CONNECTIONS:
        # Said once, at start: the limit cutting connections at 16 was seen only as it did (helper 52).
        logger.warning(
            "the descriptor limit (%d) leaves %d client connections beside %d archive jobs (%d descriptors each): "
            "%d are allowed, and the jobs may run short; raise LimitNOFILE (ulimit -n) or lower ARCHIVER_MAX_JOBS",
            soft,
            max(left, 0),
            max_jobs,
            DESCRIPTORS_PER_JOB,
            MIN_CONNECTIONS,
        )
    return max(MIN_CONNECTIONS, left)


class TokenBucket:
    """At most ``rate`` bytes a second on average, and at most ``burst`` bytes ahead of that.

    A download may fall behind its rate (the client paused, the disk was
    slow); what it saved up is capped at ``burst``, so a resume cannot send
    everything the pause did not.  A chunk larger than what is in the bucket
    still goes out whole, and the bucket goes into debt: the next one waits.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = 0.0  # nothing saved up at the start: the first second is at the rate too
        self._updated = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next chunk may go out."""
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def spend(self, count: int) -> None:
        self._tokens -= count
