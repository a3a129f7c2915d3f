"""Seventeen adjustments to Hypercorn's HTTP/2 protocol (0.18), installed once per process.

The send path (2 and 3, and what a stream's end learns of its bytes: ``undelivered``) is
``hypercorn_h2_send``; what a client's frames may cost (11-16) is ``hypercorn_h2_frames``;
``install`` here installs all seventeen.

1. Reset a stream whose response the app did not finish.

When an ASGI app fails after ``http.response.start``, Hypercorn 0.18 closes
the stream on its side and says nothing to the client: no END_STREAM (good)
but no RST_STREAM either, so an HTTP/2 client waits for the rest of the
archive forever.  Over HTTP/1.1 Hypercorn closes the connection without the
terminating chunk, which clients report as a truncated transfer.  Older
Hypercorn releases reset such streams; this restores that, so a failed archive
is an aborted transfer on both protocols and never looks complete.

The patch wraps ``H2Protocol.stream_send``: on the app's ``StreamClosed``, a
stream whose body the app never ended, and which is still open on our side
(OPEN or HALF_CLOSED_REMOTE), gets RST_STREAM(INTERNAL_ERROR) before Hypercorn
forgets it.  A stream the client reset is already CLOSED.  An app that stops
waiting for its last body message (Hypercorn's EndBody waits until the client
has taken the stream's buffered tail: the stall timeout cancels it) has not
finished either: the buffer is marked incomplete again, and the stream reset.

4. Time out idle HTTP/2 connections.

An HTTP/1.1 connection with no request in progress is closed after
``keep_alive_timeout``.  A connection that starts with the HTTP/2 preface
arrives as an HTTP/1.1 "PRI" request, which stops that timer, and Hypercorn's
H2Protocol restarts it only when a stream closes: a client that sends the
preface and SETTINGS and nothing else holds a descriptor for ever.  Here a
new HTTP/2 connection without streams reports itself idle, so the same
timeout applies.  So does a connection whose streams the client reset: their
apps end without the StreamClosed that restarts the timer (helper 62: a client
that reset its download and then idled held the connection, a descriptor and
a connection slot, for ever, and SIGTERM waited out the whole grace).

5. Reset a request whose ``:method`` or ``:path`` is not ASCII, or has no ``:path``.

h2 passes pseudo-header values through as bytes.  Hypercorn decodes
``:method`` and ``:path`` as ASCII while it creates the stream
(``H2Protocol._create_stream``, ``HTTPStream.handle``), outside any handler:
one request with ``:path`` = ``/archive/\xff/`` raises UnicodeDecodeError
through the connection and, in the trio worker, stops the whole server.
Over HTTP/1.1 h11 answers the same bytes with a 400.  Such a request is
malformed (RFC 9113 section 8.3.1: a request target is ASCII, RFC 9110
section 9.1: a method is a token), and section 8.1.1 says a malformed request
is a stream error of type PROTOCOL_ERROR: the stream is reset, and the
connection and its other streams go on.  Upstream report, as it would be
filed: "H2: a non-ASCII byte in :path or :method raises UnicodeDecodeError
in _create_stream/HTTPStream.handle; with the trio worker this stops the
server; it should reset the stream with PROTOCOL_ERROR."  A plain CONNECT
(RFC 9113 section 8.5) has no ``:path``, and ``_create_stream`` then read a
variable it never set (UnboundLocalError), which ended the connection and its
other streams: this server tunnels nothing, so its stream is reset the same way.
And a ``:method`` with a lower-case letter: Hypercorn upper-cases it, so ``get``
was served as a GET and ``head`` as a HEAD, its headers announcing a body its
client, not taking ``head`` for HEAD, waited for and never got (RFC 9110
section 9.1: a method is case-sensitive; helper 170).  Over HTTP/1.1 it is a
``405`` (``hypercorn_h11``, patch 7).

6. Drop the body of a stream already answered.

A stream answered before its body came (a 405, a 400, one reset as above) is
forgotten, and RFC 9113 lets the client go on sending that body.
``H2Protocol._handle_events`` looks the stream up for each DATA frame and
raised KeyError, which ended the connection and every download on it.  Here
such DATA is dropped, its flow-control window given back to the connection.
Upstream report, as it would be filed: "H2: DataReceived for a stream the
server has already closed raises KeyError in _handle_events and tears down
the connection; StreamEnded has a try/except KeyError for this, DataReceived
does not."

7. Release the streams' buffers when the connection closes.

On ``Closed`` Hypercorn ends each stream it still tracks, but not the
streams' buffers, whose events only its send task sets, and that task ends
with the connection.  An app task already past the point where its stream was
told (the app's end, a ``500`` for a response whose start a stall cut, then
its ``EndBody``) waited in ``drain`` for ever: a task left a stream, and a
SIGTERM waited out the whole grace period on an idle service (found by
helper 47, after an HTTP/2 client that stopped reading was cut for stalling).
Here every buffer is closed once the connection is, as the send task does
for a stream that closed under it: its waits return.
Upstream report, as it would be filed: "H2: H2Protocol.handle(Closed) does
not close stream_buffers; an app task in stream_send(EndBody) at that moment
waits in StreamBuffer.drain() forever."

8. Say why a connection ended for a protocol error.

h2 raises ProtocolError for broken frames or HPACK and for requests RFC 9113
calls malformed (an upper-case header name, ``connection``, ``te`` other than
``trailers``, an empty ``:path``, CR, LF or NUL in a value), and
``H2Protocol.handle`` answers it with GOAWAY and closes the connection,
silently: no access line, no other line (helper 52), where HTTP/1.1 logs the
request it cannot parse.  Here such a connection leaves a WARNING line,
its peer and h2's reason, without the header bytes it quotes, escaped and cut to
``_REASON_CHARACTERS``: at most one every 10 s (a client makes them at its
own rate, a connection each), each counted (``client_errors``).  The
downloads on such a connection end with it, their lines saying so
(``connection closed: HTTP/2 protocol error``, not ``client disconnected``).

9. Start nothing, and send nothing, once the connection is gone.

A client that sends many requests at once and closes its socket (helper 61:
20 GETs, closed 20 ms later) met three gaps.  Closed can come from another
task (a failed write) while the reader is still making the streams of the
requests it received, and ``handle(Closed)`` ends the streams it had when it
started, awaiting each: streams made meanwhile were never ended, their apps
never told the client was gone.  And once closed, Hypercorn drops what an
app sends (its stream's buffer is closed, or gone, and the error is
swallowed): such an app ran through its whole archive as if sent, logged it
complete, and with a rate limit held its job slot and producer for minutes
(a 300 MB album: 162 s, for a client that had left).  Here no stream is made
after Closed; Closed ends every stream, those made while it ran too; and an
app's data for a closed connection waits, for the cancellation its stream's
end brings (or the stall timeout), instead of returning at once.  The end
of a stream told from an app task already cancelled was lost as well: that,
the cause of the downloads that ran on, is ``hypercorn_access._tell_app``,
and tests/test_adversarial.py fails without it; this patch closes the
windows the trace showed beside it (a stream made after Closed was told only
because Hypercorn happened to get Closed again from the reader).
An app's end counts as dropped (``fences.delivery``) only if a byte it pushed
was never written: its buffer closed with bytes in it, or a write failed, or
was still waiting on a full socket after ``IN_FLIGHT_WAIT`` (``undelivered``).
Whether the connection is closed by then says nothing: curl closes as soon
as it has END_STREAM, and a quarter of its complete downloads were counted
dropped (helper 78).
Upstream report, as it would be filed: "H2: streams created while
handle(Closed) awaits are never closed, and stream_send drops Body after the
connection closed without telling the app; an ASGI app then streams its
whole response into nothing."

10. Bound the streams a client resets before their answer ("rapid reset").

A stream the client resets is closed at once in h2's state machine, so the
concurrent-stream limit never holds such streams back, and the server writes
nothing that could make the client wait: HEADERS then RST_STREAM, ~26 bytes
with HPACK, ran the app (~1 ms, a 404 page and an access line) at whatever
rate the client sent them (helper 84: 1 s of a client's traffic, 15,600
streams, kept a core busy 15 s and wrote 31,000 log lines; CVE-2023-44487).
Hypercorn's only bound is ``keep_alive_max_requests`` a connection.  Here a
request reset in the same batch of frames is never made into a stream (no
app, no line: nobody waits for its answer; counted, ``client_errors``), and
a connection whose streams are reset before their answer began faster than
a budget allows (``EARLY_RESETS`` at once, ``EARLY_RESETS_PER_SECOND`` after:
a bucket as nghttp2 keeps, whose defaults are 1,000 and 33 for every reset)
is closed with GOAWAY(ENHANCE_YOUR_CALM), and the rest of that batch is
dropped; its other downloads end with it.  A reset h2 makes for a frame the
client should not have sent (DATA after END_STREAM) counts as the client's.
One WARNING says so, at most every 10 s.

17. Retire a connection at ``keep_alive_max_requests``, gracefully.

Past ``keep_alive_max_requests`` (1,000) requests, Hypercorn called h2's
``close_connection`` at once, at the request that passed it: a GOAWAY that
moves h2's connection to CLOSED, where it sends no frame more.  Every response
still in flight on that connection was cut (Hypercorn's send task drops a
stream whose frame h2 refuses), and the client's next frame, sent before it
saw the GOAWAY, ended the connection as a protocol error (helper 179: h2load,
100 streams at a time, had 98 of 1,002 streams answered 2xx and never ended;
a long download on such a connection was a failed transfer).  RFC 9113
section 6.8 wants the streams up to the GOAWAY's last-stream-id completed.
Here, as Hypercorn does at shutdown (``context.terminated``), a connection
that has started ``keep_alive_max_requests`` requests (those reset in their
batch count, patch 10) takes no more: SETTINGS_MAX_CONCURRENT_STREAMS is set
to 0, each further request is reset with REFUSED_STREAM (RFC 9113 section
8.7: its client may retry it on another connection), counted as a frame that
asks for nothing (patch 14), and its streams in flight run to their end; when
the last has ended (or at once, if none is open), the GOAWAY goes, NO_ERROR,
naming the last stream started.  What the client sends after it is not parsed
(h2 refuses every frame but GOAWAY then, and the client's WINDOW_UPDATE for
the last bytes it read was a "protocol error"): the client closes the
connection, or the keep-alive timer, started with the GOAWAY, does.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import trio
from h2.connection import ConnectionState
from h2.settings import SettingCodes
from h2.stream import StreamState
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.events import Body, Data, EndBody, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState

from ..logs import Quieted
from . import client_errors, hypercorn_h2_frames, hypercorn_h2_send
from .delivery import note_connection_closed, note_dropped
from .hypercorn_h2_frames import LAST_STARTED
from .hypercorn_h2_send import undelivered

_UNFINISHED = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
_MARKER = "_archiver_adjusted"
logger = logging.getLogger(__name__)


def install() -> None:
    """Patch Hypercorn's HTTP/2 protocol once per process (idempotent)."""
    if getattr(H2Protocol, _MARKER, False):
        return
    _reset_unfinished_streams()
    hypercorn_h2_send.batch_data_frames()
    hypercorn_h2_send.bound_stream_buffers()
    _time_out_idle_connections()
    _reset_malformed_requests()
    _drop_data_of_streams_gone()
    _release_buffers_on_close()
    _log_protocol_errors()
    _no_streams_after_close()
    _bound_early_resets()  # it filters what the others see
    _retire_at_the_bound_of_requests()  # after 10: a request reset in its batch counts, and none is "started"
    hypercorn_h2_frames.install()  # last: its budget counts every frame
    setattr(H2Protocol, _MARKER, True)


