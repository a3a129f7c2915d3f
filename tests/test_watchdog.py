"""systemd's watchdog (``web.watchdog``): pinged by a running event loop, not by a stopped one."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from archiver.web.watchdog import notify_address, watchdog_interval

from .test_cli import Launched, launched_on_a_free_port

PROJECT = Path(__file__).resolve().parent.parent


def test_the_watchdog_is_fed_only_where_systemd_asks_it_of_this_process() -> None:
    asked = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}
    assert watchdog_interval(asked, 42, 1) == 15.0  # half the timeout, as sd_watchdog_enabled(3) advises
    assert watchdog_interval(asked, 43, 42) == 15.0  # a Hypercorn worker: its master runs no event loop of ours
    assert watchdog_interval(asked, 44, 43) is None  # another process inherited the variables
    assert watchdog_interval({**asked, "WATCHDOG_PID": ""}, 43, 1) == 15.0  # no PID: whoever has the variables
    assert watchdog_interval({**asked, "WATCHDOG_USEC": "0"}, 42, 1) is None
    assert watchdog_interval({**asked, "WATCHDOG_USEC": "x"}, 42, 1) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42, 1) is None  # no socket to tell
    assert notify_address("@/org/freedesktop/systemd1/notify") == "\0/org/freedesktop/systemd1/notify"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"


def test_the_unit_asks_for_the_watchdog() -> None:
    unit = (PROJECT / "deploy" / "archiver@.service").read_text()
    assert "\nWatchdogSec=30\n" in unit
    assert "\nNotifyAccess=all\n" in unit  # workers = N: the pings come from the master's workers


HYPERCORN = str(Path(sys.executable).with_name("hypercorn"))


@asynccontextmanager
async def watched(usec: int, workers: int = 0) -> AsyncIterator[tuple[socket.socket, Launched]]:
    """A manager's notify socket (abstract, as systemd's own; pings read with a 20 s timeout) and the
    Hypercorn launch on the sample data, told to ping it every ``usec`` / 2 microseconds.

    With ``workers``, WATCHDOG_PID is the master's, as systemd sets it: the shell's, which execs Hypercorn.
    """
    name = f"@archiver-test-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(notify_address(name))
        manager.settimeout(20)  # a TimeoutError here: no ping
        manager.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # each ping says its sender's PID
        environment = {"ARCHIVER_DIR": "data", "NOTIFY_SOCKET": name, "WATCHDOG_USEC": str(usec)}

        def command(port: int) -> list[str]:
            launch = (
                f"{HYPERCORN} --config hypercorn.toml --workers {workers} --bind 127.0.0.1:{port} archiver.asgi:app"
            )
            return ["sh", "-c", f"WATCHDOG_PID=$$ exec {launch}"] if workers else launch.split()

        async with launched_on_a_free_port(command, env=environment) as (_, server):
            yield manager, server


async def ping(manager: socket.socket) -> bytes:
    """The next datagram the service sent ``manager``."""
    return await trio.to_thread.run_sync(manager.recv, 64)


async def test_hypercorn_workers_ping_for_their_master() -> None:
    # With workers = 2 systemd's WATCHDOG_PID is the master's, which runs none of the service: had
    # only that PID pinged, systemd would kill the instance every 30 s.
    credentials = struct.Struct("3i")  # struct ucred: pid, uid, gid
    async with watched(400_000, workers=2) as (manager, server):
        senders = set()
        for _ in range(6):
            data, ancillary, _, _ = await trio.to_thread.run_sync(
                manager.recvmsg, 64, socket.CMSG_SPACE(credentials.size)
            )
            assert data == b"WATCHDOG=1"
            senders.add(credentials.unpack(ancillary[0][2])[0])
        master = server.process.pid
        workers = {int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()}
        assert master not in senders and senders <= workers  # the workers, not the master


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def waiting_datagrams(manager: socket.socket) -> list[bytes]:
    """The datagrams ``manager`` has received and not yet read."""
    found, timeout = [], manager.gettimeout()
    manager.settimeout(0)  # with a timeout, even MSG_DONTWAIT waits for it
    try:
        while True:
            found.append(manager.recv(64))
    except BlockingIOError:
        return found
    finally:
        manager.settimeout(timeout)


async def test_the_hypercorn_launch_pings_while_its_loop_runs_and_not_while_it_is_stopped() -> None:
    # Helper 82: a stopped instance kept its listening socket (the kernel accepts into its backlog),
    # and nginx waited for its headers for proxy_read_timeout, 1 h, every second request.
    async with watched(400_000) as (manager, server):
        for _ in range(3):
            assert await ping(manager) == b"WATCHDOG=1"
        pid = server.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with trio.fail_after(10):
                while process_state(pid) != "T":
                    await trio.sleep(0.01)
            waiting_datagrams(manager)  # sent before it stopped
            await trio.sleep(1.0)  # five intervals: the window measured, not a synchronisation
            # A stopped loop sends nothing: systemd kills it at WatchdogSec (and Restart=always).
            assert waiting_datagrams(manager) == []
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await ping(manager) == b"WATCHDOG=1"  # running again, it pings again
    assert b"systemd watchdog: a ping every 0.2 s" in server.output


def runnable_seconds(pid: int) -> float:
    """How long the process's main thread (the event loop's) has run or waited to run (schedstat).

    Not its CPU time alone: a thread spinning on a machine whose cores are busy with other tests
    gets less than a core, but is runnable all along (helper 105).
    """
    running_ns, waiting_ns, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return (int(running_ns) + int(waiting_ns)) / 1e9


async def test_a_manager_that_stops_reading_costs_no_cpu_and_is_pinged_again_once_it_reads() -> None:
    # Helper 83: with the manager's queue full (PID 1 busy: its queue is every service's), Trio's
    # sendto waited for a writable socket, which an unconnected datagram socket always is, and
    # failed again: a core spinning, ~9,000 sendto a second.
    async with watched(20_000) as (manager, server):  # a ping every 10 ms
        assert await ping(manager) == b"WATCHDOG=1"
        with trio.fail_after(10):
            while b"cannot ping" not in server.output:  # the queue (net.unix.max_dgram_qlen) has filled
                await trio.sleep(0.05)
        before = runnable_seconds(server.process.pid)
        await trio.sleep(1.0)  # the window measured: a hundred pings' worth
        assert runnable_seconds(server.process.pid) - before < 0.3  # spinning: runnable all along, ~1 s
        waiting_datagrams(manager)
        assert await ping(manager) == b"WATCHDOG=1"
        with trio.fail_after(10):
            while not re.search(rb"pinging @archiver-test-notify-\w+ again", server.output):
                await trio.sleep(0.05)
