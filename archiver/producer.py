"""Producer: runs ``zip`` over an album's file list and feeds its output to a channel.

The producer owns the ``zip`` process from start to reaping.  Names go to
zip's stdin (``-@``), the archive comes from its stdout, and stderr is drained
all along: ``zip`` blocks once a pipe is full, so an undrained stderr would
stall it on a large album.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import struct
import subprocess
import termios
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import trio

from .storage import AlbumListing

logger = logging.getLogger(__name__)

# What a ZIP with no entries is: just the end-of-central-directory record.
# zip refuses to write it ("Nothing to do!", exit 12), so we send it ourselves.
EMPTY_ZIP = b"PK\x05\x06" + bytes(18)

# A fixed, minimal environment: ZIPOPT or ZIP in the service's environment
# would change zip's options behind our back, and the locale decides how zip
# treats non-ASCII names.
ZIP_ENVIRONMENT = {"LC_ALL": "C.UTF-8"}


def zip_environment() -> dict[str, str]:
    """ZIP_ENVIRONMENT, and the service's TZ if it has one.

    zip writes mtimes in local time; the service writes the same times into
    the central directories it generates (``central``), and the two must agree.
    """
    timezone = os.environ.get("TZ")
    return ZIP_ENVIRONMENT if timezone is None else {**ZIP_ENVIRONMENT, "TZ": timezone}


STDERR_TAIL_BYTES = 2048

# zip writes its output 16 KiB at a time.  Read as each write lands, a 16 KiB
# piece would travel the whole path (channel, Hypercorn, socket) on its own,
# and that per-piece cost, not the bytes, is what the server's CPU goes to.
# After a short read the reader lets the pipe gather about a chunk first: it
# looks once per tick (epoll's resolution is 1 ms) and reads as soon as a
# chunk is there, or zip has stopped adding (finished, or waiting on the
# disk), or the ticks run out.  One fast zip (~400 MB/s) fills a chunk in a
# tick; with 32 downloads sharing the machine each takes ~10 ticks.
GATHER_TICK = 0.001
GATHER_TICKS_MAX = 20

# zip's stdout pipe is widened to this (the most an unprivileged process may
# ask for by default): enough to keep zip writing while the reader waits or the
# event loop is busy with other downloads.  Kernel memory, filled only when the
# client is slower than zip.
PIPE_SIZE = 1024 * 1024


class ZipUnavailable(RuntimeError):
    """The zip executable cannot be found or started."""


class ZipFailed(RuntimeError):
    """zip exited with a failure status (or was killed) while producing an archive."""

    def __init__(self, returncode: int, stderr_tail: str) -> None:
        super().__init__(f"zip exited with status {returncode}: {stderr_tail or '(no stderr)'}")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


def find_zip(command: str) -> str:
    """Return the absolute path of the zip executable, or raise ZipUnavailable."""
    path = shutil.which(command)
    if path is None:
        raise ZipUnavailable(f"{command!r} not found on PATH: install Info-ZIP zip (Debian: apt-get install zip)")
    return path


class ZipInput:
    """What zip is given for one archive: the directory it runs in and the names it reads (-@).

    A download keeps this, not the album's listing: the names as one bytes
    object cost ~25 bytes a file, the listing's objects ~200.  The names are
    taken once, by the producer, and let go as soon as zip has them.
    """

    def __init__(self, directory: Path, names: bytes, file_count: int, total_size: int = 0) -> None:
        self.directory = directory
        self.file_count = file_count
        self.total_size = total_size
        self._names = names

    @property
    def names(self) -> bytes:
        """The names (``./path`` a line) while zip has not taken them; shared, not copied."""
        return self._names

    def take_names(self) -> bytes:
        names, self._names = self._names, b""
        return names


def zip_input(listing: AlbumListing) -> ZipInput:
    # "./" keeps zip from reading a file named "-" as "the data on stdin"; zip
    # drops the prefix, so the entry names (and the layout) are unchanged.
    names = b"".join(b"./" + os.fsencode(file.path) + b"\n" for file in listing.files)
    return ZipInput(listing.directory, names, len(listing.files), listing.total_size)


def zip_arguments(executable: str, compression: int) -> list[str]:
    """The zip command line: names on stdin, archive on stdout, nothing implicit.

    -q: no per-file chatter; -X: no extra attributes (uid/gid, extended times),
    so the output depends on names, contents and mtimes only; -nw: names are
    literal, not wildcards ("a[1].jpg" must not match "a1.jpg"); -y: store a
    link as a link, never follow it; -D: no directory entries; -MM: a listed
    file that is gone or unreadable is an error (exit 18), not a warning that
    -q would hide while the archive silently lacks the file.
    """
    return [executable, "-q", "-X", "-nw", "-y", "-D", "-MM", f"-{compression}", "-@", "-"]


async def produce_zip(
    arguments: Sequence[str],
    job: ZipInput,
    send_channel: trio.MemorySendChannel[bytes],
    *,
    chunk_size: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send the archive of ``job``'s files to ``send_channel`` in chunks, then close it.

    The channel is closed only after ``zip`` has exited with status 0, and the
    last chunk is held back until then: a receiver that sees the end of the
    channel has the whole, correct archive.  If ``zip`` fails, ZipFailed is
    raised and the channel is left open, so the receiver never sees a clean
    end.  ZipUnavailable is raised if ``zip`` cannot be started; run with
    ``nursery.start``, that happens before ``start`` returns, so a caller can
    still answer with an error status instead of the archive.

    If cancelled, ``zip`` is killed and reaped before the cancellation
    propagates: no process outlives this call.
    """
    if not job.file_count:
        task_status.started()
        await send_channel.send(EMPTY_ZIP)
        await send_channel.aclose()
        return
    try:
        process = await trio.lowlevel.open_process(
            list(arguments),
            cwd=job.directory,
            env=zip_environment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as error:
        raise ZipUnavailable(f"cannot start {arguments[0]}: {error}") from error
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    _widen_pipe(process.stdout, chunk_size)
    task_status.started()
    stderr_tail: deque[bytes] = deque()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed_names, process.stdin, job.take_names())
            nursery.start_soon(_drain_stderr, process.stderr, stderr_tail, job.directory.name)
            last_chunk = await _pump_output(process.stdout, send_channel, chunk_size)
            returncode = await process.wait()
        if returncode != 0:
            raise ZipFailed(returncode, b"".join(stderr_tail).decode(errors="replace").strip())
        if last_chunk:
            await send_channel.send(last_chunk)
        await send_channel.aclose()
    finally:
        # Shielded: a cancelled download must still kill and reap its zip.
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stdin.aclose()
            await process.stdout.aclose()
            await process.stderr.aclose()


