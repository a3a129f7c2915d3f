"""Every call one download makes to the outside world, made to fail in turn (helper 193's sweep).

For one download of one album (HTTP/1.1 and HTTP/2; whole and a range, stored; whole, deflated)
a first run counts the calls of one kind the service makes on its path (its looks at the storage
and CRC reads, a listing's steps and its entries' stats among them, the worker threads it starts,
the producer's start, its writes of the instructions to the producer's stdin, its reads of the
producer's pipe, the CRC index file's calls, cold or warm (a second download's lookups finding
rows), the producer's own calls, the sockets' sends); then, for each such call, a fresh server
and a fresh index (or a copy of the warm one) see that call fail once (an OSError of the kind the
call can give; RuntimeError for a thread; the producer killed at that read of its pipe).  A call
is known by what it is, on what and from where, and its number among those (``Faults.hit``), or
for a stream by its offset (``Faults.hit_stream``): the i-th call of all was not the same call
from run to run (worker threads, trio's shuffled tasks, HTTP/2's frames), and a run that never
met its call passed without a fault (helper 197).  The test checks that the call was made, and
what the client and the operator get:

- an answer that ended cleanly holds exactly the bytes of the download without the fault;
- a refusal (before the head) is a defined status with its short page: ``REFUSALS``;
- after the head, an aborted transfer (HTTP/1.1 closed short, HTTP/2 RST_STREAM), its bytes a
  prefix of the right ones;
- exactly one line for the download, whose outcome is the client's (``complete`` only for a
  clean end), and no traceback;
- nothing left: no producer, descriptors and busy threads as before, the gauges at 0, and the
  next download of the album byte for byte the one without the fault.

The faults are monkeypatched at their call sites (a real EIO cannot be had on demand): the
``os`` of the service's storage modules, ``uncached_status._status`` (statx), Trio's
``to_thread.run_sync`` as ``worker_threads`` calls it, the launcher's start, the producer's stdout
as ``producer`` reads it, the CRC index's SQLite connections, ``trio.SocketStream.send_all`` of
the server's sockets; and in the producer (a process of its own) the ``os`` of its modules, by a
stand-in command that runs the real program so patched.  The rest is real.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import archiver
from archiver.archive import (
    album_crcs,
    album_walk,
    crc_reads,
    crc_store,
    filesystems,
    launcher,
    listed_files,
    producer,
    producer_output,
    producer_program,
    producer_protocol,
    real_paths,
    shared_descriptor,
    sparse,
    uncached_status,
    worker_threads,
)
from archiver.archive import (
    storage as archive_storage,
)
from archiver.archive.listing import ListingFailed
from archiver.config import Settings
from archiver.web import download, routes

from .conftest import (
    ctimes_settled,
    expected_archive,
    make_client,
    own_descriptors,
    read_archive,
    running_server,
    wait_until_no_producer_children,
    write_tree,
)
from .test_disconnects import GAUGES, busy_threads, metrics

ALBUM = {
    "a.txt": b"a" * 3000,  # its CRC computed by the producer when cold
    "b.bin": os.urandom(200_000),  # read in a batch
    "c.bin": os.urandom(5 * 1024 * 1024 + 17),  # read block by block (large_file_crc)
    "d.txt": b"d" * 10,
}
PROTOCOLS = ["HTTP/1.1", "HTTP/2"]
EXTENTS = ["whole", "range", "deflated"]

# The service's modules whose ``os`` makes the calls on a download's path (its looks at the storage,
# its CRC reads, its checks of files changed lately): the calls counted and failed.
STORAGE_MODULES = (
    album_crcs,
    album_walk,
    crc_reads,
    filesystems,
    listed_files,
    real_paths,
    shared_descriptor,
    sparse,
    archive_storage,
    uncached_status,
)
OS_CALLS = frozenset(
    {"open", "scandir", "stat", "lstat", "fstat", "fstatvfs", "readv", "pread", "read", "lseek", "access", "close",
     "listdir", "sendfile", "splice", "write"}
)  # fmt: skip


# A call to fail: the ``n``-th of those with its label (``Faults.hit``), or (an int) the ``at``-th of all.
Target = tuple[str, int] | int


class Faults:
    """Counts the calls made while armed, and fails the one due once (0: none); thread-safe (worker threads call).

    Each call is counted by its label (what is called, on what, from where: ``hit``): a target of
    (label, n) is the n-th call of that label, the same call in every run whatever order the threads
    (and trio's scheduler, which shuffles its tasks) take; a count over all calls is not (helper 197).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.armed = False
        self.at: Target = 0
        self.count = 0
        self.seen: dict[str, int] = {}
        self.calls: list[tuple[str, int]] = []  # each call's label, and its number among those of that label
        self.failed: str | None = None
        self.port = 0  # the server's (its sockets' sends)
        self.asked = False  # whether the service took the request (its route was called)

    def arm(self, at: Target) -> None:
        with self.lock:
            self.armed, self.at, self.count, self.seen, self.calls, self.failed = True, at, 0, {}, [], None
            self.asked = False

    def disarm(self) -> None:
        with self.lock:
            self.armed = False

    def hit(self, what: str, subject: str = "") -> bool:
        """Count a call of ``what`` (on ``subject``, from where: its label); whether it is the one to fail."""
        label = f"{what} {subject}" if subject else what
        with self.lock:
            if not self.armed:
                return False
            self.count += 1
            number = self.seen[label] = self.seen.get(label, 0) + 1
            self.calls.append((label, number))
            if self.at == (label, number) or self.at == self.count:
                self.failed = what
                return True
            return False

    def moved(self, what: str, size: int) -> None:
        """``size`` more bytes of stream ``what`` (read after its call was counted)."""
        with self.lock:
            if self.armed:
                self.seen[what] = self.seen.get(what, 0) + size

    def hit_stream(self, what: str, size: int) -> bool:
        """Count a call of ``what`` that moves ``size`` bytes of a stream; whether it is the one to fail.

        Labelled by the stream's offset at its start: how a stream is cut into sends or reads
        depends on timing (HTTP/2's frames, what the producer's pipe holds: 15 to 18 sends of one
        download over HTTP/2), its bytes do not.  The one to fail is the first at or past (or over)
        the target's offset.
        """
        with self.lock:
            if not self.armed:
                return False
            self.count += 1
            start = self.seen[what] = self.seen.get(what, 0) + size
            start -= size
            self.calls.append((what, start))
            target = self.at
            reaches = isinstance(target, tuple) and target[0] == what and start + max(size, 1) > target[1]
            if (reaches and self.failed is None) or target == self.count:
                self.failed = what
                return True
            return False


def _subject(args: tuple[Any, ...], depth: int = 2) -> str:
    """What a call is on (its path, or the path of its descriptor), and the function it is made from."""
    first = args[0] if args else None
    if isinstance(first, (str, bytes, os.PathLike)):
        on = os.fsdecode(first)
    elif isinstance(first, int):
        on = _target(str(first)).split(":")[0]  # a pipe's or socket's inode differs from run to run
    else:
        on = type(first).__name__
    return f"{on} in {sys._getframe(depth).f_code.co_qualname}"


class FaultyEntry:
    """An entry of a ``FaultyListing``: its ``stat`` (an fstatat, unless scandir had the type) counted and failed."""

    def __init__(self, entry: os.DirEntry[str], faults: Faults, error: int) -> None:
        self._entry, self._faults, self._error = entry, faults, error
        self.name, self.path = entry.name, entry.path

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if self._faults.hit("entry stat", str(self.path)):
            raise OSError(self._error, os.strerror(self._error))
        return self._entry.stat(follow_symlinks=follow_symlinks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._entry, name)


class FaultyListing:
    """An ``os.scandir`` iterator whose every step (a getdents, or its buffer) is counted, the due one raising."""

    def __init__(self, listing: Any, subject: str, faults: Faults, error: int) -> None:
        self._listing, self._subject, self._faults, self._error = listing, subject, faults, error

    def __enter__(self) -> FaultyListing:
        return self

    def __exit__(self, *exception: object) -> None:
        self._listing.close()

    def __iter__(self) -> FaultyListing:
        return self

    def __next__(self) -> FaultyEntry:
        if self._faults.hit("scandir next", self._subject):
            raise OSError(self._error, os.strerror(self._error))
        return FaultyEntry(next(self._listing), self._faults, self._error)

    def close(self) -> None:
        self._listing.close()


class FaultyOs:
    """A module's ``os``: the calls in OS_CALLS counted, the one due failing with ``error`` (a close closes first).

    A listing's steps and its entries' stats are counted too (``FaultyListing``).
    """

    def __init__(self, faults: Faults, error: int) -> None:
        self._faults = faults
        self._error = error

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in OS_CALLS:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            subject = _subject(args)
            if self._faults.hit(f"os.{name}", subject):
                if name == "access":
                    return False  # Python's access raises nothing: any error is False
                if name == "close":
                    real(*args, **kwargs)  # Linux frees the descriptor whatever close says
                raise OSError(self._error, os.strerror(self._error))
            if name == "scandir":
                return FaultyListing(real(*args, **kwargs), subject, self._faults, self._error)
            return real(*args, **kwargs)

        return call


# The calls counted by the offset of a stream they move (``Faults.hit_stream``).
STREAMS = frozenset({"socket send", "pipe read", "feed"})


@dataclass
class Kind:
    """One kind of call: how to install its fault, and what a refusal it causes may be."""

    install: Callable[[pytest.MonkeyPatch, Faults, Any, Path], None]
    errors: dict[str, Any]  # by name


def install_storage(monkeypatch: pytest.MonkeyPatch, faults: Faults, error: int, tmp: Path) -> None:
    faulty = FaultyOs(faults, error)
    for module in STORAGE_MODULES:
        monkeypatch.setattr(module, "os", faulty)
    real_status = uncached_status._status

    def status(*args: Any) -> Any:
        if faults.hit("statx", f"{_target(str(args[0])) if args[1] == b'' else os.fsdecode(args[1])}"):
            raise OSError(error, os.strerror(error))
        return real_status(*args)

    monkeypatch.setattr(uncached_status, "_status", status)


def install_thread(monkeypatch: pytest.MonkeyPatch, faults: Faults, error: None, tmp: Path) -> None:
    real = trio.to_thread.run_sync

    async def run_sync(*args: Any, **kwargs: Any) -> Any:
        work = getattr(args[0], "func", args[0]) if args else None  # a partial's function
        what = getattr(work, "__qualname__", type(work).__name__)
        if sys._getframe(1).f_globals.get("__name__") == worker_threads.__name__ and faults.hit("thread", what):
            raise RuntimeError("can't start new thread")
        return await real(*args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


def install_spawn(monkeypatch: pytest.MonkeyPatch, faults: Faults, error: int, tmp: Path) -> None:
    real = launcher.Launcher.start

    async def start(self: launcher.Launcher, *args: Any) -> Any:
        if faults.hit("start"):
            raise OSError(error, os.strerror(error))
        return await real(self, *args)

    monkeypatch.setattr(launcher.Launcher, "start", start)


class KillingStdout:
    """The producer's stdout as ``producer._pump_output`` reads it: the due read first kills the producer."""

    def __init__(self, stdout: trio.abc.ReceiveStream, faults: Faults, pid: int, signal_number: int) -> None:
        self._stdout, self._faults, self._pid, self._signal = stdout, faults, pid, signal_number

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._faults.hit_stream("pipe read", 0):  # at the bytes read so far
            with contextlib.suppress(ProcessLookupError):  # it has exited (its last read): nothing to kill
                os.kill(self._pid, self._signal)
        data = await self._stdout.receive_some(max_bytes)
        self._faults.moved("pipe read", len(data))
        return data


def install_pipe(monkeypatch: pytest.MonkeyPatch, faults: Faults, signal_number: int, tmp: Path) -> None:
    real_start, real_pump = launcher.Launcher.start, producer._pump_output
    started: list[int] = []

    async def start(self: launcher.Launcher, *args: Any) -> Any:
        process = await real_start(self, *args)
        started.append(process.pid)
        return process

    async def pump(stdout: trio.abc.ReceiveStream, *args: Any) -> Any:
        return await real_pump(KillingStdout(stdout, faults, started[-1], signal_number), *args)

    monkeypatch.setattr(launcher.Launcher, "start", start)
    monkeypatch.setattr(producer, "_pump_output", pump)


class FaultyConnection:
    """An SQLite connection of the CRC index whose calls are counted, the due one failing with ``error``."""

    def __init__(self, connection: sqlite3.Connection, faults: Faults, error: str) -> None:
        self._connection, self._faults, self._error = connection, faults, error

    def __enter__(self) -> FaultyConnection:
        # A transaction (``with connection:``): looked up on the type, so not by __getattr__; without it
        # every write raised TypeError, which the writes thread dropped, and no row was ever written.
        self._connection.__enter__()
        return self

    def __exit__(self, *exception: Any) -> Any:
        if exception[0] is None and self._faults.hit("sqlite commit", "with"):
            self._connection.rollback()
            raise sqlite3.OperationalError(self._error)
        return self._connection.__exit__(*exception)

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._connection, name)
        if name not in ("execute", "executemany", "commit"):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            statement = str(args[0]).split()[0] if args else ""
            if self._faults.hit(f"sqlite {name}", statement):
                raise sqlite3.OperationalError(self._error)
            return real(*args, **kwargs)

        return call


def install_index(monkeypatch: pytest.MonkeyPatch, faults: Faults, error: str, tmp: Path) -> None:
    real = crc_store._connect
    monkeypatch.setattr(crc_store, "_connect", lambda *args: FaultyConnection(real(*args), faults, error))


class FaultyStdin:
    """The producer's stdin as the service feeds it its instructions: the due write fails (the pipe broken)."""

    def __init__(self, stdin: trio.abc.SendStream, faults: Faults, error: int) -> None:
        self._stdin, self._faults, self._error = stdin, faults, error

    async def send_all(self, data: Any) -> None:
        if self._faults.hit_stream("feed", len(data)):
            raise trio.BrokenResourceError("injected") from OSError(self._error, os.strerror(self._error))
        await self._stdin.send_all(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stdin, name)


def install_feed(monkeypatch: pytest.MonkeyPatch, faults: Faults, error: int, tmp: Path) -> None:
    real = launcher.Launcher.start

    async def start(self: launcher.Launcher, *args: Any) -> Any:
        process = await real(self, *args)
        process.stdin = FaultyStdin(process.stdin, faults, error)
        return process

    monkeypatch.setattr(launcher.Launcher, "start", start)


# The producer run by a stand-in command: the real program, its modules' ``os`` counting its calls and
# failing the AT-th with ERROR; the count appended to COUNTS as it exits (a count of -1 for none).
PRODUCER_CODE = """
import os, sys
sys.path.insert(0, {root!r})
import archiver.archive.producer_program as program
from archiver.archive import producer_files, producer_output, producer_protocol, sparse, uncached_status
AT, ERROR, COUNTS, CALLS = {at}, {error}, {counts!r}, {calls!r}
count = 0
def due():
    global count
    count += 1
    return count == AT
class Faulty:
    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in CALLS:
            return real
        def call(*args, **kwargs):
            if due():
                if name == "access":
                    return False
                if name == "close":
                    real(*args, **kwargs)
                raise OSError(ERROR, os.strerror(ERROR))
            return real(*args, **kwargs)
        return call
for module in (program, producer_files, producer_output, producer_protocol, sparse, uncached_status):
    module.os = Faulty()
real_status = uncached_status._status
def status(*args):
    if due():
        raise OSError(ERROR, os.strerror(ERROR))
    return real_status(*args)
uncached_status._status = status
try:
    exit_status = program.main()
finally:
    counts = os.open(COUNTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(counts, b"%d\\n" % count)
    os.close(counts)
sys.exit(exit_status)
"""


def install_producer(monkeypatch: pytest.MonkeyPatch, faults: Faults, error: int, tmp: Path) -> None:
    """The producer's own calls: ``faults.at`` is read as each producer starts (armed: the one to fail)."""
    counts = tmp / "producer-counts"
    real = launcher.Launcher.start

    async def start(self: launcher.Launcher, *args: Any) -> Any:
        at = faults.at if faults.armed else 0
        code = PRODUCER_CODE.format(
            root=str(Path(archiver.__file__).parents[1]), at=at, error=error, counts=str(counts), calls=set(OS_CALLS)
        )
        return await real(self, (os.path.realpath(producer.PROGRAM_COMMAND[0]), "-I", "-S", "-c", code))

    monkeypatch.setattr(launcher.Launcher, "start", start)
    # The service runs a command of its own (not its launcher's fork) only when COMMAND is not the program's.
    monkeypatch.setattr(producer, "COMMAND", ("stand-in",))
    counts.write_text("")


def install_socket(monkeypatch: pytest.MonkeyPatch, faults: Faults, error: int, tmp: Path) -> None:
    real = trio.SocketStream.send_all

    async def send_all(self: trio.SocketStream, data: Any) -> None:
        ours = self.socket.fileno() != -1 and self.socket.getsockname()[1] == faults.port  # closed: trio's own error
        if ours and faults.hit_stream("socket send", len(data)):
            if error == errno.EPIPE:  # the connection is gone: the client sees it closed
                with contextlib.suppress(OSError):
                    self.socket.shutdown(socket.SHUT_RDWR)
            # ENOBUFS (no memory for the send): the connection is as it was, but for the bytes not sent.
            raise trio.BrokenResourceError("injected") from OSError(error, os.strerror(error))
        await real(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", send_all)


# Each kind's errors (by name), and the statuses a refusal each causes may have before the head (none:
# never a refusal, the transfer whole).
KINDS = {
    "storage": Kind(install_storage, {"EIO": errno.EIO, "EMFILE": errno.EMFILE, "EACCES": errno.EACCES}),
    "thread": Kind(install_thread, {"RuntimeError": None}),
    "spawn": Kind(install_spawn, {"EAGAIN": errno.EAGAIN, "EMFILE": errno.EMFILE}),
    "pipe": Kind(install_pipe, {"SIGKILL": signal.SIGKILL, "SIGSEGV": signal.SIGSEGV}),
    "index": Kind(install_index, {"EIO": "disk I/O error", "ENOSPC": "database or disk is full"}),
    # A second download, its lookups finding the first's rows (a warm index): they fail, it reads the files.
    "index-warm": Kind(install_index, {"EIO": "disk I/O error"}),
    "storage-warm": Kind(install_storage, {"EIO": errno.EIO, "EMFILE": errno.EMFILE}),
    "feed": Kind(install_feed, {"EPIPE": errno.EPIPE}),
    "producer": Kind(install_producer, {"EIO": errno.EIO, "EMFILE": errno.EMFILE}),
    "socket": Kind(install_socket, {"ENOBUFS": errno.ENOBUFS, "EPIPE": errno.EPIPE}),
}
REFUSALS: dict[str | tuple[str, str], set[int]] = {
    "EIO": {500},  # the storage failed: the server's page (README, Failure behaviour)
    "EACCES": {500, 503},  # a file's mode changed (503, the album changing) or a folder unreadable (500)
    "EMFILE": {503},  # out of descriptors: a moment, Retry-After
    "EAGAIN": {503},  # no process could be started
    "RuntimeError": {503},  # no thread could be started (the tasks' limit)
    "SIGKILL": {500},  # the producer killed before its first byte
    "SIGSEGV": {500},
    "ENOSPC": set(),  # the CRC index is a cache: never the download's failure
    "EPIPE": set(),  # the client's socket: no answer to see
    "ENOBUFS": set(),
    ("feed", "EPIPE"): {500},  # the instructions cut: the producer fails (the input ended), before its head
}


@dataclass
class Fetched:
    """What the client got: the status (0: no head), the headers, the body bytes, whether it ended cleanly."""

    status: int
    headers: httpx.Headers
    body: bytes
    clean: bool
    error: str


async def fetch(url: str, protocol: str, path: str, headers: dict[str, str]) -> Fetched:
    status, received, body, clean, error = 0, httpx.Headers(), bytearray(), False, ""
    async with make_client(url, protocol) as client:
        try:
            with trio.fail_after(30):
                async with client.stream("GET", path, headers=headers) as response:
                    status, received = response.status_code, response.headers
                    async for chunk in response.aiter_raw():
                        body += chunk
            clean = True
        except httpx.TransportError as failure:  # a connection closed short, a reset stream
            error = repr(failure)
    return Fetched(status, received, bytes(body), clean, error)


@dataclass
class Case:
    kind: str
    error: str
    protocol: str
    extent: str

    def settings(self, storage: Path, index: Path) -> Settings:
        return Settings(
            settle_time=0,
            storage_dir=storage,
            host="127.0.0.1",
            port=0,
            max_jobs=2,
            max_jobs_per_client=2,
            stall_timeout=5.0,
            # A fault must never be a hang: one would show as "nothing came from the storage", refused below.
            storage_timeout=5.0,
            index_path=str(index),
            compression=6 if self.extent == "deflated" else 0,
        )

    def headers(self, whole: bytes) -> dict[str, str]:
        if self.extent != "range":
            return {}
        start, end = self.range(whole)
        return {"Range": f"bytes={start}-{end}"}

    def range(self, whole: bytes) -> tuple[int, int]:
        """From inside b.bin's data to inside d.txt's local header: the producer runs, CRCs are read."""
        start = whole.index(ALBUM["b.bin"][:64]) + 10
        return start, whole.index(ALBUM["d.txt"]) - 20


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def download_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        message
        for message in (record.getMessage() for record in caplog.records)
        if message.startswith(("download album for ", "refused album:", "refused album for "))
    ]


@dataclass
class Run:
    fetched: Fetched
    faults: Faults
    line: str


class Sweep:
    """One case's servers, each with a fresh CRC index, and the download each makes with its fault armed."""

    def __init__(self, case: Case, storage: Path, tmp: Path, faults: Faults, caplog: pytest.LogCaptureFixture) -> None:
        self.case, self.storage, self.tmp, self.faults, self.caplog = case, storage, tmp, faults, caplog
        self.runs = 0
        self.expected = b""  # the download without a fault
        self.whole = expected_archive(storage / "album")

    async def run(self, at: Target) -> Run:
        """A fresh server whose download fails call ``at`` (0: none); checks what is left behind."""
        self.runs += 1
        index = self.tmp / f"index-{self.runs}.sqlite"
        if self.case.kind.endswith("-warm"):
            shutil.copyfile(self.tmp / "warm.sqlite", index)
        settings = self.case.settings(self.storage, index)
        async with running_server(settings) as url:
            self.faults.port = int(url.rsplit(":", 1)[1])
            # The launcher started, the server's first connection served: the descriptors from now on are the run's.
            warm = await fetch(url, "HTTP/1.1", "/archive/warmup/", {})
            assert warm.status == 200 and warm.clean
            await wait_until_no_producer_children(timeout=10)
            descriptors, threads = own_descriptors(), busy_threads()
            self.caplog.clear()
            self.faults.arm(at)
            try:
                fetched = await fetch(url, self.case.protocol, "/archive/album/", self.case.headers(self.whole))
                # A send of the server's before it takes the request (HTTP/2's preface, its SETTINGS
                # frame's ACK) failing closes the connection with no request taken: no download, no line.
                if not self.faults.asked:
                    with trio.move_on_after(10):  # the server's side of the connection closed
                        while own_descriptors() - descriptors:
                            await trio.sleep(0.02)
                unasked = not self.faults.asked
                with trio.move_on_after(0 if unasked else 15):  # its line written, its producer reaped
                    while not download_lines(self.caplog):
                        await trio.sleep(0.01)
                await wait_until_no_producer_children(timeout=10)
            finally:
                self.faults.disarm()
            if unasked:
                assert self.case.kind == "socket" and fetched.status == 0, (self.where(), fetched)
            lines = download_lines(self.caplog)
            assert len(lines) == (0 if unasked else 1), (self.where(), fetched, lines)
            tracebacks = [record.getMessage() for record in self.caplog.records if record.exc_info]
            assert not tracebacks, (self.where(), tracebacks)
            await self.check_left_behind(url, descriptors, threads)
        return Run(fetched, self.faults, lines[0] if lines else "")

    async def check_left_behind(self, url: str, descriptors: set[str], threads: list[str]) -> None:
        with trio.fail_after(10):
            while (found := await metrics(url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.02)
        assert {name: found[name] for name in GAUGES} == dict.fromkeys(GAUGES, 0)
        with trio.move_on_after(10):  # the client's sockets closed, the server's too, every file and pipe
            while own_descriptors() - descriptors:
                await trio.sleep(0.02)
        left = {fd: _target(fd) for fd in own_descriptors() - descriptors}
        assert not left, (self.where(), left)
        # The next download: byte for byte the one without a fault (no CRC the fault left wrong).
        if self.expected:
            again = await fetch(url, self.case.protocol, "/archive/album/", self.case.headers(self.whole))
            assert again.clean and again.status in (200, 206)
            assert again.body == self.expected
            await wait_until_no_producer_children(timeout=10)
        with trio.fail_after(10):  # no thread still at work: each back in trio's cache
            while busy_threads() != threads:
                await trio.sleep(0.02)

    async def warm(self) -> None:
        """An index (``warm.sqlite``) that holds every file's CRC, as a download left it."""
        index = self.tmp / "warm.sqlite"
        # Stored: a deflated download computes its CRCs as it compresses, and keeps none.
        async with running_server(replace(self.case.settings(self.storage, index), compression=0)) as url:
            fetched = await fetch(url, "HTTP/1.1", "/archive/album/", {})
            assert fetched.clean and fetched.status == 200
            await wait_until_no_producer_children(timeout=10)
        with contextlib.closing(sqlite3.connect(index)) as connection:  # closed: written whole, no -wal
            assert connection.execute("SELECT count(*) FROM crc_v6").fetchone()[0] == len(ALBUM)

    async def count(self) -> list[Target]:
        """The calls of the kind one download makes (each to be failed in turn), and the download without a fault."""
        # The same calls in every run: no file's CRC too new to keep (its ctime within a clock tick,
        # ``ctime_trust.RACY_NS``), and every file looked at again before the end, not only in the first
        # minute (RECHECK_SECONDS), whatever the time the sweep has taken.
        await ctimes_settled(self.storage / "album")
        if self.case.kind.endswith("-warm"):
            await self.warm()
        run = await self.run(0)
        fetched = run.fetched
        assert fetched.clean and fetched.status == (206 if self.case.extent == "range" else 200), fetched
        assert ": complete" in run.line
        if self.case.extent == "whole":
            assert fetched.body == self.whole
        elif self.case.extent == "range":
            start, end = self.case.range(self.whole)
            assert fetched.body == self.whole[start : end + 1]
        else:
            assert read_archive(fetched.body) == ALBUM
        self.expected = fetched.body
        if self.case.kind == "producer":
            return list(range(1, int((self.tmp / "producer-counts").read_text().split()[-1]) + 1))
        return list(self.faults.calls)

    def where(self) -> str:
        faults = self.faults
        return f"{faults.failed} ({self.case.error}) at call {faults.at}, after {len(faults.calls)}: {faults.calls}"

    def judge(self, run: Run) -> None:
        """What the client got and the line said, for a fault at one call."""
        fetched, line, name = run.fetched, run.line, self.case.error
        where = self.where()
        if not line:  # no request taken (``run``)
            return
        # The call due was made (not a run that took another way: the sweep would pass without its fault),
        # or a stream's target offset was past its end this time (HTTP/2's last frames, a few bytes, coalesce
        # differently from run to run).
        at = run.faults.at
        if isinstance(at, tuple) and at[0] in STREAMS and run.faults.failed is None:
            assert run.faults.seen.get(at[0], 0) <= at[1], where
        else:
            assert self.case.kind == "producer" or run.faults.failed is not None, where
        assert "nothing came from the storage" not in line, where  # a fault made a hang
        if fetched.status in (200, 206) and fetched.clean and run.faults.failed == "entry stat" and name == "EACCES":
            # A file whose status is denied is one the service may not read: left out (README, Failure behaviour).
            assert ": complete" in line and ", 1 left out" in line, (where, line)
        elif fetched.status in (200, 206) and fetched.clean:
            assert fetched.body == self.expected, where  # a clean end is the whole, right answer
            assert ": complete" in line, (where, line)
        elif fetched.status in (200, 206):
            # Aborted after the head: never ended as if complete, and what came is the right bytes' start;
            # but over HTTP/2 every byte written and only END_STREAM lost is complete: a client with every
            # byte may close before it comes, as curl does (fences.hypercorn_h2_send.undelivered).
            every_byte = self.case.protocol == "HTTP/2" and fetched.body == self.expected
            assert ": complete" not in line or every_byte, (where, line)
            assert self.expected.startswith(fetched.body), where
        elif fetched.status == 0:
            # No head: only a fault of the connection's own sockets may leave the client without an answer.
            assert self.case.kind == "socket", (where, fetched)
            assert ": complete" not in line, (where, line)
        else:
            allowed = REFUSALS.get((self.case.kind, name), REFUSALS[name])
            closed = run.faults.failed == "os.close" or (
                self.case.kind == "producer" and "closed after reading" in line
            )
            if closed and name == "EIO":
                allowed = {503}  # a file's close failing after its read: not the file read (README, rclone)
            assert fetched.status in allowed, (where, fetched.status, line)
            assert fetched.clean and 0 < len(fetched.body) < 16_384, where  # the short page (text: no Accept)
            if fetched.status == 503:
                assert "Retry-After" in fetched.headers, where
            assert line.startswith("refused album") or "(refused before the head)" in line, (where, line)
        if self.case.kind.startswith("index"):  # only a cache: a fault of it is never the download's
            assert fetched.clean and fetched.status in (200, 206), (where, fetched, line)


def cases() -> Iterator[Any]:
    """Every kind, error, protocol and extent; each kind's first in the default run (a sample of its calls)."""
    for k, (kind, spec) in enumerate(KINDS.items()):
        # A deflated download computes its CRCs as it compresses: it neither looks any up nor keeps any
        # (an index case of it counted no call, and failed: helper 193's never ran).
        index = kind.endswith("-warm") or kind.startswith("index")
        extents = [extent for extent in EXTENTS if not (index and extent == "deflated")]
        for name in spec.errors:
            for protocol in PROTOCOLS:
                for extent in extents:
                    case = Case(kind, name, protocol, extent)
                    identifier = f"{kind}-{name}-{protocol}-{extent}"
                    first = name == next(iter(spec.errors))
                    if first and (protocol, extent) == (PROTOCOLS[k % 2], extents[k % len(extents)]):
                        yield pytest.param(case, "sample", id=f"{identifier}-sample")
                    yield pytest.param(case, "every", id=f"{identifier}-every", marks=pytest.mark.slow)


@pytest.mark.parametrize(("case", "calls"), list(cases()))
async def test_each_call_of_a_download_failing_once(
    case: Case, calls: str, storage: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    write_tree(storage / "album", ALBUM)
    write_tree(storage / "warmup", {"w.txt": b"w"})
    faults = Faults()
    KINDS[case.kind].install(monkeypatch, faults, KINDS[case.kind].errors[case.error], tmp_path)
    monkeypatch.setattr(download, "RECHECK_SECONDS", 10**10)
    real_archive = routes.Routes.archive

    async def archive(self: routes.Routes, name: str) -> Any:
        faults.asked = faults.asked or faults.armed
        return await real_archive(self, name)

    monkeypatch.setattr(routes.Routes, "archive", archive)
    sweep = Sweep(case, storage, tmp_path, faults, caplog)
    targets = await sweep.count()
    assert targets, case
    ats = targets if calls == "every" else list(dict.fromkeys([targets[0], targets[len(targets) // 2], targets[-1]]))
    failures = []  # each call's, all told at once (a run is a fresh server: one failing leaves the next as it was)
    for at in ats:
        try:
            sweep.judge(await sweep.run(at))
        except AssertionError as failure:
            failures.append(f"at {at}: {failure!r}"[:3000])
    assert not failures, "\n".join(failures)


def one_call_failing(monkeypatch: pytest.MonkeyPatch, module: Any, call: str, error: int, at: int = 1) -> Faults:
    """``module``'s ``at``-th ``os.<call>`` fails with ``error`` (a close closes first; an access is False)."""
    faults = Faults()
    real = FaultyOs(faults, error)

    class OneCall(FaultyOs):
        def __getattr__(self, name: str) -> Any:
            return real.__getattr__(name) if name == call else getattr(os, name)

    monkeypatch.setattr(module, "os", OneCall(faults, error))
    faults.arm(at)
    return faults


def test_a_passage_s_close_failing_on_the_way_to_a_folder_closes_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    before = own_descriptors()
    faults = one_call_failing(monkeypatch, real_paths, "close", errno.EIO)
    fd = real_paths.open_real_directory((tmp_path / "a" / "b").resolve())
    assert faults.failed == "os.close"
    assert os.path.samefile(f"/proc/self/fd/{fd}", tmp_path / "a" / "b")
    os.close(fd)
    assert own_descriptors() == before  # the parent closed once, the child not left open


@pytest.mark.parametrize("call", ["close", "access"])
def test_a_walk_whose_folder_close_or_file_access_fails_lists_the_album_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    write_tree(tmp_path / "album", {"a.txt": b"a", "b.txt": b"b"})
    # The album's own access first (its folder searchable), then each file's.
    faults = one_call_failing(monkeypatch, album_walk, call, errno.EIO, at=2 if call == "access" else 1)
    listing = archive_storage.list_album(tmp_path / "album")
    assert faults.failed == f"os.{call}"
    assert [str(file.path) for file in listing.files] == ["a.txt", "b.txt"]
    assert not listing.skipped


def test_a_batch_s_folder_close_failing_is_no_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    folders = listed_files.Folders()
    os.close(folders.open((tmp_path / "a.txt").resolve()))
    faults = one_call_failing(monkeypatch, listed_files, "close", errno.EIO)
    folders.close()
    assert faults.failed == "os.close"


@pytest.mark.parametrize(("error", "transient"), [(errno.EMFILE, True), (errno.ENOMEM, True), (errno.EIO, False)])
def test_an_album_whose_look_up_runs_out_of_descriptors_or_memory_is_to_be_tried_again(
    storage: Path, monkeypatch: pytest.MonkeyPatch, error: int, transient: bool
) -> None:
    (storage / "album").mkdir()
    one_call_failing(monkeypatch, archive_storage, "stat", error)
    with pytest.raises(ListingFailed) as failure:
        archive_storage.resolve_album(storage, "album")
    assert failure.value.transient is transient


@pytest.mark.parametrize("at", [1, 3], ids=["the album's", "a folder's"])
def test_a_walk_whose_folder_access_fails_though_it_is_searchable_lists_the_album_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    write_tree(tmp_path / "album", {"a.txt": b"a", "sub/b.txt": b"b"})
    # access() in turn: the album's folder, a.txt, sub (read and search), sub/b.txt.
    faults = one_call_failing(monkeypatch, album_walk, "access", errno.EIO, at=at)
    listing = archive_storage.list_album(tmp_path / "album")
    assert faults.failed == "os.access"
    assert [str(file.path) for file in listing.files] == ["a.txt", "sub/b.txt"]
    assert not listing.skipped


@pytest.mark.parametrize(("error", "transient"), [(errno.EMFILE, True), (errno.EIO, False)])
@pytest.mark.parametrize("at", [1, 3], ids=["the album's", "a folder's"])
def test_a_walk_that_cannot_tell_whether_a_folder_is_searchable_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int, error: int, transient: bool
) -> None:
    """access() failed, and so did the look up in the folder that tells: not left out of an archive ending cleanly."""
    write_tree(tmp_path / "album", {"a.txt": b"a", "sub/b.txt": b"b"})
    one_call_failing(monkeypatch, album_walk, "access", errno.EIO, at=at)
    real_stat = os.stat

    def stat(path: Any, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> Any:
        if path == "." and dir_fd is not None:
            raise OSError(error, os.strerror(error))
        return real_stat(path, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(album_walk.os, "stat", stat, raising=False)
    with pytest.raises(ListingFailed) as failure:
        archive_storage.list_album(tmp_path / "album")
    assert failure.value.transient is transient


@pytest.mark.parametrize(
    ("error", "status"),
    [(errno.EIO, producer_protocol.EXIT_FAILED), (errno.EMFILE, producer_protocol.EXIT_OUT_OF_RESOURCES)],
)
def test_a_producer_whose_look_at_its_output_fails_exits_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: int, status: int
) -> None:
    """Its first call (an fstat of stdout) failing was an uncaught traceback: a 500 whatever the error."""
    faults = one_call_failing(monkeypatch, producer_output, "fstat", error)
    assert producer_program.main() == status
    assert faults.failed == "os.fstat"
    message = capsys.readouterr().err
    assert message.startswith("archiver-producer: ") and message.count("\n") == 1, message
