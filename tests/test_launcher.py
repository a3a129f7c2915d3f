"""The producers' launcher (archiver/archive/launcher.py): real processes, started, killed, reaped, and its own end."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from archiver.archive import launcher, launcher_program, producer_protocol, worker_threads
from archiver.archive.spawner import SpawnerProcess

from . import conftest as conftest_module
from .conftest import (
    CLIENT_TLS,
    launcher_processes,
    own_descriptors,
    parent_pid,
    process_state,
    producer_processes,
    read_archive,
    spawner_processes,
    write_tree,
)
from .test_cli import PROJECT, Launched, launched

ECHO = (sys.executable, "-I", "-S", "-c", "import sys; sys.stdout.write(sys.stdin.read().upper()); sys.exit(3)")
SLEEPER = (sys.executable, "-I", "-S", "-c", "import time; time.sleep(60)")


@pytest.fixture
def stop() -> Iterator[Callable[[int], None]]:
    """SIGSTOP a process for the test, and SIGCONT it after, passed or failed.

    The launcher and its spawner are this test process's, shared with the tests
    after it: one left stopped by a failed assertion held every later start (helper 105).
    """
    stopped: list[int] = []

    def stop_process(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    yield stop_process
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def _launcher_and_spawner() -> tuple[launcher.Launcher, launcher.Launcher]:
    """This run's launcher and spawner, started."""
    started = await launcher.current()
    spawner = launcher.current_spawner()
    assert spawner is not None
    return started, spawner


async def _kill_launcher_and_spawner() -> launcher.Launcher:
    """Kill this run's launcher and spawner at once, and wait until the service has seen both end: the spawner."""
    first, spawner = await _launcher_and_spawner()
    os.kill(first.process.pid, signal.SIGKILL)
    os.kill(spawner.process.pid, signal.SIGKILL)
    with trio.fail_after(5):
        while first.alive or spawner.alive:
            await trio.sleep(0.01)
    return spawner


async def _runs_a_program(started_by: launcher.Launcher) -> bool:
    """Whether ``started_by`` starts a program that runs: its status comes back (ECHO's, 3)."""
    started = await started_by.start(ECHO)
    await started.stdin.aclose()
    return await started.wait() == 3


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return sorted(int(child) for child in file.read().split())


async def test_a_program_runs_with_its_pipes_and_its_status_is_reported() -> None:
    started = await (await launcher.current()).start(ECHO)
    assert parent_pid(started.pid) == (await launcher.current()).process.pid  # the launcher's child, not ours
    await started.stdin.send_all("ъ photo\n".encode())
    await started.stdin.aclose()
    output = b""
    while chunk := await started.stdout.receive_some():
        output += chunk
    assert output == "Ъ PHOTO\n".encode()
    assert await started.wait() == 3 and started.returncode == 3
    assert process_state(started.pid) is None  # reaped


