"""The producers' launcher: starts each producer for the service, from a process that holds no storage file.

Why a process of its own: starting a program (fork, then exec) closes the
child's copies of every descriptor its parent holds, and on FUSE each close
of a file sends a FLUSH.  The service holds storage files open (the CRC
readers); on a mount whose daemon no longer answers (a dead sshfs), each of
its own producer starts would wait for that FLUSH, for any album, with no
timeout able to cut it (the wait is in the kernel, in the starting thread).
The same program plays two roles.  The spawner (``spawner.py``) is the one
the service starts itself, with the app, before it opens any storage file;
each launcher is then started by the spawner (``_start_launcher``), and
never opens a storage file itself, so its starts never wait on the storage.

Each runs as ``python -I -S`` (``spawner.COMMAND``) with this module's
``main`` and its end of a ``SOCK_SEQPACKET`` Unix socket as stdin.  The
protocol, a packet per message:

- service → launcher ``<id> NUL <argv0> NUL <argv1> ...``: start that program
  (absolute path, empty environment) with pipes for its stdin, stdout, stderr;
  or ``<id>`` alone: the producer, forked from this process (``_fork_producer``);
  or ``<id> NUL NUL <argv0> ...``: a launcher (``_start_launcher``), this
  program, whose stdin is a new socket (see ``spawner.py``).
- launcher → service ``R`` first, once ready (SIGINT, SIGTERM and SIGHUP ignored).
- launcher → service ``S <id> <pid>`` with four descriptors (a pidfd for the
  process, the write end of its stdin, the read ends of its stdout and
  stderr; for a launcher, two: a pidfd and the other end of its socket), or
  ``E <id> <errno> <message>`` if it could not be started.
- launcher → service ``X <pid> <status>`` once the process has exited and
  been reaped (``status``: its exit code, or minus the signal that ended it).
  Always after that process's ``S``, and before any later ``S`` could name
  the same pid again.

The end of the socket (the service closed it, or died) kills every producer
still running and ends the launcher (a launcher it started ends as its own
socket does: the service holds that too).  SIGINT, SIGTERM and SIGHUP are
ignored (a terminal's Ctrl-C and hang-up, systemd's stop of the whole group:
the service stops gracefully on each, and needs its launcher meanwhile;
found by helper 36), and each program
started is a process group of its own, out of reach of a signal to the
service's group: the service decides when its producers end.  Standard library only (and ``producer_program``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys

from archiver.archive import producer_program

# Signals ignored here: what stops the service (it stops gracefully, its launcher still needed).
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Signals a started program gets back at their defaults: those ignored here, and those
# Python ignores for itself (as subprocess.Popen's restore_signals does).
RESTORED_SIGNALS = (*IGNORED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ)
# A forked producer's name (ps, top; /proc/<pid>/comm): its command line is this program's.
PRODUCER_NAME = "producer"
REQUEST_BYTES = 64 * 1024


def _start(request: bytes) -> tuple[bytes, list[int]]:
    """Start the program a request names: the reply, and the descriptors to send with it (then closed here)."""
    ident, *arguments = request.split(b"\0")
    if arguments and not arguments[0]:
        return _start_launcher(ident, arguments[1:])
    opened: list[int] = []
    try:
        for _ in range(3):
            opened.extend(os.pipe())
        stdin_read, stdin_write, stdout_read, stdout_write, stderr_read, stderr_write = opened
        child_ends = [stdin_read, stdout_write, stderr_write]
        try:
            if not arguments:
                pid = _fork_producer(child_ends)
            else:
                pid = os.posix_spawn(
                    arguments[0],
                    arguments,
                    {},
                    file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(child_ends)],
                    setsigdef=RESTORED_SIGNALS,
                    setpgroup=0,
                )
        finally:
            for fd in child_ends:
                os.close(fd)
                opened.remove(fd)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)  # untracked, it must not run
            os.waitpid(pid, 0)
            raise
    except (OSError, IndexError, ValueError) as error:  # IndexError, ValueError: no or a bad program named
        for fd in opened:
            os.close(fd)
        return _refusal(ident, error), []
    return b"S %s %d" % (ident, pid), [pidfd, stdin_write, stdout_read, stderr_read]


def _start_launcher(ident: bytes, arguments: list[bytes]) -> tuple[bytes, list[int]]:
    """Start a launcher (``arguments``, this program): its stdin a new socket, whose other end is sent.

    Its stdout and stderr are this process's (the service's): a launcher
    writes nothing but what goes wrong.
    """
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as error:  # out of descriptors: answered, as a start that failed
        return _refusal(ident, error), []
    try:
        with theirs:
            pid = os.posix_spawn(
                arguments[0],
                arguments,
                {},
                file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 0)],
                setsigdef=RESTORED_SIGNALS,
                setpgroup=0,
            )
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
    except (OSError, IndexError, ValueError) as error:
        ours.close()
        return _refusal(ident, error), []
    return b"S %s %d" % (ident, pid), [pidfd, ours.detach()]


def _refusal(ident: bytes, error: Exception) -> bytes:
    errno = getattr(error, "errno", None) or 0
    message = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return b"E %s %d %s" % (ident, errno, message.encode(errors="replace"))


def _fork_producer(child_ends: list[int]) -> int:
    """Fork a producer from this process, which imported its program when it started: its pid.

    A fresh interpreter costs ~12 ms of CPU before the program's first
    instruction (most of a small range's cost); a fork of this one, ~2.
    The child takes the pipes as its stdin, stdout and stderr, closes every
    other descriptor (this process's socket and pipes, pidfds), gets its
    signals back as a fresh Python has them, and names itself PRODUCER_NAME.
    """
    pid = os.fork()
    if pid:
        return pid
    status = 1  # an exception the program did not expect, as a fresh interpreter's status
    try:
        for target, fd in enumerate(child_ends):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
            comm.write(PRODUCER_NAME)
        status = producer_program.main()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(status)


def serve(control: socket.socket) -> None:
    """Start programs as ``control`` asks, report their exits; return when it ends (killing those left)."""
    poller = select.poll()
    poller.register(control, select.POLLIN)
    running: dict[int, int] = {}  # pidfd → pid
    launchers: dict[int, int] = {}  # the same, of launchers started (which end as their own sockets end)
    try:
        while True:
            for fd, _ in poller.poll():
                if fd != control.fileno():
                    pid = running.pop(fd, None) or launchers.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    _, status = os.waitpid(pid, 0)
                    control.send(b"X %d %d" % (pid, os.waitstatus_to_exitcode(status)))
                    continue
                request = control.recv(REQUEST_BYTES)
                if not request:
                    return
                reply, descriptors = _start(request)
                try:
                    if descriptors:
                        socket.send_fds(control, [reply], descriptors)
                        started = launchers if len(descriptors) == 2 else running
                        started[descriptors[0]] = int(reply.split()[2])
                        poller.register(descriptors[0], select.POLLIN)
                    else:
                        control.send(reply)
                finally:
                    for fd in descriptors[1:]:
                        os.close(fd)
    finally:
        for pidfd in running:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def main() -> int:
    """Serve the socket on stdin; named (``ps -e``, ``pgrep -x``) by its role, the last argument if any."""
    for ignored in IGNORED_SIGNALS:
        signal.signal(ignored, signal.SIG_IGN)
    if len(sys.argv) > 1:
        with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
            comm.write(sys.argv[-1])
    control = socket.socket(fileno=0)
    # The service may be gone: a start it gave up on may run once the storage let it, after the service stopped.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        control.send(b"R")  # ready: its signals set
        serve(control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
