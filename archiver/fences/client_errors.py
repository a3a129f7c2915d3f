"""What clients sent that the protocols refused, counted for ``/metrics``.

Each kind but ``http2_stream_not_started`` is also logged, quietly
(``logs.Quieted``: a client makes these at its own rate); the count is what
the quieted lines leave out.  ``connection_error`` is the backstop's: a
client's doing or a bug.  Process-wide, as
the fences that see them are; ``web.metrics`` reads ``COUNTS`` at each scrape.
"""

from __future__ import annotations

KINDS = (
    "http1_unparsable",  # a request h11 refused before it was one (hypercorn_h11)
    "http2_malformed_stream",  # a stream reset for its :method or :path (hypercorn_h2 patch 5)
    "http2_protocol_error",  # a connection closed for a protocol error (hypercorn_h2 patch 8)
    "http2_stream_not_started",  # a request reset in its own batch of frames (hypercorn_h2 patch 10)
    "http2_reset_flood",  # a connection closed for resetting streams before their answer (patch 10)
    "http2_frame_flood",  # a connection closed for frames that ask nothing, past its budget (patch 14)
    "connection_error",  # a connection ended by an error nothing else caught (hypercorn_tcp)
)
COUNTS: dict[str, int] = dict.fromkeys(KINDS, 0)


def count(kind: str, number: int = 1) -> None:
    """Add ``number`` to ``kind``'s count (one of ``KINDS``)."""
    COUNTS[kind] += number
