"""Album walks per client: one at a time in arrival order, a bounded queue, and how far each queue moved."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..archive.listing import WalkProgress
from .limits import WalkLimitReached


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

    @property
    def waiting_or_walking(self) -> int:
        """Requests of every client waiting for their turn or a walker thread, or walking."""
        return self._queued.total()
