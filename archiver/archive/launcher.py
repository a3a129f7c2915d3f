"""The service's side of the producers' launcher (``launcher_program``): ask it to start a program, hear of its end.

Each producer is started by the launcher, a process of the service's own
that holds no storage file, so that no start waits on a storage that does not
answer a close (see ``launcher_program``).  The launcher hands back the
process's pidfd and pipes and reports its exit; to the download, a
``launched.LaunchedProcess`` is what ``trio.Process`` was: ``kill``, ``wait``,
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
(``spawner.SpawnerProcess``).  One spawner and one launcher a Trio run (a service
process; a test): ``start`` with the app, then ``current()``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterator, Sequence

import trio

from .launched import LaunchedProcess, ReportedProcess, SpawnedLauncher
from .spawner import COMMAND, LAUNCHER, SPAWNER, SpawnerProcess

logger = logging.getLogger(__name__)

_NAMES = {SPAWNER: "the launchers' spawner", LAUNCHER: "the producers' launcher"}
# Time the launcher gets to end once its socket is closed (it kills what it started, then exits).
STOP_WAIT = 5.0
# Time a spawner gets to start, and a launcher or spawner to say it is ready (a start takes ~20 ms).
READY_WAIT = 10.0
# Time the launcher gets to answer a start (~1 ms): past it, it is killed (stopped, wedged).  Also
# the time it gets to report an exit seen on a process's pidfd: given to each process as it starts.
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


class Launcher:
    """A running launcher (or spawner): ``start`` a program through it.  Use ``current()`` for the run's."""

    def __init__(self, process: SpawnerProcess | ReportedProcess, control: trio.socket.SocketType, name: str) -> None:
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
            process = await SpawnerProcess.start(theirs, READY_WAIT)
        except BaseException:
            ours.close()
            raise
        return await cls(process, trio.socket.from_stdlib_socket(ours), _NAMES[SPAWNER])._ready()

    async def open_launcher(self, role: str = LAUNCHER) -> Launcher:
        """A launcher (or spawner: ``role``) started by this process, with its reader task; OSError if it cannot be.

        The spawner starts launchers; a launcher starts a spawner that ended.
        """
        result = await self._ask([b"", *(os.fsencode(part) for part in (*COMMAND, role))])
        if not isinstance(result, SpawnedLauncher):  # cannot happen: a reply with two descriptors
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
        """Hand a report to the start or the process it is for; ValueError, its descriptors closed, if it is none.

        Every report has two numbers first (``launcher_program``).  One that
        has not (a launcher of another version: started from a checkout
        updated since the service started) was an IndexError that ended the
        service's whole Trio run (helper 176): now its launcher is ended (logged).
        So is an exit's report that comes with descriptors, which none carries:
        they were left open, one report's worth each (helper 179).
        """
        kind, *fields = message.split(b" ", 3)
        try:
            first, second = int(fields[0]), int(fields[1])
            if kind == b"X" and descriptors:
                raise ValueError
        except (IndexError, ValueError):
            for descriptor in descriptors:
                os.close(descriptor)
            raise ValueError(f"a report of no known form: {message[:64]!r}") from None
        if kind == b"X":  # X <pid> <status>
            process = self._running.pop(first, None)
            if process is not None:
                process._ended(second)
            return
        waiting = self._replies.get(first)  # S <id> <pid>, E <id> <errno> <message>
        result: ReportedProcess | OSError
        if kind == b"S" and len(descriptors) == _DESCRIPTORS:
            pidfd, stdin, stdout, stderr = descriptors
            result = LaunchedProcess(second, pidfd, stdin, stdout, stderr, self.name, self.process.kill, REPLY_WAIT)
            self._running[result.pid] = result
        elif kind == b"S" and len(descriptors) == _LAUNCHER_DESCRIPTORS:
            pidfd, control = descriptors
            result = SpawnedLauncher(second, pidfd, control, self.name, self.process.kill, REPLY_WAIT)
            self._running[result.pid] = result
        else:
            for descriptor in descriptors:
                os.close(descriptor)
            number = second if kind == b"E" else 0
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

    A spawner that ended and could not be replaced at once (it could not be
    started, or the last was started less than SPAWNER_RETRY ago) is tried
    again here (while the launcher runs: no fork), at most every SPAWNER_RETRY.
    """
    async with _opening_lock():
        launcher = _current.get()
        if launcher is None or not launcher.alive:
            spawner = _spawner.get()
            if (spawner is None or not spawner.alive) and SpawnerProcess.spawns_waiting:
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
        if SpawnerProcess.spawns_waiting:  # no second fork while one waits on the storage
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
    the next launcher start to a fork of the service.  A spawner the launcher
    started less than SPAWNER_RETRY ago is not replaced here but at a producer
    start (``current``): one that ends as soon as it is ready (a checkout
    updated under the service: it fails, or reports what this service cannot
    read) was replaced at once, again and again, ~40 a second (helper 179).
    """
    async with _opening_lock():
        launcher = _current.get()
        if launcher is not None and _spawner_to_replace(launcher) and trio.current_time() >= _spawner_retry_at.get():
            await _replace_spawner_now(launcher)


async def _replace_spawner_now(launcher: Launcher) -> None:
    """Have ``launcher`` start a spawner; either way, not again (if it ends) before SPAWNER_RETRY; a failure logged."""
    _spawner_retry_at.set(trio.current_time() + SPAWNER_RETRY)
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
    if SpawnerProcess.spawns_waiting or (
        opening_since is not None and trio.current_time() - opening_since > ANSWER_LATE
    ):
        return False
    return all(
        process is None or not process.alive or process.answering() for process in (_current.get(), _spawner.get())
    )


async def start() -> None:
    """Start this run's spawner and launcher now (with the app, before any storage file is opened); OSError if not."""
    await current()
