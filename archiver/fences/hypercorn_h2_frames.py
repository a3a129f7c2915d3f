"""What a client's HTTP/2 frames may cost (h2 4.4, Hypercorn 0.18): patches 11-16 of ``hypercorn_h2``.

11. Refuse an overlong frame at its header.

h2's ``FrameBuffer`` checks a frame's length against SETTINGS_MAX_FRAME_SIZE
(16 KiB here) only once the whole frame has arrived: a header announcing
16 MiB had the server buffer 16 MiB before refusing it, at no cost to the
client but its bytes, and held them until the keep-alive timer (helper 108:
64 connections took the process from 56 MB to 1,180 MB of RSS, which stayed).
Here the length is checked as soon as the 9-byte header is in: the
connection ends with GOAWAY(FRAME_SIZE_ERROR), as h2 ends it for the whole
frame (RFC 9113 section 4.2).  Upstream report, as it would be filed: "h2:
FrameBuffer validates a frame's length only after buffering its whole body;
a header announcing 2**24-1 bytes makes the server buffer them first."

A header block (HEADERS and its CONTINUATIONs) is refused once it passes
``HEADER_BLOCK_BYTES``, at the header of the frame that would pass it,
GOAWAY(ENHANCE_YOUR_CALM): h2 held up to 64 CONTINUATIONs, 1 MiB a
connection, before refusing one (helper 123).

12. Ignore priority signals.

Hypercorn keeps RFC 7540's priority tree (the ``priority`` package), and each
PRIORITY frame rebuilds the ordering of its parent's children: with ~1,000
streams made siblings by PRIORITY frames for streams never opened, each
further frame cost 1.36 ms of the event loop for 14 bytes, and 4 s of one
client's 28 KB/s held every other download's first byte for 9.9 s (helper
108; CVE-2019-9513's shape).  RFC 9113 section 5.3 deprecates these signals
and lets a server ignore them: every stream is then a child of the root with
the default weight, served in turn.  No frame for a stream never opened
makes a node either (helper 85 found those never removed, in a tree that
holds 1,000).  And the tree itself goes: the streams with something to send
are served least lately first (``_StreamsInTurn``).  The tree found the next
stream by popping every blocked one off a heap and pushing it back, at each
batch sent and each time the send task went idle: a client that held 99
streams at a zero window and read one 4 KiB at a time cost the server 4.5
times the CPU a MB of one that held none (helper 120; with patch 15, ~1.2
times now).  And it served the first unblocked: when a connection's window
opened, every stream was unblocked in the order they were made, and the
first took the window each time (each download had half the bytes of the one
made before it, on a 64 KiB connection window).

15. Wake, for a connection's WINDOW_UPDATE, only the streams that can send.

Hypercorn's ``_window_updated`` unblocks every stream when the connection's
window opens (or SETTINGS_INITIAL_WINDOW_SIZE changes), and each then gets a
turn, pops nothing and is blocked again: with 99 streams held at a zero
window of their own, every WINDOW_UPDATE of the connection cost 99 turns
(2.1-2.4 times the CPU a MB of a client that holds none, with patch 12).
Here it unblocks a stream only if it has bytes or its end to send and a
window of its own; one whose own window opens later is unblocked by that
WINDOW_UPDATE, as before.

13. Keep the response encoder's table at 4,096 bytes.

A client may offer a larger HPACK table (SETTINGS_HEADER_TABLE_SIZE, up to
2**32-1), and h2's encoder then keeps every header it sends for as long as the
table holds it: the ``Location`` of each redirect, echoing a request target of
up to 16 KiB (helper 108: 300 requests kept 4.5 MB a connection, against 0.9
at the default).  RFC 7541 section 4.2 lets the encoder use less than the
decoder allows; this one uses at most the default's 4,096 bytes.

16. Remember how the latest ``CLOSED_STREAMS`` streams closed, not 65,536.

h2 keeps, for each stream that closed, whether it ended or was reset, up to
2**16 of them a connection (``H2Connection.MAX_CLOSED_STREAMS``), for the
connection's life: only to tell a frame on a stream reset a moment ago (the
client's DATA or trailers still on their way) from one on a stream that
ended.  A stream refused as malformed (patch 5) costs a client ~30 bytes,
and the budget below lets a connection 100 of them for each request: one
connection made 65,536 in ~12 s and held ~8 MB (~125 bytes a stream) for as
long as it made a request every few seconds (helper 175; four such: +32 MB).  RFC 9113 section
5.1 lets an endpoint limit how long it ignores frames on a stream it reset;
nghttp2 keeps no more closed streams than its concurrent-stream limit.  A
HEADERS frame on a stream forgotten so ends the connection (PROTOCOL_ERROR,
as a stream id used again does); DATA, WINDOW_UPDATE and RST_STREAM on it are
answered as before.

14. A budget for frames that ask for nothing.

Every frame but a request's HEADERS and the DATA that ends it (SETTINGS,
PING, PRIORITY, RST_STREAM, ALTSVC, unknown types, CONTINUATION, DATA that
carries a body, which no route reads, HEADERS or DATA on a stream whose
client has ended or reset it, which h2 answers with RST_STREAM, and a stream
refused as malformed (patch 5); a header block that makes no request counts
one more for each ``BYTES_A_FRAME`` of it, as h2 decodes it whole
first, a request's block for each of it past ``REQUEST_BLOCK_BYTES``, and a
SETTINGS frame for each of it, whose settings h2 does not act on are dropped:
all but the first six uncounted until 2026-12-05, helpers 123-125) is
parsed and acted on by h2 and Hypercorn in Python, ~5-10 us a frame, and one
read of 64 KiB of them held the event loop ~45 ms: one connection sending
them at 8-15 MB/s kept a core busy and a 50 MB download beside it took 4.5 s
instead of 0.05 (helper 108; CVE-2019-9512, -9515, -9518's shapes).  Here a
connection has a bucket of ``CONTROL_FRAMES`` of them, which each request
refills by ``CONTROL_FRAMES_PER_STREAM`` and each second by
``CONTROL_FRAMES_PER_SECOND``, never above ``CONTROL_FRAMES``: a connection
that lives long banks no burst (helper 110).  WINDOW_UPDATEs have one of their
own, ``WINDOW_UPDATES``, refilled by ``WINDOW_UPDATES_PER_STREAM`` a request
and ``WINDOW_UPDATES_PER_DATA_FRAME`` for each DATA frame the connection was
sent (Envoy's shape, whose defaults are 2 a stream and 10 a frame: a client
opens its window as it reads; here a frame over 16 KiB counts as one a 16 KiB
and one under 1 KiB by its bytes, and in full while a bank that each 2 KiB
sent fills by one lasts, so that a window given back in pieces is paid for
and one opened a byte at a time, each byte a frame, is not; a KiB sent pays
for six at most: ``hypercorn_h2_send._count_data_frames``).  A connection past either is closed
with GOAWAY(ENHANCE_YOUR_CALM), naming the last stream started, its downloads
with it; one WARNING at most every 10 s, counted (``http2_frame_flood``).  A
browser sends a few SETTINGS and PINGs a connection and a PRIORITY_UPDATE (an
unknown type here) a request.

"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import trio
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from h2.stream import StreamState
from h2.utilities import SizeLimitDict
from hpack import Encoder
from hypercorn.events import Closed
from hypercorn.protocol.h2 import H2Protocol
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame
from priority.priority import DeadlockError, DuplicateStreamError, MissingStreamError

from ..logs import Quieted
from . import client_errors
from .delivery import note_connection_closed, watch_connection
from .hypercorn_h2_send import DATA_FRAMES_SENT

# The bytes parsed in Python (a header block that makes no request, a SETTINGS frame) that count one frame;
# and the bytes of a request's block that count nothing: the service answers a head over 16 KiB with 431
# (``web.app.MAX_HEADER_BYTES``), and a block is no longer than its head.
BYTES_A_FRAME = 64
REQUEST_BLOCK_BYTES = 16_384
# RFC 9113 section 6.5.2: SETTINGS_HEADER_TABLE_SIZE's initial value.
ENCODER_TABLE_BYTES = 4096
# The most bytes of a header block (HEADERS and its CONTINUATIONs, HPACK-encoded) a connection may hold
# (patch 11): Hypercorn's SETTINGS_MAX_HEADER_LIST_SIZE, which the decoded list may not pass, and an encoded
# field is never longer than the 32 bytes the list counts for it besides its name and value.
HEADER_BLOCK_BYTES = 65_536
_FRAME_HEADER_BYTES = 9
# Frames that ask for nothing a connection may send (patch 14): at once (at most), for each request, each second.
CONTROL_FRAMES = 1_000
CONTROL_FRAMES_PER_STREAM = 100
CONTROL_FRAMES_PER_SECOND = 10
# WINDOW_UPDATEs a connection may send: at once, for each request, and for each DATA frame it was sent (a
# frame over 16 KiB counts as one a 16 KiB, one under 1 KiB in part: ``hypercorn_h2_send._count_data_frames``).
WINDOW_UPDATES = 1_000
WINDOW_UPDATES_PER_STREAM = 2
WINDOW_UPDATES_PER_DATA_FRAME = 4
# Closed streams whose end a connection remembers (patch 16): Hypercorn's h2_max_concurrent_streams.
CLOSED_STREAMS = 100
# The highest stream id given to Hypercorn's _create_stream (set by hypercorn_h2's patch 10).
LAST_STARTED = "_archiver_last_started"
_FRAMES = "_archiver_frames"
_flood_lines = Quieted(logging.getLogger(__name__), logging.WARNING)


def install() -> None:
    """Patch h2's frame buffer and Hypercorn's H2Protocol (called by ``hypercorn_h2.install``, once)."""
    _watch_the_frame_buffer()
    _ignore_priority_signals()
    _bound_the_encoder_table()
    _bound_the_closed_streams()
    _budget_frames_that_ask_nothing()
    _wake_only_streams_that_can_send()


def _watch_the_frame_buffer() -> None:
    """Patch 11, and the count of patch 14."""
    original: Callable[[FrameBuffer], Any] = FrameBuffer.__next__

    def __next__(self: FrameBuffer) -> Any:
        data = self._data
        counts = getattr(self, _FRAMES, None)  # a server's connection (patch 14)
        if len(data) >= _FRAME_HEADER_BYTES:
            # The 24-bit length leads the header (RFC 9113 section 4.1); raising FrameTooLargeError
            # here makes h2 end the connection with FRAME_SIZE_ERROR, as it would for the whole frame.
            length = int.from_bytes(data[:3], "big")
            self._validate_frame_length(length)
            if self._headers_buffer:  # a header block under way: this frame must be its CONTINUATION
                _bound_the_header_block(self._headers_buffer, length)
                if counts is not None and len(data) >= _FRAME_HEADER_BYTES + length:
                    # Parsed now, and joined to its block, which comes out as one frame: counted here
                    # (helper 124: 63 empty CONTINUATIONs a block, each parsed, counted as none).
                    counts.control += 1
        if counts is None:
            return original(self)
        # h2's __next__ calls itself past a CONTINUATION: the frame it returns then comes through
        # here twice, and is counted by the outer call only.
        counts.nested += 1
        try:
            frame = original(self)
        finally:
            counts.nested -= 1
        if not counts.nested:
            _count(counts, frame)
        return frame

    FrameBuffer.__next__ = __next__  # type: ignore[method-assign]


def _bound_the_header_block(buffered: list[Any], length: int) -> None:
    """DenialOfServiceError (GOAWAY(ENHANCE_YOUR_CALM)) if the block would pass HEADER_BLOCK_BYTES."""
    # h2 holds up to 64 CONTINUATIONs of 16 KiB, 1 MiB, before it refuses a block (helper 123: 64
    # connections took the process from 50 to 136 MiB of RSS, not given back), though the list decoded
    # from them may not pass 64 KiB.
    if sum(len(frame.data) for frame in buffered) + length > HEADER_BLOCK_BYTES:
        raise h2.exceptions.DenialOfServiceError(f"a header block over {HEADER_BLOCK_BYTES} bytes")


def _ignore_priority_signals() -> None:
    async def _priority_updated(self: Any, event: h2.events.PriorityUpdated) -> None:
        return None

    original: Callable[..., None] = H2Protocol.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.priority = _StreamsInTurn()

    H2Protocol._priority_updated = _priority_updated  # type: ignore[method-assign]
    H2Protocol.__init__ = __init__  # type: ignore[method-assign]


class _StreamsInTurn:
    """The streams of a connection served in turn: what ``H2Protocol`` asks of a ``priority.PriorityTree``.

    A stream is inserted unblocked, as in the tree; ``next`` gives the
    unblocked stream served least lately (a new one: as of its insertion);
    ``priority.DeadlockError`` when none is unblocked;
    ``priority.MissingStreamError`` for a stream not inserted, or removed.
    Least lately, not first unblocked: when the connection's window opens,
    Hypercorn unblocks every stream in the order they were made, and the first
    then took the whole window each time; each stream got half the bytes of
    the one before it (8 downloads on a 64 KiB connection window, python h2's
    own: the eighth had 0.6 MB when the first had its 80).  A heap of
    (turn last served, stream), its stale entries dropped as they come up:
    O(log n) a call, whatever the number of streams blocked (the tree's
    ``schedule`` popped and pushed back every blocked one: helper 120).
    """

    def __init__(self) -> None:
        self._served: dict[int, int] = {}  # each stream's turn when last given by next (or inserted)
        self._unblocked: set[int] = set()
        self._queue: list[tuple[int, int]] = []  # (turn, stream id): the unblocked, and stale entries
        self._turn = 0

    def insert_stream(self, stream_id: int) -> None:
        if stream_id in self._served:
            raise DuplicateStreamError(stream_id)
        self._served[stream_id] = self._turn
        self.unblock(stream_id)

    def remove_stream(self, stream_id: int) -> None:
        self._known(stream_id)
        del self._served[stream_id]
        self._unblocked.discard(stream_id)

    def block(self, stream_id: int) -> None:
        self._known(stream_id)
        self._unblocked.discard(stream_id)

    def unblock(self, stream_id: int) -> None:
        self._known(stream_id)
        if stream_id not in self._unblocked:
            self._unblocked.add(stream_id)
            heapq.heappush(self._queue, (self._served[stream_id], stream_id))

    def __next__(self) -> int:
        while self._queue:
            turn, stream_id = self._queue[0]
            # An entry stands while its stream is unblocked and was not served since it was queued
            # (a stream blocked and unblocked again between two turns is queued twice: one stands).
            if stream_id in self._unblocked and self._served.get(stream_id) == turn:
                self._turn += 1
                self._served[stream_id] = self._turn
                heapq.heapreplace(self._queue, (self._turn, stream_id))
                return stream_id
            heapq.heappop(self._queue)
        raise DeadlockError("No unblocked streams to schedule.")

    def _known(self, stream_id: int) -> None:
        if stream_id not in self._served:
            raise MissingStreamError(f"Stream {stream_id} not in tree")


_ENCODER_TABLE_SIZE: property = Encoder.__dict__["header_table_size"]


class _BoundedEncoder(Encoder):
    """An HPACK encoder whose dynamic table never exceeds ``ENCODER_TABLE_BYTES``."""

    @property
    def header_table_size(self) -> int:
        return int(_ENCODER_TABLE_SIZE.__get__(self))

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        _ENCODER_TABLE_SIZE.__set__(self, min(value, ENCODER_TABLE_BYTES))


def _bound_the_closed_streams() -> None:
    original: Callable[..., None] = H2Protocol.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.connection._closed_streams = SizeLimitDict(size_limit=CLOSED_STREAMS)  # before any stream

    H2Protocol.__init__ = __init__  # type: ignore[method-assign]


def _bound_the_encoder_table() -> None:
    original: Callable[..., None] = H2Protocol.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.connection.encoder = _BoundedEncoder()  # before any SETTINGS of the client's

    H2Protocol.__init__ = __init__  # type: ignore[method-assign]


# The states of a stream whose client may still send DATA (RFC 9113 section 5.1).
_RECEIVING = frozenset((StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL))


@dataclass
class _FrameCounts:
    """A connection's frames that asked for nothing (patch 14): counted as h2 parses them, and its budgets."""

    made: float  # trio time
    connection: Any  # h2's H2Connection: which streams a frame may open or send on
    control: int = 0  # counted so far
    window_updates: int = 0
    nested: int = 0  # calls of FrameBuffer.__next__ in progress
    # The budgets: what is left of each, as of the last check, and what was counted and earned by then.
    control_left: float = CONTROL_FRAMES
    window_updates_left: float = WINDOW_UPDATES
    checked: float = 0.0
    control_then: int = 0
    window_updates_then: int = 0
    requests_then: int = 0
    data_frames_then: float = 0.0


