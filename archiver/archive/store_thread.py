"""A thread of the CRC index's own that makes its SQLite calls, so that no other thread waits on its file for long.

The index's file may lie on a filesystem that stops answering (a hard NFS
mount whose server is gone, a FUSE daemon wedged): a thread in an SQLite call
there waits in the kernel, and nothing can take it back.  When that thread was
a download's (a CRC reader's, or its lookup's), the download stopped with it
and was failed as storage that did not answer (a ``503``, or an archive cut
short), and the next lookups queued behind its lock for good (helper 177).
Here only this thread waits: a caller waits for its answer only while the
thread makes progress (``StoreThread.stall`` seconds at most without), and a
call given up on is passed over once the thread is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class StoreStalled(Exception):
    """The store's thread has not moved for ``StoreThread.stall`` seconds: its file does not answer."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"its file has not answered for {seconds:.1f} s")
        self.seconds = seconds


def _still() -> None:
    """The progress function of a call made without a thread: no one watches it."""


class StallReport:
    """What the ``StoreThread``s of one file have found: a line as it answers again after any was found stalled.

    (Not as each thread does: two lines for one fault.)
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._lock = threading.Lock()
        self._stalled = False

    def stalled(self) -> None:
        with self._lock:
            self._stalled = True

    def answered(self, seconds: float) -> None:
        with self._lock:
            stalled, self._stalled = self._stalled, False
        if stalled:
            self._logger.warning("%s answers again, after %.1f s", self._what, seconds)


class _Call(Generic[T]):
    def __init__(self, function: Callable[[Callable[[], None]], T]) -> None:
        self.function = function
        self.done = False
        self.given_up = False
        self.result: T | None = None
        self.error: BaseException | None = None


class StoreThread:
    """One daemon thread that runs the calls given to ``run`` in turn.

    ``stall``: seconds a caller waits without the thread's progress (a call
    begun or ended, or the progress function each call is given, called);
    None: as long as it takes, and no thread: each call is made in its
    caller's, one at a time (``archiver index``: no event loop to keep going,
    and a hand-over to a thread would cost ~45 us a lookup made one by one).
    ``report`` is told when a call is first found stalled, and when it ends.
    """

    def __init__(self, name: str, stall: float | None, report: StallReport | None = None) -> None:
        self.stall = stall
        self._report = report
        self._found_stalled = False  # the call in progress
        self._condition = threading.Condition()
        self._calls: deque[_Call[object]] = deque()
        self._busy = False
        self._moved = time.monotonic()  # the thread's last progress
        self._closing = False
        self._own = threading.Lock()  # without a thread: the calls', one at a time
        self._thread = None if stall is None else threading.Thread(target=self._serve, name=name, daemon=True)
        if self._thread is not None:
            self._thread.start()

    def run(self, function: Callable[[Callable[[], None]], T]) -> T:
        """``function(progress)`` in the thread, or StoreStalled once it has not moved for ``stall`` seconds.

        StoreStalled at once while a call has gone that long without progress.
        Whatever ``function`` raises is raised here.
        """
        if self._thread is None:
            with self._own:
                return function(_still)
        call: _Call[T] = _Call(function)
        with self._condition:
            self._check_moving()
            self._calls.append(call)  # type: ignore[arg-type]
            self._condition.notify_all()
            while not call.done:
                try:
                    self._check_moving()
                except StoreStalled:
                    call.given_up = True
                    raise
                # Not in a call (this one, or one before it, not taken yet): ``_moved`` is when the
                # last ended, perhaps long ago, and a wait until then was none: the caller spun until
                # the thread had the lock, ~3,000 turns and 4-12 ms a call (helper 181).  The call is
                # taken in a moment; one that hangs from its start is then found ``stall`` later.
                wait = None if self.stall is None else self._moved + self.stall - time.monotonic()
                if not self._busy:
                    wait = self.stall
                self._condition.wait(wait)
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    @property
    def threaded(self) -> bool:
        """Whether the calls are made in a thread of the store's (``stall`` given)."""
        return self._thread is not None

    def start(self, function: Callable[[Callable[[], None]], object]) -> None:
        """``function(progress)`` in the thread, not waited for: it must handle its own errors.

        Without a thread: in the caller's, unless another call is being made (then not at all).
        """
        if self._thread is None:
            if self._own.acquire(blocking=False):
                try:
                    function(_still)
                finally:
                    self._own.release()
            return
        with self._condition:
            self._calls.append(_Call(function))
            self._condition.notify_all()

    def stalled(self) -> float | None:
        """Seconds since the thread last moved, if it is in a call and that is ``stall`` or more; else None."""
        with self._condition:
            try:
                self._check_moving()
            except StoreStalled as stalled:
                return stalled.seconds
            return None

    def close(self, timeout: float | None = None) -> bool:
        """End the thread once its calls are done; whether it ended within ``timeout``."""
        if self._thread is None:
            return True
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _check_moving(self) -> None:
        """Under the condition: StoreStalled if a call has gone ``stall`` seconds without progress."""
        if self.stall is not None and self._busy:
            still = time.monotonic() - self._moved
            if still >= self.stall:
                if not self._found_stalled and self._report is not None:
                    self._report.stalled()
                self._found_stalled = True
                raise StoreStalled(still)

    def _progress(self) -> None:
        with self._condition:
            self._moved = time.monotonic()

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._calls and not self._closing:
                    self._condition.wait()
                if not self._calls:
                    return
                call = self._calls.popleft()
                if call.given_up:  # its caller went on without it while the thread was away
                    continue
                self._busy, self._moved = True, time.monotonic()
            began = time.monotonic()
            try:
                call.result = call.function(self._progress)
            except BaseException as error:  # the caller's to handle
                call.error = error
            with self._condition:
                call.done = True
                self._busy, self._moved = False, time.monotonic()
                found_stalled, self._found_stalled = self._found_stalled, False
                self._condition.notify_all()
            if found_stalled and self._report is not None:
                self._report.answered(time.monotonic() - began)
