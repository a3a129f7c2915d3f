"""What a client's HTTP/2 frames may cost (h2 4.x, Hypercorn 0.17-0.18): patches 11-13 of ``hypercorn_h2``.

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
holds 1,000).

13. Keep the response encoder's table at 4,096 bytes.

A client may offer a larger HPACK table (SETTINGS_HEADER_TABLE_SIZE, up to
2**32-1), and h2's encoder then keeps every header it sends for as long as the
table holds it: the ``Location`` of each redirect, echoing a request target of
up to 16 KiB (helper 108: 300 requests kept 4.5 MB a connection, against 0.9
at the default).  RFC 7541 section 4.2 lets the encoder use less than the
decoder allows; this one uses at most the default's 4,096 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.events
from h2.frame_buffer import FrameBuffer
from hpack import Encoder
from hypercorn.protocol.h2 import H2Protocol

# RFC 9113 section 6.5.2: SETTINGS_HEADER_TABLE_SIZE's initial value.
ENCODER_TABLE_BYTES = 4096
_FRAME_HEADER_BYTES = 9


def install() -> None:
    """Patch h2's frame buffer and Hypercorn's H2Protocol (called by ``hypercorn_h2.install``, once)."""
    _refuse_overlong_frames_at_their_header()
    _ignore_priority_signals()
    _bound_the_encoder_table()


def _refuse_overlong_frames_at_their_header() -> None:
    original: Callable[[FrameBuffer], Any] = FrameBuffer.__next__

    def __next__(self: FrameBuffer) -> Any:
        data = self._data
        if len(data) >= _FRAME_HEADER_BYTES:
            # The 24-bit length leads the header (RFC 9113 section 4.1); raising FrameTooLargeError
            # here makes h2 end the connection with FRAME_SIZE_ERROR, as it would for the whole frame.
            self._validate_frame_length(int.from_bytes(data[:3], "big"))
        return original(self)

    FrameBuffer.__next__ = __next__  # type: ignore[method-assign]


def _ignore_priority_signals() -> None:
    async def _priority_updated(self: Any, event: h2.events.PriorityUpdated) -> None:
        return None

    H2Protocol._priority_updated = _priority_updated  # type: ignore[method-assign]


_ENCODER_TABLE_SIZE: property = Encoder.__dict__["header_table_size"]


class _BoundedEncoder(Encoder):
    """An HPACK encoder whose dynamic table never exceeds ``ENCODER_TABLE_BYTES``."""

    @property
    def header_table_size(self) -> int:
        return int(_ENCODER_TABLE_SIZE.__get__(self))

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        _ENCODER_TABLE_SIZE.__set__(self, min(value, ENCODER_TABLE_BYTES))


def _bound_the_encoder_table() -> None:
    original: Callable[..., None] = H2Protocol.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.connection.encoder = _BoundedEncoder()  # before any SETTINGS of the client's

    H2Protocol.__init__ = __init__  # type: ignore[method-assign]
