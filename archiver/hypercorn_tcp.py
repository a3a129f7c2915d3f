"""Two adjustments to Hypercorn's trio TCP server (0.17-0.18), installed once per process.

1. A socket write that makes no progress for the stall timeout ends the connection.

Hypercorn writes to a client's socket inside a cancel scope shielded from
every outside cancellation (``TCPServer.protocol_send``): a client that stops
reading blocks that write, and the task that asked for it, for ever; no
timeout of the app's can end it, and the app's zip sits blocked behind it.
Here the write gets a deadline of its own inside the shield (an inner scope's
deadline still applies): past it the socket is closed and the protocol told,
exactly as when the client resets the connection.  The app then sees the
client gone (``connection`` names it a stall).

2. At most ``connection_limit`` client connections at once.

Every connection holds a descriptor.  When a flood of connections takes the
last ones, ``accept`` fails with EMFILE (trio retries every 0.1 s, logging
each time), and a download already running cannot open zip's pipes.  Here a
connection past the limit is closed as soon as it is accepted, before the
TLS handshake or any byte is read; the limit (``limits.connection_limit``)
leaves the descriptors the job limit needs.

The patches wrap ``TCPServer.run`` and replace ``TCPServer.protocol_send``
for its RawData case.  tests/test_fences.py fails if what they rely on
changes in a new Hypercorn release.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer

logger = logging.getLogger(__name__)

_MARKER = "_archiver_adjusted"
# Seconds between two "connection limit reached" warnings.
REFUSAL_LOG_INTERVAL = 10.0


class _Limits:
    """The process's settings for the patches, and its count of open connections."""

    write_timeout = math.inf
    max_connections = math.inf
    open_connections = 0
    refused_connections = 0
    last_refusal_logged = -math.inf


LIMITS = _Limits()


def install(*, write_timeout: float, max_connections: int) -> None:
    """Patch Hypercorn's TCP server (once per process) and set its limits (every call: the last app's apply)."""
    LIMITS.write_timeout = write_timeout
    LIMITS.max_connections = max_connections
    if getattr(TCPServer, _MARKER, False):
        return
    _limit_connections()
    _time_out_writes()
    setattr(TCPServer, _MARKER, True)


def _limit_connections() -> None:
    original: Callable[[Any], Awaitable[None]] = TCPServer.run

    async def run(self: Any) -> None:
        if LIMITS.open_connections >= LIMITS.max_connections:
            LIMITS.refused_connections += 1
            _log_refusal()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            return
        LIMITS.open_connections += 1
        try:
            await original(self)
        finally:
            LIMITS.open_connections -= 1

    TCPServer.run = run  # type: ignore[method-assign]


def _log_refusal() -> None:
    now = trio.current_time()
    if now - LIMITS.last_refusal_logged >= REFUSAL_LOG_INTERVAL:
        LIMITS.last_refusal_logged = now
        logger.warning(
            "connection limit reached: %d open; new connections are closed at once (%d so far)",
            LIMITS.open_connections,
            LIMITS.refused_connections,
        )


def _time_out_writes() -> None:
    original: Callable[[Any, Event], Awaitable[None]] = TCPServer.protocol_send

    async def protocol_send(self: Any, event: Event) -> None:
        if not isinstance(event, RawData):
            await original(self, event)
            return
        async with self.send_lock:
            stalled = False
            try:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(LIMITS.write_timeout) as deadline:
                        await self.stream.send_all(event.data)
                    if deadline.cancelled_caught:
                        # Half a write went out: the stream is unusable.
                        stalled = True
                        await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            else:
                if not stalled:
                    return
            await self.protocol.handle(Closed())

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
