"""One adjustment to Hypercorn's HTTP/1.1 protocol (0.17-0.18): a reason phrase in the status line.

Hypercorn builds every ``h11.Response`` without a reason, so the status line
reads ``HTTP/1.1 200 `` with an empty phrase.  RFC 9112 section 4 lets a
client ignore the phrase and a server send none, but some proxies and old
clients log or show it.  Here ``H11Protocol._send_h11_event`` fills an empty
reason from ``http.HTTPStatus`` before h11 writes it: a dictionary lookup a
response.  h11's events are frozen dataclasses, so the field is set the way
their own ``__init__`` sets it.  tests/test_fences.py fails if what this
relies on changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h11
from hypercorn.protocol.h11 import H11Protocol

_MARKER = "_archiver_adjusted"
_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def install() -> None:
    """Patch Hypercorn's HTTP/1.1 protocol once per process (idempotent)."""
    if getattr(H11Protocol, _MARKER, False):
        return
    original: Callable[[Any, Any], Awaitable[None]] = H11Protocol._send_h11_event

    async def _send_h11_event(self: Any, event: Any) -> None:
        if isinstance(event, (h11.Response, h11.InformationalResponse)) and not event.reason:
            object.__setattr__(event, "reason", _PHRASES.get(event.status_code, b""))
        await original(self, event)

    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    setattr(H11Protocol, _MARKER, True)
