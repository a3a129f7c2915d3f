"""Hypercorn's access log (0.18): one line per request, with the status and the bytes really sent.

Hypercorn logs a request when the response ends (``HTTPStream._send_closed``)
and also when the stream closes before that (``handle(StreamClosed)``), with
no response.  Three things go wrong for this service:

- Over HTTP/1.1 the stream closes *during* ``_send_closed`` (sending the end
  of the message recycles the connection), before the state says CLOSED:
  every complete response is logged twice, first as ``"- -"``.
- A download the client cancels is logged only as ``"- -"``: no status,
  though a 200 went out, and no size, though megabytes did.
- A response without a body (a 308) is complete with its headers: a client
  that closes at once (curl) closes the stream while they are being sent,
  before Hypercorn's state says RESPONSE, and it is logged as ``"- -"``.

Here the response is noted before it is sent, the first of the two calls
writes the line and the second is skipped,
and the line's size (``%(b)s``, Hypercorn's ``{Content-Length}o``) is the
body bytes handed to the server, not the length announced: equal for a
complete response, smaller for a cut one.  The app's sending task is told
of each (``delivery.note_sent``), up to the line: its own log line and
metrics then say the same.  A request that ends before its
response started is still logged with ``-`` for both.

The patches wrap ``HTTPStream.app_send`` (to count) and replace
``HTTPStream._send_closed``, ``HTTPStream._send_error_response`` and the
StreamClosed case of ``HTTPStream.handle`` (each a copy but for the log call).
``handle`` also takes an HTTP/1.x absolute-form target (``http://host/path``) as its path,
with its authority as the Host field (RFC 9112 3.2.2), and answers a request
whose target is not a path (``?x``, ``*``, an absolute URI of another scheme)
with a 400 (``install``'s ``error_answer``), from an ASGI
app of its own run as Hypercorn runs the service's
(``TaskGroup.spawn_app``): no route takes such a target.
The StreamClosed case tells the app without a checkpoint (``_tell_app``).
tests/test_fences.py fails if what they copy or call changes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from time import time
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.protocol.events import EndBody, Request, Response, StreamClosed
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.typing import ResponseSummary

from ..logs import escape_log_field
from .delivery import note_sent
from .hypercorn_h11 import ErrorAnswer

_MARKER = "_archiver_adjusted"
_SENT = "_archiver_body_bytes"
_LOGGED = "_archiver_logged"
_RESPONSE = "_archiver_response"
# The headers and body of the 400 for a target that is not a path (set by install).
_error_answer: ErrorAnswer = lambda status: ([], b"")  # noqa: E731


# RFC 9112 3.2.2: a server MUST accept a request target in absolute form (HTTP/1.1 sends it to proxies,
# and some clients to an origin); h11 lets it through as it is.  Its authority stands for the Host field.
_ABSOLUTE_FORM = re.compile(rb"https?://([^/?#]*)", re.IGNORECASE)


def _in_origin_form(event: Request, absolute: re.Match[bytes]) -> Request:
    """``event`` with its absolute-form target made a path (and query), and the target's authority its Host."""
    rest = event.raw_path[absolute.end() :]
    headers = [(name, value) for name, value in event.headers if name.lower() != b"host"]
    headers.append((b"host", absolute[1]))
    return dataclasses.replace(event, raw_path=rest if rest.startswith(b"/") else b"/" + rest, headers=headers)


def install(error_answer: ErrorAnswer | None = None) -> None:
    """Patch Hypercorn's HTTP streams once per process (idempotent); ``error_answer`` (the headers and body of a
    400) replaces the last one given."""
    global _error_answer
    if error_answer is not None:
        _error_answer = error_answer
    if getattr(HTTPStream, _MARKER, False):
        return
    _count_body_bytes()
    _log_once()
    setattr(HTTPStream, _MARKER, True)


def _count_body_bytes() -> None:
    original: Callable[[Any, Any], Awaitable[None]] = HTTPStream.app_send

    async def app_send(self: Any, message: Any) -> None:
        if message is not None and message["type"] == "http.response.start" and self.state == ASGIHTTPState.REQUEST:
            # Noted before it is sent: a response with no body is complete with its
            # headers, and the stream may close while they are being sent.
            setattr(self, _RESPONSE, message)
        if (
            message is not None
            and message["type"] == "http.response.body"
            and self.state == ASGIHTTPState.RESPONSE
            and self.scope["method"] != "HEAD"
        ):
            setattr(self, _SENT, getattr(self, _SENT, 0) + len(message.get("body", b"")))
            if not getattr(self, _LOGGED, False):  # what the line says (written once the stream closes)
                note_sent(len(message.get("body", b"")))
        await original(self, message)

    HTTPStream.app_send = app_send  # type: ignore[method-assign]


