"""Whether the server dropped response bytes that the current task handed it.

Hypercorn lets an app's send return normally once the client is gone: over
HTTP/1.1 a write to a reset socket is swallowed, over HTTP/2 a stream's
buffered tail is dropped when the connection closes.  An archive whose last
bytes went that way looked delivered, and its download was logged
``complete`` (helper 62: a client that read 64 KiB of 300 KB and left).  The
patches that see the drop note it here, in the sending task's context (an
app's send runs in its own task: ``hypercorn_tcp`` for HTTP/1.1 writes,
``hypercorn_h2`` for a stream's end), and the download reads it when it ends.
Delivered means written to the socket, as the kernel took it; over HTTP/2,
END_STREAM aside: a client with every byte may close before it comes, as curl
does (``hypercorn_h2_send.undelivered``).
"""

from __future__ import annotations

from contextvars import ContextVar

_DROPPED: ContextVar[bool] = ContextVar("archiver_bytes_dropped", default=False)


def note_dropped() -> None:
    """Bytes this task handed to the server will not reach the client."""
    _DROPPED.set(True)


def bytes_dropped() -> bool:
    """Whether ``note_dropped`` was called in this task (or the one it was started from, before)."""
    return _DROPPED.get()