def _count(counts: _FrameCounts, frame: Any) -> None:
    # Counted as parsed, not by h2's events: h2 makes none of some (a WINDOW_UPDATE or DATA for a closed
    # stream, an ALTSVC from a client) and they cost their parsing all the same (helper 110).  Every frame
    # but a request's HEADERS (its CONTINUATIONs are counted as parsed) and the DATA that ends a request;
    # a SETTINGS frame and a header block that makes no request by their size; a WINDOW_UPDATE has a
    # budget of its own.
    if isinstance(frame, WindowUpdateFrame):
        counts.window_updates += 1
    elif isinstance(frame, SettingsFrame):
        counts.control += charge_for_bytes(frame.body_len)  # parsed an entry at a time, in Python
        _drop_unknown_settings(frame)
    elif isinstance(frame, HeadersFrame):
        if not _opens_a_stream(counts.connection, frame):
            counts.control += charge_for_bytes(len(frame.data))
        elif len(frame.data) > REQUEST_BLOCK_BYTES:  # a request answered 431: its excess is decoded for nothing
            counts.control += charge_for_bytes(len(frame.data) - REQUEST_BLOCK_BYTES)
    elif not _ends_a_request(counts.connection, frame):
        counts.control += 1


# The settings h2 acts on (RFC 9113 section 6.5.2, RFC 8441): a receiver ignores the others.
_KNOWN_SETTINGS = frozenset(int(code) for code in SettingCodes)


