"""Quart-Trio's HTTP connection, with the sending of every response taken over.

Quart sends a response's headers before it touches the body; an archive's
must wait until the producer has produced (``web.connection``), and every
other answer gets the stall timeout (``web.connection.response_sender``).
The only place to change that is ``_send_response``, a private method of
Quart's ``ASGIHTTPConnection`` that Quart-Trio's ``TrioASGIHTTPConnection``
inherits and calls (checked against quart 0.22 and quart-trio 0.12, pinned in
pyproject.toml; its signature and the call are asserted in tests/test_fences.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from hypercorn.typing import ASGISendCallable, HTTPScope
from quart.typing import ResponseTypes
from quart_trio.asgi import TrioASGIHTTPConnection

SendResponse = Callable[[ASGISendCallable, ResponseTypes], Awaitable[None]]
# Sends ``response`` itself and answers True, or answers False to leave it to Quart-Trio.
# Given the scope, and Quart-Trio's own way of sending (for the error responses it builds).
Takeover = Callable[[ASGISendCallable, ResponseTypes, HTTPScope, SendResponse], Awaitable[bool]]


def connection_class(takeover: Takeover) -> type[TrioASGIHTTPConnection]:
    """A TrioASGIHTTPConnection whose ``_send_response`` asks ``takeover`` first (set it as ``app.asgi_http_class``)."""

    class TakenOverConnection(TrioASGIHTTPConnection):
        async def _send_response(self, send: ASGISendCallable, response: ResponseTypes) -> None:
            if not await takeover(send, response, self.scope, super()._send_response):
                await super()._send_response(send, response)

    return TakenOverConnection
