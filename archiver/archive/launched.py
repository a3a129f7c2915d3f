"""The processes a launcher started, as the service sees them: a pid and a pidfd, ``kill``, ``wait``.

The launcher (``launcher_program``) is their parent: it reaps each and
reports its exit on its socket (``launcher.Launcher``), which hands the report
to the process here.  The service kills through the pidfd (no pid reused
meanwhile can be hit) and sees an exit there too, reaped or not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
from collections.abc import Callable

import trio

logger = logging.getLogger(__name__)


class ReportedProcess:
    """A process a launcher started and reaps: its pid and, once reaped, returncode.

    ``returncode`` is the exit code, or minus the signal that ended it (as
    ``subprocess``).  If the launcher ended before reporting it, a producer
    was killed (-SIGKILL); a launcher, which outlives its spawner, is init's
    to reap, and its status is not known (None, and ``wait`` returns -SIGKILL)
    unless the service is init and reaped it itself.
    """

    kind = "producer"  # for the log
    # A producer does not outlive its launcher: the service cannot read its reports any more.
    ends_with_its_launcher = True

    def __init__(self, pid: int, pidfd: int, reporter: str, wedged: Callable[[], None], reply_wait: float) -> None:
        self.pid = pid
        self._reply_wait = reply_wait  # how long its exit may go unreported before the launcher is killed
        self._reporter = reporter  # the launcher's name, for the log
        self._wedged = wedged  # kills the launcher: it did not report this process's exit
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._reaped = trio.Event()
        self._exited = trio.Event()
        self._watching: trio.Event | None = None  # set when the task watching the pidfd stops
        self._wedged_seen = False

    def kill(self) -> None:
        """SIGKILL, through the pidfd (a process already gone is no error)."""
        if self.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def has_exited(self) -> bool:
        """Whether the process has exited, reaped or not (its pidfd polls readable); no wait."""
        if self._exited.is_set() or self._pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(0))

    async def exited(self) -> None:
        """Until the process has exited (reaped or not: its children are its new parent's already).

        Any number of tasks may wait: one watches the pidfd (Trio lets one task
        wait on a descriptor), the others wait for it.
        """
        while not self._exited.is_set() and self._pidfd >= 0:
            if self._watching is not None:
                await self._watching.wait()
                continue
            self._watching = watching = trio.Event()
            try:
                with contextlib.suppress(trio.ClosedResourceError):  # closed: reaped and reported meanwhile
                    await trio.lowlevel.wait_readable(self._pidfd)
                self._exited.set()
            finally:
                self._watching = None
                watching.set()

    async def wait(self) -> int:
        """Until the process has ended and been reaped: its ``returncode`` (-SIGKILL if not known).

        Its exit is seen on the pidfd too: a launcher that has not reported it
        ``reply_wait`` s later (stopped, wedged) is killed, as for a start.
        """
        if not self._reaped.is_set():
            await self.exited()
            with trio.move_on_after(self._reply_wait):
                await self._reaped.wait()
            if not self._reaped.is_set() and not self._wedged_seen:
                self._wedged_seen = True
                logger.error(
                    "%s did not report %s %d's exit in %.0f s: killed",
                    self._reporter,
                    self.kind,
                    self.pid,
                    self._reply_wait,
                )
                self._wedged()
        await self._reaped.wait()
        if self._pidfd >= 0:
            # The launcher ended first: the process was killed (a producer) or went on (a launcher
            # whose spawner ended), and is its new parent's to reap: init's, or ours if the service
            # is a container's init (then nobody else would, and its status is known here).
            await self.exited()
            if self._pidfd < 0:  # another task's wait got here first
                return self.returncode if self.returncode is not None else -signal.SIGKILL
            with contextlib.suppress(ChildProcessError):
                reaped = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
                if reaped is not None:
                    exited = reaped.si_code == os.CLD_EXITED
                    self.returncode = reaped.si_status if exited else -reaped.si_status
            if self.returncode is None and self.ends_with_its_launcher:
                self.returncode = -signal.SIGKILL  # killed as its launcher ended
            self._close_pidfd()
        return self.returncode if self.returncode is not None else -signal.SIGKILL

    def _ended(self, returncode: int | None) -> None:
        """From the launcher's reader: reaped with ``returncode``, or None if the launcher ended (it is killed)."""
        if returncode is None:
            if self.ends_with_its_launcher:
                self.kill()
        else:
            self.returncode = returncode
            self._close_pidfd()
        self._reaped.set()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


class LaunchedProcess(ReportedProcess):
    """A program the launcher started, with its pipes (``trio.lowlevel.FdStream``)."""

    def __init__(
        self,
        pid: int,
        pidfd: int,
        stdin: int,
        stdout: int,
        stderr: int,
        reporter: str,
        wedged: Callable[[], None],
        reply_wait: float,
    ) -> None:
        super().__init__(pid, pidfd, reporter, wedged, reply_wait)
        self.stdin = trio.lowlevel.FdStream(stdin)
        self.stdout = trio.lowlevel.FdStream(stdout)
        self.stderr = trio.lowlevel.FdStream(stderr)


class SpawnedLauncher(ReportedProcess):
    """A launcher the spawner started, and the service's end of its socket (``control``, a descriptor)."""

    kind = "launcher"
    # A launcher goes on if its spawner ends: its producers with it; its own end is seen on its socket.
    ends_with_its_launcher = False

    def __init__(
        self, pid: int, pidfd: int, control: int, reporter: str, wedged: Callable[[], None], reply_wait: float
    ) -> None:
        super().__init__(pid, pidfd, reporter, wedged, reply_wait)
        self.control = control
