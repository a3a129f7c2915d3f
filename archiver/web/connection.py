"""How an archive response goes out: headers only once the producer is producing.

Quart sends a response's headers before it touches the body.  For an archive
that would promise a 200 before we know the producer can run.
``send_archive_response`` (which takes over Quart-Trio's sending through
``fences.quart_trio``) enters the body first, waits for the first chunk, and only then sends the
headers.  Whatever fails before that point becomes a proper error response:
no free job slot, no producer, a file found changed (an album being
uploaded to), the system out of descriptors, or the storage giving nothing
for the storage timeout is a 503; any other failure of the producer's a 500.
Whatever fails after it propagates, and the transfer is aborted
(see ``hypercorn_h2`` for HTTP/2); so does an archive whose length differs
from the Content-Length announced (HTTP/1.1: the connection closes short).

Every message to the client must be taken within the body's stall timeout
for each 256 KiB it holds (``limits.STALL_UNIT``); one that is not ends the
download as stalled (aborted, producer killed, slot freed).  Over HTTP/1.1 Hypercorn writes to the socket shielded from
cancellation, so ``hypercorn_tcp`` ends such a write after the same time;
the deadline here, which started first, has then passed and names the outcome.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import cast

import trio
from hypercorn.typing import ASGISendCallable, HTTPResponseBodyEvent, HTTPResponseStartEvent, HTTPScope
from quart import Response
from quart.typing import ResponseTypes

from ..archive.listed_files import FileUnreadable
from ..archive.listing import AlbumKeepsChanging, ListingFailed
from ..archive.producer import ProducerFailed, ProducerUnavailable
from ..archive.producer_protocol import FileChanged, OutOfResources
from ..archive.root_filesystem import StorageUnavailable
from ..archive.worker_threads import NoThread
from ..fences.hypercorn_tcp import write_units
from ..fences.quart_trio import SendResponse, Takeover
from ..logs import Quieted
from .download import ArchiveBody
from .limits import (
    STALL_UNIT,
    DownloadStalled,
    FairShareExceeded,
    JobLimitReached,
    PlanLimitReached,
    RangeLimitReached,
    SlotReclaimed,
    WalkLimitReached,
)
from .metrics import DownloadMetrics
from .outcomes import LengthMismatch, StorageTimeout, album_changed, first_failure
from .pages import ALBUM_CHANGING, STORAGE_SILENT, error_page
from .storage_calls import StorageSilent

logger = logging.getLogger(__name__)
# Failures the download's body logs (one line, no traceback) and counts itself.
_LOGGED_BY_THE_BODY = (
    ProducerFailed,
    LengthMismatch,
    FileChanged,
    FileUnreadable,
    OutOfResources,
    DownloadStalled,
    StorageTimeout,
    SlotReclaimed,
    NoThread,
)

RETRY_AFTER_SECONDS = 5
# Storage that stopped answering is not back in seconds (and each try holds a thread for the storage timeout).
STORAGE_RETRY_AFTER_SECONDS = 60


def response_sender(stall_timeout: float) -> Takeover:
    """How every response goes out (``fences.quart_trio``): an archive by ``send_archive_response``, any other
    answer within ``stall_timeout`` (seconds).

    Any other answer is small (a page, ``/healthz``, a redirect), but over HTTP/2 its end waits until
    the client has taken its bytes: a client that keeps its flow-control window shut held the stream,
    and so its connection and a connection slot, for ever (helper 108: 20 connections, 85 bytes each,
    held every slot of ``ARCHIVER_MAX_CONNECTIONS=20``).  Cut, it is unfinished: its stream is reset
    (``hypercorn_h2``), and the connection, idle, closes at the keep-alive timeout.
    """

    async def send_response_within(
        send: ASGISendCallable, response: ResponseTypes, scope: HTTPScope, send_response: SendResponse
    ) -> bool:
        if not await send_archive_response(send, response, scope, send_response):
            with trio.move_on_after(stall_timeout):
                await send_response(send, response)
        return True

    return send_response_within


async def send_archive_response(
    send: ASGISendCallable, response: ResponseTypes, scope: HTTPScope, send_response: SendResponse
) -> bool:
    """Send an archive response (headers once the body has produced); False for any other response."""
    if not isinstance(response, Response) or not isinstance(response.response, ArchiveBody):
        return False
    body = response.response
    headers_sent = False
    try:
        async with body:
            async for chunk in body:
                if not headers_sent:
                    # A failure that came with this chunk (a CRC read's thread ending) is pending:
                    # its refusal, not a head.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    # Set first: the server may have taken the headers when a failure
                    # cancels their send, and a second response would then be refused.
                    headers_sent = body.head_sent = True
                    # Whole or not at all: cancelled at its write's first checkpoint, the head was
                    # h11's but not Hypercorn's stream's, which at the app's end sent a 500 head
                    # too; h11 refused it, and the client had an empty reply (helper 68).  Since
                    # then ``hypercorn_tcp`` shields every write from its first checkpoint (helper
                    # 110), which covers this one (no test tells the two apart); kept here, where
                    # the head's rule is, for a server without that fence.
                    with trio.CancelScope(shield=True):
                        await _send_within(send, _start_event(response), body.stall_timeout)
                    body.head_went_out()
                await _send_within(send, _body_event(chunk, more_body=True), body.stall_timeout)
                body.handed_over(len(chunk))
            if not headers_sent:  # cannot happen: even an empty album yields the empty ZIP
                headers_sent = True
                await _send_within(send, _start_event(response), body.stall_timeout)
            # Within the download and its deadline: over HTTP/2 the last message waits until the
            # client has taken the stream's buffered tail, which a closed window would hold for ever.
            await _send_within(send, _body_event(b"", more_body=False), body.stall_timeout)
    except BaseException as error:
        # A group, often: the failure, and the cancellations it caused in the
        # download's nursery (and, once the client is gone, in Quart-Trio's).
        failure = first_failure(error)
        if not isinstance(failure, Exception):
            raise  # a cancellation alone: the client left, or shutdown
        if headers_sent:  # a stall too: DownloadStalled is raised only by a send, once the head is sent
            if isinstance(failure, _LOGGED_BY_THE_BODY):
                # Logged by the body already.  Returning without the final
                # body message aborts the transfer, like raising would,
                # without a traceback for an expected operational failure.
                return True
            raise
        refusal = _refusal_for(body, failure, _accept_header(scope["headers"]))
        if refusal is None:
            # A fault of the service's own: its traceback, and the 500 page every other error has,
            # not Hypercorn's empty 500 without no-store, which an escaped error got (helper 140).
            logger.error("download %s for %s: unexpected failure before the head", body.name, body.client,
                         exc_info=failure)  # fmt: skip
            refusal = error_page(500, _accept_header(scope["headers"]))
        with trio.move_on_after(body.stall_timeout):  # as any small answer (response_sender)
            await send_response(send, refusal)
        return True
    return True


async def _send_within(
    send: ASGISendCallable, event: HTTPResponseStartEvent | HTTPResponseBodyEvent, timeout: float
) -> None:
    """Hand ``event`` to the server; DownloadStalled if the client has not taken it within ``timeout`` a STALL_UNIT."""
    body = event.get("body", b"")
    units = write_units(len(body) if isinstance(body, bytes) else 0, STALL_UNIT)  # as hypercorn_tcp counts them
    with trio.move_on_after(timeout * units) as deadline:
        await send(event)
    # Checked after the send returns: an HTTP/1.1 write cannot be interrupted
    # (the server ends it, see the module docstring), so the deadline may
    # have passed without cancelling anything.
    if deadline.cancel_called:
        raise DownloadStalled(f"the client took less than 256 KiB in {timeout:g} s")


_LIMIT_REASONS: dict[type[BaseException], str] = {
    JobLimitReached: "job_limit",
    FairShareExceeded: "fair_share",
    RangeLimitReached: "range_limit",
    WalkLimitReached: "walk_limit",
    PlanLimitReached: "plan_limit",
}
# One client's flood of refused requests (helper 84: 986 lines in 4 s of ranges) writes a line a
# second for each reason, each saying how many it stands for; the metric counts every one.
_refusal_lines = {reason: Quieted(logger, logging.WARNING, interval=1.0) for reason in _LIMIT_REASONS.values()}


def limit_refusal(
    error: JobLimitReached | FairShareExceeded | RangeLimitReached | WalkLimitReached | PlanLimitReached,
    name: str,
    client: str,
    metrics: DownloadMetrics,
    accept: str | None,
) -> Response:
    """The 503 for a request over a limit: a WARNING line (at most one a second for each reason), counted by reason;
    never queued."""
    reason = _LIMIT_REASONS[type(error)]
    _refusal_lines[reason].log("refused %s for %s: %s", name, client, error)
    metrics.rejected.labels(reason).inc()
    return error_page(503, accept, {"Retry-After": str(RETRY_AFTER_SECONDS)})


def listing_refusal(error: ListingFailed, name: str, metrics: DownloadMetrics, accept: str | None) -> Response:
    """The answer for an album that cannot be listed whole: 503 if the system ran out of something, else 500."""
    if isinstance(error, AlbumKeepsChanging):  # an upload under way, as a file gone before the first byte
        logger.info("refused %s: %s", name, error)  # no fault of the service's
        metrics.rejected.labels("album_changing").inc()
        # Not before the album can have settled (helper 73: with a settle time of 60 s, every client
        # was told to come back in 5, and behind nginx another instance walked it each time).
        retry_after = max(RETRY_AFTER_SECONDS, math.ceil(error.settles_in))
        return error_page(503, accept, {"Retry-After": str(retry_after)}, ALBUM_CHANGING)
    logger.error("refused %s: cannot list it: %s", name, error)
    metrics.rejected.labels("listing_failed").inc()
    if error.transient:
        if isinstance(error, (StorageSilent, StorageUnavailable)):  # no answer, or no storage there: minutes
            return error_page(503, accept, {"Retry-After": str(STORAGE_RETRY_AFTER_SECONDS)}, STORAGE_SILENT)
        return error_page(503, accept, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    return error_page(500, accept)


def _refusal_for(body: ArchiveBody, error: BaseException, accept: str | None) -> Response | None:
    """The error response for a failure before any header went out, or None if unexpected."""
    if isinstance(error, (JobLimitReached, FairShareExceeded, RangeLimitReached, PlanLimitReached)):
        return limit_refusal(error, body.name, body.client, body.metrics, accept)
    if isinstance(error, ProducerUnavailable):
        logger.error("refused %s: %s", body.name, error)
        body.metrics.rejected.labels("producer_unavailable").inc()
        return error_page(503, accept, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, SlotReclaimed):  # the same, as reclaimed: another client took its slot
        return error_page(503, accept, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, StorageTimeout):  # logged and counted as a failed download by the body
        return error_page(503, accept, {"Retry-After": str(STORAGE_RETRY_AFTER_SECONDS)}, STORAGE_SILENT)
    if isinstance(error, NoThread):  # the same; the tasks' limit (a CRC lookup's or read's thread)
        return error_page(503, accept, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, OutOfResources) or (
        isinstance(error, ProducerFailed) and error.out_of_resources
    ):  # the same: out of descriptors or memory at a file's open or read, in a moment no more
        return error_page(503, accept, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if album_changed(error):
        # A file listed, then gone or changed before the first byte: an album being uploaded to.
        # Walked afresh it is whole: in a few seconds, or at once by nginx on another instance
        # (proxy_next_upstream http_503).  A 500 before, for a normal upload (helper 67).
        return error_page(503, accept, {"Retry-After": str(RETRY_AFTER_SECONDS)}, ALBUM_CHANGING)
    if isinstance(error, (ProducerFailed, LengthMismatch, FileUnreadable)):
        return error_page(500, accept)
    return None


def _accept_header(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    values = [value.decode("latin-1") for name, value in headers if name.lower() == b"accept"]
    return ", ".join(values) if values else None


def _start_event(response: Response) -> HTTPResponseStartEvent:
    return {
        "type": "http.response.start",
        "status": response.status_code,
        "headers": [(name.lower().encode(), value.encode()) for name, value in response.headers.items()],
        "trailers": False,
    }


def _body_event(data: bytes, *, more_body: bool) -> HTTPResponseBodyEvent:
    return cast(HTTPResponseBodyEvent, {"type": "http.response.body", "body": data, "more_body": more_body})