def _drop_unknown_settings(frame: SettingsFrame) -> None:
    """Leave out of ``frame`` the settings h2 does not act on, before h2 sees it.

    h2 keeps a history of every setting id it is sent, known or not, for the connection's life:
    a SETTINGS frame of 16 KiB holds 2,730 ids, and 24 of them with ids all different held ~49
    MiB a connection, which the process did not give back (helper 125: 10 connections, +488 MiB);
    and each such frame cost ~11 ms to act on, counted as one frame.  A browser's GREASE id is
    one such setting: ignored, as RFC 9113 says.
    """
    for code in [code for code in frame.settings if code not in _KNOWN_SETTINGS]:
        del frame.settings[code]


def charge_for_bytes(size: int) -> int:
    """What ``size`` bytes parsed in Python count for, in frames that ask for nothing: 1 + 1 a BYTES_A_FRAME.

    A header block that makes no request is decoded whole (HPACK) before h2 finds its stream ended
    or reset: ~0.2 ms a KiB Huffman-coded, some forty frames' cost (helper 124: 37.5 KB blocks on a
    reset stream, each counted as one frame, cost 7.3 ms each, ~8 CPU-s a connection before it
    was cut).  A SETTINGS frame is parsed and acted on an entry at a time (helper 125: ~11 ms for
    16 KiB, counted as one frame).
    """
    return 1 + size // BYTES_A_FRAME