# RFC 9110 section 5.6.2: a token's characters (a method is a token).
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def is_malformed_request(headers: list[tuple[bytes, bytes]]) -> bool:
    """True if ``:method`` is not a token or has a lower-case letter, ``:path`` holds a byte outside visible ASCII, or
    is missing (patch 5)."""
    path = False
    for name, value in headers:
        if name == b":method" and (not value or not _TOKEN.issuperset(value) or value != value.upper()):
            return True
        if name == b":path":
            if any(byte < 0x21 or byte > 0x7E for byte in value):
                return True
            path = True
    return not path


# A client sends these at its own rate, ~13 bytes each with HPACK (helper 84).
_malformed_lines = Quieted(logger, logging.WARNING)


def _reset_malformed_requests() -> None:
    original: Callable[[Any, Any], Awaitable[None]] = H2Protocol._create_stream

    async def _create_stream(self: Any, request: Any) -> None:
        if is_malformed_request(request.headers):
            client_errors.count("http2_malformed_stream")
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
            _malformed_lines.log(
                "HTTP/2 stream %d from %s reset: malformed or missing :method or :path", request.stream_id, peer
            )
            with contextlib.suppress(h2.exceptions.StreamClosedError):  # reset by the client meanwhile
                self.connection.reset_stream(request.stream_id, error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
            # Not a request (none is counted): a frame that asks for nothing, at its block's cost (helper
            # 124: uncounted, 66,000 such streams in 8 s, a core, and the connection never closed).
            block = sum(len(name) + len(value) for name, value in request.headers)
            hypercorn_h2_frames.charge(self, hypercorn_h2_frames.charge_for_bytes(block))
            await self._flush()
            return
        await original(self, request)

    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]


