"""Both launch ways, as an operator runs them: the console script and hypercorn with hypercorn.toml."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.settings
import httpx
import pytest
import trio

from archiver.logs import EXIT_DRAIN

from .conftest import (
    CLIENT_TLS,
    PROTOCOLS,
    files_on_disk,
    free_port,
    launcher_processes,
    make_client,
    parent_pid,
    process_state,
    producer_processes,
    read_archive,
    spawner_processes,
    write_tree,
)

PROJECT = Path(__file__).resolve().parent.parent
SAMPLE_ALBUM = "holiday-2024"


@dataclass
class Launched:
    url: str
    process: trio.Process
    # Everything the server has printed so far (stdout and stderr).
    output: bytearray


@asynccontextmanager
async def launched(command: Sequence[str], env: dict[str, str] | None = None) -> AsyncIterator[Launched]:
    """Start ``command``, wait for Hypercorn's "Running on" line, yield it; SIGTERM it at the end."""
    process = await trio.lowlevel.open_process(
        list(command),
        cwd=PROJECT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # A group of its own: a test that fails midway kills Hypercorn's workers too, not only their master.
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(30):
            while not (match := re.search(rb"Running on (http://\S+)", output)):
                data = await process.stdout.receive_some()
                assert data, f"server exited before listening:\n{output.decode()}"
                output += data
        launched = Launched(match.group(1).decode(), process, bytearray(output))
        async with trio.open_nursery() as nursery:
            # Keep reading so a chatty server never blocks on a full pipe.
            nursery.start_soon(_collect, process.stdout, launched.output)
            yield launched
            # A server the test stopped itself is the test's to check.
            if process.returncode is None:
                process.terminate()
                with trio.fail_after(15):
                    assert await process.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


@asynccontextmanager
async def launched_on_a_free_port(
    command: Callable[[int], Sequence[str]], env: dict[str, str] | None = None
) -> AsyncIterator[tuple[int, Launched]]:
    """``launched`` on a port told to it (``command(port)``), and the port.

    The port is free when chosen, and chosen again if another process has
    bound it before the server could (the other xdist worker's servers).
    """
    async with contextlib.AsyncExitStack() as stack:
        for attempt in range(3):
            port = free_port()
            try:
                server = await stack.enter_async_context(launched(command(port), env))
            except AssertionError as error:
                if attempt < 2 and "Address already in use" in str(error):
                    continue
                raise
            yield port, server
            return


async def _collect(stream: trio.abc.ReceiveStream, output: bytearray) -> None:
    async for data in stream:
        output += data


async def check_serves_sample_album(url: str) -> None:
    expected = files_on_disk(PROJECT / "data" / SAMPLE_ALBUM)
    for protocol in PROTOCOLS:
        async with make_client(url, protocol) as client:
            response = await client.get(f"/archive/{SAMPLE_ALBUM}/")
        assert response.http_version == protocol
        assert response.status_code == 200
        assert read_archive(response.content) == expected


async def test_console_script_serves_sample_data() -> None:
    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", str(port), "-D", "data"]

    async with launched_on_a_free_port(command) as (port, server):
        assert server.url.endswith(f":{port}")
        await check_serves_sample_album(server.url)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("host", ["::1", "[::1]"])  # as a URL writes it too: "[[::1]]:0" in the log (helper 171)
async def test_console_script_serves_on_an_ipv6_address(host: str) -> None:
    command = [sys.executable, "-m", "archiver", "-H", host, "-P", "0", "-D", "data"]
    async with launched(command) as server:
        assert server.url.startswith("http://[::1]:")
        await check_serves_sample_album(server.url)
    # The address as a URL and Hypercorn's --bind write it, not "::1:0"; the client's address as it is.
    assert re.search(rb"INFO archiver\.cli: serving \S+/data on \[::1\]:0\n", server.output)
    assert re.search(rb"download holiday-2024 for ::1: complete", server.output)


async def test_verbose_logs_a_line_a_chunk() -> None:
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", "data", "-v"]
    async with launched(command) as server, httpx.AsyncClient(verify=CLIENT_TLS, base_url=server.url) as client:
        whole = await client.get(f"/archive/{SAMPLE_ALBUM}/")
        await client.get("/archive/no-such-album/")
    assert whole.status_code == 200
    lines = re.findall(
        rb"DEBUG archiver\.web\.download: download \S+ for 127\.0\.0\.1: sending (\d+) bytes", server.output
    )
    assert lines and sum(map(int, lines)) == len(whole.content)
    assert b"DEBUG archiver.web.routes: no album for 'no-such-album'" in server.output


async def test_hypercorn_config_serves_sample_data() -> None:
    hypercorn = Path(sys.executable).with_name("hypercorn")

    def command(port: int) -> list[str]:
        return [str(hypercorn), "--config", "hypercorn.toml", "--bind", f"127.0.0.1:{port}", "archiver.asgi:app"]

    async with launched_on_a_free_port(command, env={"ARCHIVER_DIR": "data"}) as (port, server):
        assert server.url.endswith(f":{port}")
        await check_serves_sample_album(server.url)


def test_help_documents_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "-h"], capture_output=True, text=True, check=True, cwd=PROJECT
    )
    for flag in (
        "-H",
        "--host",
        "-P",
        "--port",
        "-D",
        "--dir",
        "-d",
        "--delay",
        "-v",
        "--verbose",
        "--compression",
    ):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", result.stdout), flag


