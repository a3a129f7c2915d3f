"""SIGTERM, SIGINT, SIGHUP in Hypercorn's own process: the graceful shutdown of any stop, never a KeyboardInterrupt.

hypercorn.toml runs the app in Hypercorn's own process (``workers = 0``), so
that a fatal error exits non-zero: Hypercorn 0.18's ``run`` returns 0 after a
worker process died with 1.  In that mode Hypercorn passes no shutdown
trigger to its trio worker: SIGINT reaches it only as a KeyboardInterrupt,
which Trio may raise inside any task (a connection's, a download's) rather
than where Hypercorn catches it, and SIGTERM, the signal systemd sends, is
left at its default and kills the process at once, cutting every download
(as does SIGHUP, a closed terminal's).  A second Ctrl-C during the grace
period was a KeyboardInterrupt traceback, cutting the downloads; and a
process that inherited SIGINT ignored (started with ``&`` from a script)
ignored it for good (found by helper 34).

Here a Trio signal receiver, started in the app's lifespan, waits for any of
``STOP_SIGNALS`` and sets Hypercorn's ``WorkerContext.terminate``, the event Hypercorn's own
worker loop waits on (``raise_shutdown(context.terminate.wait)``, as for
``max_requests``): no new connections, in-flight downloads get
``graceful_timeout``, then the process exits 0.  The contexts are found by
wrapping ``WorkerContext.__init__``.

With ``workers`` > 0 (``hypercorn --workers N``), Hypercorn's master stops its
workers another way: on SIGTERM, SIGINT or SIGHUP (a reload) it sets a shared
``multiprocessing`` event, which each worker polls every 0.1 s
(``hypercorn.utils.check_multiprocess_shutdown_event``, the worker's shutdown
trigger), and sends SIGTERM only once a first worker has exited.  No signal
reaches the workers meanwhile, so the stall deadline of a write blocked on a
client that stopped reading was not shortened to the grace period
(``hypercorn_tcp.shutting_down``): a stop or a reload took up to the stall
timeout (60 s a 256 KiB) instead of ``graceful_timeout``, and the downloads it
cut were logged as clients leaving.  Here the trigger is wrapped: once the
event is set, the worker logs it and starts its grace period, as on SIGTERM.
tests/test_fences.py fails if what this relies on changes.
"""

from __future__ import annotations

import logging
import signal
import weakref
from typing import Any

import trio
from hypercorn.trio import run as hypercorn_trio_run
from hypercorn.trio.worker_context import WorkerContext

from . import held_signals, hypercorn_tcp
from .held_signals import STOP_SIGNALS

logger = logging.getLogger(__name__)

_MARKER = "_archiver_adjusted"
_CONTEXTS: weakref.WeakSet[Any] = weakref.WeakSet()


def install() -> None:
    """Note every WorkerContext Hypercorn creates in this process, and wrap the workers' shutdown trigger (once).

    ``archiver.asgi`` has held the stop signals since its first line (``held_signals``).
    """
    if getattr(WorkerContext, _MARKER, False):
        return
    original = WorkerContext.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _CONTEXTS.add(self)

    WorkerContext.__init__ = __init__  # type: ignore[method-assign]
    setattr(WorkerContext, _MARKER, True)
    # Looked up by name when trio_worker builds the trigger, after it has loaded the app (this).
    original_trigger = hypercorn_trio_run.check_multiprocess_shutdown_event  # type: ignore[attr-defined]

    async def check_multiprocess_shutdown_event(shutdown_event: Any, sleep: Any) -> None:
        await original_trigger(shutdown_event, sleep)
        logger.info(
            "stopped by Hypercorn's master: no new connections; in-flight downloads get Hypercorn's "
            "graceful_timeout to finish (hypercorn.toml's, or --graceful-timeout's)"
        )
        hypercorn_tcp.shutting_down()

    hypercorn_trio_run.check_multiprocess_shutdown_event = check_multiprocess_shutdown_event  # type: ignore[attr-defined]


async def terminate_on_stop_signal() -> None:
    """Wait for one of STOP_SIGNALS, then start Hypercorn's graceful shutdown (run in the app's lifespan nursery).

    Later ones are ignored: a second (a supervisor's repeat, a second Ctrl-C;
    with workers, the master's SIGTERM after its shutdown event) would, at
    its default, end the process at once, cutting the downloads in flight
    (the receiver restores what it found: SIG_IGN).
    """
    received = await wait_for_stop_signal()
    logger.info(
        "received %s: no new connections; in-flight downloads get Hypercorn's graceful_timeout to finish "
        "(hypercorn.toml's, or --graceful-timeout's)",
        received.name,
    )
    for context in list(_CONTEXTS):
        await context.terminate.set()
    hypercorn_tcp.shutting_down()


async def wait_for_stop_signal() -> signal.Signals:
    """Until one of STOP_SIGNALS arrives (or one held, ``held_signals``): which one.  From then on, they are ignored."""
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            if held_signals.received:
                return held_signals.received[0]
            return signal.Signals(await anext(signals))
    finally:
        # The receiver has put back what it found (the default, or the holding handler): a
        # second signal now, at its default, would end the process at once.
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