async def test_the_forked_producer_holds_its_pipes_only_and_its_signals_are_a_fresh_pythons() -> None:
    started_by = await launcher.current()
    forked = await started_by.start()  # launcher.FORKED_PRODUCER
    assert parent_pid(forked.pid) == started_by.process.pid
    with trio.fail_after(5):  # named by itself, once forked
        while Path(f"/proc/{forked.pid}/comm").read_text().strip() != launcher_program.PRODUCER_NAME:
            await trio.sleep(0.001)
    # Waiting on its stdin now: its descriptors are the three pipes, none of the launcher's.
    descriptors = {int(fd): os.readlink(f"/proc/{forked.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{forked.pid}/fd")}
    assert sorted(descriptors) == [0, 1, 2] and all(target.startswith("pipe:") for target in descriptors.values())
    with open(f"/proc/{forked.pid}/status") as status:
        fields = dict(line.split(":\t", 1) for line in status.read().splitlines())
    ignored = int(fields["SigIgn"], 16)
    assert not any(ignored & (1 << (signum - 1)) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    await forked.stdin.send_all(producer_protocol.DONE)
    await forked.stdin.aclose()
    assert await forked.stdout.receive_some() == b""
    assert await forked.wait() == 0


async def test_a_forked_producer_that_fails_unexpectedly_reports_it_on_stderr() -> None:
    forked = await (await launcher.current()).start()
    await forked.stdin.send_all(b"?")  # no such instruction
    await forked.stdin.aclose()
    errors = b""
    while chunk := await forked.stderr.receive_some():
        errors += chunk
    assert await forked.wait() == producer_protocol.EXIT_FAILED
    assert b"archiver-producer:" in errors


async def test_a_killed_program_is_reaped_and_reported_as_killed() -> None:
    started = await (await launcher.current()).start(SLEEPER)
    started.kill()
    with trio.fail_after(5):
        assert await started.wait() == -signal.SIGKILL
    assert process_state(started.pid) is None
    started.kill()  # once gone, a kill is no error (and hits no other process: the pidfd is closed)


async def test_the_launcher_ignores_sigterm_sigint_and_sighup_but_its_programs_do_not() -> None:
    # A terminal's Ctrl-C and hang-up and a stop of the whole group reach the launcher too: the service
    # decides (SIGHUP killed it, and the service logged ERRORs and started another; helper 36).
    started_by = await launcher.current()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(started_by.process.pid, signum)
        started = await started_by.start(SLEEPER)
        os.kill(started.pid, signum)  # its dispositions are the defaults again
        with trio.fail_after(5):
            assert await started.wait() in (-signum, 1)  # SIGINT: Python's KeyboardInterrupt, status 1
    assert started_by.alive and started_by.process.returncode is None


async def test_a_program_that_cannot_start_is_an_oserror_and_the_launcher_goes_on(tmp_path: Path) -> None:
    with pytest.raises(OSError) as failed:
        await (await launcher.current()).start(("/nonexistent/python", "-c", "pass"))
    assert failed.value.errno == errno.ENOENT
    with pytest.raises(OSError) as failed:
        (tmp_path / "program").write_text("#!/bin/sh\n")  # not executable
        await (await launcher.current()).start((str(tmp_path / "program"),))
    assert failed.value.errno == errno.EACCES
    assert await _runs_a_program(await launcher.current())


async def test_a_launcher_that_dies_kills_what_it_started_and_another_one_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = await launcher.current()
    running = await first.start(SLEEPER)
    os.kill(first.process.pid, signal.SIGKILL)
    with trio.fail_after(5):
        assert await running.wait() == -signal.SIGKILL
    assert process_state(running.pid) in (None, "Z")  # init's to reap now
    assert not first.alive
    with trio.fail_after(5):  # logged once the launcher is reaped
        while "the producers' launcher exited (status -9)" not in caplog.text:
            await trio.sleep(0.01)
    children = _children(os.getpid())
    with caplog.at_level(logging.ERROR):
        second = await launcher.current()
    assert second is not first and second.alive
    spawner = launcher.current_spawner()
    assert spawner is not None and parent_pid(second.process.pid) == spawner.process.pid
    assert _children(os.getpid()) == children  # started by the spawner: no fork of ours
    assert await _runs_a_program(second)


async def test_a_spawner_that_dies_is_replaced_by_the_launcher_which_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    first = await launcher.current()
    spawner = launcher.current_spawner()
    assert spawner is not None and parent_pid(spawner.process.pid) == os.getpid()
    children = _children(os.getpid())
    with caplog.at_level(logging.WARNING):
        os.kill(spawner.process.pid, signal.SIGKILL)
        with trio.fail_after(5):
            while (respawner := launcher.current_spawner()) is spawner or respawner is None:
                await trio.sleep(0.01)
    assert "the launchers' spawner had ended: the producers' launcher started another" in caplog.text
    assert respawner.alive and parent_pid(respawner.process.pid) == first.process.pid
    assert await launcher.current() is first and first.alive  # its producers go on starting
    assert await _runs_a_program(first)
    first.process.kill()  # the launcher: replaced by the new spawner, outliving it; no fork of ours
    with trio.fail_after(5):
        while first.alive:
            await trio.sleep(0.01)
    second = await launcher.current()
    assert second is not first and parent_pid(second.process.pid) == respawner.process.pid
    assert respawner.alive and _children(os.getpid()) == [pid for pid in children if pid != spawner.process.pid]
    assert await _runs_a_program(second)


async def test_a_spawner_the_launcher_cannot_start_again_is_tried_again_at_a_later_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Out of descriptors, the launcher answers the start of a spawner with an error, and goes
    # on; the next producer start a while later tries again (else the launcher's death would
    # fork the service, however much later).
    monkeypatch.setattr(launcher, "SPAWNER_RETRY", 0.2)
    first, spawner = await _launcher_and_spawner()
    pid = first.process.pid
    limit = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (max(map(int, os.listdir(f"/proc/{pid}/fd"))) + 1, limit[1]))
    os.kill(spawner.process.pid, signal.SIGKILL)
    with trio.fail_after(5):
        while "the producers' launcher could not start another spawner" not in caplog.text:
            await trio.sleep(0.01)
    assert "Too many open files" in caplog.text
    assert first.alive and not launcher.current_spawner().alive  # type: ignore[union-attr]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
    with trio.fail_after(5):  # tried again, SPAWNER_RETRY after
        while not (respawner := launcher.current_spawner()) or not respawner.alive:
            assert await launcher.current() is first
            await trio.sleep(0.05)
    assert parent_pid(respawner.process.pid) == pid
    assert "the launchers' spawner had ended: the producers' launcher started another" in caplog.text


