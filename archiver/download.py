"""One download: a nursery that runs the producer and feeds the response body.

``ArchiveBody`` is the response body.  Entering it takes a job slot, opens the
download's nursery and starts the producer (``zip`` is running when it
returns); iterating it takes chunks from the bounded channel between them;
leaving it waits for the producer, which means ``zip`` has been reaped, and
gives the slot back.  The nursery encloses the whole send loop, so a client
that goes away (Hypercorn cancels the send) cancels the producer too.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import trio
from quart.wrappers.response import ResponseBody

from .crc_index import CrcIndex
from .crc_source import CrcSource
from .layout import ArchiveLayout, set_utf8_flags
from .limits import DownloadStalled, JobSlots, TokenBucket
from .metrics import DownloadMetrics
from .partial import CentralTail
from .producer import ZipInput, produce_zip
from .ranges import ByteRange
from .rewrite import DescriptorMismatch, DescriptorRemover

logger = logging.getLogger(__name__)


class ArchiveChanged(RuntimeError):
    """zip's output is not the announced length: the album changed after it was listed."""


class ArchiveBody(ResponseBody):
    """The streamed ZIP of one album, produced while it is sent."""

    def __init__(
        self,
        name: str,
        zip_input: ZipInput | None,
        zip_arguments: Sequence[str],
        *,
        slots: JobSlots,
        metrics: DownloadMetrics,
        chunk_size: int,
        channel_capacity: int,
        delay: float = 0.0,
        rate_limit: int = 0,
        layout: ArchiveLayout | None = None,
        byte_range: ByteRange | None = None,
        client: str = "unknown",
        stall_timeout: float = math.inf,
        crc_index: CrcIndex | None = None,
        known_crcs: array[int] | None = None,
        tail: CentralTail | None = None,
    ) -> None:
        self.name = name
        self.zip_input = zip_input
        self.zip_arguments = zip_arguments
        self.slots = slots
        self.metrics = metrics
        self.chunk_size = chunk_size
        self.channel_capacity = channel_capacity
        self.delay = delay
        self.rate_limit = rate_limit
        # Store mode: the announced length (never send a byte more or end a byte
        # short) and where to set the UTF-8 flag zip leaves out.
        self.layout = layout
        # A Range request: zip's output (over the files the range touches, see
        # ``partial``) before the range is read and dropped; then, if the range
        # reaches the archive's tail, that is generated.  No zip_input: the
        # range lies in the tail.
        self.byte_range = byte_range
        self.tail = tail
        self._producer_scope = trio.CancelScope()
        # Who asked (for the fair share of the job slots), and how long one
        # chunk may wait on them (see ``connection``, which does the sending).
        self.client = client
        self.stall_timeout = stall_timeout
        # Stored archives without ZIP64 go out without data descriptors (see
        # ``rewrite``): their CRCs come from the index, computed ahead of zip.
        self._crcs: CrcSource | None = None
        self._rewriter: DescriptorRemover | None = None
        if zip_input is not None and crc_index is not None and layout is not None and layout.name_lengths is not None:
            assert layout.sizes is not None
            name_lengths, sizes = layout.name_lengths, layout.sizes
            self._crcs = CrcSource(zip_input.directory, zip_input.names, sizes, crc_index, known_crcs)
            self._rewriter = DescriptorRemover(name_lengths, sizes, self._crcs.crc, self._crcs.ready, layout.zip64_end)
        self.bytes_produced = 0
        self.bytes_out = 0
        self.bytes_sent = 0
        self._started_at = math.nan
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._receive_channel: trio.MemoryReceiveChannel[bytes] | None = None
        self._bucket: TokenBucket | None = None

    async def __aenter__(self) -> ArchiveBody:
        """Take this client's and a global job slot and start zip.

        Raises JobLimitReached, FairShareExceeded, RangeLimitReached or ZipUnavailable if that fails.
        A range counts like a whole download: it may read whole files (those
        at its ends, CRCs the index lacks), or, in an archive with
        descriptors, run zip from the first file.
        """
        self.slots.acquire(self.client, self._ranged)
        self._started_at = trio.current_time()
        if self.rate_limit:
            # A second's worth of saved-up rate at most (and never less than a chunk).
            burst = max(self.rate_limit, self.chunk_size)
            self._bucket = TokenBucket(self.rate_limit, burst, self._started_at)
        send_channel, self._receive_channel = trio.open_memory_channel[bytes](self.channel_capacity)
        self._nursery_manager = trio.open_nursery()
        nursery = self._nursery = await self._nursery_manager.__aenter__()
        try:
            if self._crcs is not None:
                nursery.start_soon(self._crcs.compute)
            if self.tail is not None:
                nursery.start_soon(self.tail.compute_crcs)
            if self.zip_input is not None:
                await nursery.start(self._produce, send_channel)
        except BaseException as error:
            self._receive_channel.close()
            try:
                if not await self._nursery_manager.__aexit__(type(error), error, error.__traceback__):
                    raise
            finally:
                self._release_slots()
        if self.zip_input is None:
            self.metrics.download_started(0, 0)
        else:
            self.metrics.download_started(self.zip_input.file_count, self.zip_input.total_size)
        return self

    async def _produce(self, send_channel: trio.MemorySendChannel[bytes], task_status: trio.TaskStatus[None]) -> None:
        assert self.zip_input is not None
        # Its own scope: zip is stopped once its part of a range is out, while the tail goes on.
        with self._producer_scope:
            await produce_zip(
                self.zip_arguments,
                self.zip_input,
                send_channel,
                chunk_size=self.chunk_size,
                task_status=task_status,
            )

    def __aiter__(self) -> ArchiveBody:
        return self

    async def __anext__(self) -> bytes:
        assert self._receive_channel is not None and self._nursery is not None
        if self.zip_input is None or (self.byte_range is not None and self.bytes_out > self.byte_range.end):
            # zip's part of the range is sent; the rest of its output is not wanted.
            self._producer_scope.cancel()
            chunk = await self._tail_chunk()
            if not chunk:
                self._nursery.cancel_scope.cancel()  # CRCs still being computed for a partial file
                raise StopAsyncIteration
            return self._count_sent(chunk)
        await self._pace()
        while True:
            try:
                chunk = await self._receive_channel.receive()
            except trio.EndOfChannel:
                if self.layout is not None and self.bytes_produced != self.layout.size:
                    raise ArchiveChanged(
                        f"zip wrote {self.bytes_produced} bytes, {self.layout.size} announced"
                    ) from None
                if self._rewriter is not None and not self._rewriter.done:
                    raise ArchiveChanged("zip's archive ended before its end record") from None
                if self.layout is not None and self.bytes_out != self.layout.sent_size:
                    # Never a clean end for bytes that disagree with the announced plan.
                    raise ArchiveChanged(f"{self.bytes_out} bytes made, {self.layout.sent_size} announced") from None
                raise StopAsyncIteration from None
            offset = self.bytes_produced
            self.bytes_produced += len(chunk)
            if self.layout is not None:
                if self.bytes_produced > self.layout.size:
                    raise ArchiveChanged(f"zip wrote more than the {self.layout.size} bytes announced")
                chunk = set_utf8_flags(chunk, offset, self.layout.utf8_flag_positions)
            if self._rewriter is not None:
                chunk = await self._without_descriptors(chunk)
            out_offset = self.bytes_out
            self.bytes_out += len(chunk)
            if self.layout is not None and self.bytes_out > self.layout.sent_size:
                raise ArchiveChanged(f"more than the {self.layout.sent_size} bytes announced were made")
            if self.byte_range is not None:
                # Keep only the part of this chunk inside the range (slicing all of it costs no copy).
                chunk = chunk[max(0, self.byte_range.start - out_offset) : self.byte_range.end + 1 - out_offset]
            if chunk:
                break
        return self._count_sent(chunk)

    async def _tail_chunk(self) -> bytes:
        """The next chunk of the generated tail of a range, b"" if there is none (left)."""
        if self.tail is None:
            return b""
        await self._pace()
        return await self.tail.read(self.chunk_size)

    def _count_sent(self, chunk: bytes) -> bytes:
        self.bytes_sent += len(chunk)
        if self._bucket is not None:
            self._bucket.spend(len(chunk))
        self.metrics.bytes_sent.inc(len(chunk))
        logger.debug("%s: sending %d bytes (%d so far)", self.name, len(chunk), self.bytes_sent)
        return chunk

    async def _without_descriptors(self, chunk: bytes) -> bytes:
        assert self._rewriter is not None and self._crcs is not None
        try:
            pieces = await self._rewriter.feed(chunk)
        except DescriptorMismatch as mismatch:
            if mismatch.name:
                self._crcs.forget(mismatch.name)
            raise ArchiveChanged(str(mismatch)) from None
        if len(pieces) == 1:
            (piece,) = pieces
            # All file data, the usual chunk: a view of the whole chunk is the chunk itself,
            # passed on as it came, no copy.  A piece of the same length that is not such
            # a view is a rewritten record (an end record, a local header, a central
            # entry), never the chunk it came from.
            if isinstance(piece, memoryview) and piece.obj is chunk and piece.nbytes == len(chunk):
                return chunk
            return bytes(piece)
        return b"".join(pieces)

    async def _pace(self) -> None:
        """Slow the next chunk down: ``delay`` after each chunk, and ``rate_limit`` bytes/s with a bounded burst.

        No pause once the whole length is sent: the client has it all, and may leave.
        """
        if self.bytes_sent == self._length():
            return
        if self.bytes_sent and self.delay:
            await trio.sleep(self.delay)
        if self._bucket is not None:
            await trio.sleep(self._bucket.delay(trio.current_time()))

    # Quart annotates __aexit__ as returning None, but a nursery may swallow
    # the exception it was handed, and that answer must be passed on.
    async def __aexit__(  # type: ignore[override]
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._nursery_manager is not None and self._receive_channel is not None and self._nursery is not None
        if exc_value is not None:
            # Cancelled before the channel closes: a producer waiting to send is
            # then cancelled, not told BrokenResourceError, which would stand
            # beside the real failure (a stall, a disconnect) as a second one.
            self._nursery.cancel_scope.cancel()
        self._receive_channel.close()
        try:
            suppressed = await self._nursery_manager.__aexit__(exc_type, exc_value, traceback)
        except BaseException as error:
            self._finish(*_outcome(error))
            raise
        else:
            self._finish(*_outcome(None if suppressed else exc_value))
            return suppressed
        finally:
            self._release_slots()

    def _release_slots(self) -> None:
        self.slots.release(self.client, self._ranged)

    def _finish(self, outcome: str, description: str) -> None:
        if outcome == "cancelled" and self.bytes_sent == self._length():
            # Judged by what was delivered: every byte announced was taken by
            # the client, which may then leave (closing the connection) before
            # the body ends, while a range's zip is stopped early on purpose
            # or a paced body waits out its pause.
            outcome, description = "completed", "complete"
        duration = trio.current_time() - self._started_at
        self.metrics.download_finished(outcome, duration)
        log = {"failed": logger.error, "stalled": logger.warning}.get(outcome, logger.info)
        log(
            "download %s for %s: %s, %d bytes sent in %.3f s (%d files)",
            self.name,
            self.client,
            description,
            self.bytes_sent,
            duration,
            0 if self.zip_input is None else self.zip_input.file_count,
        )

    @property
    def _ranged(self) -> bool:
        return self.byte_range is not None or self.tail is not None

    def _length(self) -> int | None:
        """The bytes this response is to send in all (its Content-Length); None if not known ahead (compressed)."""
        if self.byte_range is None and self.tail is None:
            return None if self.layout is None else self.layout.sent_size
        return (0 if self.byte_range is None else self.byte_range.length) + (
            0 if self.tail is None else self.tail.length
        )


def first_failure(error: BaseException) -> BaseException:
    """The first exception in ``error`` that is not a cancellation, digging through (nested) groups.

    A group of nothing but cancellations gives its first Cancelled.
    """
    if isinstance(error, BaseExceptionGroup):
        _, others = error.split(trio.Cancelled)  # recursive: no Cancelled is left in ``others``
        error = error if others is None else others
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
    return error


def _outcome(error: BaseException | None) -> tuple[str, str]:
    """How a download ended, as a metrics label and a log phrase.

    A cancellation is the client leaving (or a shutdown past its grace
    period); anything else is a failure.
    """
    if error is None:
        return "completed", "complete"
    error = first_failure(error)
    if isinstance(error, trio.Cancelled):
        return "cancelled", "client disconnected"
    if isinstance(error, DownloadStalled):
        return "stalled", f"stalled: {error}"
    return "failed", f"failed: {error}"
