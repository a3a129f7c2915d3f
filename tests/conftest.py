"""Fixtures: storage trees on disk, and a real Hypercorn server on a free port."""

from __future__ import annotations

import errno
import gc
import getpass
import io
import os
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h11
import httpx
import pytest
import trio
import trustme
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from archiver.archive import launcher_program, producer, spawner
from archiver.archive.ctime_trust import COARSE_RACY_NS, RACY_NS
from archiver.archive.entries import EntryPolicy
from archiver.archive.names import entry_names
from archiver.archive.plan import ArchivePlan
from archiver.archive.producer_protocol import SECOND
from archiver.archive.storage import list_album
from archiver.config import Settings
from archiver.web.app import create_app

from .zip_records import check_zip_records

PROTOCOLS = ["HTTP/1.1", "HTTP/2"]
# The tests write an album and download it a moment later: the service launched as a process
# (archiver, hypercorn) serves it without waiting for it to settle, as Settings(settle_time=0) in
# this one.  The settle rule's own tests set it (test_failures).
os.environ["ARCHIVER_SETTLE_TIME"] = "0"


class PlainHttpOnly(ssl.SSLContext):
    """A TLS context that refuses to be used: for clients that speak plain HTTP only.

    Given to the tests' httpx clients and transports: without one httpx builds a
    context for each, loading the CA bundle (~70 ms of CPU; ~730 of them took 52
    CPU-s, a seventh of a run's).  Shared, it would also be changed by any https
    connection (httpcore sets its ALPN protocols), so it refuses TLS: the TLS
    tests pass their own trust.
    """

    def wrap_socket(self, *args: object, **kwargs: object) -> ssl.SSLSocket:
        raise AssertionError("a plain-HTTP test client was used for https: give it its own trust")

    def wrap_bio(self, *args: object, **kwargs: object) -> ssl.SSLObject:
        raise AssertionError("a plain-HTTP test client was used for https: give it its own trust")


CLIENT_TLS = PlainHttpOnly(ssl.PROTOCOL_TLS_CLIENT)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (stress, soak)")


def unmount_dead_fuse_mounts(root: Path, spare: Callable[[Path], bool] = lambda _: False) -> list[str]:
    """Unmount (lazily) the FUSE mounts under ``root`` whose daemon is gone, but those ``spare`` names; the mount
    points unmounted.

    A dead mount answers ENOTCONN. ``statvfs`` asks, not ``stat``: gated_fs holds ``stat`` while a
    test's gate says so, never ``statfs``, so a live mount of a run going on answers at once.
    """
    dead = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, filesystem = line.partition(" - ")
        # The mount point, field 5, escapes space, tab, newline and backslash in octal (proc(5)).
        mountpoint = re.sub(r"\\([0-7]{3})", lambda escape: chr(int(escape[1], 8)), fields.split()[4])
        if not filesystem.startswith("fuse") or not Path(mountpoint).is_relative_to(root):
            continue
        try:
            os.statvfs(mountpoint)
        except OSError as error:
            # Asked of dead mounts only: a look into a live one may wait on its gate.
            if error.errno == errno.ENOTCONN and not spare(Path(mountpoint)):
                subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False, capture_output=True)
                dead.append(mountpoint)
    return dead


def pytest_sessionstart(session: pytest.Session) -> None:
    """Unmount the dead FUSE mounts a killed run left under pytest's temporary folders.

    A run killed with SIGKILL (a time limit's, a session's end) takes gated_fs's daemon with it
    before it can unmount: its PR_SET_PDEATHSIG helps only when the daemon outlives the run. The
    mount stays, answering ENOTCONN, and pytest cannot remove its folder (found at the start of
    sessions 33 to 36). Only the controller does it, not each pytest-xdist worker.
    """
    if hasattr(session.config, "workerinput") or shutil.which("fusermount3") is None:
        return
    temporary = os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()  # where pytest puts them
    root = Path(temporary) / f"pytest-of-{getpass.getuser()}"
    unmount_dead_fuse_mounts(root, spare=lambda mountpoint: of_a_live_session(mountpoint, root))