async def test_a_spawner_and_launcher_that_die_at_once_are_started_again_by_the_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spawner = await _kill_launcher_and_spawner()
    with caplog.at_level(logging.ERROR):
        second = await launcher.current()  # a spawner first (a fork of ours), then the launcher
    assert "the launchers' spawner had ended: starting another (a fork of the service)" in caplog.text
    respawner = launcher.current_spawner()
    assert respawner is not None and respawner is not spawner
    assert parent_pid(second.process.pid) == respawner.process.pid and parent_pid(respawner.process.pid) == os.getpid()
    assert await _runs_a_program(second)


async def test_a_launcher_that_dies_under_a_stopped_spawner_frees_its_producers_waits_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stop: Callable[[int], None]
) -> None:
    # Its producers are killed as soon as it has exited (its children are no longer its own
    # then): not once the stopped spawner, which should reap it, is found out and killed.
    # A reply wait of 5 s, its producer's end bounded by 3 (1 of 2 was tight on a loaded machine: helper 151).
    monkeypatch.setattr(launcher, "REPLY_WAIT", 5.0)
    first, spawner = await _launcher_and_spawner()
    running = await first.start(SLEEPER)
    stop(spawner.process.pid)
    os.kill(first.process.pid, signal.SIGKILL)
    with trio.fail_after(3):
        assert await running.wait() == -signal.SIGKILL
    with trio.fail_after(10):  # the spawner is found out at the reply wait
        assert await first.process.wait() == -signal.SIGKILL
    assert f"the launchers' spawner did not report launcher {first.process.pid}'s exit in 5 s: killed" in caplog.text
    assert await _runs_a_program(await launcher.current())


async def test_a_service_killed_mid_download_leaves_no_launcher_and_no_producer(tmp_path: Path) -> None:
    # The launcher sees its socket end when the service dies, whatever killed it, and kills
    # the producers it started.
    write_tree(tmp_path / "storage" / "album", {f"{index}.jpg": os.urandom(4 << 20) for index in range(16)})
    port = 0  # the kernel's choice: the URL is read from the "Running on" line
    command = [sys.executable, "-m", "archiver", "-D", str(tmp_path / "storage"), "-H", "127.0.0.1", "-P", str(port)]
    async with (
        launched(command) as server,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=server.url, timeout=30) as client,
        client.stream("GET", "/archive/album/") as response,
    ):
        assert response.status_code == 200
        (started_by,) = launcher_processes(server.process.pid)
        (spawner,) = spawner_processes(server.process.pid)
        (producer,) = producer_processes(server.process.pid)
        server.process.kill()  # the client stops reading: the producer is blocked on its pipe
        with trio.fail_after(5):
            while any(process_state(process.pid) not in (None, "Z") for process in (started_by, spawner, producer)):
                await trio.sleep(0.02)


async def test_a_stopped_launcher_is_killed_at_the_reply_wait_and_another_one_starts(
    monkeypatch: pytest.MonkeyPatch, stop: Callable[[int], None]
) -> None:
    # A launcher that does not answer (SIGSTOP, a debugger, swapped out) must not hold every
    # download: the start waits REPLY_WAIT, /healthz says so past ANSWER_LATE, then it is killed.
    # 5 s: with 1, the look below had 0.9 s to see the launcher late, little on a loaded machine
    # (and 1.8 of 2 was tight too: helper 151).
    monkeypatch.setattr(launcher, "REPLY_WAIT", 5.0)
    monkeypatch.setattr(launcher, "ANSWER_LATE", 0.2)
    stopped = await launcher.current()
    stop(stopped.process.pid)
    health: list[bool] = []

    async def look_at_health() -> None:
        with trio.fail_after(4.5):  # before the kill
            while launcher.answering():
                await trio.sleep(0.01)
        health.append(False)

    started_at = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(look_at_health)
        with pytest.raises(OSError, match="launcher has ended"):
            await stopped.start(SLEEPER)
    assert 5.0 <= trio.current_time() - started_at < 12.0
    assert health == [False]
    assert not stopped.alive
    assert await stopped.process.wait() == -signal.SIGKILL and stopped.process.returncode == -signal.SIGKILL
    assert launcher.answering()  # ended: the next start starts another
    assert await _runs_a_program(await launcher.current())


async def test_a_launcher_stopped_after_a_start_is_killed_once_it_leaves_an_exit_unreported(
    monkeypatch: pytest.MonkeyPatch, stop: Callable[[int], None]
) -> None:
    # No start comes to find it stopped: the exit it does not report, seen on the pidfd, does.
    monkeypatch.setattr(launcher, "REPLY_WAIT", 1.0)
    stopped = await launcher.current()
    started = await stopped.start(ECHO)
    # Answered only once the launcher has closed its copies of the first one's pipes (stopped
    # before, it would hold the first one's stdin open: no end of input, no exit to see).
    assert await _runs_a_program(stopped)
    stop(stopped.process.pid)
    await started.stdin.aclose()  # it exits; the launcher cannot reap it
    with trio.fail_after(5):
        assert await started.wait() == -signal.SIGKILL  # its status went with the launcher
    assert not stopped.alive
    assert await stopped.process.wait() == -signal.SIGKILL and stopped.process.returncode == -signal.SIGKILL


