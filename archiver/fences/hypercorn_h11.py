"""Seven adjustments to Hypercorn's HTTP/1.1 protocol (0.18): reason phrases, bodies for its own errors,
no request read after "close", no reader left waiting on a closed connection, blank lines before a request,
no request line of another major version, and no method read as another.

1. Hypercorn builds every ``h11.Response`` without a reason, so the status
   line reads ``HTTP/1.1 200 `` with an empty phrase.  RFC 9112 section 4
   lets a client ignore the phrase and a server send none, but some proxies
   and old clients log or show it.  ``H11Protocol._send_h11_event`` fills an
   empty reason from ``http.HTTPStatus`` before h11 writes it: a dictionary
   lookup a response.  h11's events are frozen dataclasses, so the field is
   set the way their own ``__init__`` sets it.
2. A request h11 cannot parse (a head over ``h11_max_incomplete_size``
   arriving in pieces: ``431``; a request line with raw non-ASCII bytes:
   ``400``) never reaches the app: ``H11Protocol._send_error_response``
   answers it with an empty body, and a browser shows a blank page.  It
   now sends the headers and body ``install``'s ``error_answer`` gives for
   the status (the head was not read, so not its Accept: the sentence as
   plain text), and logs it (INFO): no request exists for Hypercorn's access
   log to write.

3. Bytes that follow a request whose connection must close (``Connection:
   close``, HTTP/1.0) are dropped unread.  RFC 9112 section 9.6: the server
   closes after its answer and "SHOULD NOT process any further requests
   received on that connection".  h11 read them as a protocol error, and
   Hypercorn answered a 400 in place of the answer the request was getting,
   or closed the connection before that answer was written.

4. A connection closed while a pipelined request waits ends.  h11 answers
   ``PAUSED`` for a request that comes while a response is in progress, and
   Hypercorn's reading task waits for ``can_read``, which only the end of that
   response sets (``_maybe_recycle``).  When a write finds the client gone,
   the connection is closed from the writing task: the response never ends
   as such, the reader waited for ever, and its connection's descriptor and
   task with it, a socket no table listed any more, until shutdown waited out
   its whole grace period (helper 61: a descriptor for each client that
   pipelined a download and a range and went away).  On ``Closed`` the reader
   is woken, and reads nothing more from h11: it goes back to its socket,
   finds the end, and the connection ends.  Upstream report, as it would be
   filed: "h11: handle(Closed) does not set can_read; a reader paused on a
   pipelined request waits forever once another task closed the connection".

5. Blank lines before a request line are skipped, a few.  RFC 9112 section
   2.2: "a server that is expecting to receive and parse a request-line
   SHOULD ignore at least one empty line (CRLF) received prior to the
   request-line", as a client may send one after a request's body.  h11
   0.14-0.16 reads one as a head with no request line: a ``400``, and the
   connection closed, so that a request kept alive after it, and any
   pipelined behind it, was lost.  While h11 waits for a request (the
   client's state ``IDLE``), empty lines (CRLF, or LF alone) at the start of
   its receive buffer are dropped before it parses, ``BLANK_LINE_BYTES`` at
   most before each request: past them, h11's ``400`` as before, counted
   and logged.  Unbounded, as nginx skips them, one connection sending
   blank lines at full speed made the event loop skip 64 KiB of them at
   each read, for the keep-alive timeout, uncounted: a download beside four
   such connections took 11 s instead of 0.1 (helper 129).  A bare CR is no
   line end (RFC 9112 2.2: invalid), and stays for h11 to refuse.  Blank
   lines before the HTTP/2 prior-knowledge preface (``PRI * HTTP/2.0``) are
   skipped too, and the connection becomes HTTP/2, as Hypercorn already
   makes it for a preface sent after an HTTP/1.1 exchange.

6. A request line of another major version than 1 (``GET / HTTP/2.0``,
   ``HTTP/9.9``, ``HTTP/0.9``) is a ``505`` (RFC 9110 15.6.6; RFC 9112 2.3:
   the major version names the message's syntax), its connection closed,
   as nginx answers it.  h11 takes any ``HTTP/<digit>.<digit>``, and the
   app was served it with that version in its scope: the guards that tell
   HTTP/1.x by ``http_version`` (a GET's body refused and its connection
   closed, helper 123's lever; a 405's ``Connection: close``; an invalid
   Host's close) let it through, and with compression on, ``HTTP/0.9`` (not
   "HTTP/1.0") got the deflated archive close-delimited, which a failure
   would have ended looking complete (helper 170).  A minor version above 1
   (``HTTP/1.2``) is HTTP/1.1, as RFC 9110 2.5 asks and h11 frames it.  The
   HTTP/2 preface (``PRI * HTTP/2.0``) is still Hypercorn's to switch on.
   h11 has read such a request, so a ``HEAD``'s 505 goes without its page.

7. A method with a lower-case letter (``get``, ``head``, ``Get``) is a
   ``405`` with ``Allow: GET, HEAD``, its connection closed.  A method is
   case-sensitive (RFC 9110 9.1): ``head`` is no HEAD, and h11 frames the
   answer as to an unknown method, with the body its Content-Length
   announces; but Hypercorn upper-cases the method it hands the app, which
   served ``get`` as a GET and ``head`` as a HEAD: headers announcing the
   archive's length and no body, h11's ``LocalProtocolError`` ("Too little
   data for declared Content-Length"), an ERROR with a traceback in the log
   for each such request, and the client's answer cut short (helper 170).
   nginx in front answers such a line ``400``.

tests/test_fences.py fails if what this relies on changes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h11
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol

from ..logs import Quieted
from . import client_errors

logger = logging.getLogger(__name__)
_unparsed_lines: dict[int, Quieted] = {}  # by status

_MARKER = "_archiver_adjusted"
_CLOSED = "_archiver_closed"
# The client's states once its last request is in and the connection must close.
_CLOSING = (h11.MUST_CLOSE, h11.CLOSED)
# Bytes of empty lines skipped before each request line (patch 5): 32 CRLFs.
BLANK_LINE_BYTES = 64
_BLANKS_SKIPPED = "_archiver_blanks_skipped"  # on the h11 connection: since its last request
_CR_HELD = "_archiver_cr_held"  # on the h11 connection: a CR taken out, its LF still to come
_HEAD_REFUSED = "_archiver_head_refused"  # on the protocol: the request refused (patch 6) was a HEAD
_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
# Status -> the headers and body of an error answer made before the app (see install).
ErrorAnswer = Callable[[int], tuple[list[tuple[bytes, bytes]], bytes]]
# Hypercorn's own error answers' headers and body, by status (set by install).
_error_answer: ErrorAnswer = lambda status: ([], b"")  # noqa: E731


def _drop_blank_lines(connection: h11.Connection) -> None:
    """Drop the empty lines before a request line in h11's receive buffer, up to BLANK_LINE_BYTES (patch 5).

    A CR last in the buffer is held back until the next byte says what it
    is: h11 refuses a buffer that starts with one as an illegal request line.
    """
    buffer = connection._receive_buffer
    data: bytearray = buffer._data
    if not data:
        return
    skipped = getattr(connection, _BLANKS_SKIPPED, 0)
    count = 0
    if getattr(connection, _CR_HELD, False):
        setattr(connection, _CR_HELD, False)
        if data[0] != 0x0A:
            data[0:0] = b"\r"  # a bare CR after all: h11's to refuse
            buffer._next_line_search = buffer._multiple_lines_search = 0  # searched from the start again
            return
        count = 1  # the held CR's LF
    end = min(len(data), BLANK_LINE_BYTES - skipped)
    while count < end:
        if data[count] == 0x0A:  # LF
            count += 1
        elif data[count] == 0x0D and count + 1 < end and data[count + 1] == 0x0A:  # CRLF
            count += 2
        elif data[count] == 0x0D and count + 1 == len(data) and count + 2 <= BLANK_LINE_BYTES - skipped:
            # A CR whose next byte has not come, with room for it and its LF.
            count += 1
            setattr(connection, _CR_HELD, True)
        else:
            break  # a request line, a bare CR, or the allowance spent
    if count:
        buffer._extract(count)  # also resets h11's search positions
        setattr(connection, _BLANKS_SKIPPED, skipped + count)


def _closing_aware(protocol: Any, connection: h11.Connection, next_event: Callable[[], Any]) -> Callable[[], Any]:
    """``connection.next_event``, but NEED_DATA while the client's side must close and bytes wait unparsed,
    and once the connection is closed (patch 4); blank lines before a request line skipped (patch 5)."""

    def closing_aware_next_event() -> Any:
        if getattr(protocol, _CLOSED, False):
            return h11.NEED_DATA
        their_state = connection.their_state
        if their_state in _CLOSING and connection.trailing_data[0]:
            return h11.NEED_DATA
        if their_state is h11.IDLE:
            _drop_blank_lines(connection)
        event = next_event()
        if isinstance(event, h11.Request):
            setattr(connection, _BLANKS_SKIPPED, 0)
            if not event.http_version.startswith(b"1.") and not _preface(event):
                # h11 has taken it in: it frames the answer to a HEAD with no body (helper 174: the page sent
                # was h11's LocalProtocolError, the connection ended by an error).
                setattr(protocol, _HEAD_REFUSED, event.method == b"HEAD")
                # Raised from next_event, as h11's own refusals are: Hypercorn answers it (patch 2), and closes.
                raise h11.RemoteProtocolError("a request line of another major version than 1", 505)
            if event.method != event.method.upper():
                # Hypercorn would hand it to the app upper-cased: another method than the one h11 answers.
                raise h11.RemoteProtocolError("a method with a lower-case letter", 405)
        return event

    return closing_aware_next_event


def _preface(request: h11.Request) -> bool:
    """Whether ``request`` is the HTTP/2 prior-knowledge preface's first line, which Hypercorn switches on."""
    return request.method == b"PRI" and request.target == b"*" and request.http_version == b"2.0"


