"""Logging set-up shared by both ways of launching the service."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

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
