"""One download: a nursery that runs the producer and feeds the response body.

``ArchiveBody`` is the response body.  Entering it takes a job slot, opens the
download's nursery and starts the producer (its process is running when it
returns); iterating it takes chunks from the bounded channel between them;
leaving it waits for the producer, which means its process has been reaped,
and gives the slot back.  The nursery encloses the whole send loop, so a
client that goes away (Hypercorn cancels the send) cancels the producer too.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import trio
from quart.wrappers.response import ResponseBody

from ..archive.crc_index import CrcIndex
from ..archive.crc_source import CrcSource
from ..archive.listed_files import check_still_listed
from ..archive.plan import ArchivePlan
from ..archive.producer import ProducerUnavailable, produce
from ..archive.worker_threads import in_thread
from ..fences import hypercorn_h2_send
from ..fences.delivery import (
    SentBytes,
    bytes_dropped,
    connection_closed_by_server,
    unwatch_sent_bytes,
    watch_sent_bytes,
)
from ..fences.hypercorn_tcp import is_shutting_down, watch_response_writes
from .limits import Job, JobSlots, PlanLimitReached, PlannedFiles, SlotReclaimed, TokenBucket
from .metrics import DownloadMetrics
from .outcomes import LengthMismatch, StorageTimeout, download_outcome, first_failure
from .ranges import ByteRange
from .tail_hold import TailHold

logger = logging.getLogger(__name__)

# Files whose ctime is this recent (seconds) when a download starts are looked at again before its
# end: an upload that paused while its file was read (README, Failure behaviour).
RECHECK_SECONDS = 60


def chunk_size_for(http_version: str, chunk_size: int) -> int:
    """The chunk size for a download over ``http_version``: HTTP/2 reads at most one send batch a chunk.

    An HTTP/2 stream at a closed flow-control window holds its chunks in the
    server (``hypercorn_h2_send``): at most a batch (512 KiB, the default chunk) a
    chunk keeps that to a batch and a chunk.  An HTTP/1.1 download's chunks
    wait in the socket's send path and may be larger (ARCHIVER_CHUNK_SIZE).
    """
    return min(chunk_size, hypercorn_h2_send.SEND_BATCH) if http_version.startswith("2") else chunk_size


class ArchiveBody(ResponseBody):
    """The streamed ZIP of one album (or a range of it), produced while it is sent."""

    def __init__(
        self,
        name: str,
        plan: ArchivePlan,
        *,
        slots: JobSlots,
        planned: PlannedFiles,
        metrics: DownloadMetrics,
        crc_index: CrcIndex,
        chunk_size: int,
        channel_capacity: int,
        delay: float = 0.0,
        rate_limit: int = 0,
        byte_range: ByteRange | None = None,
        client: str = "unknown",
        counted_as: str | None = None,
        stall_timeout: float = math.inf,
        storage_timeout: float = math.inf,
        left_out: int = 0,
    ) -> None:
        self.name = name
        self.plan = plan
        self.left_out = left_out  # entries of the album not in the archive: said in the download's line
        self.slots = slots
        self.planned = planned
        self.metrics = metrics
        self.chunk_size = chunk_size
        self.channel_capacity = channel_capacity
        self.delay = delay
        self.rate_limit = rate_limit
        # A Range request: only those bytes are produced.  A whole stored archive is [0, length - 1].
        self.byte_range = byte_range
        if byte_range is None and plan.length is not None:
            self._start, self._end = 0, plan.length - 1
        elif byte_range is not None:
            self._start, self._end = byte_range.start, byte_range.end
        else:
            self._start, self._end = 0, -1  # deflated: all of it, length unknown
        # Stored archives: the CRCs the bytes hold, read ahead of the producer where the index lacks them.
        # Deflated ones: those of their stored entries (files just under 4 GiB), if any.
        self._crcs = None
        if plan.length is not None:
            whole = (self._start, self._end) == (0, plan.length - 1)
            self._crcs = CrcSource(plan, plan.crc_entries(self._start, self._end), crc_index, whole_download=whole)
        elif stored := plan.entries_stored_when_deflating():
            self._crcs = CrcSource(plan, stored, crc_index)
        # Who asked (for the log), who the fair share of the job slots counts (``clients.counted_client``),
        # and how long one chunk may wait on them (see ``connection``, which does the sending).
        self.client = client
        self.counted_as = client if counted_as is None else counted_as
        self.stall_timeout = stall_timeout
        # How long the response may wait for its next chunk while the storage yields nothing.
        self.storage_timeout = storage_timeout
        self._waiting_since: float | None = None  # trio time, while the response waits for a chunk
        self._watch_scope = trio.CancelScope()  # the watchdog's: it ends with the body
        self.bytes_sent = 0  # taken from the producer for the client
        # Of those, what the access line counts (``fences.delivery.SentBytes``, from ``__aenter__`` on): the
        # log's "bytes sent", and archiver_bytes_sent_total.
        self._out: SentBytes | None = None
        # Of the bytes taken, those whose send to the server returned (``handed_over``): a chunk whose send was
        # cancelled as its client left (an HTTP/2 window never opened, the chunk waiting at the
        # stream's buffer limit) is not among them, and the download is not complete (helper 140).
        self.bytes_handed = 0
        # Set by the sender as the head goes out: before it, a failure is a refusal (503, 500), and the
        # chunk taken from the producer reached no one (helper 70: "524288 bytes sent" for a 503).
        self.head_sent = False
        self.head_written = False  # and once its write has returned (``head_went_out``)
        self._started_at = math.nan
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._receive_channel: trio.MemoryReceiveChannel[bytes] | None = None
        self._bucket: TokenBucket | None = None
        self._job: Job | None = None  # the job slot, once taken
        self._leaving = False  # in __aexit__: the slot is about to come back
        # The body's tail, held back until the producer's proof and the recheck of the files changed lately.
        self._hold = TailHold(plan, self._start, self._end, chunk_size)

    async def __aenter__(self) -> ArchiveBody:
        """Take this client's and a global job slot and start the producer.

        Raises JobLimitReached, FairShareExceeded, RangeLimitReached,
        PlanLimitReached or ProducerUnavailable if that fails.  A range counts
        like a whole download: it may read whole files (those at its ends,
        CRCs the index lacks), and holds the whole plan.
        """
        self._job = await self.slots.take(self.counted_as, self._ranged, self._reclaim)
        self._writes = watch_response_writes()  # this task's, which send this body over HTTP/1.1
        try:
            self.planned.acquire(self.plan)
        except PlanLimitReached:
            self.slots.release(self._job)
            raise
        self._started_at = trio.current_time()
        # Files changed lately: looked at again before the body's end (``_check_recent_files``).
        self._recent = self.plan.changed_since(int(time.time()) - RECHECK_SECONDS)
        if self.rate_limit:
            # A second's worth of saved-up rate at most (and never less than a chunk).
            burst = max(self.rate_limit, self.chunk_size)
            self._bucket = TokenBucket(self.rate_limit, burst, self._started_at)
        send_channel, self._receive_channel = trio.open_memory_channel[bytes](self.channel_capacity)
        self._nursery_manager = trio.open_nursery()
        nursery = self._nursery = await self._nursery_manager.__aenter__()
        try:
            if self._job.reclaimed:  # a slot handed over (``take``), reclaimed again before this task ran
                nursery.start_soon(self._end_reclaimed)
            if self._crcs is not None:
                nursery.start_soon(self._crcs.compute)
            if math.isfinite(self.storage_timeout):
                nursery.start_soon(self._watch_storage)
            await nursery.start(self._produce, send_channel)
        except BaseException as error:
            self._leaving = True  # failing: not to be reclaimed on the way out (helper 134)
            self._receive_channel.close()
            try:
                if not await self._nursery_manager.__aexit__(type(error), error, error.__traceback__):
                    raise
            except BaseException as failure:
                self._finish_before_start(failure)
                raise
            finally:
                self._release_slots()
        # The bytes its access line counts, from its head on: not a refusal's page, sent by this task
        # when the body could not start (a plan over its limit, no producer).
        self._out = watch_sent_bytes(self.metrics.bytes_sent.inc)
        self.metrics.download_started(self.plan.count, self.plan.total_size)
        return self

    def _reclaim(self) -> None:
        """Abort this download: its slot is reclaimed for another client (``JobSlots``).

        Not once the body is leaving: its slot comes back as it does, and a
        download whose every byte went out must not be logged as cut.
        """
        if self._nursery is not None and not self._leaving:  # not open yet: once it is (``__aenter__``)
            self._nursery.start_soon(self._end_reclaimed)
            if self.head_written:
                # A write to a client that reads slowly is shielded: cut, not left to its stall deadline
                # (helper 132: the slot came back ~60 s later, the newcomer refused after 5).
                self._writes.cut_now()

    def handed_over(self, count: int) -> None:
        """The sender's send of ``count`` bytes of the body has returned: the server took them (``bytes_handed``)."""
        self.bytes_handed += count

    def head_went_out(self) -> None:
        """The head's write has returned (the sender says): a reclaim since it began cuts the writes after it.

        Not the head's own write, which may wait for the connection's lock: cut
        there, the client had no answer at all (helper 133).
        """
        self.head_written = True
        if self._job is not None and self._job.reclaimed and not self._leaving:
            self._writes.cut_now()

    async def _end_reclaimed(self) -> None:
        raise SlotReclaimed(
            f"every archive job was busy and {self.counted_as} held more than its share: "
            "its newest download gave its slot"
        )

    def _finish_before_start(self, failure: BaseException) -> None:
        """Log and count a download that ended before its producer had started, but for a refusal.

        A cold CRC read fails (FileChanged) or the client leaves while the
        producer is being forked: a download like any, with its line and its
        outcome.  ProducerUnavailable is a refusal, logged as one by the caller.
        """
        if isinstance(first_failure(failure), ProducerUnavailable):
            return
        self.metrics.download_started(self.plan.count, self.plan.total_size)
        self._finish(*download_outcome(failure))

    async def _produce(self, send_channel: trio.MemorySendChannel[bytes], task_status: trio.TaskStatus[None]) -> None:
        await produce(
            self.plan,
            self._start,
            self._end,
            self._crcs,
            send_channel,
            chunk_size=self.chunk_size,
            task_status=task_status,
        )

    def __aiter__(self) -> ArchiveBody:
        return self

    async def __anext__(self) -> bytes:
        assert self._receive_channel is not None
        await self._pace()
        recheck = self._check_recent_files if self._recent else None
        chunk = await self._hold.next(self._next_chunk, self.bytes_sent, recheck)
        if chunk is None:
            # Stopped now, not in __aexit__: the body's end must not wait for the watchdog's,
            # for once the last message is sent the server may cancel whatever still waits.
            self._watch_scope.cancel()
            length = self._length()
            if length is not None and self.bytes_sent != length:
                # Never a clean end for bytes that disagree with the announced plan.
                raise LengthMismatch(f"{self.bytes_sent} bytes made, {length} announced")
            raise StopAsyncIteration
        self.bytes_sent += len(chunk)
        length = self._length()
        if length is not None and self.bytes_sent > length:
            raise LengthMismatch(f"more than the {length} bytes announced were made")
        if self._bucket is not None:
            self._bucket.spend(len(chunk))
        if logger.isEnabledFor(logging.DEBUG):  # -v: a line a chunk, as the original service wrote
            logger.debug("download %s for %s: sending %d bytes (%d so far)", self.name, self.client, len(chunk),
                         self.bytes_sent)  # fmt: skip
        return chunk

    async def _next_chunk(self) -> bytes | None:
        """The producer's next chunk, or None at its end."""
        assert self._receive_channel is not None
        self._waiting_since = trio.current_time()
        try:
            return await self._receive_channel.receive()
        except trio.EndOfChannel:
            return None
        finally:
            self._waiting_since = None

    async def _check_recent_files(self) -> None:
        """FileChanged unless every file changed lately is still as listed: before the body can end.

        An upload that pauses between writes for longer than the settle time, its file read whole
        within a pause, went out cut in an archive that ended cleanly (helper 72: 20 of 200
        downloads during an FTP upload writing every 0.1-3 s).  Its next write, before the end,
        now makes the transfer fail.  Covered by the storage watchdog (a stat of dead storage).
        """
        self._waiting_since = trio.current_time()
        try:
            await in_thread(check_still_listed, self.plan, self._recent)
        finally:
            self._waiting_since = None

    async def _watch_storage(self) -> None:
        """Raise StorageTimeout once the response has waited ``storage_timeout`` s for a chunk with nothing advancing.

        Advancing: a chunk arriving, or, while the producer waits for a cold
        file's CRC (read before its header goes out: minutes for a large file
        on a slow disk), a read of that CRC's file (or, while queued for one
        of the CRC readers, a read by any download: ``CrcSource.progress``).  Time the response spends
        on the client (the stall timeout's business) or pacing does not count,
        nor CRCs read ahead of what is sent.  Looked at four times
        a timeout: a hang is seen within 1.25 timeouts.  Ends when the body does.
        """
        timeout = self.storage_timeout
        crcs = self._crcs
        since = trio.current_time()  # from when nothing has advanced
        # The last value seen of each count of reads looked at (``CrcSource.progress``), the latest
        # three: a count is compared with its own last, not another's (a switch to another read is
        # no progress; helper 113).
        counts: dict[object, int] = {}
        with self._watch_scope:
            while True:
                await trio.sleep(timeout / 4)
                now = trio.current_time()
                waiting_since = self._waiting_since
                if crcs is not None:
                    whose, count = crcs.progress()
                    last = counts.pop(whose, None)
                    if last is not None and last != count and self._next_byte_waits_for_crc(crcs):
                        since = now
                    counts[whose] = count
                    if len(counts) > 3:  # its own, every download's, and the read it follows now
                        del counts[next(iter(counts))]
                if waiting_since is None:
                    since = now
                elif waiting_since > since:
                    since = waiting_since
                if now - since >= timeout:
                    raise StorageTimeout(
                        f"nothing came from the storage for {now - since:.1f} s (no archive bytes, no file read)"
                    )

    def _next_byte_waits_for_crc(self, crcs: CrcSource) -> bool:
        """Whether the next byte to send is the first that waits for a CRC being read (its reads are then progress).

        Not so while bytes before it are still to come: the producer (or
        whatever holds them) is what the download waits for, and a CRC read
        ahead of it says nothing of that.  Bytes that came and wait in the
        tail hold have come (helper 112: a range from the last entry's data
        into the central directory, its CRC read slowly, timed out with the read
        going on, as if none of its reads were progress).
        """
        arrived = self._start + self.bytes_sent + len(self._hold.held)
        return crcs.waiting_at is not None and arrived >= crcs.waiting_at

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
        self._leaving = True
        self._watch_scope.cancel()  # (a failure's way out; see __anext__)
        if exc_value is not None:
            # Cancelled before the channel closes: a producer waiting to send is
            # then cancelled, not told BrokenResourceError, which would stand
            # beside the real failure (a stall, a disconnect) as a second one.
            self._nursery.cancel_scope.cancel()
        self._receive_channel.close()
        try:
            suppressed = await self._nursery_manager.__aexit__(exc_type, exc_value, traceback)
        except BaseException as error:
            self._finish(*download_outcome(error))
            raise
        else:
            self._finish(*download_outcome(None if suppressed else exc_value))
            return suppressed
        finally:
            self._release_slots()

    def _release_slots(self) -> None:
        assert self._job is not None
        self.slots.release(self._job)
        self.planned.release(self.plan)

    def _finish(self, outcome: str, description: str) -> None:
        unwatch_sent_bytes()  # a refusal's page, sent after, is no archive byte
        if outcome in ("completed", "cancelled") and bytes_dropped():
            # The server dropped bytes handed to it (the client left with them unread): however
            # the send returned, and however many were handed over, they were not delivered.
            outcome, description = "cancelled", "client disconnected"
            if is_shutting_down():
                description = "cancelled during shutdown"
        elif (
            (outcome == "cancelled" or (outcome == "reclaimed" and self._writes.written and not bytes_dropped()))
            and self.head_written
            and self.bytes_handed == self._length()
        ):
            # Judged by what was delivered: every byte announced was taken by
            # the client, which may then leave (closing the connection) before
            # the body ends, or while a paced body waits out its pause.  Or its
            # slot was reclaimed as its end was written, over HTTP/1.1, where a
            # write that returned was taken (over HTTP/2 the reset stream, with
            # no END_STREAM, is a failed transfer to the client: helper 134).
            # Never before the head went out: the client had a 503 (helper 134).
            outcome, description = "completed", "complete"
        elif outcome == "cancelled" and is_shutting_down():
            # Past the grace period (or the client left meanwhile): not to be read as a client's doing.
            description = "cancelled during shutdown"
        if outcome == "cancelled" and (reason := connection_closed_by_server()):
            # Closed by the server for its client's flood: its metric is counted with the connection's WARNING.
            description = f"connection closed: {reason}"
        duration = trio.current_time() - self._started_at
        self.metrics.download_finished(outcome, duration)
        # A file changed mid-download is an upload's doing, not the service's: a WARNING (helper 70:
        # 180 ERROR lines in 5 minutes of uploads), as a stall or a slot reclaimed for another client.
        log = {"failed": logger.error, "completed": logger.info, "cancelled": logger.info}.get(outcome, logger.warning)
        # What was left out is logged once a version of the album ("skipped ..."); its count here,
        # on every download's line, for an operator who reads only those (helper 67).
        left_out = f", {self.left_out} left out: see 'skipped'" if self.left_out else ""
        if not self.head_sent and outcome in ("failed", "changed", "reclaimed"):
            description += " (refused before the head)"
        log(
            "download %s for %s: %s, %d bytes sent in %.3f s (%s%d files%s)",
            self.name,
            self.client,
            description,
            0 if self._out is None else self._out.count,
            duration,
            self._extent(),
            self.plan.count,
            left_out,
        )

    def _extent(self) -> str:
        """What the line's bytes sent are of: the archive's length, and a range's first and last byte in it.

        Helper 191: ``client disconnected, 51904560 bytes sent`` said nothing of how far the client
        had come, and a range's ``complete, 100 bytes sent`` read as a whole archive of 100 bytes.
        A deflated archive's length is not known ahead: nothing.
        """
        if self.plan.length is None:
            return ""
        if self.byte_range is None:
            return f"of {self.plan.length}, "
        return f"bytes {self._start}-{self._end} of {self.plan.length}, "

    @property
    def _ranged(self) -> bool:
        return self.byte_range is not None

    def _length(self) -> int | None:
        """The bytes this response is to send in all (its Content-Length); None if not known ahead (deflated)."""
        return None if self.plan.length is None else self._end - self._start + 1
