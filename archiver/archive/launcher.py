"""The service's side of the producers' launcher (``launcher_program``): start a program, kill it, wait for its end.

Each producer is started by the launcher, a process of the service's own
that holds no storage file, so that no start waits on a storage that does not
answer a close (see ``launcher_program``).  The launcher hands back the
process's pidfd and pipes and reports its exit; to the download, a
``LaunchedProcess`` is what ``trio.Process`` was: ``kill``, ``wait``,
``returncode`` and three pipe streams.  The producer is the launcher's child
and the launcher the service's: a download still kills its producer (through
the pidfd: no pid reused meanwhile can be hit) and waits until it has been
reaped.  One launcher a Trio run (a service process; a test), started with
the app (``start``) and, if it ends, again at the next producer start.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import launcher_program

logger = logging.getLogger(__name__)

_LAUNCH = (
    f"import sys; sys.path.insert(0, {str(Path(launcher_program.__file__).parents[2])!r}); "
    "from archiver.archive.launcher_program import main; sys.exit(main())"
)
COMMAND = (sys.executable, "-I", "-S", "-c", _LAUNCH)
# Time the launcher gets to end once its socket is closed (it kills what it started, then exits).
STOP_WAIT = 5.0
# Time the launcher gets to say it is ready (a start takes ~20 ms).
READY_WAIT = 10.0
_REPLY_BYTES = 256
# No program named: the launcher forks a producer of its own (``launcher_program._fork_producer``).
FORKED_PRODUCER: Sequence[str] = ()
_DESCRIPTORS = 4  # a pidfd, the stdin, stdout and stderr pipes


class LaunchedProcess:
    """A program the launcher started: its pid, pipes (``trio.lowlevel.FdStream``) and, once reaped, returncode.

    ``returncode`` is the exit code, or minus the signal that ended it (as
    ``subprocess``), or -SIGKILL if the launcher ended before reporting it.
    """

    def __init__(self, pid: int, pidfd: int, stdin: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = trio.lowlevel.FdStream(stdin)
        self.stdout = trio.lowlevel.FdStream(stdout)
        self.stderr = trio.lowlevel.FdStream(stderr)
        self._pidfd = pidfd
        self._reaped = trio.Event()
        self._orphaned = False

    def kill(self) -> None:
        """SIGKILL, through the pidfd (a process already gone is no error)."""
        if self.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def wait(self) -> int:
        """Until the process has ended and been reaped: its ``returncode``."""
        await self._reaped.wait()
        if self.returncode is None:
            # The launcher ended first: the process was killed, and is init's to reap now.
            await trio.lowlevel.wait_readable(self._pidfd)
            self.returncode = -signal.SIGKILL
            self._close_pidfd()
        assert self.returncode is not None
        return self.returncode

    def _ended(self, returncode: int | None) -> None:
        """From the launcher's reader: reaped with ``returncode``, or None if the launcher ended (it is killed)."""
        if returncode is None:
            self.kill()
        else:
            self.returncode = returncode
            self._close_pidfd()
        self._reaped.set()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class Launcher:
    """A running launcher: ``start`` a program through it.  Use ``current()`` for the run's."""

    def __init__(self, process: trio.Process, control: trio.socket.SocketType) -> None:
        self.process = process
        self._control = control
        self._next_id = 0
        self._replies: dict[int, tuple[trio.Event, list[object]]] = {}
        self._running: dict[int, LaunchedProcess] = {}
        self._sending = trio.Lock()
        self.alive = True

    @classmethod
    async def open(cls) -> Launcher:
        """Start a launcher and the system task that reads its reports; OSError if it cannot start."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await trio.lowlevel.open_process(list(COMMAND), stdin=theirs.fileno(), env={})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        launcher = cls(process, trio.socket.from_stdlib_socket(ours))
        try:
            ready = b""
            with trio.move_on_after(READY_WAIT):
                ready, _ = await launcher._receive()
            if ready != b"R":
                raise OSError(f"the producers' launcher did not start (status {process.poll()})")
        except BaseException:
            launcher._control.close()
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
            raise
        trio.lowlevel.spawn_system_task(launcher._read_reports, name="archiver launcher")
        return launcher

    async def start(self, command: Sequence[str] = FORKED_PRODUCER) -> LaunchedProcess:
        """Start ``command`` (an absolute path first) with pipes, empty environment; OSError if it cannot be.

        With no command (FORKED_PRODUCER), the producer program, forked from
        the launcher, which has it imported: ~2 ms of CPU instead of ~12.
        """
        if not self.alive:
            raise OSError("the producers' launcher has ended")
        ident = self._next_id
        self._next_id += 1
        answered, reply = trio.Event(), list[object]()
        self._replies[ident] = (answered, reply)
        request = b"\0".join([str(ident).encode(), *(os.fsencode(part) for part in command)])
        try:
            async with self._sending:
                await self._control.send(request)
            with trio.CancelScope(shield=True):  # a start asked for is taken, or its process would be lost
                await answered.wait()
        except OSError as error:
            raise OSError(f"the producers' launcher has ended: {error}") from error
        finally:
            self._replies.pop(ident, None)
        if not reply:
            raise OSError("the producers' launcher has ended")
        (result,) = reply
        if isinstance(result, OSError):
            raise result
        assert isinstance(result, LaunchedProcess)
        return result

    async def _read_reports(self) -> None:
        """The system task: hand each reply and exit to who waits for it; at the end, wake them all.  Never raises.

        It ends with the run (cancelled: the service stops; the launcher then
        kills what it started and exits) or with the launcher (an ERROR).
        """
        unexpected = True
        try:
            while True:
                message, descriptors = await self._receive()
                if not message:
                    break
                self._dispatch(message, descriptors)
        except trio.Cancelled:
            unexpected = False
            raise
        except (OSError, ValueError) as error:
            logger.error("the producers' launcher: %s", error)
        finally:
            self.alive = False
            for answered, _ in self._replies.values():
                answered.set()
            for process in self._running.values():
                process._ended(None)
            self._running.clear()
            self._control.close()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(STOP_WAIT):
                    await self.process.wait()
                if self.process.returncode is None:
                    self.process.kill()  # it ignores SIGTERM
                    await self.process.wait()
            if unexpected:
                logger.error("the producers' launcher exited (status %s)", self.process.returncode)

    async def _receive(self) -> tuple[bytes, list[int]]:
        space = socket.CMSG_SPACE(_DESCRIPTORS * array.array("i").itemsize)
        message, ancillary, _, _ = await self._control.recvmsg(_REPLY_BYTES, space)
        descriptors = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                descriptors.frombytes(data[: len(data) - len(data) % descriptors.itemsize])
        return message, list(descriptors)

    def _dispatch(self, message: bytes, descriptors: list[int]) -> None:
        kind, *fields = message.split(b" ", 3)
        if kind == b"X":
            process = self._running.pop(int(fields[0]), None)
            if process is not None:
                process._ended(int(fields[1]))
            return
        waiting = self._replies.get(int(fields[0]))
        if kind == b"S" and len(descriptors) == _DESCRIPTORS:
            result: object = LaunchedProcess(int(fields[1]), *descriptors)
            self._running[int(fields[1])] = result  # type: ignore[assignment]
        else:
            for descriptor in descriptors:
                os.close(descriptor)
            errno = int(fields[1]) if len(fields) > 1 else 0
            result = OSError(errno, fields[2].decode(errors="replace") if len(fields) > 2 else "not started")
        if waiting is None:  # cannot happen: a start waits for its reply, shielded
            if isinstance(result, LaunchedProcess):
                result.kill()
            return
        waiting[1].append(result)
        waiting[0].set()


_current: trio.lowlevel.RunVar[Launcher | None] = trio.lowlevel.RunVar("archiver_launcher", default=None)
_opening: trio.lowlevel.RunVar[trio.Lock | None] = trio.lowlevel.RunVar("archiver_launcher_opening", default=None)


async def current() -> Launcher:
    """This run's launcher, started if there is none or it has ended; OSError if it cannot start."""
    lock = _opening.get()
    if lock is None:
        lock = trio.Lock()
        _opening.set(lock)
    async with lock:
        launcher = _current.get()
        if launcher is None or not launcher.alive:
            if launcher is not None:
                logger.error("the producers' launcher had ended: starting another")
            launcher = await Launcher.open()
            _current.set(launcher)
    return launcher


async def start() -> None:
    """Start this run's launcher now (with the app, before any storage file is opened); OSError if it cannot."""
    await current()