def _drop_data_of_streams_gone() -> None:
    original: Callable[[Any, list[h2.events.Event]], Awaitable[None]] = H2Protocol._handle_events

    async def _handle_events(self: Any, events: list[h2.events.Event]) -> None:
        if not any(isinstance(event, h2.events.DataReceived) for event in events):
            await original(self, events)  # the usual case (no route reads a body): as Hypercorn does, in one go
            return
        # One at a time, each DATA looked at just before Hypercorn would look its stream up: an
        # earlier event may open that stream, and while one is handled, the app may answer and
        # close it.
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                await original(self, [event])
        await self._flush()

    H2Protocol._handle_events = _handle_events  # type: ignore[method-assign]


def _release_buffers_on_close() -> None:
    original: Callable[[Any, Any], Awaitable[None]] = H2Protocol.handle

    async def handle(self: Any, event: Any) -> None:
        await original(self, event)
        if isinstance(event, Closed):
            # Hypercorn ends the streams it had when Closed came; closing each one awaits, and
            # meanwhile the reader may have made more of the requests already received (patch 9).
            while self.streams:
                await self._close_stream(next(iter(self.streams)))
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()  # sets what drain and push wait on (patch 7)

    H2Protocol.handle = handle  # type: ignore[method-assign]


def _no_streams_after_close() -> None:
    original_create: Callable[[Any, Any], Awaitable[None]] = H2Protocol._create_stream
    original_send: Callable[[Any, StreamEvent], Awaitable[None]] = H2Protocol.stream_send

    async def _create_stream(self: Any, request: Any) -> None:
        if getattr(self, "closed", False):
            return  # the client is gone: nobody to answer, nothing to start (patch 9)
        await original_create(self, request)

    async def stream_send(self: Any, event: StreamEvent) -> None:
        if getattr(self, "closed", False) and isinstance(event, (Body, Data)):
            # The connection is gone: these bytes can reach nobody.  Hypercorn drops them and
            # returns at once, and the app would go on making and "sending" its archive at disk
            # speed until told.  It is told (its stream's end, which cancels a Quart app): this
            # send waits for that, and the stall timeout bounds the wait all the same.
            note_dropped()
            if event.stream_id in self.streams:
                await self._close_stream(event.stream_id)
            await trio.sleep_forever()
        buffer = self.stream_buffers.get(getattr(event, "stream_id", None))
        await original_send(self, event)
        if isinstance(event, EndBody) and buffer is not None and await undelivered(buffer):
            # The end "sent" because the buffer was closed with the tail in it (the connection
            # closed), not because the tail was written, or its last write failed.  Whether the
            # connection is closed by now says nothing: a client that has END_STREAM may close
            # it before the app's end runs (helper 78: a quarter of curl's HTTP/2 downloads).
            note_dropped()

    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]
    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]


