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
import struct
import subprocess
import sys
import weakref
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import accumulate
from pathlib import Path
from typing import cast

import trio

from . import producer_program
from .crc_source import CrcSource
from .plan import ArchivePlan, CrcWait, FileSlice, stored_pieces
from .zipformat import LOCAL_CRC_AT

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


_CRC = struct.Struct("<I")

# What the producer's stdin is fed, in order, and where it waits for a CRC.
Instructions = Iterator[bytes | bytearray | CrcWait]

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
            nursery.start_soon(_feed, process.stdin, _instructions(plan, start, end, crcs), crcs)
            nursery.start_soon(_drain_stderr, process.stderr, stderr_tail, plan.directory.name)
            written, last_chunk = await _pump_output(process.stdout, send_channel, chunk_size, expected)
            returncode = await process.wait()
        if returncode != 0:
            tail = b"".join(stderr_tail).decode(errors="replace").strip() or "(no message)"
            raise ProducerFailed(f"the producer exited with status {returncode}: {tail}", returncode)
        if expected is not None and written != expected:
            raise ProducerFailed(f"the producer wrote {written} bytes, {expected} planned")
        if last_chunk:
            await send_channel.send(last_chunk)
        await send_channel.aclose()
    finally:
        # Shielded: a cancelled download must still kill and reap its producer.
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stdin.aclose()
            await process.stdout.aclose()
            await process.stderr.aclose()


def _instructions(plan: ArchivePlan, start: int, end: int, crcs: CrcSource | None) -> Instructions:
    """The producer's input for bytes ``start`` .. ``end`` of ``plan``, with the waits for CRCs (``stored_pieces``)."""
    level = plan.compression
    yield producer_program.album(os.fsencode(plan.directory), level)
    if plan.length is None:  # deflated: whole entries, written by the producer
        for k in range(plan.count):
            yield producer_program.deflated_entry(plan.path(k), plan.key(k), plan.fields(k))
        yield producer_program.END
    else:
        assert crcs is not None
        yield from _stored_instructions(plan, start, end, crcs)
    yield producer_program.DONE


# Whole entries and central headers are given to the producer this many at a time.
RUN = 512


def _stored_instructions(plan: ArchivePlan, start: int, end: int, crcs: CrcSource) -> Instructions:
    """The instructions for bytes ``start`` .. ``end`` of a stored archive.

    Runs of whole entries and of whole central headers whose CRCs are at
    hand are copied from the plan's joined records and patched (``_WholeEntries``,
    ``ArchivePlan.central_headers``); whatever else (an entry cut by the range,
    a CRC still being read, a racy file) goes piece by piece (``stored_pieces``).
    Both send the same bytes (``tests/test_producer.py``); the runs cost a
    tenth: a warm 20,000-file download's instructions took 0.10 s of the
    service's CPU piece by piece.
    """
    position = start
    local = plan.whole_entries(start, end)
    if local:
        entries = _whole_entries(plan)
        k = local.start
        while k < local.stop:
            # A run lies within one of the table's blocks (``_WholeEntries``).
            known = crcs.ready_run(k, min(k - k % entries.block + entries.block, local.stop), unverified=True)
            stop = k + max(1, len(known))
            at = plan.local_offsets[stop]
            if known:
                yield from _pieces(plan, position, plan.local_offsets[k] - 1, crcs)
                yield entries.instructions(k, stop, known)
            else:
                yield from _pieces(plan, position, at - 1, crcs)
            position, k = at, stop
    central = plan.whole_central_headers(start, end)
    if central:
        k = central.start
        while k < central.stop:
            known = crcs.ready_run(k, min(k + RUN, central.stop))
            stop = k + max(1, len(known))
            at = plan.central_offset + plan.central_offsets[stop]
            if known:
                yield from _pieces(plan, position, plan.central_offset + plan.central_offsets[k] - 1, crcs)
                yield producer_program.literal(plan.central_headers(k, stop, known))
            else:
                yield from _pieces(plan, position, at - 1, crcs)
            position, k = at, stop
    yield from _pieces(plan, position, end, crcs)


def _pieces(plan: ArchivePlan, start: int, end: int, crcs: CrcSource) -> Instructions:
    """The instructions for bytes ``start`` .. ``end`` (none if ``start > end``), piece by piece."""
    if start > end:
        return
    for piece in stored_pieces(plan, start, end, crcs.ready, crcs.racy):
        if isinstance(piece, FileSlice):
            k, offset, length, verify_crc = piece
            yield producer_program.file_slice(plan.path(k), plan.identity(k), offset, length, verify_crc)
        elif isinstance(piece, CrcWait):
            yield piece
        else:
            yield producer_program.literal(piece)