def charge(protocol: Any, frames: int) -> None:
    """Count ``frames`` more that ask for nothing on ``protocol``'s connection (a stream refused before it began)."""
    counts: _FrameCounts | None = getattr(protocol, _FRAMES, None)
    if counts is not None:
        counts.control += frames


def _opens_a_stream(connection: Any, frame: Any) -> bool:
    """A request's HEADERS: a stream the client has not used yet (h2 has handled every frame before this one).

    Not HEADERS on a stream it has used, nor DATA that ends a stream already ended or reset: h2
    answers each with RST_STREAM and no event, ~5 us, and until 2026-12-05 they went uncounted
    (helper 123: one connection sent 110,000 a second, 9-byte DATA frames with END_STREAM on a
    closed stream, a core for as long as it liked; a 50 MB download beside it took 9.7 s, not 0.07).
    """
    return isinstance(frame, HeadersFrame) and frame.stream_id > connection.highest_inbound_stream_id


def _ends_a_request(connection: Any, frame: Any) -> bool:
    """DATA with END_STREAM on a stream whose client may still send: a request ended (once a stream).

    The DATA before it carries a body, which no route reads: counted.  Until 2026-12-05 a frame of
    1 KiB or more was not, and a GET on a connection of its own whose body never ended (its
    download held at a zero window) kept a core busy for as long as the download lasted, at
    35 MB/s of 1 KiB frames (130 MB/s of 16 KiB ones).
    """
    if not isinstance(frame, DataFrame) or "END_STREAM" not in frame.flags:
        return False
    stream = connection.streams.get(frame.stream_id)
    return stream is not None and stream.state_machine.state in _RECEIVING