def test_process_state_of_a_process_reaped_between_its_open_and_its_read_is_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Helper 184: a ProcessLookupError from the read, in the wait for a killed launcher's zombie below.
    child = subprocess.Popen([sys.executable, "-c", ""])
    real_open = open

    def open_then_reap(path: str) -> Any:
        file = real_open(path)
        child.wait()
        return file

    monkeypatch.setattr(conftest_module, "open", open_then_reap, raising=False)
    assert process_state(child.pid) is None


async def test_a_start_sent_to_a_launcher_that_died_before_its_end_was_seen_is_an_oserror_naming_it() -> None:
    # launcher.Launcher._ask: the launcher is dead (its socket closed) but the task reading its socket has
    # not run yet: the send fails (EPIPE, or EBADF once that task has closed the socket meanwhile), and
    # the start is the OSError of an ended launcher, as a start after the end was seen is (a 503); the
    # next start has another launcher (untested until helper 176, by coverage).
    started_by = await launcher.current()
    os.kill(started_by.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process_state(started_by.process.pid) not in ("Z", None):  # no checkpoint: its end is not seen yet
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert started_by.alive
    with pytest.raises(OSError, match=r"^the producers' launcher has ended: \[Errno (32|9)\] "):
        await started_by.start(SLEEPER)
    with trio.fail_after(5):
        while started_by.alive:
            await trio.sleep(0.01)
    assert await _runs_a_program(await launcher.current())


def _socket_of(pid: int, fd: int) -> socket.socket:
    """A copy of process ``pid``'s descriptor ``fd`` (pidfd_getfd(2), Linux 5.6: the test runs as its owner)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        taken = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if taken < 0:
        pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
    return socket.socket(fileno=taken)


_SYS_PIDFD_GETFD = 438  # the same number on every architecture


@pytest.mark.parametrize("report", [b"X", b"E", b"S 0 x", b"X 12 oops", b"X 12 0"])
async def test_a_report_of_no_known_form_ends_its_launcher_not_the_service(
    report: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # A launcher of another version (started, after one died, from a checkout updated since the service
    # started) may report what the service cannot read: one with a field missing was an IndexError that
    # ended the whole Trio run (the service), one with two descriptors and a bad number left them open
    # (helper 176; coverage found the logging of such a report untested).  Now its launcher is ended,
    # logged, and the next start has another.  Sent on the launcher's own end of its socket.  An exit's
    # report carries no descriptors: one that came with some (X 12 0) left them open (helper 179).
    started_by = await launcher.current()
    descriptors = own_descriptors()
    with _socket_of(started_by.process.pid, 0) as its_end:
        reading, writing = os.pipe()
        socket.send_fds(its_end, [report], [reading, writing])
        os.close(reading)
        os.close(writing)
    with trio.fail_after(5):
        while started_by.alive:
            await trio.sleep(0.01)
    assert await started_by.process.wait() == 0  # its socket closed, it exited
    assert f"the producers' launcher: a report of no known form: {report!r}" in caplog.text
    left = own_descriptors()  # those sent with it closed, and its socket and pidfd
    assert left < descriptors and len(descriptors) - len(left) == 2
    assert await _runs_a_program(await launcher.current())


# A spawner from a checkout updated under the service: ready, then a report this service cannot read.
_SPAWNER_OF_ANOTHER_VERSION = (
    sys.executable,
    "-I",
    "-S",
    "-c",
    "import socket\ns = socket.socket(fileno=0)\ns.send(b'R')\ns.send(b'V 2')\ns.recv(1)\n",
)


async def test_a_spawner_that_ends_as_soon_as_it_is_ready_is_not_replaced_in_a_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Helper 179: the launcher replaced a spawner that ended as soon as it was started, at once, each
    # time: one that reported what this service cannot read (ended since 9cc57b6), or failed right after
    # its "ready", was started again ~40 times a second, three log lines each, for as long as the service
    # ran.  Now one started less than SPAWNER_RETRY ago is replaced at a producer start, at most that often.
    monkeypatch.setattr(launcher, "SPAWNER_RETRY", 3.0)
    first, spawner = await _launcher_and_spawner()
    command = launcher.COMMAND
    monkeypatch.setattr(launcher, "COMMAND", _SPAWNER_OF_ANOTHER_VERSION)
    started = "the launchers' spawner had ended: the producers' launcher started another"
    with caplog.at_level(logging.WARNING):
        os.kill(spawner.process.pid, signal.SIGKILL)  # the first replacement at once, as ever
        with trio.fail_after(5):
            while "the launchers' spawner: a report of no known form: b'V 2'" not in caplog.text:
                await trio.sleep(0.01)
        await trio.sleep(0.5)  # a window for the loop: ~20 more starts in it before
        assert caplog.text.count(started) == 1
        assert await launcher.current() is first and await _runs_a_program(first)  # within SPAWNER_RETRY
        assert caplog.text.count(started) == 1
        monkeypatch.setattr(launcher, "COMMAND", command)
        with trio.fail_after(10):  # a producer start SPAWNER_RETRY after the last start starts the next
            while not (respawner := launcher.current_spawner()) or not respawner.alive:
                assert await launcher.current() is first
                await trio.sleep(0.05)
    assert caplog.text.count(started) == 2 and parent_pid(respawner.process.pid) == first.process.pid
    first.process.kill()  # the new spawner starts the next launcher: no fork of ours
    with trio.fail_after(5):
        while first.alive:
            await trio.sleep(0.01)
    second = await launcher.current()
    assert parent_pid(second.process.pid) == respawner.process.pid and await _runs_a_program(second)


async def _kill_launcher(started_by: launcher.Launcher) -> None:
    """Kill ``started_by`` and wait until the service has seen it end (the next start has the spawner start another).

    And until it is reaped: its pidfd is closed then, after ``alive`` is False (a test that counts
    descriptors from here saw it close later, once in 12 runs: helper 188).
    """
    os.kill(started_by.process.pid, signal.SIGKILL)
    with trio.fail_after(5):
        while started_by.alive:
            await trio.sleep(0.01)
        await started_by.process.wait()


# Programs started in place of a launcher: one stopped before it says it is ready (SIGSTOP, a debugger), and
# one that dies at once (an interpreter that cannot start, the checkout it imports from gone).
_STOPS_ITSELF = (sys.executable, "-I", "-S", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)")
_DIES_AT_ONCE = (sys.executable, "-I", "-S", "-c", "raise SystemExit(1)")


@pytest.mark.parametrize(
    ("command", "ready_wait"), [(_STOPS_ITSELF, 1.0), (_DIES_AT_ONCE, 10.0)], ids=["stopped", "dead"]
)
async def test_a_launcher_that_never_says_it_is_ready_is_killed_and_reaped_and_the_next_start_has_another(
    monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], ready_wait: float
) -> None:
    # launcher.Launcher._ready: a start waits READY_WAIT at most for the launcher's "ready" (a dead one:
    # not at all), then kills and reaps it and closes its socket, and is an OSError (a 503); the next
    # start asks the spawner again (untested until helper 176, by coverage).
    first, spawner = await _launcher_and_spawner()
    await _kill_launcher(first)
    monkeypatch.setattr(launcher, "READY_WAIT", ready_wait)
    monkeypatch.setattr(launcher, "COMMAND", command)
    descriptors = own_descriptors()
    started: list[int] = []

    async def note_what_the_spawner_starts() -> None:
        while True:
            started.extend(pid for pid in _children(spawner.process.pid) if pid not in started)
            await trio.sleep(0.005)

    began = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(note_what_the_spawner_starts)
            with pytest.raises(OSError, match="the producers' launcher did not start"), trio.fail_after(15):
                await launcher.current()
            nursery.cancel_scope.cancel()
        took = trio.current_time() - began
        assert ready_wait <= took < ready_wait + 3 if command == _STOPS_ITSELF else took < 5
        assert command == _DIES_AT_ONCE or started  # the stopped one was seen
        assert all(process_state(pid) is None for pid in started)  # killed, and reaped by the spawner
        assert own_descriptors() == descriptors  # its socket and pidfd closed
        assert spawner.alive and _children(spawner.process.pid) == []
    finally:
        for pid in started:  # a failed assertion leaves no stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    monkeypatch.undo()
    assert await _runs_a_program(await launcher.current())


_STOP_WITH_A_STOPPED_LAUNCHER = (
    "import os, signal, time, trio\n"
    "from archiver.archive import launcher\n"
    "launcher.STOP_WAIT = 0.5\n"
    "async def main():\n"
    "    first = await launcher.current()\n"
    "    spawner = launcher.current_spawner()\n"
    "    os.kill(spawner.process.pid, signal.SIGKILL)  # replaced by the launcher, which is init's child from now on\n"
    "    with trio.fail_after(5):\n"
    "        while (respawner := launcher.current_spawner()) is spawner or not respawner.alive:\n"
    "            await trio.sleep(0.01)\n"
    "    os.kill(first.process.pid, signal.SIGSTOP)\n"
    "    print(first.process.pid, flush=True)\n"
    "    global ending\n"
    "    ending = time.monotonic()\n"
    "trio.run(main)\n"
    "print(f'{time.monotonic() - ending:.1f}', flush=True)\n"
)


def test_a_launcher_stopped_as_the_service_stops_is_killed_after_the_stop_wait() -> None:
    # The stop closes the launcher's socket and waits STOP_WAIT for it to exit, then kills it: a stopped
    # launcher (SIGSTOP, a debugger) holds the stop no longer (untested until helper 176, by coverage).
    # One whose spawner ended before: one whose spawner still runs is woken as that spawner exits (the
    # kernel's SIGCONT to a process group left orphaned), and exits.  In a process of its own: the
    # stop is the end of a Trio run.
    command = [sys.executable, "-c", _STOP_WITH_A_STOPPED_LAUNCHER]
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    stopped = 0
    try:
        stopped = int(process.stdout.readline() or 0)
        output, errors = process.communicate(timeout=20)
        assert process.returncode == 0 and stopped, errors
        assert 0.5 <= float(output) < 3, output
        assert process_state(stopped) in (None, "Z")  # killed (init's to reap)
    finally:
        process.kill()
        process.wait()
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)


@pytest.mark.slow  # ~7 s: the stop waits launcher.STOP_WAIT (5 s) for the stopped launcher
async def test_a_service_whose_launcher_is_stopped_stops_after_the_stop_wait_and_kills_it(
    tmp_path: Path, stop: Callable[[int], None]
) -> None:
    # As above, with the real service and its SIGTERM.
    write_tree(tmp_path / "storage" / "album", {"a.jpg": os.urandom(1000)})
    command = [sys.executable, "-m", "archiver", "-D", str(tmp_path / "storage"), "-H", "127.0.0.1", "-P", "0"]
    async with launched(command) as server:
        (started_by,) = launcher_processes(server.process.pid)
        (spawner,) = spawner_processes(server.process.pid)
        os.kill(spawner.pid, signal.SIGKILL)
        with trio.fail_after(5):
            while b"the producers' launcher started another" not in server.output:
                await trio.sleep(0.02)
        stop(started_by.pid)
        began = trio.current_time()
        server.process.terminate()
        with trio.fail_after(15):
            assert await server.process.wait() == 0
        assert launcher.STOP_WAIT <= trio.current_time() - began < launcher.STOP_WAIT + 3
        assert process_state(started_by.pid) in (None, "Z")
    assert b"Traceback" not in server.output


async def test_a_spawner_start_given_up_before_its_thread_ran_bars_no_later_start() -> None:
    # Helper 48: a start given up before its thread ran (its client left while it waited for a
    # thread, or no thread could be started) stayed counted as one waiting on the storage, and
    # every later start of the spawner was refused: each download a 503 until a restart.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with trio.CancelScope() as scope:
        scope.cancel()  # as the download's client leaves: the start is cancelled at its first checkpoint
        await SpawnerProcess.start(theirs, launcher.READY_WAIT)
    ours.close()
    assert scope.cancelled_caught
    assert theirs.fileno() == -1  # closed by the start: no descriptor left behind
    assert SpawnerProcess.spawns_waiting == 0
    await _kill_launcher_and_spawner()
    assert await _runs_a_program(await launcher.current())  # a fork of ours starts both again


async def test_a_function_s_own_runtime_error_is_not_taken_for_a_missing_thread() -> None:
    def fails() -> None:
        raise RuntimeError("the function's own")

    with pytest.raises(RuntimeError, match="the function's own") as raised:
        await worker_threads.in_thread(fails)
    assert not isinstance(raised.value, worker_threads.NoThread)


def test_no_thread_is_an_oserror_and_a_spawner_start_without_one_leaves_nothing_counted() -> None:
    # Helper 48: at the tasks' limit (TasksMax, ulimit -u) threading's RuntimeError was a 500 with a
    # traceback, and a spawner start left counted for ever.  Run as nobody (the limit does not bind
    # root) with a limit of one task: its own.
    program = (
        "import os, resource, socket, trio\n"
        "from archiver.archive import worker_threads\n"
        "from archiver.archive.spawner import SpawnerProcess\n"
        "if os.geteuid() == 0: os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))\n"
        "async def main():\n"
        "    try:\n"
        "        await worker_threads.in_thread(print, 'ran')\n"
        "    except worker_threads.NoThread as error:\n"
        "        print('NoThread', isinstance(error, OSError), error.errno == errno.EAGAIN)\n"
        "    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "    try:\n"
        "        await SpawnerProcess.start(theirs, 10.0)\n"
        "    except OSError as error:\n"
        "        print('OSError', error)\n"
        "    print('waiting', SpawnerProcess.spawns_waiting, 'closed', theirs.fileno() == -1)\n"
        "import errno\n"
        "trio.run(main)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=PROJECT)
    assert result.stdout.splitlines() == [
        "NoThread True True",
        "OSError [Errno 11] no thread could be started (can't start new thread)",
        "waiting 0 closed True",
    ], result.stderr


def test_a_start_whose_descriptors_the_service_has_no_room_for_is_emfile_and_leaves_nothing() -> None:
    # The launcher's reply comes with four descriptors; with fewer free the kernel installs what it can
    # and drops the rest (MSG_CTRUNC): the start is EMFILE (a 503), the ones installed are closed, and the
    # program started, its pipes gone, ends (launcher._receive; untested until helper 169, by coverage).
    # In a process of its own: the descriptors are filled to the limit.
    program = (
        "import errno, os, resource, sys, trio\n"
        "from archiver.archive import launcher\n"
        "ECHO = (sys.executable, '-I', '-S', '-c', 'import sys; sys.stdout.write(sys.stdin.read()); sys.exit(3)')\n"
        "def children(pid):\n"
        "    with open(f'/proc/{pid}/task/{pid}/children') as file:\n"
        "        return file.read().split()\n"
        "async def main():\n"
        "    started = await launcher.current()\n"
        "    before = len(os.listdir('/proc/self/fd'))\n"
        "    for free in range(4):\n"
        "        fillers = []\n"
        "        try:\n"
        "            while True:\n"
        "                fillers.append(os.open('/dev/null', os.O_RDONLY))\n"
        "        except OSError:\n"
        "            pass\n"
        "        for _ in range(free):\n"
        "            os.close(fillers.pop())\n"
        "        try:\n"
        "            with trio.fail_after(10):\n"
        "                await started.start(ECHO)\n"
        "            print(free, 'started')\n"
        "        except OSError as error:\n"
        "            print(free, errno.errorcode.get(error.errno))\n"
        "        finally:\n"
        "            for fd in fillers:\n"
        "                os.close(fd)\n"
        "    print('descriptors', len(os.listdir('/proc/self/fd')) - before, 'alive', started.alive)\n"
        "    with trio.fail_after(10):\n"
        "        while children(started.process.pid):\n"
        "            await trio.sleep(0.02)\n"
        "    echo = await started.start(ECHO)\n"
        "    await echo.stdin.send_all(b'ok')\n"
        "    await echo.stdin.aclose()\n"
        "    print(await echo.stdout.receive_some(), await echo.wait())\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "trio.run(main)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=PROJECT)
    assert result.stdout.splitlines() == [
        "0 EMFILE",
        "1 EMFILE",
        "2 EMFILE",
        "3 EMFILE",
        "descriptors 0 alive True",
        "b'ok' 3",
    ], result.stderr


def test_a_started_program_whose_pidfd_cannot_be_had_is_killed_and_reaped_and_the_start_refused() -> None:
    # launcher_program: a process started untracked must not run.  The pidfd_open after the start fails
    # only for the system's file table (ENFILE) or memory: the descriptors the start took are freed
    # by then, so a process's own limit (EMFILE) fails the pipes or socket before anything starts.  The
    # failure is planted, the processes real: a forked producer, a program, a launcher (untested until
    # helper 176, by coverage).  In a process of its own: it forks.
    program = (
        "import errno, os\n"
        "from archiver.archive import launcher_program\n"
        "def refused(pid):\n"
        "    raise OSError(errno.ENFILE, os.strerror(errno.ENFILE))\n"
        "os.pidfd_open = refused\n"
        "before = sorted(os.listdir('/proc/self/fd'))\n"
        "for request in (b'7', b'8\\0/bin/sleep\\0' b'60', b'9\\0\\0/bin/sleep\\0' b'60'):\n"
        "    reply, descriptors = launcher_program._start(request)\n"
        "    with open(f'/proc/self/task/{os.getpid()}/children') as children:\n"
        "        left = children.read().split()\n"
        "    print(reply.decode(), descriptors, left, sorted(os.listdir('/proc/self/fd')) == before)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=20, cwd=PROJECT)
    refusal = f"{errno.ENFILE} {os.strerror(errno.ENFILE)} [] [] True"
    assert result.stdout.splitlines() == [f"E 7 {refusal}", f"E 8 {refusal}", f"E 9 {refusal}"], result.stderr


def _pids_cgroup_parent() -> Path | None:
    """Where a cgroup with the pids controller can be made: v1's hierarchy, or v2's root if it delegates pids."""
    v1, v2 = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")
    if (v1 / "cgroup.procs").exists():
        return v1
    delegated = v2 / "cgroup.subtree_control"
    if delegated.exists() and "pids" in delegated.read_text().split():
        return v2
    return None


@contextlib.asynccontextmanager
async def _served_in_a_pids_cgroup(storage: Path) -> AsyncIterator[tuple[Launched, Path]]:
    """``python -m archiver`` on ``storage`` in a cgroup of its own (its pids.max the tasks' limit), removed after."""
    parent = _pids_cgroup_parent()
    if parent is None:
        pytest.skip("no cgroup with the pids controller here")
    cgroup = parent / f"archiver-test-{os.getpid()}"
    cgroup.mkdir()
    join = f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"'
    command = ["sh", "-c", join, sys.executable, "-m", "archiver", "-D", str(storage), "-P", "0"]
    try:
        async with launched(command) as server:
            yield server, cgroup
    finally:
        with trio.fail_after(10):  # the service's spawner and launcher end just after it
            while (cgroup / "cgroup.procs").read_text().split():
                await trio.sleep(0.02)
        cgroup.rmdir()


async def _no_worker_thread_left(server: Launched) -> None:
    """Until Trio's idle worker threads have ended (after 10 s): then any call needs a new one.

    The threads left: the main one, and stdout's and stderr's writers (``logs.DetachedStream``).
    """
    with trio.fail_after(30):
        while len(os.listdir(f"/proc/{server.process.pid}/task")) > 3:
            await trio.sleep(0.2)


async def test_a_launcher_the_spawner_cannot_start_at_the_tasks_limit_is_a_503_and_all_is_served_once_it_lifts(
    tmp_path: Path,
) -> None:
    # launcher_program._start_launcher: the spawner's posix_spawn of a launcher fails (EAGAIN at the
    # tasks' limit): refused as a start that failed, the download a 503 naming it, and the spawner
    # goes on (untested until helper 176, by coverage).  Within 10 s of a download: the service's
    # idle worker threads are still there for the walk and the CRCs.
    files = {"photo.jpg": os.urandom(100_000)}
    write_tree(tmp_path / "storage" / "album", files)
    async with (
        _served_in_a_pids_cgroup(tmp_path / "storage") as (server, cgroup),
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=server.url, timeout=30) as client,
    ):
        assert read_archive((await client.get("/archive/album/")).content) == files
        (started_by,) = launcher_processes(server.process.pid)
        (spawner,) = spawner_processes(server.process.pid)
        os.kill(started_by.pid, signal.SIGKILL)
        with trio.fail_after(5):
            while b"the producers' launcher exited (status -9)" not in server.output:
                await trio.sleep(0.02)
        (cgroup / "pids.max").write_text((cgroup / "pids.current").read_text())
        refused = await client.get("/archive/album/")
        (cgroup / "pids.max").write_text("max\n")
        assert (refused.status_code, refused.headers["Retry-After"]) == (503, "5")
        assert read_archive((await client.get("/archive/album/")).content) == files
        assert spawner_processes(server.process.pid) == [spawner]  # the same spawner started the next launcher
    assert b"cannot start the producer" in server.output
    assert b"Resource temporarily unavailable" in server.output
    assert b"Traceback" not in server.output


@pytest.mark.slow  # ~12 s: waits for Trio's idle worker threads to end (10 s)
async def test_at_the_tasks_limit_requests_are_refused_with_503_and_all_is_served_once_it_lifts(
    tmp_path: Path,
) -> None:
    # Helper 48: with no thread to be had (systemd's TasksMax), /healthz and downloads were 500s
    # with a traceback.  A cgroup's pids.max stands for the limit: it binds root too.
    files = {"photo.jpg": os.urandom(100_000)}
    write_tree(tmp_path / "storage" / "album", files)
    async with (
        _served_in_a_pids_cgroup(tmp_path / "storage") as (server, cgroup),
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=server.url, timeout=30) as client,
    ):
        assert (await client.get("/archive/album/")).status_code == 200
        await _no_worker_thread_left(server)
        (cgroup / "pids.max").write_text((cgroup / "pids.current").read_text())
        health = await client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "failing", "storage": False, "producer": True, "threads": False}
        assert (await client.get("/")).status_code == 200  # without the sample's link
        refused = await client.get("/archive/album/")
        assert (refused.status_code, refused.headers["Retry-After"]) == (503, "5")
        (cgroup / "pids.max").write_text("max\n")
        assert read_archive((await client.get("/archive/album/")).content) == files
        assert (await client.get("/healthz")).status_code == 200
    assert b"Traceback" not in server.output
    assert b"no thread could be started (can't start new thread)" in server.output


@pytest.mark.slow  # ~12 s, as above
async def test_a_stop_at_the_tasks_limit_is_clean(tmp_path: Path) -> None:
    # Helper 50: the stop's last write to the CRC index found no thread: an ERROR with a traceback,
    # and the stop's later steps skipped.
    write_tree(tmp_path / "storage" / "album", {"photo.jpg": os.urandom(100_000)})
    async with _served_in_a_pids_cgroup(tmp_path / "storage") as (server, cgroup):
        async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=server.url, timeout=30) as client:
            assert (await client.get("/archive/album/")).status_code == 200
        await _no_worker_thread_left(server)
        (cgroup / "pids.max").write_text((cgroup / "pids.current").read_text())
        server.process.terminate()
        with trio.fail_after(15):
            assert await server.process.wait() == 0
    assert b"Traceback" not in server.output
    assert b"stopping without writing the last CRCs to the index: [Errno 11] no thread" in server.output
