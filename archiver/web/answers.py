"""What a download's request asks (its client, protocols, range, preconditions) and the headers its answer carries."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator

from quart import Response, request
from werkzeug.datastructures import Headers

from .clients import TrustedProxies
from .disposition import content_disposition
from .pages import error_page
from .preparation import PreparedArchive
from .ranges import (
    ByteRange,
    NotModified,
    PreconditionFailed,
    RangeNotSatisfiable,
    check_preconditions,
    requested_range,
)


def answer_headers(prepared: PreparedArchive, filename: str) -> tuple[dict[str, str], ByteRange | None] | Response:
    """A download's headers and the range it asks for (None: the whole archive); or its answer, if no body is due.

    That answer is a ``304`` or ``412`` (If-None-Match, If-Match) or a ``416``
    (a range past the archive's end).  RFC 9110 13 and 14.
    """
    headers = {
        "Content-Disposition": content_disposition(filename),
        # Never a shared cache's copy: it would outlive a signed link's expiry, and serve a
        # request without a signature where a cache keys without the query (helper 68).
        "Cache-Control": "private",
        # nginx in front: pass bytes on as they come, never spool the archive.
        "X-Accel-Buffering": "no",
    }
    length, etag = prepared.plan.length, prepared.etag
    byte_range: ByteRange | None = None
    if length is not None:
        headers |= {"Content-Length": str(length), "Accept-Ranges": "bytes"}
    if etag is not None:
        headers["ETag"] = etag
    try:
        check_preconditions(
            header_field(request.headers, "If-Match"), header_field(request.headers, "If-None-Match"), etag
        )
    except PreconditionFailed:
        return error_page(412, request.headers.get("Accept"))
    except NotModified:
        # The headers a 200 would carry, and no body.  Not its Content-Length, which RFC 9110 8.6
        # allows: HTTP/2 clients (h2, so httpx) take it as a promise of a body and fail the response.
        headers.pop("Content-Length", None)
        return Response(no_body(), status=304, mimetype="application/zip", headers=headers)
    if length is not None:
        try:
            if request.method == "GET":
                # Several Range lines are one list (RFC 9110 5.3), and so several ranges: the whole archive.
                # Several If-Range lines name no one archive: never equal to the ETag, so no range.
                byte_range = requested_range(
                    header_field(request.headers, "Range"), header_field(request.headers, "If-Range"), etag, length
                )
        except RangeNotSatisfiable:
            return error_page(416, request.headers.get("Accept"), {"Content-Range": f"bytes */{length}"})
        if byte_range is not None:
            headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{length}"
            headers["Content-Length"] = str(byte_range.length)
    return headers, byte_range


def client_address(proxies: TrustedProxies) -> str:
    """The request's client: its peer's address, or the one a trusted proxy forwards for."""
    peer = request.scope.get("client")
    forwarded_for = ",".join(request.headers.getlist("X-Forwarded-For"))
    return proxies.client_address(peer[0] if peer else None, forwarded_for)


def header_field(headers: Headers, name: str) -> str | None:
    """Header ``name``'s value, its lines joined with ", " as RFC 9110 5.3 combines them; None if absent."""
    lines = headers.getlist(name)
    return ", ".join(lines) if lines else None


def utf8_filename(query: bytes) -> bool:
    """Whether every ``filename`` value in the raw query string is UTF-8 once its %-escapes are decoded."""
    for field in query.split(b"&"):
        name, _, value = field.partition(b"=")
        if urllib.parse.unquote_to_bytes(name) == b"filename":
            try:
                urllib.parse.unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                return False
    return True


def client_protocols(proxies: TrustedProxies) -> set[str]:
    """The HTTP versions on the way from the client ("HTTP/1.0"): this request's, and what a trusted proxy says.

    nginx talks HTTP/1.1 to the service whatever its client speaks, and
    passes that on as X-Client-Protocol (deploy/nginx.conf: $server_protocol).
    Both count: a proxy talking HTTP/1.0 to the service cannot pass a
    chunked end on either, whatever its client speaks.
    """
    protocols = {"HTTP/" + request.scope.get("http_version", "1.1")}
    peer = request.scope.get("client")
    stated = request.headers.get("X-Client-Protocol")
    if stated is not None and peer and proxies.trusts(peer[0]):
        protocols.add(stated.strip().upper())
    return protocols


async def no_body() -> AsyncIterator[bytes]:
    """An empty async body: Quart then announces no Content-Length of 0 (HEAD, 304)."""
    return
    yield
