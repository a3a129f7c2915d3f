"""What a request asks of the storage before a producer starts: in a worker thread, given up when the storage is silent.

A ``stat`` or ``readdir`` on a dead NFS server or FUSE file system blocks until
the storage comes back (on a hard mount, for ever).  On the event loop it would
stop the whole service, ``/healthz`` with it; in a worker thread it holds only
its request, and only until the storage timeout: the request then gets a 503
(``StorageSilent``), and the thread is left to finish when it can.  Each kind of
call has its own small capacity limiter, so that threads stuck on dead storage
are bounded, and further calls of that kind wait for a thread within the same
deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from ..archive.storage import ListingFailed, WalkProgress

T = TypeVar("T")

# Album names resolved at once (a few lstat calls each; stuck ones stay stuck while the storage is dead).
RESOLVERS = 4


class StorageSilent(ListingFailed):
    """The storage did not answer (nor, for a walk, move on) for the storage timeout: try again later."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the storage did not answer for {seconds:.1f} s", transient=True)


async def call_storage(
    function: Callable[[], T],
    *,
    timeout: float,
    limiter: trio.CapacityLimiter,
    progress: WalkProgress | None = None,
) -> T:
    """Return ``function()``, run in a worker thread under ``limiter``; StorageSilent after ``timeout`` s of silence.

    Silence: ``timeout`` seconds (``inf``: never) in which the call neither
    returned nor moved ``progress`` on; the wait for a thread of ``limiter``
    counts too.  Looked at four times a timeout: given up within 1.25
    timeouts.  Whatever ``function`` raises is raised here.
    """
    returned: list[T] = []
    raised: list[Exception] = []

    async def call() -> None:
        try:
            returned.append(await trio.to_thread.run_sync(function, limiter=limiter, abandon_on_cancel=True))
        except Exception as error:  # raised below, itself: not in the nursery's ExceptionGroup
            raised.append(error)
        nursery.cancel_scope.cancel()

    silent_for = 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        since = trio.current_time()
        steps = -1
        while True:
            await trio.sleep(timeout / 4)  # for ever when the timeout is inf: ended by call()
            now = trio.current_time()
            if progress is not None and progress.steps != steps:
                steps, since = progress.steps, now
            if now - since >= timeout:
                silent_for = now - since
                nursery.cancel_scope.cancel()  # the thread is abandoned, still holding its limiter's token
                break
    if raised:
        raise raised[0]
    if returned:  # (a cancellation from outside propagates from the nursery)
        return returned[0]
    raise StorageSilent(silent_for)
