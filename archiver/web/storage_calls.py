"""What a request asks of the storage before a producer starts: in a worker thread, given up when the storage is silent.

A ``stat`` or ``readdir`` on a dead NFS server or FUSE file system blocks until
the storage comes back (on a hard mount, for ever).  On the event loop it would
stop the whole service, ``/healthz`` with it; in a worker thread it holds only
its request, and only until the storage timeout: the request then gets a 503
(``StorageSilent``), and the thread is left to finish when it can.  Each kind of
call has its own small capacity limiter, so that threads stuck on dead storage
are bounded.

A request waits for nothing for longer than the storage timeout, queues
included: the wait for its turn and for a thread counts as silence unless
what it waits behind moves on (a slow walk of a large album on cold NFS is
no reason to refuse the requests queued behind it; a stuck one is).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import trio

from ..archive.listing import ListingFailed, WalkProgress
from ..archive.worker_threads import NoThread, in_thread

T = TypeVar("T")

# Album names resolved at once (a few lstat calls each; stuck ones stay stuck while the storage is dead).
RESOLVERS = 4


class StorageSilent(ListingFailed):
    """The storage did not answer (nor, for a walk, move on) for the storage timeout: try again later."""

    def __init__(self, seconds: float, queued: bool) -> None:
        if queued:  # the request's own storage was never asked: the calls before it are stuck
            message = f"waited {seconds:.1f} s behind calls that the storage does not answer"
        else:
            message = f"the storage did not answer for {seconds:.1f} s"
        super().__init__(message, transient=True)


async def call_storage(
    function: Callable[[], T],
    *,
    timeout: float,
    limiter: trio.CapacityLimiter,
    progress: WalkProgress | None = None,
    admission: Callable[[], AbstractAsyncContextManager[object]] | None = None,
    queue_moved: Callable[[], tuple[str, object]] | None = None,
) -> T:
    """Return ``function()``, run in a worker thread under ``limiter``; StorageSilent after ``timeout`` s of silence.

    ``admission`` (a request's turn) is entered first, then ``limiter``'s
    thread is waited for.  Silence: ``timeout`` seconds (``inf``: never) in
    which nothing moved: before ``function`` starts, ``queue_moved()`` (the
    name of the queue waited in, and how far it moved) kept its count
    (without it, waiting is silence); after, ``progress`` did not move on
    (without it, the call did not return).  Looked at four times a
    timeout: given up within 1.25 timeouts.  Whatever ``admission`` or
    ``function`` raises is raised here.
    """
    returned: list[T] = []
    raised: list[Exception] = []
    started = False

    def run() -> T:
        nonlocal started
        started = True
        return function()

    async def call(nursery: trio.Nursery) -> None:
        try:
            if admission is None:
                returned.append(await in_thread(run, limiter=limiter))
            else:
                async with admission():
                    returned.append(await in_thread(run, limiter=limiter))
        except NoThread as error:  # the system's, not the storage's: the request may be tried again
            raised.append(ListingFailed(str(error), transient=True))
        except Exception as error:  # raised below, itself: not in the nursery's ExceptionGroup
            raised.append(error)
        nursery.cancel_scope.cancel()

    try:
        silent_for, queued = await _watch(call, timeout, lambda: started, progress, queue_moved)
    finally:
        if progress is not None and not returned:
            progress.given_up = True  # given up on, or its client left: a walk still moving stops at its next step
    if raised:
        raise raised[0]
    if returned:
        return returned[0]
    raise StorageSilent(silent_for, queued=queued)


async def _watch(
    call: Callable[[trio.Nursery], Awaitable[None]],
    timeout: float,
    started: Callable[[], bool],
    progress: WalkProgress | None,
    queue_moved: Callable[[], tuple[str, object]] | None,
) -> tuple[float, bool]:
    """Run ``call`` until it cancels the nursery it is given: (0, False); or after ``timeout`` s of silence, cancel it.

    Then: how long the silence was, and whether most of it was spent queued
    (the calls ahead are what the storage does not answer, not this one).
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, nursery)
        since = trio.current_time()
        seen: tuple[str, object] | None = None
        called_at: float | None = None  # the first look that saw the call started
        while True:
            await trio.sleep(timeout / 4)  # for ever when the timeout is inf: ended by call()
            now = trio.current_time()
            state: tuple[str, object] | None
            if started():
                called_at = now if called_at is None else called_at
                state = ("walk", progress.steps) if progress is not None else None
            else:
                state = queue_moved() if queue_moved is not None else None
            # Only a measure that moved between two looks is movement.  A request that moves on
            # to another queue (its turn came, its thread started) moved nothing itself: a turn
            # handed on by a walk given up on, just before this look, must not buy a timeout more.
            if state is not None and seen is not None and state[0] == seen[0] and state[1] != seen[1]:
                since = now
            seen = state
            if now - since >= timeout:
                nursery.cancel_scope.cancel()  # the thread is abandoned, still holding its limiter's token
                return now - since, called_at is None or now - called_at < (now - since) / 2
    return 0.0, False  # call() ended (a cancellation from outside propagates from the nursery)
