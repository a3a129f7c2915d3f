"""Six adjustments to Hypercorn's trio TCP server (0.18), installed once per process.

1. A socket write that does not get each 256 KiB out within the stall timeout ends the connection.

Hypercorn writes to a client's socket inside a cancel scope shielded from
every outside cancellation (``TCPServer.protocol_send``): a client that stops
reading blocks that write, and the task that asked for it, for ever; no
timeout of the app's can end it, and the app's producer sits blocked behind it.
Here the write gets a deadline of its own inside the shield (an inner scope's
deadline still applies): the stall timeout for each ``write_unit`` bytes it
holds, so that the timeout means the same for a write of any size (a steady
client at 50 kB/s takes 10.5 s for a 512 KiB chunk, 5.2 s for each half; the
app's deadline, ``connection``, is counted the same way): past it the socket is
closed and the protocol told,
exactly as when the client resets the connection.  The app then sees the
client gone (``connection`` names it a stall).  Once the server shuts down
(``shutting_down``, called by both launches on SIGTERM/SIGINT), the deadline
is also the end of the grace period: a client that stops reading would
otherwise hold the shutdown for the whole stall timeout.  And a response's
writes can be cut (``ResponseWrites``): a download whose job slot is
reclaimed for another client ends at once, not at its deadline.

2. At most ``connection_limit`` client connections at once.

Every connection holds a descriptor.  When a flood of connections takes the
last ones, ``accept`` fails with EMFILE (trio retries every 0.1 s, logging
each time), and a download already running cannot open its producer's pipes.  Here a
connection past the limit is closed as soon as it is accepted, before the
TLS handshake or any byte is read; the limit (``limits.connection_limit``)
leaves the descriptors the job limit needs.

3. An exception while one connection is handled ends that connection, not the server.

Hypercorn's trio worker runs every connection's ``TCPServer.run`` in one
handler nursery.  Whatever a connection raises beyond ``OSError`` crashes
that nursery, and with it the process: every other download is cut and the
port is closed.  Two such bugs were found by sending malformed requests
(a non-ASCII byte in an HTTP/2 ``:path``, fixed where it arises in
``hypercorn_h2``; a ``BusyResourceError`` below); this is the backstop for
the next one.  The connection is closed, a WARNING line says why (at most one
every 10 s: a client may cause them at its own rate; each is counted,
``client_errors``), and the server goes on.  Upstream report, as it would be filed: "trio worker: an
exception in one connection's handler (e.g. UnicodeDecodeError for a
non-ASCII :path over h2) propagates into serve_listeners' handler nursery and
stops the server; the asyncio worker logs it and keeps serving."

A ``BusyResourceError`` from a write means another task is sending on the
stream without the send lock: Hypercorn's ``_close`` (its ``send_eof``) on the
way out after a framing error.  The connection is ending; the write is
treated like one to a closed stream, as Hypercorn treats BrokenResourceError.

4. A connection HTTP says must close is closed at once, and an idle one after the keep-alive timeout,
   even when the app's task asks.

After a response to ``Connection: close``, to HTTP/1.0 without keep-alive,
or to a request whose body was not read to its end, Hypercorn's HTTP/1.1
protocol sends ``Closed`` from the task that finished the response.  With
Quart-Trio that is the app's message task, which Quart-Trio cancels as soon as
the response is out: ``_close`` is cancelled at its first checkpoint, before
the socket is shut, and the client (reading until close) waits until the
read timeout, 120 s and more, holding a descriptor.  Here ``_close`` is
shielded, with a deadline of its own (a TLS close may wait on the peer).
The same task restarts the keep-alive timer once a response is out
(``Updated(idle=True)``): cancelled there, the timer never ran again, and a
connection that had carried one request stayed open for ever, so one client
with enough idle sockets could take every connection.  The restart is
shielded too (it only starts a task).

5. A close first reads what the client still sends (a lingering close).

See ``_close_lingering``: closed with the rest of a refused head unread, the
socket sent a reset, and a client may drop the answer it had not read yet.
An HTTP/2 connection's streams are ended before it lingers, not after: the
protocol closes a connection itself (a protocol error, the client's GOAWAY, a
flood), and h2 then refuses every frame while Hypercorn drops what the apps
send, saying nothing.  Told only once the lingering close had ended (the
client closing, or 2 s), a download at an open window made its whole archive
for nobody at disk speed meanwhile (48 MB in 0.3 s), and one at a closed
window held its producer and job slot those 2 s (helper 190).

6. A connection the client has closed ends with its last response, not at the keep-alive timeout.

See ``_stop_idle_timer_at_eof``: 25-45 % of curl's connections to ``/healthz``
stayed in CLOSE-WAIT for the keep-alive timeout, and sequential polite clients
filled a small ``ARCHIVER_MAX_CONNECTIONS``.

The patches wrap ``TCPServer.run`` and ``TCPServer._read_data`` and replace ``TCPServer.protocol_send``
for its RawData and Closed cases (the latter closing as ``TCPServer._close``
does, but for the lingering).  tests/test_fences.py fails if what they rely on
changes in a new Hypercorn release.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, ClassVar

import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

from ..logs import Quieted
from . import client_errors
from .delivery import note_dropped

logger = logging.getLogger(__name__)

_MARKER = "_archiver_adjusted"
_READ_DONE = "_archiver_read_done"
_LINGERING = "_archiver_lingering"  # set on a TCPServer once _close_lingering reads
# Seconds between two "connection limit reached" warnings.
REFUSAL_LOG_INTERVAL = 10.0
# Seconds a connection's close may take (a TLS close_notify to a peer that does not read).
CLOSE_TIMEOUT = 5.0
# What a close reads and drops of what the client still sends, at most (``_close_lingering``).
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024


class _Limits:
    """The process's settings for the patches, and its count of open connections."""

    write_timeout = math.inf
    write_unit = 256 * 1024
    max_connections = math.inf
    open_connections = 0
    refused_connections = 0
    last_refusal_logged = -math.inf
    shutdown_started = math.inf  # trio time of SIGTERM/SIGINT
    writes: ClassVar[set[tuple[trio.CancelScope, float]]] = set()  # in flight, with their grace