def _log_once() -> None:
    original_handle: Callable[[Any, Any], Awaitable[None]] = HTTPStream.handle

    async def _send_closed(self: Any) -> None:
        await self.send(EndBody(stream_id=self.stream_id))
        self.state = ASGIHTTPState.CLOSED
        await _log(self)
        await self.send(StreamClosed(stream_id=self.stream_id))

    async def _send_error_response(self: Any, status_code: int) -> None:
        headers = [(b"content-length", b"0"), (b"connection", b"close")]
        await self.send(Response(stream_id=self.stream_id, headers=headers, status_code=status_code))
        # Closed before the end goes out, so that a StreamClosed meanwhile logs this response.
        self.response = {"type": "http.response.start", "status": status_code, "headers": []}
        setattr(self, _RESPONSE, self.response)
        self.state = ASGIHTTPState.CLOSED
        await self.send(EndBody(stream_id=self.stream_id))
        await _log(self)

    async def handle(self: Any, event: Any) -> None:
        if (
            isinstance(event, Request)
            and event.http_version.startswith("1")  # HTTP/2's :path is never one (RFC 9113 8.3.1: a 400 below)
            and (absolute := _ABSOLUTE_FORM.match(event.raw_path))
        ):
            event = _in_origin_form(event, absolute)
        if isinstance(event, Request) and not event.raw_path.startswith(b"/"):
            # Not origin-form ("?x", "*", another scheme's absolute URI h11 let through, or any absolute
            # :path over HTTP/2): no route takes it,
            # and Quart indexes the empty path (IndexError, a 500 with a traceback).  A 400.
            self.start_time = time()
            # Just what the access line reads (hypercorn.logging.AccessLogAtoms).
            self.scope = {
                "type": "http",
                "method": event.method,
                "scheme": self.scheme,
                "path": event.raw_path.decode("latin-1"),
                "query_string": b"",
                "http_version": event.http_version,
                "client": self.client,
                "headers": event.headers,
            }
            # Answered by an app of its own, as Hypercorn runs any, so that the stream ends as any does
            # (after HTTP/2 has marked the connection busy with it).  Answered here, in the request's
            # event, HTTP/1.1 never closed the connection its "Connection: close" announced, and
            # HTTP/2 never let it idle out: a few such requests held every connection slot.
            self.app_put = await self.task_group.spawn_app(_BAD_TARGET, self.config, self.scope, self.app_send)
            return
        if not isinstance(event, StreamClosed) or self.closed:
            await original_handle(self, event)
            return
        # Hypercorn's StreamClosed case, logging through _log.
        self.closed = True
        if hasattr(self, "scope"):
            await _log(self)
        if getattr(self, "app_put", None) is not None:
            await _tell_app(self.app_put, {"type": "http.disconnect"})

    HTTPStream._send_closed = _send_closed  # type: ignore[method-assign]
    HTTPStream._send_error_response = _send_error_response  # type: ignore[method-assign]
    HTTPStream.handle = handle  # type: ignore[method-assign]


async def _tell_app(app_put: Callable[[Any], Awaitable[None]], message: Any) -> None:
    """Put ``message`` on the app's queue (``TaskGroup.spawn_app``: a trio memory channel) without a checkpoint.

    A stream's end is often told from another stream's app task (its write
    found the connection gone, and Hypercorn closes every stream from there),
    and that task may itself be cancelled already: the channel's ``send``
    checks for cancellation first, raises, and the disconnect is lost, with
    the rest of the connection's streams (helper 61: HTTP/2 downloads ran on
    after their client had left).  ``send_nowait`` cannot be cancelled; only
    a full queue (an app that has stopped reading) waits as before.
    """
    channel = getattr(app_put, "__self__", None)
    if isinstance(channel, trio.MemorySendChannel):
        try:
            channel.send_nowait(message)
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the app has ended: nobody to tell
        else:
            return
    await app_put(message)


async def _refuse_bad_target(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app answering 400 with ``install``'s ``error_answer`` (it was a bare 400 with no body: helper 81).

    The connection is kept as after any answer (the request was framed
    right): with ``Connection: close``, h11 read a pipelined request after it
    as an error, and Hypercorn closed the socket before the 400 was written.
    """
    answer_headers, body = _error_answer(400)
    headers = [(b"content-length", b"%d" % len(body)), *answer_headers]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


_BAD_TARGET = ASGIWrapper(_refuse_bad_target)


async def _log(stream: Any) -> None:
    if getattr(stream, _LOGGED, False):
        return
    setattr(stream, _LOGGED, True)
    # The path is %-decoded: "/archive/a%0Ab/" would put a line break into the log; and a header
    # (the User-Agent, the Referer) may hold bytes from 0x80 and quotes: none may forge a line or a
    # field (helper 44: "\x85" and "\x9b" in a User-Agent made a second, fake access line).
    query = stream.scope.get("query_string", b"")
    scope = {
        **stream.scope,
        # Any token, of any length (helper 84: a 60,000-byte HTTP/2 :method was a 60 KB line).
        "method": escape_log_field(stream.scope.get("method", "")),
        "path": escape_log_field(stream.scope.get("path", "")),
        # Hypercorn decodes it as UTF-8 (and the headers as Latin-1): what goes back must decode so.
        "query_string": escape_log_field(query.decode("utf-8", "backslashreplace")).encode(),
        "headers": [
            (name, escape_log_field(value.decode("latin-1")).encode("latin-1"))
            for name, value in stream.scope.get("headers", [])
        ],
    }
    await stream.config.log.access(scope, _summary(stream), time() - stream.start_time)


def _summary(stream: Any) -> ResponseSummary | None:
    """The response as it went out: its status, and the body bytes sent as its length."""
    response = getattr(stream, _RESPONSE, None)
    if response is None:
        return None
    headers = [(name, value) for name, value in response.get("headers", []) if name.lower() != b"content-length"]
    headers.append((b"content-length", b"%d" % getattr(stream, _SENT, 0)))
    return {"status": response["status"], "headers": headers}