def test_bad_settings_under_the_hypercorn_launch_are_one_line() -> None:
    # Helper 34: the traceback of Hypercorn's import of archiver.asgi.
    hypercorn = str(Path(sys.executable).with_name("hypercorn"))
    command = [hypercorn, "--config", "hypercorn.toml", "--bind", "127.0.0.1:0", "archiver.asgi:app"]
    env = {**os.environ, "ARCHIVER_MAX_JOBS": "0"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=PROJECT, env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "archiver: ARCHIVER_MAX_JOBS must be at least 1, not 0"


@pytest.mark.parametrize("worker", [[], ["--config", "hypercorn.toml", "--worker-class", "asyncio"]])
def test_a_hypercorn_worker_other_than_trio_is_refused_at_start_in_one_line(worker: list[str]) -> None:
    # Helper 171: Hypercorn's default worker (asyncio: `hypercorn archiver.asgi:app`, no hypercorn.toml)
    # started, said "Running on", and answered every request, /healthz's too, 500 with a traceback.
    hypercorn = str(Path(sys.executable).with_name("hypercorn"))
    command = [hypercorn, *worker, "--bind", "127.0.0.1:0", "archiver.asgi:app"]
    env = {**os.environ, "ARCHIVER_DIR": "data"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=PROJECT, env=env)
    # 1 from the app's own process; without hypercorn.toml, Hypercorn's master (workers = 1) exits 0 (README).
    assert result.returncode == (1 if worker else 0)
    assert "Running on" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "archiver: runs on Hypercorn's trio worker only: hypercorn --config hypercorn.toml archiver.asgi:app "
        "(or --worker-class trio)"
    )


@pytest.mark.parametrize("launch", ["archiver", "hypercorn"])
async def test_a_misspelt_or_unread_variable_is_a_warning_at_start(launch: str) -> None:
    # Helper 67: ARCHIVER_MAX_JOB=8 (for ARCHIVER_MAX_JOBS) was ignored without a word.
    hypercorn = str(Path(sys.executable).with_name("hypercorn"))
    command = {
        "archiver": [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0"],
        "hypercorn": [hypercorn, "--config", "hypercorn.toml", "--bind", "127.0.0.1:0", "archiver.asgi:app"],
    }[launch]
    # Helper 103: and ARCHIVER_PORT, which the Hypercorn launch leaves to --bind, was ignored unsaid.
    env = {"ARCHIVER_DIR": "data", "ARCHIVER_MAX_JOB": "8", "ARCHIVER_MAX_JOBS": "8", "ARCHIVER_PORT": "0"}
    async with launched(command, env) as server:
        await check_serves_sample_album(server.url)
    lines = bytes(server.output).decode().splitlines()
    unknown = [line for line in lines if "is not a setting" in line]
    assert len(unknown) == 1 and "WARNING" in unknown[0] and "ARCHIVER_MAX_JOB is not a setting" in unknown[0]
    not_read = [line for line in lines if "no effect in this launch" in line]
    if launch == "hypercorn":
        assert len(not_read) == 1 and "WARNING" in not_read[0]
        assert "ARCHIVER_PORT has no effect in this launch (use hypercorn --bind)" in not_read[0]
    else:
        assert not_read == []


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"),
    reason="needs root, setpriv, unshare",
)
def test_a_root_that_is_slash_by_a_bind_mount_or_cannot_be_looked_at_is_refused_at_start(tmp_path: Path) -> None:
    # Helper 54: a bind mount of / (a container's -v /:/host) served /etc; and a root the service may
    # not search died in the look's thread, logged "did not answer", and the service started anyway.
    host = tmp_path / "host"
    host.mkdir()
    serve = f"{shlex.quote(sys.executable)} -m archiver -H 127.0.0.1 -P 0 -D"
    bound = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"mount --bind / {host} && exec {serve} {host}"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT,
    )
    assert bound.returncode == 1
    assert bound.stderr.strip().endswith("is / (each folder in it would be served as an album)"), bound.stderr
    private = tmp_path / "private"
    (private / "photos").mkdir(parents=True)
    os.chown(private, 65534, 65534)
    private.chmod(0o700)
    dropped = "-dac_override,-dac_read_search"
    command = ["setpriv", f"--inh-caps={dropped}", f"--bounding-set={dropped}", *serve.split(), str(private / "photos")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=PROJECT)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"archiver: storage directory '{private / 'photos'}': Permission denied"
    # The root's own mode 000: its stat answers, its albums cannot be reached (helper 56: a silent start).
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o000)
    os.chown(closed, 65534, 65534)
    command[-1] = str(closed)
    refused = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=PROJECT)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"archiver: storage directory '{closed}': the service's user may not search it"