LIMITS = _Limits()


class ResponseWrites:
    """The socket writes of one HTTP/1.1 response, which its own task makes: ``cut_now`` ends them.

    Over HTTP/1.1 the app's task writes its response to the socket itself
    (``protocol_send``), shielded: cancelling that task leaves a write to a
    client that reads slowly blocked until its stall deadline (helper 132: a
    download whose job slot was reclaimed held it ~60 s more).  Once cut, the
    write under way and every later one end the connection at once, as a write
    past its deadline does.  HTTP/2 writes are never cut, whatever task makes
    them (a stream's head is written by its app's task, its data by the
    connection's writer): the connection carries other streams, and a stream's
    send of data waits unshielded.  ``written``: whether a write of this
    response's returned whole (it went over HTTP/1.1, and the kernel took it).
    """

    __slots__ = ("cut", "scope", "written")

    def __init__(self) -> None:
        self.cut = False
        self.scope: trio.CancelScope | None = None  # the write under way
        self.written = False

    def cut_now(self) -> None:
        self.cut = True
        if self.scope is not None:
            self.scope.cancel()


_RESPONSE_WRITES: ContextVar[ResponseWrites | None] = ContextVar("archiver_response_writes", default=None)


def watch_response_writes() -> ResponseWrites:
    """The writes this task makes from now on (its response's over HTTP/1.1), to be cut with ``cut_now``."""
    writes = ResponseWrites()
    _RESPONSE_WRITES.set(writes)
    return writes


def shutting_down() -> None:
    """The server stops: every socket write ends by the grace period's end at the latest (the stall patch).

    Idempotent: the grace period starts at the first call (a worker is told twice, see ``hypercorn_signals``).
    """
    if is_shutting_down():
        return
    LIMITS.shutdown_started = trio.current_time()
    for scope, grace in LIMITS.writes:
        scope.deadline = min(scope.deadline, LIMITS.shutdown_started + grace)


