"""The producer: runs ``producer_program`` for one download and moves what it writes to a channel.

The service plans the archive (``plan``); the producer subprocess writes
the bytes planned, moving file data into its stdout pipe without passing it
through Python (but for slices of up to ``producer_program.COPY_LIMIT``, copied
with their headers).  This module owns that process from start to reaping (it is
started by the launcher, ``launcher``, a process that holds no storage file): it
feeds the instructions (``instructions``) to its stdin as the plan and
the CRCs allow, drains its stderr, and sends its stdout to the download's
channel.  A range that starts at or after the central directory (what a
download manager asks for first) needs no process: its bytes are the plan's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections import deque
from pathlib import Path
from typing import cast

import trio

from . import launcher
from .crc_source import CrcMismatch, CrcSource
from .instructions import DecisionWait, Instructions, instructions
from .launched import LaunchedProcess
from .pieces import CrcWait, FileSlice, stored_pieces
from .plan import ArchivePlan
from .producer_protocol import EXIT_CHANGED, EXIT_OUT_OF_RESOURCES
from .spawner import program_command
from .worker_threads import NoThread, in_thread

logger = logging.getLogger(__name__)

# The program's file, not imported: the service needs only its protocol (``producer_protocol``);
# the launchers import it, and fork each producer with it imported.
PROGRAM = Path(__file__).with_name("producer_program.py")
# The program run afresh (``python -I -S``): what the tests run; the service has its launcher fork it instead.
PROGRAM_COMMAND = program_command(PROGRAM)
# The producer as a command.  The launcher forks it from itself instead (it has the program
# imported), unless this is set to another command (tests' stand-ins).
COMMAND = PROGRAM_COMMAND


def producer_available() -> bool:
    """Whether a producer can be run (for /healthz): its interpreter executable, its program readable,
    fewer than MAX_LINGERING killed ones still waiting on the storage, and the launcher answering
    (else every download is refused)."""
    return (
        os.access(COMMAND[0], os.X_OK)
        and os.access(PROGRAM, os.R_OK)
        and len(_lingering) < MAX_LINGERING
        and launcher.answering()
    )


STDERR_TAIL_BYTES = 2048

# The producer's stdout pipe is widened to this (the most an unprivileged
# process may ask for by default): the producer keeps writing while the
# reader waits or the event loop serves other downloads.  Kernel memory,
# filled only when the client is slower than the producer.
PIPE_SIZE = 1024 * 1024

# Instructions are written to the producer's stdin in pieces of about this size.
FEED_SIZE = 64 * 1024


# A killed producer not gone within this (seconds) and not runnable (state D) is waiting on
# storage that does not answer: a FUSE request its daemon has taken is waited out whatever the
# signal.  It is reaped in the background, so that the download's answer (a 503, an abort) does not
# wait for the storage.
REAP_WAIT = 0.5
# One runnable (state R) has only not run since the kill, and one that has exited has only not been
# reported by its launcher yet: on a loaded machine either can take longer than REAP_WAIT.  The
# first is waited for, a REAP_STEP at a time, while it stays runnable, up to this in all (seconds);
# the second is reaped in the background, and is no storage's.
REAP_WAIT_LOADED = 5.0
REAP_STEP = 0.05
# Producers killed but still waiting so: past this many, no new one is started (ProducerUnavailable,
# a 503) until some are reaped.  Each is a process, and a client retrying a download of dead
# storage would otherwise add one a try.  Those running when the storage died join them whatever
# their number: at most MAX_LINGERING - 1 + max_jobs in all (helper 127).
MAX_LINGERING = 16
_lingering: set[int] = set()  # their process ids


def lingering() -> int:
    """How many killed producers still wait on the storage (to be reaped when it answers)."""
    return len(_lingering)


class ProducerUnavailable(RuntimeError):
    """The producer subprocess cannot be started."""


class ProducerFailed(RuntimeError):
    """The producer exited with a failure (a file changed, or it was killed), or wrote other than planned.

    ``returncode``: its exit status (``producer_protocol``'s ``EXIT_*``), minus
    the signal that killed it, or None if it exited with 0 having written other
    than planned.
    """

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode

    @property
    def file_changed(self) -> bool:
        """Whether a file was not the one planned (changed, truncated, swapped, gone): the album is changing."""
        return self.returncode == EXIT_CHANGED

    @property
    def out_of_resources(self) -> bool:
        """Whether the system was out of descriptors or memory: gone in a moment, no fault of the album's."""
        return self.returncode == EXIT_OUT_OF_RESOURCES


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
    propagates: no process outlives this call, but for one killed while
    waiting in the kernel on storage that does not answer, which is reaped
    in the background once it does (REAP_WAIT, MAX_LINGERING).
    """
    if plan.length is not None and start >= plan.central_offset:
        # All generated: the plan's own bytes, no process.
        assert crcs is not None
        task_status.started()
        await _send_generated(plan, start, end, crcs, send_channel, chunk_size)
        await send_channel.aclose()
        return
    if len(_lingering) >= MAX_LINGERING:
        raise ProducerUnavailable(f"{len(_lingering)} producers killed are still waiting on the storage")
    try:
        # The program as it is, forked by the launcher; another (a test's stand-in) is run as a command.
        command = launcher.FORKED_PRODUCER if COMMAND == PROGRAM_COMMAND else COMMAND
        process = await (await launcher.current()).start(command)
    except OSError as error:
        raise ProducerUnavailable(f"cannot start the producer ({COMMAND[0]}): {error}") from error
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    _widen_pipe(process.stdout, chunk_size)
    task_status.started()
    expected = None if plan.length is None else end - start + 1
    stderr_tail: deque[bytes] = deque()
    try:
        async with trio.open_nursery() as nursery:
            # Ended once the producer has: what it has not read is moot, and a feed that waits for
            # a CRC the producer was to compute (``CrcSource.crc``) would wait for ever.
            feeding = trio.CancelScope()
            nursery.start_soon(_feed, process.stdin, instructions(plan, start, end, crcs), crcs, feeding)
            nursery.start_soon(_drain_stderr, process.stderr, stderr_tail, plan.directory.name)
            written, last_chunk = await _pump_output(process.stdout, send_channel, chunk_size, expected, start, crcs)
            returncode = await process.wait()
            feeding.cancel()
        if crcs is not None and crcs.learnt:
            # A cache: without a thread for it (the tasks' limit), the CRCs are learnt again next time.
            with contextlib.suppress(NoThread):
                await in_thread(crcs.keep_learnt)
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
            await _wait_for_killed(process)
            if process.returncode is not None:
                await _close_pipes(process)
            elif process.has_exited():
                trio.lowlevel.spawn_system_task(_reap, process, False, name="archiver reap producer")
            else:
                logger.warning(
                    "producer %d for %s killed, still waiting on the storage: reaped when it answers",
                    process.pid,
                    plan.directory.name,
                )
                _lingering.add(process.pid)
                trio.lowlevel.spawn_system_task(_reap, process, True, name="archiver reap producer")
        if crcs is not None and crcs.learnt:
            # Cut short (its client left, a file changed): each CRC learnt is still its file's, and the
            # resume that follows (a range: the service reads what the index lacks) needs them all
            # (helper 128: a `curl -C -` after a cut read 62.8 MB for a 42 MB album, 8.7 before).
            trio.lowlevel.spawn_system_task(_keep_learnt, crcs, name="archiver keep CRCs learnt")


async def _keep_learnt(crcs: CrcSource) -> None:
    """Keep the CRCs a download cut short learnt (``CrcSource.keep_learnt``; a system task: it must not raise)."""
    try:
        await in_thread(crcs.keep_learnt)
    except Exception as error:  # a cache: learnt again next time
        logger.debug("CRCs learnt not kept: %s", error)


async def _wait_for_killed(process: LaunchedProcess) -> None:
    """Until a killed producer is reaped, or has exited, or is waiting on the storage (REAP_WAIT, REAP_WAIT_LOADED)."""
    with trio.move_on_after(REAP_WAIT):
        await process.wait()
    with trio.move_on_after(REAP_WAIT_LOADED - REAP_WAIT):
        while process.returncode is None and not process.has_exited() and _waiting_to_run(process.pid):
            with trio.move_on_after(REAP_STEP):
                await process.wait()


def _waiting_to_run(pid: int) -> bool:
    """Whether killed process ``pid`` is runnable (``/proc/<pid>/stat`` state R; proc(5)): it will exit once it runs.

    A SIGKILL wakes any sleep but an uninterruptible one (D, and I, an idle
    D), so any other state is taken as waiting on the storage, as is a
    state that cannot be read: neither may hold the download's end.  ``pid``
    must not have exited (then it cannot have been reused).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read()
    except OSError:
        return False
    # The state follows the command's name, which is in parentheses and may hold any byte.
    return fields[fields.rfind(b")") + 2 : fields.rfind(b")") + 3] == b"R"


async def _close_pipes(process: LaunchedProcess) -> None:
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            await stream.aclose()


async def _reap(process: LaunchedProcess, stuck: bool) -> None:
    """Wait for a killed producer, then close its pipes (a system task: it must not raise).

    ``stuck``: it was waiting on the storage (counted in ``lingering`` until
    now, and its end logged); otherwise it had exited, its launcher had not
    reported it yet.
    """
    try:
        await process.wait()
        await _close_pipes(process)
        if stuck:
            logger.info("producer %d reaped", process.pid)
    finally:
        _lingering.discard(process.pid)


async def _feed(
    stdin: trio.abc.SendStream, instructions: Instructions, crcs: CrcSource | None, scope: trio.CancelScope
) -> None:
    """Write the instructions to the producer's stdin in pieces of about FEED_SIZE; all before a CRC is waited for.

    Within ``scope``: cancelled, it closes stdin and returns.
    """
    try:
        with scope:
            await _feed_within(stdin, instructions, crcs)
    finally:
        await stdin.aclose()


async def _feed_within(stdin: trio.abc.SendStream, instructions: Instructions, crcs: CrcSource | None) -> None:
    pending: list[bytes | bytearray] = []
    size = 0
    try:
        for instruction in instructions:
            if isinstance(instruction, CrcWait | DecisionWait):
                assert crcs is not None
                if pending:
                    await stdin.send_all(b"".join(pending))
                    pending.clear()
                    size = 0
                if isinstance(instruction, CrcWait):
                    await crcs.crc(instruction.k, instruction.at)
                else:
                    await crcs.decided(instruction.k, instruction.at)
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


async def _send_generated(
    plan: ArchivePlan, start: int, end: int, crcs: CrcSource, send_channel: trio.MemorySendChannel[bytes], size: int
) -> None:
    pending = bytearray()
    for piece in stored_pieces(plan, start, end, crcs.ready, crcs.racy):
        if isinstance(piece, CrcWait):
            await crcs.crc(piece.k, piece.at)
            continue
        assert not isinstance(piece, FileSlice), "a generated range holds no file data"
        pending += piece
        while len(pending) >= size:  # chunks of ``size`` at most: a piece is a whole record, which may pass it
            await send_channel.send(bytes(pending[:size]))
            del pending[:size]
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
        # DEBUG: a producer writes here only as it fails, and its download's one line (an ERROR)
        # carries this tail; a WARNING too made two lines of one download (helper 67).
        logger.debug("producer (%s): %s", album, data.decode(errors="replace").rstrip())
        tail.append(data)
        size += len(data)
        while size - len(tail[0]) >= STDERR_TAIL_BYTES:
            size -= len(tail.popleft())


async def _pump_output(
    stdout: trio.abc.ReceiveStream,
    send_channel: trio.MemorySendChannel[bytes],
    chunk_size: int,
    expected: int | None,
    start: int,
    crcs: CrcSource | None,
) -> tuple[int, bytes]:
    """Move stdout to the channel; return the bytes read and the chunk held back until the producer's exit.

    Held back: the chunk with the last of the ``expected`` bytes (the rest
    go at once, so a download holds no chunk more than its channel's); with
    no length known (deflated), each chunk until the next one comes.  More
    than ``expected`` is ProducerFailed at once, as is a CRC the producer
    computed that is not its data's (``CrcSource.tap``: each chunk, archive
    bytes from ``start`` on, before it goes).
    """
    held = b""
    written = 0
    # Pipe streams hand out bytes (typed bytes | bytearray): no copy needed.
    while chunk := cast(bytes, await stdout.receive_some(chunk_size)):
        if crcs is not None and expected is not None:
            try:
                crcs.tap(start + written, chunk)
            except CrcMismatch as mismatch:
                raise ProducerFailed(str(mismatch)) from None
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
