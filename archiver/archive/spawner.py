"""The spawner: the one program the service forks itself, to start the producers' launchers (``launcher``).

It runs ``launcher_program`` (as every launcher does), started with the app
before any storage file is opened, and again only if it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import trio

from .worker_threads import in_thread


def program_command(program: Path) -> tuple[str, ...]:
    """The command that runs ``program`` (a module of this package, by its file)'s ``main`` as its exit status.

    The interpreter running the service, isolated (-I: no environment, no user
    site, no current directory on the path) and without site (-S): it starts in
    ~15 ms, and loads nothing but the standard library and the program's own
    modules.  The program is imported rather than run as a script, so that its
    compiled bytecode is reused.
    """
    module = f"{__package__}.{program.stem}"
    launch = f"import sys; sys.path.insert(0, {str(program.parents[2])!r}); from {module} import main; sys.exit(main())"
    return (sys.executable, "-I", "-S", "-c", launch)


# The program's file, not imported: importing it would load the producer's modules into the
# service, which runs none of them (the launchers import them, once each).
PROGRAM = Path(__file__).with_name("launcher_program.py")
# Every launcher's command, the spawner's too (here, not in ``launcher``, which imports this module).
COMMAND = program_command(PROGRAM)
# The last argument of each one's command line (unread by the program): its role, for ps and the tests.
SPAWNER = "spawner"
LAUNCHER = "launcher"


def _in_child_before_exec() -> None:
    """Nothing: a ``preexec_fn`` only to keep ``subprocess`` from using vfork (see _NO_VFORK)."""


# CPython 3.11.0-3.11.5 hold the GIL while a vfork child runs until its exec (gh-104372): a
# start stuck in that exec (a FLUSH of a dead mount) froze the event loop.  A preexec_fn makes
# subprocess fork instead, releasing the GIL while the child runs.
_NO_VFORK = _in_child_before_exec if sys.version_info < (3, 11, 6) else None


class SpawnerProcess:
    """The spawner, the service's child: started in a worker thread the start may give up on.

    The spawner is the one program the service forks itself: at the app's
    start, before any storage file is opened, and again only if the spawner
    ends.  Such a late start may wait on a FLUSH of a dead mount whose file
    a CRC reader holds (see ``launcher_program``): it is given up after
    ``ready_wait``, its thread left to finish, and the process it starts then
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
    async def start(cls, control: socket.socket, ready_wait: float) -> SpawnerProcess:
        """The spawner, ``control`` its stdin (closed here); OSError if it cannot be started within ``ready_wait`` s.

        Starts are one at a time (``launcher._opening_lock``): a thread still counted here is one given up on.
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
            with trio.move_on_after(ready_wait):
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
            raise OSError(f"the launchers' spawner did not start in {ready_wait:.0f} s (waiting on the storage)")
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