def is_shutting_down() -> bool:
    """Whether ``shutting_down`` was called (SIGTERM/SIGINT): in-flight downloads are in their grace period."""
    return LIMITS.shutdown_started != math.inf


def install(*, write_timeout: float, max_connections: int, write_unit: int = 256 * 1024) -> None:
    """Patch Hypercorn's TCP server (once per process) and set its limits (every call: the last app's apply).

    ``write_timeout``: seconds each ``write_unit`` bytes of a socket write may take.
    """
    LIMITS.write_timeout = write_timeout
    LIMITS.write_unit = write_unit
    LIMITS.max_connections = max_connections
    if getattr(TCPServer, _MARKER, False):
        return
    _limit_connections()
    _time_out_writes()
    _stop_idle_timer_at_eof()
    setattr(TCPServer, _MARKER, True)


# Framing a write carries beyond the app's bytes (a chunk header, HTTP/2 frame headers):
# not counted, so that the socket's deadline for a chunk is the app's (512 KiB + 9 bytes of
# chunked framing was a third unit, 24 s for a client the app had given 16).
FRAMING_BYTES = 1024


def write_units(length: int, unit: int) -> int:
    """How many stall timeouts a write of ``length`` bytes may take: one for each ``unit`` bytes, at least one.

    Up to FRAMING_BYTES over a whole number of units count as that number.
    """
    return max(1, -(-(length - FRAMING_BYTES) // unit))


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
        peer = _peer(self)  # now: once Hypercorn has closed the socket it cannot be asked
        try:
            await original(self)
        except Exception as error:  # not BaseException: cancellation (shutdown) goes on as it came
            client_errors.count("connection_error")
            _error_lines.log("connection from %s ended by an error: %s", peer, _describe(error))
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await self.stream.aclose()
        finally:
            LIMITS.open_connections -= 1

    TCPServer.run = run  # type: ignore[method-assign]


def _peer(server: Any) -> str:
    try:
        stream = getattr(server.stream, "transport_stream", server.stream)
        return str(stream.socket.getpeername()[0])
    except (OSError, AttributeError, IndexError):
        return "unknown"


def _describe(error: BaseException) -> str:
    """One line for an error, digging into exception groups for the first real one."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


# A client can end connections so at its own rate (helper 85: a PRIORITY tree over 1,000 streams).
_error_lines = Quieted(logger, logging.WARNING)


def _log_refusal() -> None:
    now = trio.current_time()
    if now - LIMITS.last_refusal_logged >= REFUSAL_LOG_INTERVAL:
        LIMITS.last_refusal_logged = now
        logger.warning(
            "connection limit reached: %d open; new connections are closed at once (%d so far)",
            LIMITS.open_connections,
            LIMITS.refused_connections,
        )


async def _close_lingering(server: Any) -> None:
    """Hypercorn's ``TCPServer._close``, reading what the client still sends before the socket is closed.

    A socket closed with bytes unread, or that bytes reach after, answers
    with a reset (RFC 1122 4.2.2.13), and a client may then drop the answer
    it had not read yet (Windows does): the rest of a head too large for h11
    turned its 431 into "connection reset".  So once our side is shut
    (``send_eof``), what arrives is read and dropped until the client closes,
    for LINGER_SECONDS and LINGER_BYTES at most, as nginx's ``lingering_close``
    does.  From another task than the reader (a response's end), the reader
    may be reading: this finds the stream busy and closes at once; or the
    reader comes back to its socket while this reads, finds it busy, and ends
    (``_stop_idle_timer_at_eof``).
    """
    try:
        await server.stream.send_eof()
    except AttributeError:
        pass  # TLS has no half-close: read all the same (the answer says "close", and the client will)
    except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
        await server.stream.aclose()  # gone already, or another task is at it
        return
    setattr(server, _LINGERING, True)  # the reading task may find the stream busy from now on
    with trio.move_on_after(LINGER_SECONDS):
        try:
            dropped = 0
            while dropped < LINGER_BYTES and (data := await server.stream.receive_some(64 * 1024)):
                dropped += len(data)
        except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
            pass
    await server.stream.aclose()


def _stop_idle_timer_at_eof() -> None:
    original: Callable[[Any], Awaitable[None]] = TCPServer._read_data

    async def _read_data(self: Any) -> None:
        try:
            await original(self)
        except trio.BusyResourceError:
            if not getattr(self, _LINGERING, False):
                raise
            # Another task's close (a response's end) reads what the client still sends
            # (_close_lingering), and closes: this reader's part is over (helper 109: a WARNING
            # for an error that was none, in 2 of 9 closes after a request refused with "close").
            logger.debug("connection from %s: its reader ends, a close is reading", _peer(self))
        # The client's side has ended (it closed, or the read failed): nothing more can come, and
        # the connection ends once its responses have.  Hypercorn's keep-alive timer, restarted by
        # the last response, kept it (a descriptor and a connection slot, in CLOSE-WAIT) for the
        # keep-alive timeout: run() leaves its task group only once every task in it has ended.
        setattr(self, _READ_DONE, True)
        with trio.CancelScope(shield=True):
            await self.idle_task.stop()

    TCPServer._read_data = _read_data  # type: ignore[method-assign]


def _time_out_writes() -> None:
    original: Callable[[Any, Event], Awaitable[None]] = TCPServer.protocol_send

    async def protocol_send(self: Any, event: Event) -> None:
        if isinstance(event, Closed):
            if isinstance(self.protocol.protocol, H2Protocol):
                # Its streams end now, not once the close has lingered (patch 5); told again after, at no cost.
                await self.protocol.handle(Closed())
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await _close_lingering(self)
            await self.protocol.handle(Closed())
            return
        if isinstance(event, Updated):
            if event.idle and getattr(self, _READ_DONE, False):
                return  # the client sent all it will: no timer to wait for (see _stop_idle_timer_at_eof)
            with trio.CancelScope(shield=True):
                await original(self, event)
            return
        if not isinstance(event, RawData):
            await original(self, event)
            return
        # Shielded from the first checkpoint, the lock's: the protocol has handed these bytes over
        # (h2's data_to_send), and a send cancelled before its write lost them, which for HTTP/2 put
        # the client's HPACK table out of step and ended the connection (helper 110: a small answer
        # cut by its deadline while a batch to a slow reader held the lock).  The wait for the lock
        # is bounded by its holder's write's deadline.
        response = _RESPONSE_WRITES.get() if isinstance(self.protocol.protocol, H11Protocol) else None
        with trio.CancelScope(shield=True):
            async with self.send_lock:
                stalled = False
                try:
                    grace = self.config.graceful_timeout
                    timeout = LIMITS.write_timeout * write_units(len(event.data), LIMITS.write_unit)
                    ends = min(trio.current_time() + timeout, LIMITS.shutdown_started + grace)
                    # One scope a write (a write is one chunk): its own deadline ends it, or its response's cut.
                    with trio.CancelScope(deadline=ends) as deadline:
                        LIMITS.writes.add(entry := (deadline, grace))
                        if response is not None:
                            response.scope = deadline
                            if response.cut:
                                deadline.cancel()
                        try:
                            await self.stream.send_all(event.data)
                        finally:
                            LIMITS.writes.discard(entry)
                            if response is not None:
                                response.scope = None
                    if response is not None and not deadline.cancelled_caught:
                        response.written = True
                    if deadline.cancelled_caught:
                        # Half a write went out: the stream is unusable.
                        stalled = True
                        await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError) as failure:
                    # Busy: Hypercorn's _close is shutting the stream (see the module docstring).
                    if isinstance(failure, trio.BrokenResourceError):
                        # Broken: closing is all a broken stream is good for (trio).  Left open, a send
                        # that failed while the connection stood (ENOBUFS, ENOMEM) left the client
                        # waiting for the rest of its response for good (helper 193).
                        await self.stream.aclose()
                else:
                    if not stalled:
                        return
            if event.data:
                note_dropped()  # the app's send returns as if written (fences.delivery)
            await self.protocol.handle(Closed())

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