# Streams one connection's client may reset before their answer began (patch 10), at once, and
# then each second: a browser cancels a download or two; a flood resets every stream it opens.
EARLY_RESETS = 100
EARLY_RESETS_PER_SECOND = 10.0
_RESET_BUDGET = "_archiver_reset_budget"  # (budget left, trio time it was counted, resets so far)
_calm_lines = Quieted(logger, logging.WARNING)


def _bound_early_resets() -> None:
    original: Callable[[Any, list[h2.events.Event]], Awaitable[None]] = H2Protocol._handle_events
    original_create: Callable[[Any, Any], Awaitable[None]] = H2Protocol._create_stream

    async def _create_stream(self: Any, request: Any) -> None:
        setattr(self, LAST_STARTED, max(getattr(self, LAST_STARTED, 0), request.stream_id))
        await original_create(self, request)

    async def _handle_events(self: Any, events: list[h2.events.Event]) -> None:
        reset = {event.stream_id for event in events if isinstance(event, h2.events.StreamReset)}
        if not reset:
            await original(self, events)  # the usual case
            return
        kept: list[h2.events.Event] = []
        early = not_started = 0
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and event.stream_id in reset:
                not_started += 1  # reset in the same batch: never started
                continue
            if isinstance(event, h2.events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None and getattr(stream, "state", None) is ASGIHTTPState.REQUEST:
                    early += 1  # its app had not answered yet
            kept.append(event)
        if not_started:
            client_errors.count("http2_stream_not_started", not_started)
            # Hypercorn's bound a connection still counts them; reaching it retires the connection (patch
            # 17), and never passing it keeps Hypercorn's own check, which closes at once, from acting.
            bound = self.config.keep_alive_max_requests
            self.keep_alive_requests = min(self.keep_alive_requests + not_started, bound)
        now = trio.current_time()
        budget, then, so_far = getattr(self, _RESET_BUDGET, (EARLY_RESETS, now, 0))
        budget = min(EARLY_RESETS, budget + (now - then) * EARLY_RESETS_PER_SECOND) - early - not_started
        so_far += early + not_started
        setattr(self, _RESET_BUDGET, (budget, now, so_far))
        if budget < 0 and not getattr(self, "closed", False):
            client_errors.count("http2_reset_flood")
            note_connection_closed("HTTP/2 reset flood")
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
            _calm_lines.log("HTTP/2 connection from %s closed: %d streams reset before their answer", peer, so_far)
            # The last stream acted on: a client may retry those of the batch dropped (RFC 9113 6.8).
            self.connection.close_connection(
                error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=getattr(self, LAST_STARTED, 0)
            )
            await self._flush()
            await self.send(Closed())
            return
        await original(self, kept)

    H2Protocol._handle_events = _handle_events  # type: ignore[method-assign]
    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]


