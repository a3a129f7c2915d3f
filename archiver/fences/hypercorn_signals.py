"""SIGTERM in Hypercorn's own process: the same graceful shutdown as any other stop, never a KeyboardInterrupt.

hypercorn.toml runs the app in Hypercorn's own process (``workers = 0``), so
that a fatal error exits non-zero: Hypercorn 0.18's ``run`` returns 0 after a
worker process died with 1.  In that mode Hypercorn passes no shutdown
trigger to its trio worker: SIGINT reaches it only as a KeyboardInterrupt,
which Trio may raise inside any task (a connection's, a download's) rather
than where Hypercorn catches it, and SIGTERM, the signal systemd sends, is
left at its default and kills the process at once, cutting every download.

Here a Trio signal receiver, started in the app's lifespan, waits for SIGTERM
and sets Hypercorn's ``WorkerContext.terminate``, the event Hypercorn's own
worker loop waits on (``raise_shutdown(context.terminate.wait)``, as for
``max_requests``): no new connections, in-flight downloads get
``graceful_timeout``, then the process exits 0.  The contexts are found by
wrapping ``WorkerContext.__init__``; tests/test_fences.py fails if what this
relies on changes.
"""

from __future__ import annotations

import logging
import signal
import weakref
from typing import Any

import trio
from hypercorn.trio.worker_context import WorkerContext

from . import hypercorn_tcp

logger = logging.getLogger(__name__)

_MARKER = "_archiver_adjusted"
_CONTEXTS: weakref.WeakSet[Any] = weakref.WeakSet()


def install() -> None:
    """Note every WorkerContext Hypercorn creates in this process (once per process)."""
    if getattr(WorkerContext, _MARKER, False):
        return
    original = WorkerContext.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _CONTEXTS.add(self)

    WorkerContext.__init__ = __init__  # type: ignore[method-assign]
    setattr(WorkerContext, _MARKER, True)


async def terminate_on_sigterm() -> None:
    """Wait for SIGTERM, then start Hypercorn's graceful shutdown (run in the app's lifespan nursery).

    Later SIGTERMs are ignored: Hypercorn's master with workers sends each two,
    and the second, at its default, ended the worker at once, cutting the
    downloads in flight (the receiver restores what it found: SIG_IGN).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            logger.info("received SIGTERM: no new connections; in-flight downloads get graceful_timeout to finish")
            for context in list(_CONTEXTS):
                await context.terminate.set()
            hypercorn_tcp.shutting_down()
            return
