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

A connection the server itself closes (an HTTP/2 client past a flood budget)
ends its downloads as a client that left would: ``note_connection_closed``
says why, for their log lines (until 2026-12-05 they read ``client
disconnected``, and an operator could not tell them from users who cancelled).
The connection's reading task makes a note for it (``watch_connection``)
before it starts any request's app: each app's task starts with a copy of
that task's context, and so holds the same note.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

_DROPPED: ContextVar[bool] = ContextVar("archiver_bytes_dropped", default=False)
# Over HTTP/2, whether bytes this task handed to its stream's buffer are still there, or were dropped
# from it (``note_held``).
_HELD: ContextVar[Callable[[], bool] | None] = ContextVar("archiver_bytes_held", default=None)


class _ConnectionEnd:
    """Why the server closed a connection (None: it has not, or not for a reason of its own)."""

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: str | None = None


_CONNECTION_END: ContextVar[_ConnectionEnd | None] = ContextVar("archiver_connection_end", default=None)


def note_dropped() -> None:
    """Bytes this task handed to the server will not reach the client."""
    _DROPPED.set(True)


def note_held(unwritten: Callable[[], bool]) -> None:
    """Bytes this task handed over wait in a buffer of the server's: ``unwritten()`` says if some are not written yet.

    An HTTP/2 stream's buffer takes a batch whatever the window (``hypercorn_h2_send``):
    a download whose every byte was handed over, its tail still in the buffer at a
    closed window, is not delivered when its task ends (its client reset the
    stream) outside any send, which would have noted it (helper 190: logged complete).
    """
    _HELD.set(unwritten)


def bytes_dropped() -> bool:
    """Whether ``note_dropped`` was called in this task (or the one it was started from, before),
    or bytes it handed over wait unwritten (``note_held``)."""
    held = _HELD.get()
    return _DROPPED.get() or (held is not None and held())


class SentBytes:
    """The body bytes of the response a task sends that its access line counts (``hypercorn_access``).

    Its ``count``, and ``on_sent`` told of each send as it is handed over.  A
    chunk handed over after the client had gone, which the server drops, is
    not among them (helper 191: two downloads in three that a client left
    were logged and counted a chunk, 512 KiB, above their access line).
    """

    __slots__ = ("count", "on_sent")

    def __init__(self, on_sent: Callable[[int], None]) -> None:
        self.count = 0
        self.on_sent = on_sent


_SENT_BYTES: ContextVar[SentBytes | None] = ContextVar("archiver_sent_bytes", default=None)


def watch_sent_bytes(on_sent: Callable[[int], None]) -> SentBytes:
    """In a response's sending task, before its head: the body bytes its access line will count."""
    sent = SentBytes(on_sent)
    _SENT_BYTES.set(sent)
    return sent


def unwatch_sent_bytes() -> None:
    """The response's body has ended: what this task sends next (a refusal's page) is not its bytes."""
    _SENT_BYTES.set(None)


def note_sent(count: int) -> None:
    """The server counts ``count`` body bytes of this task's response in its access line (``watch_sent_bytes``)."""
    sent = _SENT_BYTES.get()
    if sent is not None:
        sent.count += count
        sent.on_sent(count)


def watch_connection() -> None:
    """In a connection's reading task, before it starts apps: their tasks share this connection's note."""
    _CONNECTION_END.set(_ConnectionEnd())


def note_connection_closed(reason: str) -> None:
    """The server closes this task's connection for ``reason`` (a short phrase: "HTTP/2 frame flood")."""
    end = _CONNECTION_END.get()
    if end is not None:
        end.reason = reason


def connection_closed_by_server() -> str | None:
    """Why the server closed the connection this task's request came on, or None."""
    end = _CONNECTION_END.get()
    return None if end is None else end.reason