_RETIRED = "_archiver_retired"  # 1: no more requests taken (patch 17); 2: its GOAWAY sent


def _retire_at_the_bound_of_requests() -> None:
    original_create: Callable[[Any, Any], Awaitable[None]] = H2Protocol._create_stream
    original_events: Callable[[Any, list[h2.events.Event]], Awaitable[None]] = H2Protocol._handle_events
    original_send: Callable[[Any, StreamEvent], Awaitable[None]] = H2Protocol.stream_send
    original_handle: Callable[[Any, Any], Awaitable[None]] = H2Protocol.handle
    original_send_data: Callable[[Any, int], Awaitable[None]] = H2Protocol._send_data

    async def _create_stream(self: Any, request: Any) -> None:
        if self.keep_alive_requests < self.config.keep_alive_max_requests or getattr(self, "closed", False):
            await original_create(self, request)  # Hypercorn counts it: at the bound, never past it
            return
        # Never made a stream: the events of the batch that follow it find none (DATA is dropped, patch 6;
        # StreamEnded, StreamReset and WINDOW_UPDATE look it up as one that may have closed).
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # reset by the client meanwhile
            self.connection.reset_stream(request.stream_id, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
        block = sum(len(name) + len(value) for name, value in request.headers)
        hypercorn_h2_frames.charge(self, hypercorn_h2_frames.charge_for_bytes(block))

    async def _handle_events(self: Any, events: list[h2.events.Event]) -> None:
        await original_events(self, events)
        await _retire(self)  # the bound reached in this batch, or its last stream reset by the client

    async def stream_send(self: Any, event: StreamEvent) -> None:
        await original_send(self, event)
        if isinstance(event, StreamClosed):
            await _retire(self)  # the last stream in flight may have ended

    async def _send_data(self: Any, stream_id: int) -> None:
        await original_send_data(self, stream_id)
        if getattr(self, _RETIRED, 0) == 1 and stream_id not in self.stream_buffers:
            await _retire(self)  # the last stream's END_STREAM may have gone after its app ended

    async def handle(self: Any, event: Any) -> None:
        if isinstance(event, RawData) and getattr(self, _RETIRED, 0) == 2:
            return  # after its GOAWAY h2 takes no frame but GOAWAY; nothing is left to answer
        await original_handle(self, event)

    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]
    H2Protocol._handle_events = _handle_events  # type: ignore[method-assign]
    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]
    H2Protocol.handle = handle  # type: ignore[method-assign]
    H2Protocol._send_data = _send_data  # type: ignore[method-assign]


