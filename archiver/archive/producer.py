"""The producer: runs ``producer_program`` for one download and moves what it writes to a channel.

The service plans the archive (``plan``); the producer subprocess writes
the bytes planned, moving file data into its stdout pipe without passing it
through Python.  This module owns that process from start to reaping: it
feeds the instructions (``producer_program``) to its stdin as the plan and
the CRCs allow, drains its stderr, and sends its stdout to the download's
channel.  A range that holds no file data (the central directory a download
manager asks for first) needs no process: its bytes are the plan's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import trio
from zlib_ng import zlib_ng

from . import producer_program
from .crc_source import CrcSource, HeldEntry
from .plan import ArchivePlan, CrcWait, FileSlice, stored_pieces

logger = logging.getLogger(__name__)

PROGRAM = Path(producer_program.__file__)

# The interpreter running the service, isolated (-I: no environment, no user
# site, no current directory on the path) and without site (-S): starts in
# ~15 ms, and nothing but the standard library and ``zipformat`` is loaded.
# Imported rather than run as a script, so that its compiled bytecode is reused.
_LAUNCH = (
    f"import sys; sys.path.insert(0, {str(PROGRAM.parents[2])!r}); "
    "from archiver.archive.producer_program import main; sys.exit(main())"
)
COMMAND = (sys.executable, "-I", "-S", "-c", _LAUNCH)


def producer_available() -> bool:
    """Whether the producer can be run: its interpreter executable, its program readable (for /healthz)."""
    return os.access(COMMAND[0], os.X_OK) and os.access(PROGRAM, os.R_OK)


STDERR_TAIL_BYTES = 2048

# The producer's stdout pipe is widened to this (the most an unprivileged
# process may ask for by default): the producer keeps writing while the
# reader waits or the event loop serves other downloads.  Kernel memory,
# filled only when the client is slower than the producer.
PIPE_SIZE = 1024 * 1024

# Instructions are written to the producer's stdin in pieces of about this size.
FEED_SIZE = 64 * 1024


class ProducerUnavailable(RuntimeError):
    """The producer subprocess cannot be started."""


class ProducerFailed(RuntimeError):
    """The producer exited with a failure (a file changed, or it was killed), or wrote other than planned."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


