"""Make Hypercorn reset an HTTP/2 stream whose response the app did not finish.

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
forgets it.  A stream the client reset is already CLOSED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import h2.errors
import h2.exceptions
from h2.stream import StreamState
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol

_UNFINISHED = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
_MARKER = "_archiver_resets_unfinished_streams"


def install() -> None:
    """Patch Hypercorn's HTTP/2 protocol once per process (idempotent)."""
    if getattr(H2Protocol, _MARKER, False):
        return
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
        await original(self, event)

    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]
    setattr(H2Protocol, _MARKER, True)