async def _retire(protocol: Any) -> None:
    """Patch 17: at the bound, take no more streams; once all have ended, GOAWAY(NO_ERROR), and the idle timer."""
    retired = getattr(protocol, _RETIRED, 0)
    if (
        retired == 2
        or protocol.keep_alive_requests < protocol.config.keep_alive_max_requests
        or getattr(protocol, "closed", False)
        or protocol.connection.state_machine.state is ConnectionState.CLOSED  # a GOAWAY sent already
    ):
        return
    if not retired:
        protocol.connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    retired = 1
    if not protocol.streams and not any(_may_still_send(protocol.connection, id) for id in protocol.stream_buffers):
        # Every stream ended, its END_STREAM framed: an app's end may come before its send task frames it,
        # and a GOAWAY first would have h2 refuse it (a buffer left of a stream reset holds nothing back).
        # It names the last stream acted on: the requests refused after it may be retried (RFC 9113 6.8).
        protocol.connection.close_connection(last_stream_id=getattr(protocol, LAST_STARTED, 0))
        retired = 2
    setattr(protocol, _RETIRED, retired)
    await protocol._flush()
    if retired == 2:
        await protocol.send(Updated(idle=True))  # the client closes it, or the keep-alive timer does


def _may_still_send(connection: Any, stream_id: int) -> bool:
    stream = connection.streams.get(stream_id)
    return stream is not None and not stream.closed


_REASON_CHARACTERS = 200
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PSEUDO_HEADERS = frozenset(f"b':{name}'" for name in ("method", "path", "scheme", "authority", "status", "protocol"))


def _redacted(literal: re.Match[str]) -> str:
    """A bytes literal of h2's reason, but a pseudo-header's name ("missing mandatory b':path' header")."""
    return literal[0] if literal[0] in _PSEUDO_HEADERS else "b'...'"


# A connection each, ~80 bytes (helper 85: 575 lines a second from one client).
_protocol_error_lines = Quieted(logger, logging.WARNING)
_BYTES = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')


