"""Stop signals held from a launch's first moments until the service's receiver takes them.

Hypercorn listens on its port before it imports the app, and the CLI's
Hypercorn serves only once the app's lifespan has started (the launcher, a
look at the storage: up to ~12 s).  Until the receiver (``hypercorn_signals``)
runs, a SIGTERM or SIGHUP ended the process at its default and a SIGINT was
a KeyboardInterrupt traceback (the issue 23 review; helper 49).  ``hold``
records them instead; ``wait_for_stop_signal`` returns the first at once.

Standard library only, and imported first by ``archiver.asgi``: what the
import of the rest takes is no longer a window.
"""

from __future__ import annotations

import signal
import threading

# What stops the service gracefully, in either launch: systemd's SIGTERM, a terminal's Ctrl-C and hang-up.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Stop signals that came while held, oldest first.
received: list[signal.Signals] = []


def _record(signum: int, frame: object) -> None:
    received.append(signal.Signals(signum))


def hold() -> None:
    """From now until a receiver replaces it, record any of STOP_SIGNALS instead of acting on it.

    Python sets handlers only from the main thread: elsewhere (a test importing the app) nothing is done.
    """
    if threading.current_thread() is threading.main_thread():
        for stop in STOP_SIGNALS:
            signal.signal(stop, _record)
