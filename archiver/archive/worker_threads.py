"""Trio's worker threads, and a clear error when the system will not start one.

A process at its tasks' limit (systemd's ``TasksMax``, ``ulimit -u``, a
cgroup's ``pids.max``) cannot start a thread: ``threading`` raises
``RuntimeError("can't start new thread")``, which reached the client as a 500
with a traceback in the log, and left a start given up on counted for ever in
the launcher (found by helper 48).  Here it is ``NoThread``, an ``OSError``
(EAGAIN, as ``fork`` says the same): a 503 with ``Retry-After``, as for the
other things a busy system runs out of.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


class NoThread(OSError):
    """No worker thread could be started (the tasks' limit): try again later."""


async def in_thread(function: Callable[..., T], *args: object, limiter: trio.CapacityLimiter | None = None) -> T:
    """``function(*args)`` in a Trio worker thread, given up on (not waited for) if cancelled.

    Raises NoThread if no thread can be started; whatever ``function`` raises is raised as itself.
    """
    began = False

    def run() -> T:
        nonlocal began
        began = True
        return function(*args)

    try:
        return await trio.to_thread.run_sync(run, limiter=limiter, abandon_on_cancel=True)
    except RuntimeError as error:
        if began:  # the function's own
            raise
        raise NoThread(errno.EAGAIN, f"no thread could be started ({error})") from error