def protocol_error_reason(error: h2.exceptions.ProtocolError) -> str:
    """What h2 said of a connection's protocol error, for the log: ASCII, at most _REASON_CHARACTERS, no value sent.

    h2 quotes the header it refused, whose value may be a token or a cookie (helper 54): its
    bytes are left out.  hpack names its buffer ("<memory at 0x7f...>").
    """
    reason = _BYTES.sub(_redacted, str(error) or type(error).__name__)
    return ascii(_ADDRESS.sub("", reason)[:_REASON_CHARACTERS])[1:-1]


def _log_protocol_errors() -> None:
    original: Callable[[Any, Any], Awaitable[None]] = H2Protocol.handle

    async def handle(self: Any, event: Any) -> None:
        if isinstance(event, RawData) and "receive_data" not in vars(self.connection):
            receive = self.connection.receive_data
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"

            def receive_data(data: bytes) -> list[h2.events.Event]:
                try:
                    return receive(data)  # type: ignore[no-any-return]
                except h2.exceptions.ProtocolError as error:
                    client_errors.count("http2_protocol_error")
                    # Its downloads end with it: the server's doing, for the client's error (helper 190).
                    note_connection_closed("HTTP/2 protocol error")
                    _protocol_error_lines.log(
                        "HTTP/2 connection from %s closed: %s", peer, protocol_error_reason(error)
                    )
                    raise

            self.connection.receive_data = receive_data
        await original(self, event)

    H2Protocol.handle = handle  # type: ignore[method-assign]


def _reset_unfinished_streams() -> None:
    original: Callable[[Any, StreamEvent], Awaitable[None]] = H2Protocol.stream_send

    async def stream_send(self: Any, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed) and not getattr(self, "closed", False):
            stream = self.connection.streams.get(event.stream_id)
            buffer = self.stream_buffers.get(event.stream_id)
            # After the app's last body message, Hypercorn marks the stream's
            # buffer complete and sends END_STREAM from its send task, maybe
            # after this point: a complete buffer is a finished response.
            ended_by_app = buffer is None or buffer._complete
            if not ended_by_app and stream is not None and stream.state_machine.state in _UNFINISHED:
                try:
                    self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                except h2.exceptions.ProtocolError:
                    pass  # the stream closed meanwhile: nothing left to abort
                else:
                    await self._flush()
        try:
            await original(self, event)
        except trio.Cancelled:
            buffer = self.stream_buffers.get(getattr(event, "stream_id", None))
            if isinstance(event, EndBody) and buffer is not None:
                # The app stopped waiting for the client to take the tail (a stall, a reset): the
                # response is not finished, so the StreamClosed that follows resets it, and its
                # tail, if some of it was not written yet, is not delivered (fences.delivery).
                buffer._complete = False
                if await undelivered(buffer):
                    note_dropped()
            raise

    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]


def _time_out_idle_connections() -> None:
    original: Callable[..., Awaitable[None]] = H2Protocol.initiate
    original_events: Callable[[Any, list[h2.events.Event]], Awaitable[None]] = H2Protocol._handle_events

    async def initiate(self: Any, *args: Any, **kwargs: Any) -> None:
        await original(self, *args, **kwargs)
        if self.idle:  # no stream yet: start the keep-alive timer, as HTTP/1.1 does
            await self.send(Updated(idle=True))

    async def _handle_events(self: Any, events: list[h2.events.Event]) -> None:
        await original_events(self, events)
        # A stream the client resets is closed here, and its app, told, ends without the
        # StreamClosed whose handling restarts the timer (the stream is closed already): a
        # client that reset its downloads and said nothing more held the connection for ever.
        if (
            any(isinstance(event, h2.events.StreamReset) for event in events)
            and not getattr(self, "closed", False)
            and all(stream.idle for stream in self.streams.values())
        ):
            await self.send(Updated(idle=True))

    H2Protocol.initiate = initiate  # type: ignore[method-assign]
    H2Protocol._handle_events = _handle_events  # type: ignore[method-assign]