class _WholeEntries:
    """A plan's instructions for each whole stored entry (its local header, then all its data), with CRC 0.

    Made a block of ``RUN`` entries at a time, as a download first needs
    them, and kept with the plan: copied and patched for each download
    (made entry by entry, they were half of a warm 20,000-file download's
    instruction work).  A block costs ~1.2 ms to make on the event loop (the
    whole table at once was 45 ms for 20,000 files, 270 for 120,000), and a
    range makes only the blocks it sends.  About 170 bytes an entry: its
    header and path again, and 77 bytes of instruction fields.
    """

    def __init__(self, plan: ArchivePlan) -> None:
        self.plan = plan
        self.block = RUN
        self._blocks: dict[int, tuple[bytes, array[int]]] = {}

    def instructions(self, first: int, stop: int, crcs: Sequence[int]) -> bytearray:
        """Entries ``first`` .. ``stop - 1`` (in one block), entry ``first + i``'s header with ``crcs[i]``."""
        block_first = first - first % self.block
        assert stop <= block_first + self.block, "a run crosses a block"
        joined, starts = self._blocks.get(block_first) or self._make(block_first)
        low, high = first - block_first, stop - block_first  # starts[] counts from the block's first entry
        base = starts[low]
        data = bytearray(memoryview(joined)[base : starts[high]])
        at = producer_program.LITERAL.size + LOCAL_CRC_AT - base
        for i, crc in zip(range(low, high), crcs, strict=True):
            _CRC.pack_into(data, starts[i] + at, crc)
        return data

    def _make(self, block_first: int) -> tuple[bytes, array[int]]:
        plan, parts = self.plan, []
        for k in range(block_first, min(block_first + self.block, plan.count)):
            parts.append(producer_program.literal(plan.local_header(k, 0)))
            parts.append(producer_program.file_slice(plan.path(k), plan.identity(k), 0, plan.sizes[k], None))
        starts = array("Q", [0])
        starts.extend(accumulate(len(parts[i]) + len(parts[i + 1]) for i in range(0, len(parts), 2)))
        made = self._blocks[block_first] = (b"".join(parts), starts)
        return made


# Kept while their plan is (in the plan cache, or downloading).
_whole_entries_of: weakref.WeakKeyDictionary[ArchivePlan, _WholeEntries] = weakref.WeakKeyDictionary()


def _whole_entries(plan: ArchivePlan) -> _WholeEntries:
    entries = _whole_entries_of.get(plan)
    if entries is None:
        entries = _whole_entries_of[plan] = _WholeEntries(plan)
    return entries


async def _feed(stdin: trio.abc.SendStream, instructions: Instructions, crcs: CrcSource | None) -> None:
    """Write the instructions to the producer's stdin in pieces of about FEED_SIZE; all before a CRC is waited for."""
    pending: list[bytes | bytearray] = []
    size = 0
    try:
        for instruction in instructions:
            if isinstance(instruction, CrcWait):
                assert crcs is not None
                if pending:
                    await stdin.send_all(b"".join(pending))
                    pending.clear()
                    size = 0
                await crcs.crc(instruction.k)
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
    for piece in stored_pieces(plan, start, end, crcs.ready, crcs.racy):
        if isinstance(piece, CrcWait):
            await crcs.crc(piece.k)
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


async def _pump_output(
    stdout: trio.abc.ReceiveStream, send_channel: trio.MemorySendChannel[bytes], chunk_size: int, expected: int | None
) -> tuple[int, bytes]:
    """Move stdout to the channel; return the bytes read and the chunk held back until the producer's exit.

    Held back: the chunk with the last of the ``expected`` bytes (the rest
    go at once, so a download holds no chunk more than its channel's); with
    no length known (deflated), each chunk until the next one comes.  More
    than ``expected`` is ProducerFailed at once.
    """
    held = b""
    written = 0
    # Pipe streams hand out bytes (typed bytes | bytearray): no copy needed.
    while chunk := cast(bytes, await stdout.receive_some(chunk_size)):
        written += len(chunk)
        if expected is None:
            if held:
                await send_channel.send(held)
            held = chunk
        elif written < expected:
            await send_channel.send(chunk)
        elif written == expected:
            held = chunk
        else:
            raise ProducerFailed(f"the producer wrote more than the {expected} bytes planned")
    return written, held
