"""The service's side of the producers' launcher (``launcher_program``): start a program, kill it, wait for its end.

Each producer is started by the launcher, a process of the service's own
that holds no storage file, so that no start waits on a storage that does not
answer a close (see ``launcher_program``).  The launcher hands back the
process's pidfd and pipes and reports its exit; to the download, a
``LaunchedProcess`` is what ``trio.Process`` was: ``kill``, ``wait``,
``returncode`` and three pipe streams.  The producer is the launcher's child:
a download still kills its producer (through the pidfd: no pid reused
meanwhile can be hit) and waits until it has been reaped.

The launcher is itself started by another process running the same
program, the spawner, which the service starts with the app, before any
storage file is opened, and which does nothing else.  A launcher that ends
(killed, out of memory) is replaced by the spawner: the service never forks
again, and a fork of the service is what a dead mount can hold (its child
closes a copy of every descriptor the service has, the storage files a CRC
reader holds among them, and a close on a dead sshfs does not return).
Only if the spawner ends too does the service start another itself
(``_SpawnerProcess``).  One spawner and one launcher a Trio run (a service
process; a test): ``start`` with the app, then ``current()``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import trio

from . import launcher_program
from .worker_threads import in_thread

logger = logging.getLogger(__name__)

_LAUNCH = (
    f"import sys; sys.path.insert(0, {str(Path(launcher_program.__file__).parents[2])!r}); "
    "from archiver.archive.launcher_program import main; sys.exit(main())"
)
COMMAND = (sys.executable, "-I", "-S", "-c", _LAUNCH)
# The last argument of each one's command line (unread by the program): its role, for ps and the tests.
SPAWNER = "spawner"
LAUNCHER = "launcher"
_NAMES = {SPAWNER: "the launchers' spawner", LAUNCHER: "the producers' launcher"}
# Time the launcher gets to end once its socket is closed (it kills what it started, then exits).
STOP_WAIT = 5.0
# Time the launcher gets to start and say it is ready (a start takes ~20 ms).
READY_WAIT = 10.0
# Time the launcher gets to answer a start (~1 ms): past it, it is killed (stopped, wedged).
REPLY_WAIT = 10.0
# A start unanswered this long makes /healthz say the producer is unavailable.
ANSWER_LATE = 2.0
# A spawner the launcher could not start again is tried again at a producer start, at most this often.
SPAWNER_RETRY = 10.0
_REPLY_BYTES = 256
# No program named: the launcher forks a producer of its own (``launcher_program._fork_producer``).
FORKED_PRODUCER: Sequence[str] = ()
_DESCRIPTORS = 4  # a pidfd, the stdin, stdout and stderr pipes
_LAUNCHER_DESCRIPTORS = 2  # a pidfd, the launcher's socket


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

    def __init__(self, pid: int, pidfd: int, reporter: str = "", wedged: Callable[[], None] = lambda: None) -> None:
        self.pid = pid
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
        REPLY_WAIT later (stopped, wedged) is killed, as for a start.
        """
        if not self._reaped.is_set():
            await self.exited()
            with trio.move_on_after(REPLY_WAIT):
                await self._reaped.wait()
            if not self._reaped.is_set() and not self._wedged_seen:
                self._wedged_seen = True
                logger.error(
                    "%s did not report %s %d's exit in %.0f s: killed", self._reporter, self.kind, self.pid, REPLY_WAIT
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
        reporter: str = "",
        wedged: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(pid, pidfd, reporter, wedged)
        self.stdin = trio.lowlevel.FdStream(stdin)
        self.stdout = trio.lowlevel.FdStream(stdout)
        self.stderr = trio.lowlevel.FdStream(stderr)


class _SpawnedLauncher(ReportedProcess):
    """A launcher the spawner started, and the service's end of its socket (``control``, a descriptor)."""

    kind = "launcher"
    # A launcher goes on if its spawner ends: its producers with it; its own end is seen on its socket.
    ends_with_its_launcher = False

    def __init__(self, pid: int, pidfd: int, control: int, reporter: str, wedged: Callable[[], None]) -> None:
        super().__init__(pid, pidfd, reporter, wedged)
        self.control = control


def _in_child_before_exec() -> None:
    """Nothing: a ``preexec_fn`` only to keep ``subprocess`` from using vfork (see _NO_VFORK)."""


# CPython 3.11.0-3.11.5 hold the GIL while a vfork child runs until its exec (gh-104372): a
# start stuck in that exec (a FLUSH of a dead mount) froze the event loop.  A preexec_fn makes
# subprocess fork instead, releasing the GIL while the child runs.
_NO_VFORK = _in_child_before_exec if sys.version_info < (3, 11, 6) else None


class _SpawnerProcess:
    """The spawner, the service's child: started in a worker thread the start may give up on.

    The spawner is the one program the service forks itself: at the app's
    start, before any storage file is opened, and again only if the spawner
    ends.  Such a late start may wait on a FLUSH of a dead mount whose file
    a CRC reader holds (see ``launcher_program``): it is given up after
    READY_WAIT, its thread left to finish, and the process it starts then
    killed and reaped in that thread.
    """

    # Threads of starts given up on that still run (wait on the storage): no other start is tried
    # meanwhile.  Counted by the thread itself, from its first step to its last: a start given up
    # before its thread began (cancelled while waiting for a thread, or no thread could be
    # started) leaves nothing counted, for ever (helper 48: every download was then a 503).
    spawns_waiting = 0
    _counting = threading.Lock()

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.pid = popen.pid
        self.returncode: int | None = None
        self._popen = popen
        self._pidfd = os.pidfd_open(popen.pid)

    @classmethod
    async def start(cls, control: socket.socket) -> _SpawnerProcess:
        """The spawner, ``control`` its stdin (closed here); OSError if it cannot be started within READY_WAIT.

        Starts are one at a time (``_opening_lock``): a thread still counted here is one given up on.
        """
        if cls.spawns_waiting:
            control.close()
            raise OSError("the last start of the launchers' spawner still waits on the storage")
        began = given_up = ended = False
        started: list[subprocess.Popen[bytes]] = []

        def spawn() -> None:
            nonlocal began, ended
            with cls._counting:
                if given_up:  # the start gave up before this thread began (and closed ``control``)
                    return
                began = True
                cls.spawns_waiting += 1
            popen = None
            try:
                # A process group of its own (and so its launchers): a signal to the service's group (a
                # terminal's Ctrl-C, kill -- -PGID) reached it before its Python had set its signals ignored,
                # and the service's start failed (helper 49).  The service tells it when to end.
                popen = subprocess.Popen(
                    [*COMMAND, SPAWNER], stdin=control.fileno(), env={}, preexec_fn=_NO_VFORK, process_group=0
                )
            finally:
                control.close()  # here: the thread may outlive the start, and used it until now
                with cls._counting:
                    cls.spawns_waiting -= 1
                    ended, late = True, given_up
                    if not late and popen is not None:
                        started.append(popen)
            if late and popen is not None:  # given up on: it must not run
                popen.kill()
                popen.wait()

        try:
            with trio.move_on_after(READY_WAIT):
                await in_thread(spawn)  # NoThread (an OSError) at the tasks' limit
        finally:
            # Given up on (the time is out, the download was cancelled, no thread): a thread that
            # has not begun returns at once when it does.
            with cls._counting:
                if not started and not ended:
                    given_up = True
                    if not began:
                        control.close()
        if not started:
            raise OSError(f"the launchers' spawner did not start in {READY_WAIT:.0f} s (waiting on the storage)")
        return cls(started[0])

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def exited(self) -> None:
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)

    async def wait(self) -> int:
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            self.returncode = self._popen.wait()
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
        return self.returncode