async def produce(
    plan: ArchivePlan,
    start: int,
    end: int,
    crcs: CrcSource | None,
    send_channel: trio.MemorySendChannel[bytes],
    *,
    chunk_size: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send bytes ``start`` .. ``end`` of the archive to ``send_channel`` in chunks, then close it.

    Deflated archives (no length): ``start`` and ``end`` are ignored, the
    whole archive is sent.  The channel is closed only once the producer
    has exited with status 0 having written exactly the bytes planned, and
    the last chunk is held back until then: a receiver that sees the end of
    the channel has the whole range, correct.  Otherwise ProducerFailed is
    raised and the channel is left open, so the receiver never sees a clean
    end.  ProducerUnavailable is raised if the process cannot start; run
    with ``nursery.start``, that happens before ``start`` returns.

    If cancelled, the process is killed and reaped before the cancellation
    propagates: no process outlives this call.
    """
    if plan.length is not None and start >= plan.central_offset:
        # All generated: the plan's own bytes, no process.
        assert crcs is not None
        task_status.started()
        await _send_generated(plan, start, end, crcs, send_channel, chunk_size)
        await send_channel.aclose()
        return
    try:
        process = await trio.lowlevel.open_process(
            list(COMMAND), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}
        )
    except OSError as error:
        raise ProducerUnavailable(f"cannot start the producer ({COMMAND[0]}): {error}") from error
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    _widen_pipe(process.stdout, chunk_size)
    task_status.started()
    expected = None if plan.length is None else end - start + 1
    stderr_tail: deque[bytes] = deque()
    try:
        async with trio.open_nursery() as nursery:
            feeding = trio.CancelScope()
            nursery.start_soon(_feed, process.stdin, _instructions(plan, start, end, crcs), crcs, feeding)
            nursery.start_soon(_drain_stderr, process.stderr, stderr_tail, plan.directory.name)
            forward = _Forward(send_channel, expected)
            held = [] if crcs is None or expected is None else await crcs.held()
            if held:
                assert crcs is not None
                await _pump_holding(process.stdout, forward, chunk_size, start, held, crcs, nursery)
            else:
                await _pump_output(process.stdout, forward, chunk_size)
            written, last_chunk = forward.written, forward.last
            returncode = await process.wait()
            # Gone, the producer needs no more: what may be left is a wait for a held
            # entry's CRC, which it failed before writing.
            feeding.cancel()
        if returncode != 0:
            tail = b"".join(stderr_tail).decode(errors="replace").strip() or "(no message)"
            raise ProducerFailed(f"the producer exited with status {returncode}: {tail}", returncode)
        if expected is not None and written != expected:
            raise ProducerFailed(f"the producer wrote {written} bytes, {expected} planned")
        if last_chunk:
            await send_channel.send(last_chunk)
        await send_channel.aclose()
        if crcs is not None:
            await crcs.keep_held()
    finally:
        # Shielded: a cancelled download must still kill and reap its producer.
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stdin.aclose()
            await process.stdout.aclose()
            await process.stderr.aclose()


def _instructions(plan: ArchivePlan, start: int, end: int, crcs: CrcSource | None) -> Iterator[bytes | CrcWait]:
    """The producer's input for bytes ``start`` .. ``end`` of ``plan``, with the waits for CRCs (``stored_pieces``)."""
    level = plan.compression
    yield producer_program.album(os.fsencode(plan.directory), level)
    if plan.length is None:  # deflated: whole entries, written by the producer
        for k in range(plan.count):
            yield producer_program.deflated_entry(plan.path(k), plan.key(k), plan.fields(k))
        yield producer_program.END
    else:
        assert crcs is not None
        for piece in stored_pieces(plan, start, end, crcs.ready, crcs.racy, crcs.is_held):
            if isinstance(piece, FileSlice):
                k, offset, length, verify_crc = piece
                yield producer_program.file_slice(plan.path(k), plan.identity(k), offset, length, verify_crc)
            elif isinstance(piece, CrcWait):
                yield piece
            else:
                yield producer_program.literal(piece)
    yield producer_program.DONE


async def _feed(
    stdin: trio.abc.SendStream,
    instructions: Iterator[bytes | CrcWait],
    crcs: CrcSource | None,
    scope: trio.CancelScope,
) -> None:
    """Write the instructions to the producer's stdin in pieces of about FEED_SIZE; all before a CRC is waited for.

    Before a wait, the producer is told to write out what it gathered too:
    the CRC waited for may be a held entry's, computed from those bytes.
    """
    with scope:
        await _feed_all(stdin, instructions, crcs)


async def _feed_all(
    stdin: trio.abc.SendStream, instructions: Iterator[bytes | CrcWait], crcs: CrcSource | None
) -> None:
    pending: list[bytes] = []
    size = 0
    try:
        for instruction in instructions:
            if isinstance(instruction, CrcWait):
                assert crcs is not None
                if crcs.came(instruction.k, instruction.or_held):
                    continue
                pending.append(producer_program.FLUSH)
                await stdin.send_all(b"".join(pending))
                pending.clear()
                size = 0
                await crcs.crc(instruction.k, instruction.or_held)
                continue
            pending.append(instruction)
            size += len(instruction)
            if size >= FEED_SIZE:
                await stdin.send_all(b"".join(pending))
                pending.clear()
                size = 0
        if pending:
            await stdin.send_all(b"".join(pending))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the producer exited before reading everything; its status tells why.
    finally:
        await stdin.aclose()


async def _send_generated(
    plan: ArchivePlan, start: int, end: int, crcs: CrcSource, send_channel: trio.MemorySendChannel[bytes], size: int
) -> None:
    pending = bytearray()
    for piece in stored_pieces(plan, start, end, crcs.ready, crcs.racy, crcs.is_held):
        if isinstance(piece, CrcWait):
            await crcs.crc(piece.k, piece.or_held)
            continue
        assert not isinstance(piece, FileSlice), "a generated range holds no file data"
        pending += piece
        if len(pending) >= size:
            await send_channel.send(bytes(pending))
            pending.clear()
    if pending:
        await send_channel.send(bytes(pending))


def _widen_pipe(stdout: trio.abc.ReceiveStream, chunk_size: int) -> None:
    """Let the stdout pipe hold several chunks (Linux pipes hold 64 KiB by default); best effort."""
    if not hasattr(fcntl, "F_SETPIPE_SZ") or not isinstance(stdout, trio.lowlevel.FdStream):
        return
    # A chunk larger than pipe-max-size cannot be had (EPERM without CAP_SYS_RESOURCE): then PIPE_SIZE.
    for size in (max(PIPE_SIZE, chunk_size), chunk_size, PIPE_SIZE):
        with contextlib.suppress(OSError):
            fcntl.fcntl(stdout.fileno(), fcntl.F_SETPIPE_SZ, size)
            return


async def _drain_stderr(stderr: trio.abc.ReceiveStream, tail: deque[bytes], album: str) -> None:
    size = 0
    async for received in stderr:
        data = bytes(received)
        logger.warning("producer (%s): %s", album, data.decode(errors="replace").rstrip())
        tail.append(data)
        size += len(data)
        while size - len(tail[0]) >= STDERR_TAIL_BYTES:
            size -= len(tail.popleft())


class _Forward:
    """Sends chunks to the channel, holding back the one with the last of the ``expected`` bytes.

    Held back until the producer's exit (the rest go at once, so a download
    holds no chunk more than its channel's); with no length known
    (deflated), each chunk until the next one comes.  More than ``expected``
    is ProducerFailed at once.
    """

    def __init__(self, send_channel: trio.MemorySendChannel[bytes], expected: int | None) -> None:
        self.send_channel = send_channel
        self.expected = expected
        self.written = 0  # bytes read from the producer
        self.last = b""  # the chunk held back

    async def send(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.expected is None:
            if self.last:
                await self.send_channel.send(self.last)
            self.last = chunk
        elif self.written < self.expected:
            await self.send_channel.send(chunk)
        elif self.written == self.expected:
            self.last = chunk
        else:
            raise ProducerFailed(f"the producer wrote more than the {self.expected} bytes planned")


async def _pump_output(stdout: trio.abc.ReceiveStream, forward: _Forward, chunk_size: int) -> None:
    """Move stdout to ``forward`` as it comes."""
    send = forward.send
    # Pipe streams hand out bytes (typed bytes | bytearray): no copy needed.
    while chunk := cast(bytes, await stdout.receive_some(chunk_size)):
        await send(chunk)


# Keep the held entries' CRCs in the index at least this often (a download cut short keeps those before).
KEEP_HELD_EVERY = 512


async def _pump_holding(
    stdout: trio.abc.ReceiveStream,
    forward: _Forward,
    chunk_size: int,
    start: int,
    held: list[HeldEntry],
    crcs: CrcSource,
    nursery: trio.Nursery,
) -> None:
    """Move stdout to ``forward``, holding back each held entry's bytes until its CRC is in its header.

    A held entry (``crc_source``) comes with a CRC of 0 in its local header.
    From the chunk with that CRC field to the chunk with the entry's last
    byte, chunks wait; the CRC of the data is computed as they come, then
    written over the 0 (one copy of the chunk with the field) and they go.
    ProducerFailed if the field is not 0 (the output is not the plan's).
    Holds one held entry (at most HOLD_BYTES) and two chunks at the most.
    """
    position = start  # the archive offset of the next byte read
    waiting: deque[_Waiting] = deque()
    entries = iter(held)
    coming = next(entries, None)  # the next held entry whose CRC field is not read yet
    current: HeldEntry | None = None  # the held entry whose data is being read
    current_waiting: _Waiting | None = None  # the chunk with its CRC field
    crc = 0
    finished = kept = 0
    while chunk := cast(bytes, await stdout.receive_some(chunk_size)):
        low, high = position, position + len(chunk)
        position = high
        this = None
        if waiting or (coming is not None and coming.crc_at < high):
            this = _Waiting(chunk, low)
            waiting.append(this)
        view = memoryview(chunk)
        while True:
            if current is None:
                if coming is None or coming.crc_at >= high:
                    break
                assert this is not None
                current, current_waiting, crc = coming, this, 0
                this.unfinished += 1
                coming = next(entries, None)
            data_low, data_high = max(current.data_at, low), min(current.end, high)
            if data_low < data_high:
                crc = zlib_ng.crc32(view[data_low - low : data_high - low], crc)
            if current.end > high:
                break
            _patch(waiting, current.crc_at, crc)
            assert current_waiting is not None
            current_waiting.unfinished -= 1
            crcs.held_crc(current.k, crc)
            finished += 1
            current = None
        while waiting and not waiting[0].unfinished:
            await forward.send(waiting.popleft().patched())
        if this is None:
            await forward.send(chunk)
        if finished - kept >= KEEP_HELD_EVERY:
            kept = finished
            nursery.start_soon(crcs.keep_held)
    # Chunks still waiting: the output ended short, which the caller finds (``written``).


class _Waiting:
    """A chunk held back: its bytes and archive offset, the CRCs to write in it, its held entries unfinished."""

    __slots__ = ("at", "chunk", "patches", "unfinished")

    def __init__(self, chunk: bytes, at: int) -> None:
        self.chunk = chunk
        self.at = at
        self.patches: list[tuple[int, bytes]] = []
        self.unfinished = 0

    def patched(self) -> bytes:
        if not self.patches:
            return self.chunk
        view, done = memoryview(self.chunk), 0
        pieces: list[bytes | memoryview] = []
        for at, data in self.patches:
            pieces += (view[done:at], data)
            done = at + len(data)
        pieces.append(view[done:])
        return b"".join(pieces)


def _patch(waiting: deque[_Waiting], crc_at: int, crc: int) -> None:
    """Plan ``crc`` (little-endian, APPNOTE 4.4.7) over the 0 at ``crc_at`` in the waiting chunks it lies in."""
    field = crc.to_bytes(4, "little")
    for chunk in waiting:
        low, high = max(crc_at, chunk.at), min(crc_at + 4, chunk.at + len(chunk.chunk))
        if low < high:
            if chunk.chunk[low - chunk.at : high - chunk.at] != bytes(high - low):
                raise ProducerFailed(f"a held entry's CRC field at {crc_at} is not 0: not the output planned")
            chunk.patches.append((low - chunk.at, field[low - crc_at : high - crc_at]))
