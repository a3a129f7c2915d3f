"""systemd's watchdog: "WATCHDOG=1" from the event loop while it runs (sd_notify(3); systemd.service(5) WatchdogSec=).

An instance whose event loop is stuck (a call that blocks it, the process
stopped or swapping) keeps its listening socket: the kernel completes
connections into its backlog, nginx's connect succeeds, and the request
waits for its headers for ``proxy_read_timeout`` (1 h) instead of going on to
the next instance (helper 82: every second request through nginx hung).
With ``WatchdogSec=`` in the unit (``deploy/archiver@.service``), systemd
passes ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` and kills a process that sends
no ping for that long (SIGABRT: ``faulthandler`` then writes every thread's
Python stack to the journal), and ``Restart=always`` starts it again.  The
ping comes from a task of the event loop, so it stops when the loop does.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
from collections.abc import Mapping

import trio

logger = logging.getLogger(__name__)


def watchdog_interval(environ: Mapping[str, str], pid: int, parent: int) -> float | None:
    """Seconds between pings for process ``pid`` (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    recommends), or None: no watchdog, another process's (``WATCHDOG_PID``), or no ``NOTIFY_SOCKET``.

    Also when ``WATCHDOG_PID`` is the ``parent``'s: a Hypercorn worker (``workers
    = N``), whose master runs no event loop of the service's (the unit's
    ``NotifyAccess=all`` lets workers' pings count).  Killed, a worker stops the
    master and the others (README, Deploying): any one worker's pings keep them.
    """
    usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not environ.get("NOTIFY_SOCKET") or not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner not in (str(pid), str(parent)):
        return None
    return int(usec) / 2_000_000


def notify_address(path: str) -> str:
    """The socket address of ``NOTIFY_SOCKET``: a leading ``@`` names an abstract socket (a NUL byte)."""
    return "\0" + path[1:] if path.startswith("@") else path


async def feed_watchdog(interval: float, notify_socket: str) -> None:
    """Send "WATCHDOG=1" to ``notify_socket`` (``NOTIFY_SOCKET``'s value) every ``interval`` seconds, until cancelled.

    Each ping is one non-blocking ``sendto``, made between sleeps: a manager
    whose queue is full (PID 1 busy; the queue is every service's) loses that
    ping, and the loop does not wait on the socket (helper 83: through Trio's
    ``sendto``, which waits for the socket to be writable, an unconnected
    datagram socket said writable and the send failed again, a core spinning).
    A failed send is a WARNING once, until one goes again: the pings' absence
    is the manager's to judge.
    """
    faulthandler.enable()  # the stacks of a loop that hung, in the journal, when systemd sends SIGABRT
    logger.info("systemd watchdog: a ping every %.3g s to %s", interval, notify_socket)
    address = notify_address(notify_socket)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as sock:
        failing = False
        while True:
            try:
                sock.sendto(b"WATCHDOG=1", address)
            except OSError as error:
                if not failing:
                    logger.warning("systemd watchdog: cannot ping %s: %s", notify_socket, error)
                failing = True
            else:
                if failing:
                    logger.info("systemd watchdog: pinging %s again", notify_socket)
                failing = False
            await trio.sleep(interval)


def watchdog_task(environ: Mapping[str, str] = os.environ) -> tuple[float, str] | None:
    """(interval, NOTIFY_SOCKET) to feed systemd's watchdog with for this process, or None when none was asked for.

    A ``NOTIFY_SOCKET`` that is neither a path from / nor ``@`` and a name (a
    relative path, ``vsock:``) is a WARNING and no pings, as sd_notify(3) takes none.
    """
    interval = watchdog_interval(environ, os.getpid(), os.getppid())
    if interval is None:
        return None
    notify_socket = environ["NOTIFY_SOCKET"]
    if not notify_socket.startswith(("/", "@")):
        logger.warning("systemd watchdog: NOTIFY_SOCKET %r is no socket this service can ping: no pings", notify_socket)
        return None
    return interval, notify_socket