class Launcher:
    """A running launcher (or spawner): ``start`` a program through it.  Use ``current()`` for the run's."""

    def __init__(self, process: _SpawnerProcess | ReportedProcess, control: trio.socket.SocketType, name: str) -> None:
        self.process = process
        self.name = name  # for the log: "the producers' launcher", "the launchers' spawner"
        self._control = control
        self._next_id = 0
        self._replies: dict[int, tuple[trio.Event, list[object]]] = {}
        self._running: dict[int, ReportedProcess] = {}
        self._sending = trio.Lock()
        self.alive = True
        self._waiting_since: dict[int, float] = {}  # starts asked for and not answered: when

    @classmethod
    async def open(cls) -> Launcher:
        """Start the spawner (a fork of the service) and the task that reads its reports; OSError if it cannot."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await _SpawnerProcess.start(theirs)
        except BaseException:
            ours.close()
            raise
        return await cls(process, trio.socket.from_stdlib_socket(ours), _NAMES[SPAWNER])._ready()

    async def open_launcher(self, role: str = LAUNCHER) -> Launcher:
        """A launcher (or spawner: ``role``) started by this process, with its reader task; OSError if it cannot be.

        The spawner starts launchers; a launcher starts a spawner that ended.
        """
        result = await self._ask([b"", *(os.fsencode(part) for part in (*COMMAND, role))])
        if not isinstance(result, _SpawnedLauncher):  # cannot happen: a reply with two descriptors
            raise OSError(f"{self.name} started no {role}")
        result.kind = role
        control = trio.socket.from_stdlib_socket(socket.socket(fileno=result.control))
        return await Launcher(result, control, _NAMES[role])._ready()

    async def _ready(self) -> Launcher:
        """Once it says it is ready (READY_WAIT at most, else killed: OSError), with its reader task."""
        try:
            ready = b""
            with trio.move_on_after(READY_WAIT):
                ready, _ = await self._receive()
            if ready != b"R":
                raise OSError(f"{self.name} did not start")
        except BaseException:
            self._control.close()
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()
            raise
        trio.lowlevel.spawn_system_task(self._read_reports, name=f"archiver {self.name}")
        return self

    def answering(self) -> bool:
        """Whether it is alive and has answered every start asked of it more than ANSWER_LATE ago (for /healthz)."""
        late = trio.current_time() - ANSWER_LATE
        return self.alive and all(since > late for since in self._waiting_since.values())

    async def start(self, command: Sequence[str] = FORKED_PRODUCER) -> LaunchedProcess:
        """Start ``command`` (an absolute path first) with pipes, empty environment; OSError if it cannot be.

        With no command (FORKED_PRODUCER), the producer program, forked from
        the launcher, which has it imported: ~2 ms of CPU instead of ~12.  A
        launcher that does not answer within REPLY_WAIT (stopped, wedged) is
        killed: this start and those waiting with it fail, the next one
        starts another launcher.
        """
        result = await self._ask([os.fsencode(part) for part in command])
        if not isinstance(result, LaunchedProcess):  # cannot happen: a reply with four descriptors
            raise OSError(f"{self.name} started no program")
        return result

    async def _ask(self, arguments: list[bytes]) -> ReportedProcess:
        """Send a start (``launcher_program``'s protocol) and wait for its answer; OSError if there is none."""
        if not self.alive:
            raise OSError(f"{self.name} has ended")
        ident = self._next_id
        self._next_id += 1
        answered, reply = trio.Event(), list[object]()
        self._replies[ident] = (answered, reply)
        self._waiting_since[ident] = trio.current_time()
        request = b"\0".join([str(ident).encode(), *arguments])
        try:
            # Shielded: a start asked for is taken, or its process would be lost; bounded: the launcher is killed.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(REPLY_WAIT):
                    async with self._sending:
                        await self._control.send(request)
                    await answered.wait()
                if not answered.is_set():
                    logger.error("%s did not answer in %.0f s: killed", self.name, REPLY_WAIT)
                    self.process.kill()
                    await answered.wait()  # woken as the reader sees it end
        except OSError as error:
            raise OSError(f"{self.name} has ended: {error}") from error
        finally:
            self._replies.pop(ident, None)
            self._waiting_since.pop(ident, None)
        if not reply:
            raise OSError(f"{self.name} has ended")
        (result,) = reply
        if isinstance(result, OSError):
            raise result
        assert isinstance(result, ReportedProcess)
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
        except ConnectionResetError:
            pass  # it died with a message of ours unread: its end is logged below
        except (OSError, ValueError) as error:
            logger.error("%s: %s", self.name, error)
        finally:
            self.alive = False
            for process in self._running.values():
                if process.ends_with_its_launcher:
                    process.kill()
            self._control.close()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(STOP_WAIT) as stopping:
                    await self.process.exited()
                if stopping.cancelled_caught:
                    self.process.kill()  # it ignores SIGTERM (and may be stopped)
                    await self.process.exited()
                # Once the launcher has exited (reaped or not), its producers are its new parent's
                # (ours, if we are a container's init): each is reaped by its own wait, or by init.
                for answered, _ in self._replies.values():
                    answered.set()
                for process in self._running.values():
                    process._ended(None)
                self._running.clear()
                if unexpected and self.name == _NAMES[SPAWNER]:
                    trio.lowlevel.spawn_system_task(_replace_spawner, name="archiver spawner replacement")
                await self.process.wait()  # its status: the launcher reports it, or it is the service's child
                if unexpected:
                    status = self.process.returncode if self.process.returncode is not None else "unknown"
                    logger.error("%s exited (status %s)", self.name, status)

    async def _receive(self) -> tuple[bytes, list[int]]:
        space = socket.CMSG_SPACE(_DESCRIPTORS * array.array("i").itemsize)
        message, ancillary, flags, _ = await self._control.recvmsg(_REPLY_BYTES, space)
        descriptors = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                descriptors.frombytes(data[: len(data) - len(data) % descriptors.itemsize])
        if flags & socket.MSG_CTRUNC and message.startswith(b"S "):
            # The service is out of descriptors: the kernel dropped those it could not install.
            for descriptor in descriptors:
                os.close(descriptor)
            ident = message.split(b" ")[1]
            return b"E %s %d %s" % (ident, errno.EMFILE, os.strerror(errno.EMFILE).encode()), []
        return message, list(descriptors)

    def _dispatch(self, message: bytes, descriptors: list[int]) -> None:
        kind, *fields = message.split(b" ", 3)
        if kind == b"X":
            process = self._running.pop(int(fields[0]), None)
            if process is not None:
                process._ended(int(fields[1]))
            return
        waiting = self._replies.get(int(fields[0]))
        result: ReportedProcess | OSError
        if kind == b"S" and len(descriptors) == _DESCRIPTORS:
            pidfd, stdin, stdout, stderr = descriptors
            result = LaunchedProcess(int(fields[1]), pidfd, stdin, stdout, stderr, self.name, self.process.kill)
            self._running[result.pid] = result
        elif kind == b"S" and len(descriptors) == _LAUNCHER_DESCRIPTORS:
            pidfd, control = descriptors
            result = _SpawnedLauncher(int(fields[1]), pidfd, control, self.name, self.process.kill)
            self._running[result.pid] = result
        else:
            for descriptor in descriptors:
                os.close(descriptor)
            number = int(fields[1]) if kind == b"E" and len(fields) > 1 else 0
            result = OSError(number, fields[2].decode(errors="replace") if len(fields) > 2 else "not started")
        if waiting is None:  # cannot happen: a start waits for its reply, shielded
            if isinstance(result, ReportedProcess):
                result.kill()
            return
        waiting[1].append(result)
        waiting[0].set()


_current: trio.lowlevel.RunVar[Launcher | None] = trio.lowlevel.RunVar("archiver_launcher", default=None)
_spawner: trio.lowlevel.RunVar[Launcher | None] = trio.lowlevel.RunVar("archiver_spawner", default=None)
_opening: trio.lowlevel.RunVar[trio.Lock | None] = trio.lowlevel.RunVar("archiver_launcher_opening", default=None)
_spawner_retry_at: trio.lowlevel.RunVar[float] = trio.lowlevel.RunVar("archiver_spawner_retry_at", default=0.0)
# When the start of a launcher or spawner now in progress began (for /healthz).
_opening_since: trio.lowlevel.RunVar[float | None] = trio.lowlevel.RunVar("archiver_opening_since", default=None)


def _opening_lock() -> trio.Lock:
    lock = _opening.get()
    if lock is None:
        lock = trio.Lock()
        _opening.set(lock)
    return lock


@contextlib.contextmanager
def _opening_now() -> Iterator[None]:
    _opening_since.set(trio.current_time())
    try:
        yield
    finally:
        _opening_since.set(None)


async def current() -> Launcher:
    """This run's launcher, started if there is none or it has ended; OSError if it cannot start.

    A spawner that ended and could not be replaced at once is tried again
    here (while the launcher runs: no fork), at most every SPAWNER_RETRY.
    """
    async with _opening_lock():
        launcher = _current.get()
        if launcher is None or not launcher.alive:
            spawner = _spawner.get()
            if (spawner is None or not spawner.alive) and _SpawnerProcess.spawns_waiting:
                raise OSError("the last start of the launchers' spawner still waits on the storage")
            if launcher is not None:
                logger.error("the producers' launcher had ended: starting another")
            with _opening_now():
                launcher = await (await _current_spawner()).open_launcher()
            _current.set(launcher)
        elif _spawner_to_replace(launcher) and trio.current_time() >= _spawner_retry_at.get():
            await _replace_spawner_now(launcher)
    return launcher


async def _current_spawner() -> Launcher:
    spawner = _spawner.get()
    if spawner is None or not spawner.alive:
        if _SpawnerProcess.spawns_waiting:  # no second fork while one waits on the storage
            raise OSError("the last start of the launchers' spawner still waits on the storage")
        if spawner is not None:
            logger.error("the launchers' spawner had ended: starting another (a fork of the service)")
        spawner = await Launcher.open()
        _spawner.set(spawner)
    return spawner


def _spawner_to_replace(launcher: Launcher | None) -> bool:
    """Whether the spawner has ended while ``launcher`` runs (it can start another)."""
    spawner = _spawner.get()
    return spawner is not None and not spawner.alive and launcher is not None and launcher.alive


async def _replace_spawner() -> None:
    """A system task: the spawner ended, have the launcher start another (no fork of the service).  Never raises.

    Only a spawner and a launcher that both end before one is replaced leave
    the next launcher start to a fork of the service.
    """
    async with _opening_lock():
        launcher = _current.get()
        if launcher is not None and _spawner_to_replace(launcher):
            await _replace_spawner_now(launcher)


async def _replace_spawner_now(launcher: Launcher) -> None:
    """Have ``launcher`` start a spawner; if it cannot, logged, and not tried again before SPAWNER_RETRY."""
    try:
        with _opening_now():
            _spawner.set(await launcher.open_launcher(SPAWNER))
    except OSError as error:
        _spawner_retry_at.set(trio.current_time() + SPAWNER_RETRY)
        logger.error("the producers' launcher could not start another spawner: %s", error)
    else:
        logger.warning("the launchers' spawner had ended: the producers' launcher started another")


def current_spawner() -> Launcher | None:
    """This run's spawner, if it has one (for the tests)."""
    return _spawner.get()


def answering() -> bool:
    """Whether producers can be started now (for /healthz: else every download gets a 503).

    False while this run's launcher or spawner leaves a start unanswered past
    ANSWER_LATE (it is killed at REPLY_WAIT), while the start of a launcher or
    spawner has taken longer than that, or while a start of a spawner given
    up on still waits (on the storage).  A launcher or spawner that has
    ended is no reason: the next download starts another.
    """
    opening_since = _opening_since.get()
    if _SpawnerProcess.spawns_waiting or (
        opening_since is not None and trio.current_time() - opening_since > ANSWER_LATE
    ):
        return False
    return all(
        process is None or not process.alive or process.answering() for process in (_current.get(), _spawner.get())
    )


async def start() -> None:
    """Start this run's spawner and launcher now (with the app, before any storage file is opened); OSError if not."""
    await current()
