"""How an archive response goes out: headers only once ``zip`` is producing.

Quart sends a response's headers before it touches the body.  For an archive
that would promise a 200 before we know ``zip`` can run.  This connection
class (Quart-Trio's, with ``_send_response`` taken over for archive bodies)
enters the body first, waits for the first chunk, and only then sends the
headers.  Whatever fails before that point becomes a proper error response:
no free job slot or no ``zip`` is a 503, ``zip`` failing before its first byte
a 500.  Whatever fails after it propagates, and the transfer is aborted
(see ``hypercorn_h2`` for HTTP/2); so does an archive whose length differs
from the Content-Length announced (HTTP/1.1: the connection closes short).
"""

from __future__ import annotations

import logging
from typing import cast

from hypercorn.typing import ASGISendCallable, HTTPResponseBodyEvent, HTTPResponseStartEvent
from quart import Response
from quart.typing import ResponseTypes
from quart.utils import encode_headers
from quart_trio.asgi import TrioASGIHTTPConnection

from .download import ArchiveBody, ArchiveChanged, JobLimitReached, first_failure
from .producer import ZipFailed, ZipUnavailable

logger = logging.getLogger(__name__)

BUSY_MESSAGE = "Сервер занят, попробуйте позже"  # "server busy, try later"
FAILED_MESSAGE = "Не удалось создать архив"  # "the archive could not be made"
RETRY_AFTER_SECONDS = 5


class ArchiveHTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, holding an archive's headers until zip has produced."""

    async def _send_response(self, send: ASGISendCallable, response: ResponseTypes) -> None:
        if not isinstance(response, Response) or not isinstance(response.response, ArchiveBody):
            await super()._send_response(send, response)
            return
        body = response.response
        headers_sent = False
        try:
            async with body:
                async for chunk in body:
                    if not headers_sent:
                        await send(_start_event(response))
                        headers_sent = True
                    await send(_body_event(chunk, more_body=True))
        except Exception as error:
            failure = first_failure(error)
            if headers_sent:
                if isinstance(failure, (ZipFailed, ArchiveChanged)):
                    # Logged by the body already.  Returning without the final
                    # body message aborts the transfer, like raising would,
                    # without a traceback for an expected operational failure.
                    return
                raise
            refusal = _refusal_for(body, failure)
            if refusal is None:
                raise
            await super()._send_response(send, refusal)
            return
        if not headers_sent:  # cannot happen: even an empty album yields the empty ZIP
            await send(_start_event(response))
        await send(_body_event(b"", more_body=False))


def _refusal_for(body: ArchiveBody, error: BaseException) -> Response | None:
    """The error response for a failure before any header went out, or None if unexpected."""
    if isinstance(error, JobLimitReached):
        logger.warning("refused %s: %s", body.name, error)
        body.metrics.rejected.labels("job_limit").inc()
        return _text_response(BUSY_MESSAGE, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, ZipUnavailable):
        logger.error("refused %s: %s", body.name, error)
        body.metrics.rejected.labels("zip_unavailable").inc()
        return _text_response(BUSY_MESSAGE, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, (ZipFailed, ArchiveChanged)):
        return _text_response(FAILED_MESSAGE, 500, {})
    return None


def _text_response(message: str, status: int, headers: dict[str, str]) -> Response:
    return Response(message + "\n", status=status, headers=headers, mimetype="text/plain")


def _start_event(response: Response) -> HTTPResponseStartEvent:
    return {
        "type": "http.response.start",
        "status": response.status_code,
        "headers": encode_headers(response.headers),
        "trailers": False,
    }


def _body_event(data: bytes, *, more_body: bool) -> HTTPResponseBodyEvent:
    return cast(HTTPResponseBodyEvent, {"type": "http.response.body", "body": data, "more_body": more_body})
