"""The producer's stdout: small records gathered, file data moved by sendfile and splice, files checked once read.

Standard library only, and no ``typing``: the producer program imports this.
"""

from __future__ import annotations

import fcntl
import os
import select
import stat
import sys
import termios
import time

from archiver.archive.producer_files import check_identity, close_quietly, close_read, named_failure
from archiver.archive.producer_protocol import FileChanged, FileKey

# The output gathered before a write.
WRITE_GATHER = 64 * 1024
# Deflating, when nothing went out for this long (seconds), what is compressed and gathered
# so far goes out (with a zlib sync flush, 5 bytes): files that compress to almost nothing
# (zeros) read from slow storage would otherwise leave the pipe silent for minutes, which the
# service's storage timeout reads as a hang.  Looked at after every read, of ``producer_program.DEFLATE_READ`` bytes.
# Storing, after every file: small files opened slowly would stay gathered (WRITE_GATHER) as long.
HEARTBEAT = 1.0
# File data goes file -> staging pipe (sendfile) -> stdout (splice): page references both ways,
# no copy.  Never sendfile into stdout itself: a read of storage that hangs (an NFS server
# gone, a hung FUSE mount) would hold stdout's pipe lock, and the service's read of it,
# non-blocking or not, would wait on that lock, its whole event loop with it.
STAGING_SIZE = 256 * 1024
# Files sent but not yet checked again (each holds a descriptor) before the producer waits for the reader.
MAX_UNCHECKED = 256
# The wait for the reader to take the pipe's bytes: polled, from this to at most 20 ms apart.
FIRST_POLL = 0.0002
LAST_POLL = 0.02


class Output:
    """stdout, written in full: small records gathered, file data moved by sendfile."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.position = 0  # bytes given to write, gathered or written
        self.written = 0  # bytes written to fd
        self._pending = bytearray()
        # Files whose bytes may still be in the pipe: (position after them, fd, key, path).
        self._unchecked: list[tuple[int, int, FileKey, bytes]] = []
        self._pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        self._staging: tuple[int, int] | None = None  # read end, write end; made on the first file sent
        self._poller = select.poll()
        self._poller.register(fd, 0)  # POLLERR and POLLHUP only: they are always reported
        self.next_beat()

    def next_beat(self) -> None:
        """Start a HEARTBEAT: ``due`` tells when it is over with nothing written meanwhile."""
        self._beat_at, self._beat_written = time.monotonic() + HEARTBEAT, self.written

    def due(self) -> bool:
        """Whether a HEARTBEAT has passed with nothing written: then the caller writes what it has, and flushes."""
        if time.monotonic() < self._beat_at:
            return False
        if self.written != self._beat_written:
            self.next_beat()
            return False
        return True

    def write(self, data: bytes | memoryview) -> None:
        self._pending += data
        self.position += len(data)
        if len(self._pending) >= WRITE_GATHER:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self._pending)
        while view:
            count = os.write(self.fd, view)
            self.written += count
            view = view[count:]
        view.release()
        self._pending.clear()

    def send_file(self, fd: int, offset: int, length: int) -> None:
        """Move ``length`` bytes of ``fd`` from ``offset`` to the output through the staging pipe (see STAGING_SIZE)."""
        self.flush()
        if self._staging is None:
            self._staging = os.pipe2(os.O_CLOEXEC)
            try:  # noqa: SIM105 (contextlib is not imported here: start-up time)
                fcntl.fcntl(self._staging[1], fcntl.F_SETPIPE_SZ, STAGING_SIZE)
            except OSError:
                pass  # the default 64 KiB, or 8 KiB once the user's pipe-user-pages-soft is spent: more calls
        staging_out, staging_in = self._staging
        end = offset + length
        while offset < end:
            # Into an empty pipe: sendfile moves what fits and returns, it does not wait for room.
            sent = os.sendfile(staging_in, fd, offset, min(end - offset, STAGING_SIZE))
            if not sent:
                raise FileChanged("shorter than planned")
            offset += sent
            self.position += sent
            while sent:
                moved = os.splice(staging_out, self.fd, sent)
                sent -= moved
                self.written += moved

    def check_once_read(self, fd: int, key: FileKey, path: bytes) -> None:
        """Check (check_identity) and close ``fd`` once the reader has taken every byte written so far.

        Until then the pipe may hold references to the file's pages, which a
        write to the file would change.  Waits if MAX_UNCHECKED files are
        waiting already.  FileChanged, naming ``path``, if it is not ``key``.
        """
        self._unchecked.append((self.position, fd, key, path))
        self.settle(MAX_UNCHECKED)

    def settle(self, most: int) -> None:
        """Check the files whose bytes the reader has taken; wait for it until at most ``most`` are left."""
        poll = FIRST_POLL
        while self._unchecked:
            taken = self.written - self._unread()
            done = 0
            for end, fd, key, path in self._unchecked:
                if end > taken:
                    break
                done += 1
                try:
                    check_identity(fd, key, uncached=True)
                except FileChanged as change:
                    close_quietly(fd)  # the change is the news, not a close that fails too
                    raise FileChanged(f"{os.fsdecode(path)}: {change}") from None
                except OSError as error:  # the look at it failed: ESTALE (a file changed), EIO...
                    close_quietly(fd)
                    raise named_failure(path, error) from None
                close_read(fd, path)
            del self._unchecked[:done]
            if len(self._unchecked) <= most:
                return
            # No event says "the reader took it": poll, backing off.  The wait is a poll of
            # stdout, which reports POLLERR at once if the reader is gone (the service was
            # killed): then this is the broken pipe a write would have met, not a wait for ever.
            if self._poller.poll(poll * 1000):
                raise BrokenPipeError("the pipe's reader is gone")
            poll = min(poll * 2, LAST_POLL)

    def _unread(self) -> int:
        """Bytes written to the pipe that its reader has not taken (0 if stdout is not a pipe)."""
        if not self._pipe:
            return 0
        count = bytearray(4)
        fcntl.ioctl(self.fd, termios.FIONREAD, count)
        return int.from_bytes(count, sys.byteorder)