def _widen_pipe(stdout: trio.abc.ReceiveStream, chunk_size: int) -> None:
    """Let zip's stdout pipe hold several chunks (Linux pipes hold 64 KiB by default).

    One read then returns up to ``chunk_size`` bytes instead of 64 KiB, and
    zip blocks less often.  Best effort: above /proc/sys/fs/pipe-max-size an
    unprivileged process is refused; then a chunk's worth is tried, and
    failing that the default pipe still works.
    """
    if not hasattr(fcntl, "F_SETPIPE_SZ") or not isinstance(stdout, trio.lowlevel.FdStream):
        return
    for size in (max(PIPE_SIZE, chunk_size), chunk_size):
        with contextlib.suppress(OSError):
            fcntl.fcntl(stdout.fileno(), fcntl.F_SETPIPE_SZ, size)
            return


async def _feed_names(stdin: trio.abc.SendStream, names: bytes) -> None:
    try:
        await stdin.send_all(names)
    except trio.BrokenResourceError:
        pass  # zip exited before reading every name; its status tells why.
    finally:
        await stdin.aclose()


async def _drain_stderr(stderr: trio.abc.ReceiveStream, tail: deque[bytes], album: str) -> None:
    size = 0
    async for received in stderr:
        data = bytes(received)
        logger.warning("zip (%s): %s", album, data.decode(errors="replace").rstrip())
        tail.append(data)
        size += len(data)
        while size - len(tail[0]) >= STDERR_TAIL_BYTES:
            size -= len(tail.popleft())


async def _pump_output(
    stdout: trio.abc.ReceiveStream, send_channel: trio.MemorySendChannel[bytes], chunk_size: int
) -> bytes:
    """Move stdout to the channel, one chunk behind; return the chunk held back."""
    held = b""
    # Only a pipe can be watched filling (on Unix, open_process always gives one).
    pipe_fd = stdout.fileno() if isinstance(stdout, trio.lowlevel.FdStream) else None
    # Pipe streams hand out bytes (typed bytes | bytearray): no copy needed.
    while chunk := cast(bytes, await stdout.receive_some(chunk_size)):
        if held:
            await send_channel.send(held)
        held = chunk
        if len(chunk) < chunk_size and pipe_fd is not None:
            await _gather(pipe_fd, chunk_size)
    return held


async def _gather(pipe_fd: int, chunk_size: int) -> None:
    """Wait, a tick at a time, while zip is still filling its pipe towards a chunk."""
    available = -1
    for _ in range(GATHER_TICKS_MAX):
        await trio.sleep(GATHER_TICK)
        previous, available = available, _bytes_in_pipe(pipe_fd)
        if available >= chunk_size or available == previous:
            return


def _bytes_in_pipe(fd: int) -> int:
    (count,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))
    return int(count)