def install(error_answer: ErrorAnswer | None = None) -> None:
    """Patch Hypercorn's HTTP/1.1 protocol once per process (idempotent); ``error_answer`` replaces the last one
    given."""
    global _error_answer
    if error_answer is not None:
        _error_answer = error_answer
    if getattr(H11Protocol, _MARKER, False):
        return
    original: Callable[[Any, Any], Awaitable[None]] = H11Protocol._send_h11_event

    async def _send_h11_event(self: Any, event: Any) -> None:
        if isinstance(event, (h11.Response, h11.InformationalResponse)) and not event.reason:
            object.__setattr__(event, "reason", _PHRASES.get(event.status_code, b""))
        await original(self, event)

    async def _send_error_response(self: Any, status_code: int) -> None:
        client = self.client[0] if self.client else "-"  # (host, port), or None on a Unix socket
        # At most a line every 10 s for each status: one client makes such requests at its own
        # rate, a connection each (helper 84: 2,200 lines a second).
        client_errors.count("http1_unparsable")
        if (quieted := _unparsed_lines.get(status_code)) is None:
            quieted = _unparsed_lines[status_code] = Quieted(logger, logging.INFO)
        quieted.log("refused a request from %s that HTTP/1.1 cannot parse: %d", client, status_code)
        answer_headers, body = _error_answer(status_code)
        headers = [(b"content-length", b"%d" % len(body)), (b"connection", b"close"), *answer_headers]
        await self._send_h11_event(
            h11.Response(status_code=status_code, headers=[*headers, *self.config.response_headers("h11")])
        )
        if body and not getattr(self, _HEAD_REFUSED, False):
            await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    original_handle: Callable[[Any, Any], Awaitable[None]] = H11Protocol.handle

    async def handle(self: Any, event: Any) -> None:
        connection = self.connection
        if isinstance(event, RawData) and event.data and connection.their_state in _CLOSING:
            return  # after "close": what comes is not even kept (the end of input still counts)
        if not getattr(connection, _MARKER, False):
            # Bytes that came with the request, in the same read, are in h11's buffer already:
            # h11 must not parse them either.
            setattr(connection, _MARKER, True)
            connection.next_event = _closing_aware(self, connection, connection.next_event)
        if isinstance(event, Closed):
            setattr(self, _CLOSED, True)
            await original_handle(self, event)
            # A reader paused behind a pipelined request (h11's PAUSED) waits for the response
            # in progress to end and recycle the connection; closed from another task (a write
            # that found the client gone), that never happens: it wakes, and stops (patch 4).
            await self.can_read.set()
            return
        await original_handle(self, event)

    H11Protocol.handle = handle  # type: ignore[method-assign]
    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
    setattr(H11Protocol, _MARKER, True)