def of_a_live_session(path: Path, root: Path) -> bool:
    """Whether ``path``, under ``root``, is in the folder of a pytest session still running (``root/pytest-N``).

    pytest writes its pid in that folder's ``.lock`` and removes it as it ends.  A run going on beside
    this one may hold a dead mount on purpose: test_dead_storage kills a daemon to start the service on
    the dead mount, and another run's start unmounting it (a helper's, at 3184cdc) served an empty
    folder there instead.
    """
    try:
        pid = int((root / path.relative_to(root).parts[0] / ".lock").read_text())
    except (OSError, ValueError, IndexError):
        return False
    return Path(f"/proc/{pid}").exists()


# Figures the stress tests measure, printed at the end of the run (see README).  A test's
# figures travel with its report, which pytest-xdist brings from its worker to the summary.
STRESS_FIGURES: list[str] = []
_FIGURE = "stress figure"
_figures_pending: list[str] = []


def record_figure(line: str) -> None:
    _figures_pending.append(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    report.user_properties.extend((_FIGURE, line) for line in _figures_pending)
    _figures_pending.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    STRESS_FIGURES.extend(str(value) for name, value in report.user_properties if name == _FIGURE)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if STRESS_FIGURES:
        terminalreporter.section("stress figures")
        for line in STRESS_FIGURES:
            terminalreporter.write_line(line)


# The test files that take longest (each about a minute or more of waiting on servers, mounts
# and timeouts), longest first.  `make test` hands out whole files to its workers in the order
# collected (--no-loadscope-reorder): started first, they end with the rest rather than a minute
# after them, as the last file a worker takes.
LONGEST_FILES = (
    "test_dead_storage.py",
    "test_cli.py",
    "test_crc_index.py",
    "test_adversarial.py",
    "test_integrity.py",
    "test_readers.py",
    "test_http.py",
    "test_ranges.py",
    "test_failures.py",
    "test_signing.py",
    "test_malformed.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the order within a file, and among the others, is kept
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def write_atomically(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all, as another process sees it: a file gated_fs reads while it is written.

    ``Path.write_text`` truncates first: gated_fs, reading its ``-fail-stats`` file in that moment,
    found it empty, which fails every file's stats with ESTALE, not only those named (a "z.bin:
    Stale file handle" outcome, once in 12 runs of a test naming a.bin alone).
    """
    written = path.with_name(path.name + ".new")
    written.write_text(text)
    os.replace(written, path)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Create ``files`` (relative path -> content) under ``root``."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def write_deep_file(album: Path, folders: list[bytes], name: bytes, data: bytes = b"") -> bytes:
    """File ``name`` holding ``data`` under ``folders`` (made, nested) in ``album``, through directory
    descriptors: a path past PATH_MAX cannot be opened whole.  Its path relative to ``album``."""
    fd = os.open(album, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            os.mkdir(folder, dir_fd=fd)
            child = os.open(folder, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        file = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        try:
            os.write(file, data)
        finally:
            os.close(file)
    finally:
        os.close(fd)
    return b"".join(folder + b"/" for folder in folders) + name


async def ctimes_settled(album: Path) -> None:
    """Wait until no file in ``album`` is racy (``ctime_trust.is_racy``), so that its archive has an ETag again.

    A file changed within a clock tick of a walk could change again in that
    tick, its key unmoved: its archive goes without an ETag until then
    (``archive.etag.archive_validator``).  Not a synchronisation: a time to let pass.
    """
    ctimes = [path.stat().st_ctime_ns for path in album.rglob("*") if path.is_file()]
    settled = max((ctime + (COARSE_RACY_NS if ctime % SECOND == 0 else RACY_NS) for ctime in ctimes), default=0)
    await trio.sleep(max(0, settled - time.time_ns()) / SECOND + 0.001)


def entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's name as the files were named on disk (UTF-8), whatever flag zip set."""
    if info.flag_bits & 0x800:
        return info.filename
    return info.filename.encode("cp437").decode("utf-8")


def read_archive(data: bytes) -> dict[str, bytes]:
    """Open ``data`` as a ZIP, check every record (``zip_records``) and every CRC, and return name -> content."""
    check_zip_records(data)
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    return {entry_name(info): archive.read(info) for info in archive.infolist()}


def expected_archive(album: Path, policy: EntryPolicy | None = None) -> bytes:
    """The stored archive of ``album`` as planned, rendered here from the files (the oracle for what is sent).

    The same records as the service's (``ArchivePlan``, with ``policy``: the
    service's zone, modes and name encoding), but every byte moved by this
    function: no producer, no pipe, no chunks, no HTTP.
    """
    plan = ArchivePlan(album, list_album(album).files, 0, policy)
    data = [album.joinpath(plan.path_str(k)).read_bytes() for k in range(plan.count)]
    crcs = [zlib.crc32(content) for content in data]
    pieces = [piece for k in range(plan.count) for piece in (plan.local_header(k, crcs[k]), data[k])]
    pieces += [plan.central_header(k, crcs[k]) for k in range(plan.count)]
    archive = b"".join([*pieces, plan.end_records()])
    assert len(archive) == plan.length
    check_zip_records(archive)  # the plan's records as APPNOTE has them, not only as the plan computed them
    return archive


def as_unpacked(tree: dict[str, bytes]) -> dict[str, bytes]:
    """``tree`` (name -> content) under the names the archive gives its files (the naming policy)."""
    paths = sorted(tree, key=os.fsencode)
    return dict(zip(entry_names(os.fsencode(path) for path in paths), (tree[path] for path in paths), strict=True))


def files_on_disk(album: Path) -> dict[str, bytes]:
    """Every regular file under ``album`` (not through links), as name -> content."""
    found = {}
    for directory, _, names in os.walk(album):
        for name in names:
            path = Path(directory, name)
            if stat.S_ISREG(path.lstat().st_mode):
                found[path.relative_to(album).as_posix()] = path.read_bytes()
    return found


@dataclass(frozen=True)
class ProducerChild:
    pid: int
    state: str


@dataclass(frozen=True)
class _Process:
    pid: int
    parent: int
    command: bytes  # /proc/<pid>/cmdline
    name: str  # /proc/<pid>/comm
    state: str


def producer_processes(ancestor: int) -> list[ProducerChild]:
    """The producer processes below ``ancestor`` (children, or deeper: hypercorn's CLI runs a worker), zombies too.

    A producer is a child of the launcher, forked (by its name,
    ``launcher_program.PRODUCER_NAME``, or until it has set it, by its
    command line: the launcher's), or a program it ran (the producer
    program's file in its command line).  A dying one has no command line left:
    its memory goes early in the kernel's exit, and for a while (a third of
    the samples, killed producers watched in a loop) it is still running in
    ``stat`` with an empty command line, then a zombie.  Both are known by
    their name (the interpreter's, or the forked producer's) and parent.
    (Missing the first made a test see no producer, then one zombie at its
    next look.)
    """
    interpreter = os.path.basename(sys.executable)[:15]
    table = _process_table()

    def is_producer(process: _Process) -> bool:
        started_by_launcher = _role(table.get(process.parent)) == LAUNCHER
        return (
            PRODUCER_PROGRAM in process.command
            or process.name == PRODUCER_NAME
            or (_role(process) == LAUNCHER and started_by_launcher)  # forked, not named yet
            or (
                process.name in (interpreter, spawner.LAUNCHER)  # exec'd, or forked and not named yet
                and (process.state == "Z" or not process.command)
                and started_by_launcher
            )
        )

    return _below(ancestor, table, is_producer)


def launcher_processes(ancestor: int) -> list[ProducerChild]:
    """The producers' launchers below ``ancestor`` (archiver/archive/launcher.py), while they run."""
    table = _process_table()
    return _below(
        ancestor,
        table,
        lambda process: _role(process) == LAUNCHER and _role(table.get(process.parent)) != LAUNCHER,
    )


def spawner_processes(ancestor: int) -> list[ProducerChild]:
    """The launchers' spawners below ``ancestor`` (archiver/archive/spawner.py), while they run.

    Not a spawner's child: a launcher it forked and has not yet exec'd still has its command line
    (a spawner's parent is the service or a launcher, never a spawner).
    """
    table = _process_table()
    return _below(
        ancestor,
        table,
        lambda process: _role(process) == SPAWNER and _role(table.get(process.parent)) != SPAWNER,
    )


def own_descriptors() -> set[str]:
    """This process's open descriptors, once the garbage of earlier tests is collected.

    Else a socket or file an earlier test left in a reference cycle could be closed by the collector
    between a test's two looks, and seem to be one the test's code closed, or a leak of it hidden
    (helper 184 saw one go missing in a full run).
    """
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def process_state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie), or None if there is no such process.

    One reaped between the file's open and its read is ESRCH (ProcessLookupError) from the read:
    it failed a test that waited for a killed launcher's zombie (a full run, helper 184).
    """
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def parent_pid(pid: int) -> int:
    """The parent process id of ``pid`` (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


def _role(process: _Process | None) -> bytes | None:
    """What runs the launcher's program, by its last argument: a spawner, or a launcher (or a producer it
    forked and not named yet: its command line is the launcher's); None for any other process."""
    if process is None or LAUNCHER_PROGRAM not in process.command or process.name == PRODUCER_NAME:
        return None
    return process.command.rstrip(b"\0").rsplit(b"\0", 1)[-1]


def _process_table() -> dict[int, _Process]:
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                command = file.read()
            with open(f"/proc/{entry.name}/stat") as file:
                fields = file.read()
        except OSError:
            continue
        # comm may hold spaces: split after its closing parenthesis.
        name = fields[fields.index("(") + 1 : fields.rindex(")")]
        state, parent = fields[fields.rindex(")") + 2 :].split()[:2]
        table[int(entry.name)] = _Process(int(entry.name), int(parent), command, name, state)
    return table


def _below(ancestor: int, table: dict[int, _Process], matches: Callable[[_Process], bool]) -> list[ProducerChild]:
    """The processes in ``table`` below ``ancestor`` that match."""

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = table[pid].parent if pid in table else 0
            if pid == ancestor:
                return True
        return False

    return [
        ProducerChild(process.pid, process.state)
        for process in table.values()
        if matches(process) and descends(process.pid)
    ]


PRODUCER_PROGRAM = b"archiver.archive.producer_program"
LAUNCHER_PROGRAM = b"archiver.archive.launcher_program"
PRODUCER_NAME = launcher_program.PRODUCER_NAME
SPAWNER, LAUNCHER = spawner.SPAWNER.encode(), spawner.LAUNCHER.encode()


def producer_children() -> list[ProducerChild]:
    """The producer processes this test process has started and not yet reaped."""
    return producer_processes(os.getpid())


async def wait_until_no_producer_children(timeout: float) -> None:
    """Poll /proc until no producer child (running or zombie) is left; fail after ``timeout``.

    10 s in the tests: above what a loaded machine may take to kill and reap one
    (``producer.REAP_WAIT_LOADED``, 5 s; helper 105: 1 s was tighter than the code's own
    allowance), far below the stall timeout (120 s) that a producer left running would wait for.
    """
    with trio.fail_after(timeout):
        while producer_children():
            await trio.sleep(0.01)


def socket_buffer_limit() -> int:
    """The most a loopback connection can hold in kernel buffers (receive + send side)."""
    limit = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as file:
            limit += int(file.read().split()[2])
    return limit


@pytest.fixture(scope="session")
def large_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An album far larger than every buffer between zip and a client that stops reading.

    Loopback sockets alone may hold tens of MB (tcp_rmem's maximum), so the
    size follows the kernel's limits, with 32 MB to spare.
    """
    root = tmp_path_factory.mktemp("large-storage")
    file_size = 8 * 1024 * 1024
    count = -(-(socket_buffer_limit() + 32 * 1024 * 1024) // file_size)
    write_tree(root / "big", {f"photo-{i:02d}.jpg": os.urandom(file_size) for i in range(count)})
    return root


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path]:
    """A CA made for this test run and a server certificate for 127.0.0.1."""
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("tls")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certificate.private_key_pem.write_to_path(str(keyfile))
    certificate.cert_chain_pems[0].write_to_path(str(certfile))
    return ca, certfile, keyfile


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    root = tmp_path / "storage"
    root.mkdir()
    return root


@pytest.fixture
def settings(storage: Path) -> Settings:
    return Settings(settle_time=0, storage_dir=storage, host="127.0.0.1", port=0)


@asynccontextmanager
async def running_server(settings: Settings, **hypercorn_settings: object) -> AsyncIterator[str]:
    """Serve the app with ``settings`` on a free loopback port; yield its base URL."""
    app = create_app(settings)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 1
    for name, value in hypercorn_settings.items():
        setattr(config, name, value)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
        yield binds[0]
        shutdown.set()


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    async with running_server(settings) as url:
        yield url


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_client(url: str, protocol: str) -> httpx.AsyncClient:
    """An httpx client speaking exactly ``protocol`` (HTTP/2 as h2c with prior knowledge)."""
    http2 = protocol == "HTTP/2"
    return httpx.AsyncClient(verify=CLIENT_TLS, base_url=url, http1=not http2, http2=http2, timeout=30)


@pytest.fixture
async def client(server: str, protocol: str) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(server, protocol) as client:
        yield client


def free_port() -> int:
    """A loopback port free right now, for servers started in another process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def producer_script(tmp_path: Path, name: str, body: str) -> tuple[str, ...]:
    """A shell script standing in for the producer (``$REAL_PRODUCER`` in it runs the real one), as a command."""
    script = tmp_path / name
    real = " ".join(shlex.quote(part) for part in producer.COMMAND)
    script.write_text(f"#!/bin/sh\n{body.replace('$REAL_PRODUCER', real)}\n")
    script.chmod(0o755)
    return (str(script),)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], None]:
    """Replace the producer of servers in this process by a script (see ``producer_script``)."""

    def install(body: str) -> None:
        monkeypatch.setattr(producer, "COMMAND", producer_script(tmp_path, "producer", body))

    return install


@pytest.fixture
def producer_starts(stand_in: Callable[[str], None], tmp_path: Path) -> Path:
    """A log of every producer start (its pid a line), of servers in this process."""
    log = tmp_path / "producer-starts.log"
    log.touch()
    stand_in(f'echo "$$" >> {log}\nexec $REAL_PRODUCER')
    return log


def http11_request(
    address: tuple[str, int], method: str, target: bytes, headers: list[tuple[str, str]]
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with ``target`` sent as is (no client normalisation): status, headers, body."""
    connection = h11.Connection(h11.CLIENT)
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(connection.send(h11.Request(method=method, target=target, headers=[("Host", "x"), *headers])))
        sock.sendall(connection.send(h11.EndOfMessage()))
        status, response_headers, body = 0, {}, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {name.decode(): value.decode() for name, value in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, response_headers, body


async def http10_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 GET, as old clients send it (no chunked bodies): status, headers, the body until the close."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    lines = [f"GET {path} HTTP/1.0", f"Host: {host}", *(f"{name}: {value}" for name, value in (headers or {}).items())]
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = bytearray()
        with trio.fail_after(30):
            while data := await stream.receive_some(65536):
                received += data
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), parsed, body


@contextmanager
def server_in_thread(settings: Settings) -> Iterator[tuple[str, int]]:
    """A real server in a thread with a Trio run of its own, for synchronous (hypothesis) tests."""
    app = create_app(settings)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 1
    started: list[tuple[str, int]] = []
    ready = threading.Event()
    stop: list[tuple[trio.lowlevel.TrioToken, trio.Event]] = []

    async def run() -> None:
        shutdown = trio.Event()
        stop.append((trio.lowlevel.current_trio_token(), shutdown))
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
            host, port = binds[0].removeprefix("http://").rsplit(":", 1)
            started.append((host, int(port)))
            ready.set()

    thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield started[0]
    finally:
        token, shutdown = stop[0]
        trio.from_thread.run_sync(shutdown.set, trio_token=token)
        thread.join(30)


def sparse_file(path: Path, length: int, pieces: list[tuple[int, bytes]]) -> bytes | None:
    """A file of ``length`` bytes, holes but for ``pieces`` (offset, bytes) written: its bytes if small, else None."""
    with path.open("wb") as file:
        file.truncate(length)
        for offset, data in pieces:
            os.pwrite(file.fileno(), data[: max(0, length - offset)], offset)
    return path.read_bytes() if length <= 16 * 1024 * 1024 else None