def _over_budget(protocol: Any, counts: _FrameCounts) -> bool:
    """Spend what was counted since the last check, earn what time, requests and DATA sent allow, capped."""
    now = trio.current_time()
    requests = protocol.keep_alive_requests
    data_frames = getattr(protocol.connection, DATA_FRAMES_SENT, 0)
    new_requests = requests - counts.requests_then
    earned = CONTROL_FRAMES_PER_SECOND * (now - counts.checked) + CONTROL_FRAMES_PER_STREAM * new_requests
    counts.control_left = min(CONTROL_FRAMES, counts.control_left + earned) - (counts.control - counts.control_then)
    earned = WINDOW_UPDATES_PER_DATA_FRAME * (data_frames - counts.data_frames_then)
    earned += WINDOW_UPDATES_PER_STREAM * new_requests
    counts.window_updates_left = min(WINDOW_UPDATES, counts.window_updates_left + earned) - (
        counts.window_updates - counts.window_updates_then
    )
    counts.checked, counts.requests_then, counts.data_frames_then = now, requests, data_frames
    counts.control_then, counts.window_updates_then = counts.control, counts.window_updates
    return counts.control_left < 0 or counts.window_updates_left < 0


def _budget_frames_that_ask_nothing() -> None:
    original_init: Callable[..., None] = H2Protocol.__init__
    original: Callable[[Any, list[h2.events.Event]], Awaitable[None]] = H2Protocol._handle_events

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # Counted by the connection's frame buffer, spent by the protocol.
        now = trio.current_time()
        counts = _FrameCounts(made=now, connection=self.connection, checked=now)
        setattr(self.connection.incoming_buffer, _FRAMES, counts)
        setattr(self, _FRAMES, counts)
        watch_connection()  # made in the connection's reading task, which starts the streams' apps

    async def _handle_events(self: Any, events: list[h2.events.Event]) -> None:
        counts: _FrameCounts | None = getattr(self, _FRAMES, None)  # None: a protocol not made by __init__
        if counts is None or not _over_budget(self, counts) or getattr(self, "closed", False):
            await original(self, events)
            return
        client_errors.count("http2_frame_flood")
        note_connection_closed("HTTP/2 frame flood")
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        _flood_lines.log(
            "HTTP/2 connection from %s closed: %d frames that ask for nothing and %d WINDOW_UPDATEs in %.1f s",
            peer,
            counts.control,
            counts.window_updates,
            trio.current_time() - counts.made,
        )
        # The last stream started: none of this batch's requests was, and a client may retry them (RFC 9113 6.8).
        last_started = getattr(self, LAST_STARTED, 0)
        self.connection.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=last_started)
        await self._flush()
        await self.send(Closed())

    H2Protocol.__init__ = __init__  # type: ignore[method-assign]
    H2Protocol._handle_events = _handle_events  # type: ignore[method-assign]


def _wake_only_streams_that_can_send() -> None:
    """Patch 15."""

    async def _window_updated(self: Any, stream_id: int | None) -> None:
        if stream_id:
            if stream_id in self.stream_buffers:
                self.priority.unblock(stream_id)
        else:
            for blocked_id, buffer in list(self.stream_buffers.items()):
                if (buffer.buffer or buffer.complete) and _may_send(self.connection, blocked_id):
                    self.priority.unblock(blocked_id)
        await self.has_data.set()

    H2Protocol._window_updated = _window_updated  # type: ignore[method-assign]


def _may_send(connection: Any, stream_id: int) -> bool:
    try:
        return bool(connection.local_flow_control_window(stream_id) > 0)
    except h2.exceptions.NoSuchStreamError:  # closed (a StreamClosedError), or gone: its send ends it
        return True
