"""Limits on what one client may hold: archive jobs, album walks, how long a download may stall, its rate.

The global job limit (``Settings.max_jobs``) keeps the machine from running
more producers than it can feed; its fair share (``JobSlots``) keeps one client
from taking all of them once the service is busy.  A client is its address: the TCP peer, or, when the peer is a
trusted proxy, the address the proxy put in X-Forwarded-For.  A download
whose client stops accepting bytes is ended after ``stall_timeout``, so a
reader that never reads holds its job slot, its producer and its buffers for that
long and no longer.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import resource
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio

from ..archive.plan import ArchivePlan
from ..archive.storage import MAX_DEPTH, WalkProgress

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


def unmapped(address: str) -> str:
    """An IPv4 address as a dual-stack socket gives it (``::ffff:127.0.0.1``) in its own form; any other as it is.

    Bound to ``::`` (``-H ::``), the service sees IPv4 peers so: nginx on
    127.0.0.1 must still be the trusted proxy (helper 44: its clients were one
    client, and its X-Client-Protocol was ignored), and a client one client
    whichever way it came.
    """
    try:
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        return address
    return address if mapped is None else str(mapped)


class TrustedProxies:
    """The proxies whose X-Forwarded-For is believed, and how to find the client behind them."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(address.strip(), strict=False) for address in addresses)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(unmapped(address))
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address: the peer, unless a trusted proxy names the one it forwards for.

        X-Forwarded-For is a list each proxy appends its own peer to, so only
        its right end can be believed: walk it from the right past trusted
        proxies (as nginx's realip module does with ``real_ip_recursive``).
        The first address not trusted is the client; anything to its left
        the client wrote itself.  A hop that is no address ends the walk: the
        client is then the last trusted one (a name or a quote in the logs
        and in the fair share's keys would be the client's own text; helper 52).
        """
        address = unmapped(peer) if peer else "unknown"
        if not forwarded_for or not self.trusts(address):
            return address
        for entry in reversed(forwarded_for.split(",")):
            if not entry.strip():
                continue
            hop = _hop_address(entry.strip())
            if hop is None:
                break
            address = hop
            if not self.trusts(hop):
                break
        return address


# Load balancers that write a port with the address (Azure's Application Gateway: "a.b.c.d:port",
# "[v6]:port"); nginx writes the address alone.
_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::[0-9]{1,5})?")
_IPV4_AND_PORT = re.compile(r"([0-9.]+):[0-9]{1,5}")


def _hop_address(entry: str) -> str | None:
    """The address in one X-Forwarded-For entry, in one spelling (no port, no zone, IPv4 unmapped); None if none.

    A zone ("fe80::1%eth0") is dropped: ``ip_address`` takes any text after the
    "%", which brought the client's own text back (helper 53); and one address
    is one client however it is written ("2001:DB8:0:0::1" is "2001:db8::1").
    """
    if match := _BRACKETED.fullmatch(entry) or _IPV4_AND_PORT.fullmatch(entry):
        entry = match.group(1)
    try:
        address = ipaddress.ip_address(entry.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class JobSlots:
    """Archive jobs (``total`` at once), shared fairly among clients once the service is busy.

    While more than ``reserve`` slots are free, any client may take one: 16
    downloads at once from one address (an office behind NAT, a browser
    opening every album of a page) are all served by an idle service.  Once
    the free slots are down to the reserve, a client is admitted only while
    it holds less than its fair share: the slots outside the reserve divided
    among the clients now holding any (the asking one counted), and never
    less than ``min_share``.  So the heaviest client yields first, and the
    reserve stays for clients that hold none or few.  O(1) a request: the
    active clients are the keys of a counter.

    Worked example, 64 slots, reserve 16, ``min_share`` 4: one client opens
    70 downloads.  The first 48 take the slots above the reserve; at the
    49th the client holds 48, its share is 48 // 1 = 48: refused
    (FairShareExceeded).  Twenty other clients then ask: each holds 0, its
    share is max(4, 48 // 2) = 24 or less, never under 4: admitted while any
    slot is free.  With 64 slots held, everyone is refused (JobLimitReached).

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

    @property
    def free(self) -> int:
        return self.total - self.in_use

    @property
    def active_clients(self) -> int:
        return len(self._held)

    def held_by(self, client: str) -> int:
        return self._held[client]

    def largest_share(self) -> int:
        """The most slots one client holds (for the metrics: O(clients), read at a scrape, not a request)."""
        return max(self._held.values(), default=0)

    def fair_share(self, client: str) -> int:
        active = len(self._held) + (0 if client in self._held else 1)
        return max(self.min_share, (self.total - self.reserve) // active)

    def check(self, client: str, ranged: bool = False) -> None:
        """Raise JobLimitReached, FairShareExceeded or RangeLimitReached if ``client`` may not start a job now.

        Nothing is taken.  ``ranged``: the job is a range.
        """
        if self.in_use >= self.total:
            raise JobLimitReached(f"all {self.total} archive jobs are busy")
        if ranged and self._ranges[client] >= self.min_share:
            raise RangeLimitReached(f"{client} already runs {self.min_share} ranges")
        held = self._held[client]
        if self.free <= self.reserve and held >= (share := self.fair_share(client)):
            raise FairShareExceeded(
                f"{client} holds {held} archive jobs, its fair share of {share} while {self.free} of "
                f"{self.total} are free"
            )

    def acquire(self, client: str, ranged: bool = False) -> None:
        """Take a slot for ``client``, or raise as ``check`` does (nothing taken)."""
        self.check(client, ranged)
        self.in_use += 1
        self._held[client] += 1
        if ranged:
            self._ranges[client] += 1

    def release(self, client: str, ranged: bool = False) -> None:
        self.in_use -= 1
        _decrement(self._held, client)
        if ranged:
            _decrement(self._ranges, client)


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


class WalkActivity:
    """Walks holding their turn, and how they move the queues behind them.

    ``moved()`` changes as a walk gets answers from the storage, and as one
    ends having done its work (``finished``); not as one leaves stuck (given
    up on, or its client gone).
    """

    def __init__(self) -> None:
        self._walks: set[WalkProgress] = set()
        self._left = 0  # steps of the walks that left
        self.finished = 0

    def moved(self) -> int:
        return self._left + self.finished + sum(walk.steps for walk in self._walks)

    def __contains__(self, walk: WalkProgress) -> bool:
        return walk in self._walks

    def add(self, walk: WalkProgress) -> None:
        self._walks.add(walk)

    def remove(self, walk: WalkProgress, *, ended: bool) -> None:
        self._walks.discard(walk)
        self._left += walk.steps
        self.finished += ended


class ClientWalks:
    """Album walks per client: one at a time, in arrival order, and at most ``max_waiting`` more waiting.

    A walk (a ``stat`` per file: 0.3 s for 20,000 files) runs in one of a few
    shared worker threads, so walks in flood from one client would keep every
    other client's first byte waiting behind them.  Held to one at a time, a
    client's own requests queue behind each other, and another client waits
    for at most the walk already running.  Past ``max_waiting`` a request is
    refused at once (WalkLimitReached): a queue that only grows is an attack.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._turns: dict[str, trio.Lock] = {}
        self._queued: Counter[str] = Counter()  # waiting or walking
        self._activity: dict[str, WalkActivity] = {}  # each client's walk holding its turn
        self.everyone = WalkActivity()  # all walks holding their turn: those queued for a walker thread wait on them

    @asynccontextmanager
    async def turn(self, client: str, walk: WalkProgress | None = None) -> AsyncIterator[None]:
        """Wait for ``client``'s turn to walk an album; WalkLimitReached if too many already wait.

        ``walk``: the walk's progress, which while it holds the turn is what
        the client's queue (``queue_moved``) moves with.
        """
        if self._queued[client] > self.max_waiting:
            raise WalkLimitReached(f"{client} already has {self.max_waiting} album listings waiting")
        self._queued[client] += 1
        turn = self._turns.setdefault(client, trio.Lock())
        activity = self._activity.setdefault(client, WalkActivity())
        walk = walk or WalkProgress()
        try:
            async with turn:
                activity.add(walk)
                self.everyone.add(walk)
                ended = False
                try:
                    yield
                    ended = True
                except Exception:  # a walk that failed did its work too (a 404, a 500); not one given up on
                    ended = True
                    raise
                finally:
                    activity.remove(walk, ended=ended)
                    self.everyone.remove(walk, ended=ended)
        finally:
            self._queued[client] -= 1
            if not self._queued[client]:
                del self._queued[client], self._turns[client], self._activity[client]

    def queue_moved(self, client: str, walk: WalkProgress) -> tuple[str, int]:
        """The queue ``walk`` waits in, and how far it moved: ``client``'s turn, as its walk moves; then a walker's.

        Slow walks that move on (minutes on cold NFS) move the queues behind
        them: the client's own, for its turn, and everyone's, for a thread.
        A walk given up on, stuck on dead storage, moves nothing as it leaves,
        so that the requests queued behind it get their 503 with it, not each
        a timeout after the one before.
        """
        activity = self._activity.get(client)
        if activity is None:  # not yet in the queue
            return ("arriving", 0)
        if walk in activity:
            return ("walker", self.everyone.moved())
        return ("turn", activity.moved())

    def queued(self, client: str) -> int:
        return self._queued[client]


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
