"""Logging set-up shared by both ways of launching the service."""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: a file
# name may hold any of them (a line break, a terminal escape).
_ESCAPES = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def escape_controls(text: str) -> str:
    """``text`` with control characters written as ``\\xNN`` (``\\uNNNN``): one line, nothing a terminal acts on."""
    return text.translate(_ESCAPES)


# The most characters of a request's field (path, query, a header) an access line keeps: a
# User-Agent of 7,000 control bytes made a 42 KB line, and over HTTP/2 HPACK lets a client
# repeat one for a few bytes a request (helper 47: ~330 bytes of log a byte sent).
LOGGED_FIELD = 256


def cut_for_log(text: str) -> str:
    """``text`` cut to ``LOGGED_FIELD`` characters, ``...`` added: what a client chose takes a short line."""
    return text[:LOGGED_FIELD] + "..." if len(text) > LOGGED_FIELD else text


def escape_log_field(text: str) -> str:
    """``text`` for a quoted field of the access log: cut to ``LOGGED_FIELD`` characters (``...`` added),
    controls escaped, and ``\\`` and ``"`` too (as Apache does).

    A request's headers may hold any byte from 0x80 (HTTP/1.1 allows them):
    U+0085 is a line break to Python's ``splitlines`` and to log shippers,
    U+009B a terminal's control sequence introducer, and a ``"`` in a
    User-Agent would end its field early.
    """
    # "..." is ASCII: a header goes back as Latin-1.
    return escape_controls(cut_for_log(text).replace("\\", "\\\\").replace('"', '\\"'))


class Quieted:
    """Lines of one kind at most once every ``interval`` seconds, each saying how many were left out before it.

    A client chooses how often some events happen (a malformed request, a refused range, a
    stream reset before its answer): a line each would let it write the log at its own rate
    (helper 84: 2,200 lines a second from one client).  For the event loop's thread only.
    """

    def __init__(
        self, logger: logging.Logger, level: int, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger, self._level, self._interval, self._clock = logger, level, interval, clock
        self._quiet_until = float("-inf")
        self.left_out = 0

    def quiet(self) -> bool:
        """Whether a line now would be left out: its arguments need not be worked out."""
        return self._clock() < self._quiet_until

    def log(self, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._quiet_until:
            self.left_out += 1
            return
        if self.left_out:
            message += f" ({self.left_out} more such lines left out since the last)"
        self._quiet_until, self.left_out = now + self._interval, 0
        self._logger.log(self._level, message, *args)


class OneLineFormatter(logging.Formatter):
    """Escapes control characters in each message: one event is one line, and no name can forge another.

    A traceback, added after the message, keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure_logging(verbose: bool) -> None:
    """Send the service's own logs to stderr: DEBUG with ``verbose`` (per-chunk lines), else INFO.

    Only the ``archiver`` loggers are set up: Hypercorn writes its error and
    access logs through handlers of its own, and the root logger stays quiet
    so that ``-v`` does not switch on every library's debug chatter (hpack
    logs each header it encodes).
    """
    package_logger = logging.getLogger("archiver")
    package_logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        # The process id, as in Hypercorn's own lines: with workers, which one wrote the line.
        handler.setFormatter(OneLineFormatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)


# What the standard streams hold for a reader of the log that does not keep up (bytes of text, about).
DETACHED_LIMIT = 1 << 20
# And writes held: a write of a character holds ~50 bytes (helper 157: 8 MB for 1 MiB of them).
DETACHED_WRITES = 16384
# Seconds the process's exit waits for what is held to be written: a reader that stopped must not hold the exit.
EXIT_DRAIN = 2.0


class DetachedStream:
    """A standard stream whose writes a thread of its own makes: a log's reader that stops holds that thread only.

    Every log line of the service (its own, Hypercorn's error and access lines) is
    a ``write`` to stdout or stderr on the event loop's thread.  A reader that
    stopped reading (a container's log driver in blocking mode, a stalled
    journald, ``| tee`` onto a full disk) filled the pipe, and the next line
    froze the event loop: every download, ``/healthz`` (helper 155).  Here a
    write is queued and returns; past ``limit`` characters held, a write is
    left out, and the count of those is written once the reader takes lines
    again.  A line is one ``write`` (``logging.StreamHandler`` writes a record
    and its line break at once), so a line is written whole or left out whole.
    """

    def __init__(self, stream: TextIO, limit: int = DETACHED_LIMIT) -> None:
        self._stream = stream
        # As the stream's, for what reads them (print, traceback, a library that checks the encoding).
        self.encoding, self.errors = stream.encoding, stream.errors
        self.name = str(getattr(stream, "name", "stream"))
        self._limit = limit
        self._held: deque[str] = deque()
        self._held_size = 0
        self._left_out = 0
        self._changed = threading.Condition()
        self._writing = False
        threading.Thread(target=self._write_out, name=f"archiver {self.name} writer", daemon=True).start()

    def fileno(self) -> int:
        return self._stream.fileno()  # faulthandler writes to the descriptor itself, at a crash

    def isatty(self) -> bool:
        return self._stream.isatty()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._changed:
            if self._held_size + len(text) > self._limit or len(self._held) >= DETACHED_WRITES:
                self._left_out += 1
            else:
                self._held.append(text)
                self._held_size += len(text)
                self._changed.notify()
        return len(text)

    def flush(self) -> None:
        """Nothing to wait for: the writer thread flushes what it writes (``drain`` waits, at the exit)."""

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for everything held to be written; whether it was."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._held and not self._writing, timeout)

    def _write_out(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._held) or self._left_out > 0)
                text = "".join(self._held)
                self._held.clear()
                self._held_size = 0
                if self._left_out:
                    text += f"({self._left_out} log lines left out: more than 1 MiB waited to be written)\n"
                    self._left_out = 0
                self._writing = True
            try:
                try:
                    self._stream.write(text)
                except UnicodeEncodeError:  # a name the encoding lacks: escaped, not the batch lost (helper 157)
                    self._stream.write(text.encode(self.encoding, "backslashreplace").decode(self.encoding))
                self._stream.flush()
            except (OSError, ValueError):  # the reader gone (EPIPE), the stream closed: nothing to be done
                pass
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()


def detach_standard_streams() -> None:
    """Make stdout and stderr ``DetachedStream``s, the handlers already writing to them included (the service only).

    Handlers made later (Hypercorn's error and access logs) take the new
    ``sys.stdout`` and ``sys.stderr``.  At the process's exit, what is held
    is written, waiting at most ``EXIT_DRAIN`` s.
    """
    replaced: dict[int, DetachedStream] = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, DetachedStream):
            continue
        try:
            detached = DetachedStream(stream)
        except RuntimeError:  # no thread at the tasks' limit: written as before, and the start says why it stops
            continue
        replaced[id(stream)] = detached
        setattr(sys, name, detached)
        atexit.register(detached.drain, EXIT_DRAIN)
    for logger in (logging.getLogger(), *logging.Logger.manager.loggerDict.values()):
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in replaced:
                handler.setStream(replaced[id(handler.stream)])