async def test_a_root_swapped_for_a_link_to_slash_after_the_start_serves_nothing_and_is_unhealthy(
    tmp_path: Path,
) -> None:
    # Helper 55: the start's check was the only one, and the root is resolved at every request.
    photos = tmp_path / "photos"
    write_tree(photos / "etc", {"a.jpg": b"a"})  # an album named etc, as a CMS may name one
    root = tmp_path / "root"
    root.symlink_to(photos)
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(root)]
    async with launched(command) as server, httpx.AsyncClient(verify=CLIENT_TLS, base_url=server.url) as client:
        assert (await client.get("/archive/etc/")).status_code == 200
        swapped = tmp_path / "swapped"
        swapped.symlink_to("/")
        swapped.replace(root)
        answer = await client.get("/archive/etc/")
        health = await client.get("/healthz")
    assert answer.status_code == 500 and b"passwd" not in answer.content
    assert (health.status_code, health.json()["storage"]) == (503, False)
    assert b"the storage directory is /: its folders are not served" in server.output


async def test_flags_win_over_bad_variables() -> None:
    # Helper 52: a bad value in a variable stopped the start even with its flag given, and --help.
    bad = {"ARCHIVER_DELAY": "99", "ARCHIVER_COMPRESSION": "12", "ARCHIVER_PORT": "abc", "ARCHIVER_DIR": ""}
    helped = subprocess.run(
        [sys.executable, "-m", "archiver", "--help"], capture_output=True, text=True, cwd=PROJECT, env=os.environ | bad
    )
    assert helped.returncode == 0 and "ARCHIVER_PORT" in helped.stdout
    command = [sys.executable, "-m", "archiver", "-d", "0", "--compression", "0", "-P", "0", "-H", "127.0.0.1"]
    async with launched(command, bad) as server:
        await check_serves_sample_album(server.url)
    # Left to the variable, a bad value is still refused.
    unflagged = subprocess.run(
        [sys.executable, "-m", "archiver", "-P", "0", "--compression", "0"],
        capture_output=True,
        text=True,
        cwd=PROJECT,
        env=os.environ | bad,
    )
    refusal = "archiver: -d/--delay or ARCHIVER_DELAY must be 0..60 seconds, not 99.0"
    assert (unflagged.returncode, unflagged.stderr.strip()) == (1, refusal)


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=PROJECT)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"archiver: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "Traceback" not in result.stderr


def test_no_thread_to_look_at_the_storage_at_start_is_one_line() -> None:
    # At the tasks' limit (TasksMax, ulimit -u) the start's look at the storage root raised
    # RuntimeError: a traceback.  Run as nobody (the limit does not bind root) with a limit of one
    # task, its own; everything imported first (the interpreter may live where nobody cannot read).
    program = (
        "import encodings.cp1251, os, resource, sys\n"
        "from archiver import cli\n"
        "if os.geteuid() == 0: os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))\n"
        "cli.main(['-D', '/tmp', '-H', '127.0.0.1', '-P', '0'])\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30, cwd=PROJECT)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "archiver: cannot look at the storage directory '/tmp': no thread could be started (can't start new thread)"
    )


def test_a_port_taken_between_the_check_and_the_bind_is_one_line() -> None:
    # Helper 52: two starts on one port at once both passed the early check, and one ended with a
    # CRITICAL traceback and exit 70.  The port is taken here just after the check, as the other did.
    port = free_port()
    program = (
        "import socket\n"
        "from archiver import cli\n"
        "served, taken = cli.serve, []\n"
        "async def serve(*args, **kwargs):\n"
        f"    taken.append(socket.create_server(('127.0.0.1', {port})))\n"
        "    return await served(*args, **kwargs)\n"
        "cli.serve = serve\n"
        f"cli.main(['-H', '127.0.0.1', '-P', '{port}'])\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30, cwd=PROJECT)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"archiver: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "arguments, environment, message",
    [
        (["-D", "/nonexistent/storage"], {}, "does not exist"),
        # Helper 52: the working directory (the checkout) was served, and / (with /etc) as root.
        (["-D", ""], {}, "argument -D/--dir: the storage directory must not be empty"),
        (["-D", "/"], {}, "is / (each folder in it would be served as an album)"),
        # Helper 196: '-H ""' (a variable left unset) listened on every address, "serving ... on :8080".
        (["-H", "", "-P", "0"], {}, "argument -H/--host: the address to listen on must not be empty"),
        ([], {"ARCHIVER_DIR": "/tmp/.."}, "is / (each folder in it would be served as an album)"),
        # Helper 53: abspath keeps "//", which is / to Linux; and a link to / is / too.
        (["-D", "//"], {}, "is / (each folder in it would be served as an album)"),
        ([], {"ARCHIVER_DIR": "//etc/.."}, "is / (each folder in it would be served as an album)"),
        (["-D", "/proc/self/root"], {}, "is / (each folder in it would be served as an album)"),
        (["--compression", "12"], {}, "invalid choice"),
        # Helper 74: the flags took what int() and float() take ("18_475", a full-width digit).
        (["-P", "18_475"], {}, "argument -P/--port: invalid integer value: '18_475'"),
        # A setting is named as it is given, not as its field (helper 74: "max_jobs must be positive").
        ([], {"ARCHIVER_MAX_JOBS": "0"}, "archiver: ARCHIVER_MAX_JOBS must be at least 1, not 0"),
        ([], {"ARCHIVER_CHUNK_SIZE": "0"}, "archiver: ARCHIVER_CHUNK_SIZE must be 1..16777216 bytes, not 0"),
        # Not this host's address: one line, not the fatal error's traceback (helper 34).
        (["-H", "192.0.2.1", "-P", "0"], {}, "archiver: cannot listen on 192.0.2.1:0: Cannot assign requested address"),
    ],
)
def test_bad_settings_fail_fast_with_a_message(arguments: list[str], environment: dict[str, str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "archiver", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT,
        env={**os.environ, **environment},
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


async def test_hypercorn_workers_serve_with_a_launcher_each_and_stop_leaving_no_process() -> None:
    # One process a core (README, Deploying; the benchmark's "Hypercorn workers"): each worker
    # is a whole service, with its own spawner and launcher, and a stop ends them all.
    command, env = launch_command(WORKERS_LAUNCH, 0, grace=5)
    # Eight downloads at once from one client: a worker given five of them under load refused one
    # at the per-client cap (4), each worker counting its own.
    env |= {"ARCHIVER_DIR": "data", "ARCHIVER_MAX_JOBS_PER_CLIENT": "8"}
    async with launched(command, env) as server:
        master = server.process.pid
        # Each worker starts its own spawner (a child of its own: no worker leans on another's) and launcher.
        workers = await worker_pids(master)
        assert {parent_pid(worker) for worker in workers} == {master}
        with trio.fail_after(30):
            while len(launcher_processes(master)) < 2:
                await trio.sleep(0.05)
        helpers = spawner_processes(master) + launcher_processes(master)
        expected = files_on_disk(PROJECT / "data" / SAMPLE_ALBUM)

        async def download() -> None:
            async with make_client(server.url, "HTTP/1.1") as client:
                response = await client.get(f"/archive/{SAMPLE_ALBUM}/")
            assert response.status_code == 200
            assert read_archive(response.content) == expected

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(download)
        # The service's lines say which worker wrote them, as Hypercorn's do.
        served = [pid for pid in workers if f"[{pid}] INFO archiver.web.download: download".encode() in server.output]
        assert served
        server.process.terminate()
        with trio.fail_after(15):
            assert await server.process.wait() == 0
    for pid in workers:
        assert process_state(pid) is None  # reaped by Hypercorn's master
    for process in helpers:
        # Exited: a launcher outlives its spawner by a moment, and is then init's to reap.
        assert process_state(process.pid) in (None, "Z")


# The launch ways: the console script, Hypercorn with hypercorn.toml, and the same with two worker processes.
WORKERS_LAUNCH = "hypercorn workers"


def launch_command(launch: str, port: int, grace: int) -> tuple[list[str], dict[str, str]]:
    """The command line (and environment) of one launch way, with a shutdown grace period."""
    if launch == "archiver":
        command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", str(port)]
        return command, {"ARCHIVER_SHUTDOWN_GRACE": str(grace)}
    hypercorn = str(Path(sys.executable).with_name("hypercorn"))
    bind = f"127.0.0.1:{port}"
    command = [hypercorn, "--config", "hypercorn.toml", "--bind", bind, "--graceful-timeout", str(grace)]
    if launch == WORKERS_LAUNCH:
        command += ["--workers", "2"]
    return [*command, "archiver.asgi:app"], {}


async def worker_pids(master: int) -> set[int]:
    """The worker processes of a Hypercorn master (``--workers``), once each has started its spawner."""
    with trio.fail_after(30):
        while len(workers := {parent_pid(spawner.pid) for spawner in spawner_processes(master)}) < 2:
            await trio.sleep(0.05)
    return workers


def slow_album(tmp_path: Path) -> dict[str, str]:
    """Storage with a 3 MB album (more than the producer's pipe holds) and settings that send it in 64 KiB chunks."""
    (tmp_path / "storage" / "album").mkdir(parents=True)
    (tmp_path / "storage" / "album" / "photo.jpg").write_bytes(os.urandom(3 * 1024 * 1024))
    return {"ARCHIVER_DIR": str(tmp_path / "storage"), "ARCHIVER_CHUNK_SIZE": "65536"}


@pytest.mark.parametrize(
    ("stop", "signals"),
    [(signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGINT, 2), (signal.SIGHUP, 2)],
    ids=["SIGTERM once", "SIGTERM twice", "SIGINT twice", "SIGHUP twice"],
)
@pytest.mark.parametrize("launch", ["archiver", "hypercorn"])
async def test_shutdown_lets_downloads_finish_within_grace(
    tmp_path: Path, launch: str, stop: signal.Signals, signals: int
) -> None:
    # Twice: a second signal during the grace period (a supervisor's repeat, a second Ctrl-C; with
    # workers, Hypercorn's master sends a SIGTERM after its shutdown event) is ignored.  SIGINT and
    # SIGHUP under the hypercorn launch were a KeyboardInterrupt and an instant end (helper 34).
    command, env = launch_command(launch, 0, grace=10)
    env |= slow_album(tmp_path) | {"ARCHIVER_DELAY": "0.02"}
    async with launched(command, env) as server:
        async with make_client(server.url, "HTTP/1.1") as client, client.stream("GET", "/archive/album/") as response:
            chunks = response.aiter_raw()
            received = [await anext(chunks)]
            server.process.send_signal(stop)
            if signals == 2:
                with trio.fail_after(5):
                    while f"received {stop.name}".encode() not in server.output:
                        await trio.sleep(0.01)
                server.process.send_signal(stop)
            received += [chunk async for chunk in chunks]
        assert read_archive(b"".join(received))["photo.jpg"] == (tmp_path / "storage/album/photo.jpg").read_bytes()
        # The client has closed its connection: nothing holds the server for the rest of the grace.
        with trio.fail_after(5):
            assert await server.process.wait() == 0


async def test_a_stop_after_an_http2_client_was_cut_for_stalling_does_not_wait_out_the_grace(tmp_path: Path) -> None:
    # Helper 47: a client that opens HTTP/2 downloads with a wide window and never reads is cut at
    # the stall timeout; a stream whose response start the stall had cut left its task waiting for
    # ever on the closed connection, and a SIGTERM on the idle service waited out the grace period.
    write_tree(tmp_path / "storage" / "album", {f"{index}.jpg": os.urandom(4 << 20) for index in range(6)})
    command, env = launch_command("archiver", 0, grace=60)
    env |= {"ARCHIVER_DIR": str(tmp_path / "storage"), "ARCHIVER_STALL_TIMEOUT": "1"}
    async with launched(command, env) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        connection.increment_flow_control_window(2**30)
        for stream_id in (1, 3, 5, 7):
            request = [(":method", "GET"), (":path", "/archive/album/"), (":scheme", "http"), (":authority", "x")]
            connection.send_headers(stream_id, request, end_stream=True)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(connection.data_to_send())
        client_port = stream.socket.getsockname()[1]
        with trio.fail_after(30):  # not read until the service has closed it (its socket writes stalled)
            while not _closed_by_the_server(int(port), client_port):
                await trio.sleep(0.05)
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some(1 << 20):
                    pass
        await stream.aclose()
        server.process.terminate()
        with trio.fail_after(15):  # the grace is 60 s: nothing is in flight to wait for
            assert await server.process.wait() == 0


def _closed_by_the_server(server_port: int, client_port: int) -> bool:
    """Whether the server closed its end of a local IPv4 TCP connection (its FIN may wait behind unread data)."""
    established = "01"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
        if (local, remote) == (server_port, client_port):
            return fields[3] != established
    return True


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("launch", ["archiver", "hypercorn"])
async def test_shutdown_aborts_downloads_past_grace_and_leaves_no_producer(
    tmp_path: Path, launch: str, protocol: str
) -> None:
    command, env = launch_command(launch, 0, grace=1)
    env |= slow_album(tmp_path) | {"ARCHIVER_DELAY": "1"}
    async with launched(command, env) as server, make_client(server.url, protocol) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async with client.stream("GET", "/archive/album/") as response:
                chunks = response.aiter_raw()
                await anext(chunks)
                producers = [child.pid for child in producer_processes(server.process.pid)]
                assert len(producers) == 1
                server.process.terminate()
                async for _ in chunks:
                    pass
        with trio.fail_after(10):
            assert await server.process.wait() == 0
    # Gone, not only dying: a killed producer may be its launcher's zombie for a moment after the
    # service's exit (helper 105: looked at once, that could fail).
    with trio.fail_after(10):
        while any(Path(f"/proc/{pid}").exists() for pid in producers):
            await trio.sleep(0.01)
    # Logged as what it was, not as the client leaving.
    cut = re.search(rb"download album for 127.0.0.1: cancelled during shutdown, (\d+) bytes sent", server.output)
    assert cut is not None
    # And one access line, with the status that went out and the same bytes: over HTTP/2 too, which the
    # README said had none since helper 32 (helper 196 found it written, at the INFO line's count).
    access = re.findall(rb'"GET /archive/album/ [\d.]+" (\d+) (\S+)', server.output)
    assert access == [(b"200", cut.group(1))]


@pytest.mark.parametrize(
    ("grace", "said"), [("0.5", b"downloads get 0.5 s to finish"), ("inf", b"downloads get as long as they take")]
)
async def test_the_stop_line_says_the_grace_period_as_it_is_set(grace: str, said: bytes) -> None:
    # Helper 196: it said "get 0 s to finish" for ARCHIVER_SHUTDOWN_GRACE=0.5, and "get inf s" for inf.
    command, env = launch_command("archiver", 0, grace=1)
    async with launched(command, env | {"ARCHIVER_SHUTDOWN_GRACE": grace}) as server:
        server.process.terminate()
        with trio.fail_after(15):
            assert await server.process.wait() == 0
    assert said in server.output


# Stands for any fatal error in the server itself (not in one connection, which
# costs only that connection): the accept loop fails at its first connection.
INJECTED_FAILURE = """
import runpy, sys, trio
async def failing_serve_listeners(handler, listeners, **kwargs):
    await listeners[0].accept()
    raise RuntimeError("injected fatal error")
trio.serve_listeners = failing_serve_listeners
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("launch", ["archiver", "hypercorn"])
async def test_fatal_error_exits_non_zero_and_says_so(launch: str) -> None:
    command, env = launch_command(launch, 0, grace=1)
    module = "archiver" if launch == "archiver" else "hypercorn"
    arguments = command[3:] if launch == "archiver" else command[1:]
    injected = [sys.executable, "-c", INJECTED_FAILURE, module, *arguments]
    async with launched(injected, env | {"ARCHIVER_DIR": str(PROJECT / "data")}) as server:
        with pytest.raises(httpx.TransportError):
            async with make_client(server.url, "HTTP/1.1") as client:
                await client.get("/healthz")
        with trio.fail_after(15):
            status = await server.process.wait()
    assert status != 0  # systemd's Restart= and any supervisor see a failure
    assert b"injected fatal error" in server.output


def test_systemd_unit_restarts_whatever_the_exit_status() -> None:
    unit = (PROJECT / "deploy" / "archiver@.service").read_text()
    assert "\nRestart=always\n" in unit
    assert "\nRestartSec=2\n" in unit
    # A stop's SIGTERM to the service alone: producers killed with it would cut every download in flight.
    assert "\nKillMode=mixed\n" in unit


def test_ctrl_c_during_archiver_index_ends_it_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by helper 46: Ctrl-C printed a KeyboardInterrupt traceback. (SIGINT raises it wherever
    # the index is; a stand-in raises it at once.)
    from archiver import cli

    def interrupted(argv: Sequence[str]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "index_albums", interrupted)
    with pytest.raises(SystemExit) as exited:
        cli.main(["index"])
    assert exited.value.code == 130
    assert capsys.readouterr().err.strip() == "archiver index: interrupted"


def test_ctrl_c_while_the_cli_loads_ends_it_without_a_traceback() -> None:
    # Helper 47: a SIGINT in the first ~0.5 s (importing Trio and Quart) printed a traceback.
    # Here the interrupt comes as quart is imported, as a Ctrl-C then would.
    interrupted_import = (
        "import builtins, runpy, sys\n"
        "real = builtins.__import__\n"
        "def importing(name, *args, **kwargs):\n"
        "    if name == 'quart':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = importing\n"
        "sys.argv = ['archiver', 'index']\n"
        "runpy.run_module('archiver', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", interrupted_import], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "")


# Under the hypercorn launch a stop signal comes as the app's modules load: Hypercorn listens
# on its port before it imports the app, for ~0.3 s before the app's lifespan can take a signal.
SIGNALLED_WHILE_LOADING = """
import importlib.abc, os, runpy, signal, sys
class SignalAtImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{stop})
        return None
sys.meta_path.insert(0, SignalAtImport())
sys.argv = sys.argv[1:]
runpy.run_module("hypercorn", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "stop, module",
    [
        (signal.SIGTERM, "quart"),
        (signal.SIGINT, "quart"),
        (signal.SIGHUP, "quart"),
        # Imported by the app before the first hold (9f1bc56): still a kill (helper 49).
        (signal.SIGTERM, "archiver.fences.hypercorn_tcp"),
    ],
    ids=lambda value: value.name if isinstance(value, signal.Signals) else value,
)
async def test_a_stop_signal_while_the_app_loads_is_a_graceful_stop(stop: signal.Signals, module: str) -> None:
    # A hostile review (issue 23): a SIGTERM in that window killed the process at its default.
    command, env = launch_command("hypercorn", 0, grace=1)
    program = SIGNALLED_WHILE_LOADING.format(stop=stop.name, module=module)
    signalled = [sys.executable, "-c", program, "hypercorn", *command[1:]]
    await _stops_gracefully_on(stop, signalled, env)


async def _stops_gracefully_on(stop: signal.Signals, command: list[str], env: dict[str, str]) -> None:
    """Launch ``command`` (which signals itself with ``stop`` as it starts): it serves, then stops gracefully."""
    async with launched(command, env | {"ARCHIVER_DIR": str(PROJECT / "data")}) as server:
        with trio.fail_after(15):
            status = await server.process.wait()
    assert status == 0
    assert f"received {stop.name}".encode() in server.output
    assert b"Traceback" not in server.output


# Under the CLI launch Hypercorn listens once the app is made (a look at the storage root) and has
# started (the launcher): a stop signal comes at one of those.
SIGNALLED_WHILE_STARTING = """
import os, runpy, signal, sys
from archiver.archive import launcher
from archiver.web import app as web_app
checking, opening = web_app.check_storage_root, launcher.Launcher.open.__func__
def check_signalled(*args):
    os.kill(os.getpid(), signal.{stop})
    return checking(*args)
async def open_signalled(cls):
    os.kill(os.getpid(), signal.{stop})
    return await opening(cls)
if {moment!r} == "storage look":
    web_app.check_storage_root = check_signalled
else:
    launcher.Launcher.open = classmethod(open_signalled)
sys.argv = ["archiver", *sys.argv[1:]]
runpy.run_module("archiver", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "stop, moment",
    [
        (signal.SIGTERM, "spawner start"),
        (signal.SIGINT, "spawner start"),
        (signal.SIGHUP, "spawner start"),
        (signal.SIGTERM, "storage look"),  # helper 50: before the first hold
        (signal.SIGINT, "storage look"),
    ],
    ids=lambda value: value.name if isinstance(value, signal.Signals) else value,
)
async def test_a_stop_signal_while_the_cli_starts_the_app_is_a_graceful_stop(stop: signal.Signals, moment: str) -> None:
    # Helper 49: a SIGTERM then killed the process, a SIGINT was a KeyboardInterrupt traceback.
    command, env = launch_command("archiver", 0, grace=1)
    program = SIGNALLED_WHILE_STARTING.format(stop=stop.name, moment=moment)
    signalled = [sys.executable, "-c", program, *command[3:]]
    await _stops_gracefully_on(stop, signalled, env)


@pytest.mark.parametrize("launch", ["archiver", "hypercorn"])
async def test_a_signal_to_the_service_s_process_group_cannot_reach_its_spawner_or_launcher(launch: str) -> None:
    # Helper 49: a terminal's Ctrl-C or hang-up, or kill -- -PGID, reaches the whole group; one that
    # came as the spawner started, before its Python had set these signals ignored, killed it, and
    # the service's start failed (exit 1, a traceback).  Their own group is out of its reach.
    command, env = launch_command(launch, 0, grace=1)
    async with launched(command, env | {"ARCHIVER_DIR": str(PROJECT / "data")}) as server:
        helpers = spawner_processes(server.process.pid) + launcher_processes(server.process.pid)
        assert len(helpers) == 2
        for helper in helpers:
            assert os.getpgid(helper.pid) != os.getpgid(server.process.pid)


@pytest.mark.parametrize("launch", ["archiver", "hypercorn"])
async def test_a_log_reader_that_stops_reading_stops_no_download(tmp_path: Path, launch: str) -> None:
    # Helper 155: every log line is a write to stdout or stderr from the event loop's thread; with
    # the pipe unread (a container's log driver in blocking mode, a stalled journald), the 224th
    # request froze the service, /healthz too.  Lines past what is held are left out, and said so.
    storage = tmp_path / "storage"
    files = {"photo.jpg": os.urandom(2_000_000)}
    write_tree(storage / "album", files)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # full after a few lines
    env = {**os.environ, "ARCHIVER_VERBOSE": "1", "ARCHIVER_DIR": str(storage), "ARCHIVER_CHUNK_SIZE": "4096"}
    if launch == "archiver":
        command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0"]
    else:
        command = [
            *(str(Path(sys.executable).parent / "hypercorn"), "--config", "hypercorn.toml"),
            *("--bind", "127.0.0.1:0", "archiver.asgi:app"),
        ]
    process = await trio.lowlevel.open_process(
        command, cwd=PROJECT, env=env, stdout=write_end, stderr=write_end, start_new_session=True
    )
    os.close(write_end)
    log = trio.lowlevel.FdStream(read_end)
    try:
        output = b""
        with trio.fail_after(30):
            while not (match := re.search(rb"Running on (http://\S+)", output)):
                data = await log.receive_some()
                assert data, output.decode()
                output += data
        # From here nobody reads the log: every chunk's DEBUG line (~75 KB a download) and every
        # access line go unread, past what is held (logs.DETACHED_LIMIT, 1 MiB).
        async with httpx.AsyncClient(base_url=match.group(1).decode(), timeout=10) as client:
            with trio.fail_after(60):
                for _ in range(30):
                    response = await client.get("/archive/album/")
                    assert response.status_code == 200 and read_archive(response.content) == files
                assert (await client.get("/healthz")).status_code == 200
        with trio.fail_after(30):
            while b"log lines left out: more than 1 MiB waited to be written" not in output:
                data = await log.receive_some()
                assert data, "the log ended without saying lines were left out"
                output += data
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while data := await log.receive_some():  # read on: the stop's lines are written before the exit
                output += data
            assert await process.wait() == 0
        assert b"stopped" in output.splitlines()[-1] or launch == "hypercorn"
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await log.aclose()


def _launch_command(launch: str) -> list[str]:
    """The service on a port of the kernel's choice, launched as ``archiver`` or by Hypercorn (ARCHIVER_DIR)."""
    if launch == "archiver":
        return [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0"]
    return [
        *(str(Path(sys.executable).parent / "hypercorn"), "--config", "hypercorn.toml"),
        *("--bind", "127.0.0.1:0", "archiver.asgi:app"),
    ]


@pytest.mark.parametrize("launch", ["archiver", "hypercorn"])
async def test_a_log_line_the_stream_s_encoding_cannot_hold_is_written_escaped(launch: str) -> None:
    # A stream whose encoding lacks a character of a line (PYTHONIOENCODING=ascii, a KOI8-R or
    # Latin-1 locale): the access line of a request for an album named in Cyrillic.  The writer
    # thread's write raised UnicodeEncodeError, and every line of its batch was lost (helper 157's
    # fix, untested until helper 169 found it by coverage: with it taken out, the 404's line is missing).
    env = {"PYTHONIOENCODING": "ascii", "ARCHIVER_DIR": "data"}
    async with (
        launched(_launch_command(launch), env) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        assert (await client.get("/archive/%D0%A4%D0%BE%D1%82%D0%BE/")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200
        with trio.fail_after(10):
            while b"GET /healthz" not in server.output:  # written after the 404's line
                await trio.sleep(0.05)
    assert b'"GET /archive/\\u0424\\u043e\\u0442\\u043e/ 1.1" 404' in server.output, server.output.decode()


async def test_a_log_reader_that_is_gone_stops_no_download_and_no_stop(tmp_path: Path) -> None:
    # The log's pipe closed by its reader (a journald or log shipper restarted, `| head`): each
    # write fails with EPIPE in the writer thread (logs.DetachedStream), and nothing else notices.
    # Untested until helper 169 (coverage): with the EPIPE not caught, the stop took 4.1 s.
    storage = tmp_path / "storage"
    files = {"photo.jpg": os.urandom(2_000_000)}
    write_tree(storage / "album", files)
    read_end, write_end = os.pipe()
    env = {**os.environ, "ARCHIVER_VERBOSE": "1", "ARCHIVER_DIR": str(storage)}
    process = await trio.lowlevel.open_process(
        _launch_command("archiver"), cwd=PROJECT, env=env, stdout=write_end, stderr=write_end, start_new_session=True
    )
    os.close(write_end)
    try:
        output = b""
        with trio.fail_after(30):
            async with trio.lowlevel.FdStream(read_end) as log:  # closed once the service listens
                while not (match := re.search(rb"Running on (http://\S+)", output)):
                    data = await log.receive_some()
                    assert data, output.decode()
                    output += data
        async with httpx.AsyncClient(base_url=match.group(1).decode(), timeout=10) as client:
            with trio.fail_after(60):
                for _ in range(5):
                    response = await client.get("/archive/album/")
                    assert response.status_code == 200 and read_archive(response.content) == files
                assert (await client.get("/healthz")).status_code == 200
        stopping = trio.current_time()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
        # ~0.1 s; a writer thread that had died of the EPIPE held the exit for its drain (EXIT_DRAIN a stream).
        assert trio.current_time() - stopping < EXIT_DRAIN
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
