"""Hostile and careless clients, each against a real server process: every resource they hold is bounded.

Each test reproduces one way a single cheap client took the service over
(README, Limits and abuse), with a real client speaking raw HTTP/2 (python
``h2``) or raw HTTP/1.1 over a socket, and asserts the bound: the server's
resident memory, its producer processes, its descriptors, and a normal client's
download completing during and after the attack.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import socket
import struct
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import trio
import trio.testing
from hypercorn.events import Event
from hypercorn.trio.tcp_server import TCPServer

from archiver.config import Settings
from archiver.fences.hypercorn_h2_send import SEND_BATCH
from archiver.fences.hypercorn_tcp import LIMITS
from archiver.web.limits import RECLAIM_WAIT

from .conftest import (
    CLIENT_TLS,
    PROTOCOLS,
    files_on_disk,
    launcher_processes,
    make_client,
    process_state,
    producer_processes,
    read_archive,
    record_figure,
    running_server,
    spawner_processes,
    write_tree,
)
from .test_cli import WORKERS_LAUNCH, Launched, launch_command, launched, worker_pids
from .test_observability import samples
from .test_stress import resident_kib

MB = 1024 * 1024


@pytest.fixture(scope="module")
def attacked_storage(large_storage: Path) -> Path:
    """The large album, and a small one a normal client downloads meanwhile."""
    write_tree(large_storage / "small", {"photo.jpg": os.urandom(200_000), "notes.txt": b"notes"})
    return large_storage


@asynccontextmanager
async def archiver_process(storage: Path, **settings: str) -> AsyncIterator[Launched]:
    """``python -m archiver`` on a free loopback port, with ARCHIVER_* ``settings``."""
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(storage)]
    env = {f"ARCHIVER_{name.upper()}": value for name, value in settings.items()}
    async with launched(command, env) as server:
        yield server


def address_of(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# The attackers connect from 127.0.0.1; a polite client from another loopback
# address is another client to the service (its per-client job cap).
POLITE_ADDRESS = "127.0.0.2"


def polite_client(url: str, protocol: str = "HTTP/1.1", address: str = POLITE_ADDRESS) -> httpx.AsyncClient:
    http2 = protocol == "HTTP/2"
    transport = httpx.AsyncHTTPTransport(verify=CLIENT_TLS, http1=not http2, http2=http2, local_address=address)
    return httpx.AsyncClient(verify=CLIENT_TLS, base_url=url, transport=transport, timeout=30)


async def normal_download_works(
    url: str, storage: Path, protocol: str = "HTTP/1.1", address: str = POLITE_ADDRESS
) -> None:
    """A polite client, from an address of its own, gets the small album, whole and correct."""
    async with polite_client(url, protocol, address) as client:
        response = await client.get("/archive/small/")
    assert response.status_code == 200
    assert read_archive(response.content) == files_on_disk(storage / "small")


async def wait_for_producer_output_to_stop(pid: int, timeout: float = 30) -> int:
    """Wait until the server's producers have written nothing for a while (backed up behind the client); their count."""
    quiet_for = 0
    last = -1
    with trio.fail_after(timeout):
        while quiet_for < 5:
            written = sum(_bytes_written(child.pid) for child in producer_processes(pid))
            quiet_for = quiet_for + 1 if written == last else 0
            last = written
            await trio.sleep(0.1)
    return len(producer_processes(pid))


def _bytes_written(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass  # exited meanwhile
    return 0


class RawH2Client:
    """An HTTP/2 client over a plain socket that does exactly what it is told, and nothing else.

    It never sends WINDOW_UPDATE (h2 leaves acknowledging received data to its
    user), so the server may send only the initial 65,535-byte windows.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.received: dict[int, int] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()

    async def start(self) -> None:
        self.connection.initiate_connection()
        await self.flush()

    async def get(self, path: str, *extra_headers: tuple[str, str]) -> int:
        stream_id = self.connection.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", path), *extra_headers]
        self.connection.send_headers(stream_id, headers, end_stream=True)
        await self.flush()
        self.received[stream_id] = 0
        return stream_id

    async def flush(self) -> None:
        if data := self.connection.data_to_send():
            await self.stream.send_all(data)

    async def read_some(self) -> bool:
        """Read once, note what came (answering SETTINGS and PING, not flow control); False at the end."""
        data = await self.stream.receive_some(65536)
        for event in self.connection.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.received[event.stream_id] += len(event.data)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.reset.add(event.stream_id)
        await self.flush()
        return bool(data)

    async def read_until_quiet(self) -> None:
        """Read until the server sends nothing for 1 s, or closes."""
        while True:
            with trio.move_on_after(1):
                if await self.read_some():
                    continue
            return


async def socket_bound_h2_client(address: tuple[str, int]) -> RawH2Client:
    """A RawH2Client, its windows wide open and its socket taking 4 KiB: the socket is what holds the writes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await trio.to_thread.run_sync(sock.connect, address)
    attacker = RawH2Client(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    await attacker.start()
    attacker.connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    attacker.connection.increment_flow_control_window(2**30)
    return attacker


async def connect_from(local_address: str, address: tuple[str, int]) -> trio.SocketStream:
    """A TCP connection to ``address`` from the loopback address ``local_address`` (another client to the service)."""
    sock = trio.socket.socket()
    await sock.bind((local_address, 0))
    await sock.connect(address)
    return trio.SocketStream(sock)


async def test_http2_zero_window_buffers_a_batch_per_stream(attacked_storage: Path) -> None:
    # Three clients (the per-client cap is 4), four streams each, none ever opening its window.
    clients = ("127.0.0.1", "127.0.0.3", "127.0.0.4")
    streams = 4 * len(clients)
    async with archiver_process(attacked_storage) as server:
        pid = server.process.pid
        # Warm up (imports, worker threads, allocator arenas): a whole download of the large album.
        async with polite_client(server.url, "HTTP/2") as warm_up:
            assert (await warm_up.get("/archive/big/")).status_code == 200
        before = resident_kib(pid)
        attackers = [RawH2Client(await connect_from(local, address_of(server.url))) for local in clients]
        for attacker in attackers:
            await attacker.start()
            for _ in range(4):
                await attacker.get("/archive/big/")
        for attacker in attackers:
            await attacker.read_until_quiet()
        assert await wait_for_producer_output_to_stop(pid) == streams
        growth = (resident_kib(pid) - before) / 1024
        for attacker in attackers:
            # Each stream got the initial window and no more; none ended as if complete.
            assert sum(attacker.received.values()) <= 65535
            assert not attacker.ended
        await normal_download_works(server.url, attacked_storage, "HTTP/2")
        for attacker in attackers:
            await attacker.stream.aclose()
        with trio.fail_after(10):
            while producer_processes(pid):
                await trio.sleep(0.05)
    record_figure(
        f"HTTP/2 zero window, {streams} streams of a {album_mb(attacked_storage):.0f} MB album: "
        f"server RSS +{growth:.1f} MB ({growth / streams:.2f} MB a stream), producers backed up; producers gone after"
    )
    # Each stream: its buffer (a batch and a chunk at most), a chunk in the channel, one read
    # from the pipe waiting to go in: ~1.5 MiB of 512 KiB chunks, not the 72 MB album.
    assert growth < 3 * streams


def album_mb(storage: Path, album: str = "big") -> float:
    return sum(path.stat().st_size for path in (storage / album).iterdir()) / MB


async def metrics_of(url: str) -> dict[str, float]:
    async with polite_client(url) as client:
        return samples((await client.get("/metrics")).text)


async def open_non_reader(address: tuple[str, int], path: bytes, source: str | None = None) -> trio.socket.SocketType:
    """A client (from ``source``, an address) that asks for ``path`` with a tiny receive buffer, and never reads."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if source is not None:
        await sock.bind((source, 0))
    await sock.connect(address)
    await sock.send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


async def wait_until_no_producer(pid: int, timeout: float) -> float:
    """Wait until the server runs no producer; return how long that took."""
    started = trio.current_time()
    with trio.fail_after(timeout):
        while producer_processes(pid):
            await trio.sleep(0.05)
    return trio.current_time() - started


async def test_a_reclaimed_download_to_a_client_that_stopped_reading_gives_its_slot_at_once(
    attacked_storage: Path,
) -> None:
    # Helper 132: a write to a client that reads slowly is shielded, and a download whose job slot was
    # reclaimed held it until that write's stall deadline (~60 s): the newcomer was refused after 5 s.
    async with archiver_process(attacked_storage, max_jobs="3", max_jobs_per_client="1") as server:
        readers = []
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.3"):  # two above the reserve of one, then another's
            reader = await open_non_reader(address_of(server.url), b"/archive/big/", source)
            readers.append(reader)
            assert (await reader.recv(12)).startswith(b"HTTP/1.1 200")
        assert await wait_for_producer_output_to_stop(server.process.pid) == 3  # every write blocked
        with trio.fail_after(RECLAIM_WAIT - 1):  # refused at RECLAIM_WAIT before
            await normal_download_works(server.url, attacked_storage)
        victim = b""  # the heaviest client's newest download: cut, its connection closed
        with trio.fail_after(30):
            while data := await readers[1].recv(1 << 20):
                victim += data
        metrics = await metrics_of(server.url)
        for reader in readers:
            reader.close()
    head, _, body = victim.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert len(body) < int(fields[b"content-length"])
    assert metrics['archiver_downloads_finished_total{outcome="reclaimed"}'] == 1
    assert (metrics["archiver_downloads_in_flight"], metrics["archiver_largest_client_share"]) == (2, 1)
    assert b"download big for 127.0.0.1: reclaimed: every archive job was busy" in server.output


# A stress test (70 clients, a 10 s stall timeout: ~22 s); test_limits holds the fair share's bound in the default run.
@pytest.mark.slow
async def test_readers_that_never_read_hold_their_fair_share_until_the_stall_timeout(attacked_storage: Path) -> None:
    attackers = 70
    # 10 s: the 70 opens and the 20 polite downloads must all fit before the first non-reader's
    # stall (at 5 s a loaded CI machine took them past it: "stalled" counted 7 during the polite phase).
    async with archiver_process(attacked_storage, stall_timeout="10") as server:
        pid = server.process.pid
        statuses: Counter[bytes] = Counter()
        sockets = []
        for _ in range(attackers):
            sock = await open_non_reader(address_of(server.url), b"/archive/big/")
            statuses[(await sock.recv(12))[9:12]] += 1
            sockets.append(sock)
        # One client (one address) takes the slots above the reserve, 64 - 16, and no more.
        assert statuses == {b"200": 48, b"503": attackers - 48}
        assert await wait_for_producer_output_to_stop(pid) == 48
        held = await metrics_of(server.url)
        # Meanwhile 20 polite clients from 20 other addresses, ten at a time, are all served.
        polite_started = trio.current_time()
        for wave in range(2):
            async with trio.open_nursery() as nursery:
                for number in range(10):
                    address = f"127.0.0.{10 + 10 * wave + number}"
                    nursery.start_soon(normal_download_works, server.url, attacked_storage, "HTTP/1.1", address)
        polite_seconds = trio.current_time() - polite_started
        during = await metrics_of(server.url)
        stalled_for = await wait_until_no_producer(pid, timeout=30)
        metrics = await metrics_of(server.url)
        await normal_download_works(server.url, attacked_storage)
        for sock in sockets:
            sock.close()
    assert during['archiver_downloads_finished_total{outcome="stalled"}'] == 0  # the polite ones ran meanwhile
    assert (held["archiver_active_clients"], held["archiver_largest_client_share"]) == (1, 48)
    assert metrics['archiver_downloads_finished_total{outcome="stalled"}'] == 48
    assert metrics['archiver_downloads_finished_total{outcome="completed"}'] == 20
    assert metrics['archiver_downloads_rejected_total{reason="fair_share"}'] == attackers - 48
    assert metrics["archiver_downloads_in_flight"] == 0
    assert b"stalled: the client took less than 256 KiB in 10 s" in server.output
    # An expected abort is one line, without a traceback (issue 23).
    assert b"Traceback" not in server.output, server.output.decode(errors="replace")
    record_figure(
        f"{attackers} HTTP/1.1 non-readers from one address: 48 producers (its share), {attackers - 48} refused (503); "
        f"20 polite clients from 20 other addresses served meanwhile in {polite_seconds:.2f} s; "
        f"the 48 aborted as stalled {stalled_for:.1f} s after their output backed up (stall timeout 10 s)"
    )


# "small": the whole response is the tail that Hypercorn's end of body waits to send.
@pytest.mark.parametrize("album", ["big", "small"])
async def test_http2_stream_at_a_closed_window_is_reset_after_the_stall_timeout(
    attacked_storage: Path, album: str
) -> None:
    async with archiver_process(attacked_storage, stall_timeout="1") as server:
        attacker = RawH2Client(await trio.open_tcp_stream(*address_of(server.url)))
        await attacker.start()
        streams = {await attacker.get(f"/archive/{album}/") for _ in range(2)}
        with trio.fail_after(20):
            while attacker.reset != streams:
                await attacker.read_some()
        await wait_until_no_producer(server.process.pid, timeout=10)
        metrics = await metrics_of(server.url)
        await attacker.stream.aclose()
    assert not attacker.ended
    assert metrics['archiver_downloads_finished_total{outcome="stalled"}'] == 2


async def test_small_answers_held_at_a_closed_window_are_reset_and_their_connection_closes(
    attacked_storage: Path,
) -> None:
    # Helper 108: a 404 (98 bytes), the index page or /healthz to a client whose stream window is 0 could
    # never end, so its connection was never idle: it held a connection slot for ever, for 85 bytes.
    async with archiver_process(attacked_storage, stall_timeout="1") as server:
        attacker = RawH2Client(await trio.open_tcp_stream(*address_of(server.url)))
        attacker.connection.initiate_connection()
        attacker.connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        await attacker.flush()
        streams = {await attacker.get(path) for path in ("/archive/nope/", "/", "/healthz")}
        with trio.fail_after(30):  # reset after the stall timeout, closed after the keep-alive timeout (5 s)
            while await attacker.read_some():
                pass
        await normal_download_works(server.url, attacked_storage, "HTTP/2")
    assert attacker.reset == streams and not attacker.ended
    assert not any(attacker.received.values())


async def test_a_small_answer_cut_while_a_download_holds_the_socket_leaves_the_connection_usable(
    attacked_storage: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 110: an answer's bytes, once h2 has encoded them (its HPACK table moved on), must reach
    # the socket.  A /healthz whose deadline (the stall timeout) passed while it waited for the send
    # lock, which a download's write to a client that had stopped reading held, lost its HEADERS: the
    # client's HPACK table fell out of step, and the next answer on the connection could not be read.
    # In this process, on a clock that moves only when told: the answer's deadline passes while it
    # waits, the write's never does (helper 151: slept through in real time, a stall of ~3 s of a
    # loaded machine had the write cut at its own deadline, and the connection with it).  The
    # download's own wait for the server, begun at the same instant as the answer's, passes its
    # deadline too when its chunk is under 256 KiB: chunks of 64 KiB make that certain (before, a
    # producer behind on a loaded machine gave a short read, and the download's reset, which the
    # test did not expect, failed it in CI at d5d1753).
    stall_timeout = 4
    settings = Settings(
        settle_time=0,
        storage_dir=attacked_storage,
        host="127.0.0.1",
        port=0,
        stall_timeout=stall_timeout,
        chunk_size=64 * 1024,
    )
    connections: list[TCPServer] = []

    async def until(condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds with every task blocked (the clock stands still: no deadline passes)."""
        for _ in range(3000):  # ~30 s of real time at most: a condition never met is named, not a pytest timeout
            if condition():
                return
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        raise AssertionError(f"never met: {condition}")

    async with running_server(settings) as url:
        fenced_send = TCPServer.protocol_send  # hypercorn_tcp's, installed by the app

        async def noting_send(self: TCPServer, event: Event) -> None:
            if self not in connections:
                connections.append(self)
            await fenced_send(self, event)

        monkeypatch.setattr(TCPServer, "protocol_send", noting_send)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # before connect: a small window
        await sock.connect(address_of(url))
        client = RawH2Client(trio.SocketStream(sock))
        client.connection.initiate_connection()
        client.connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        client.connection.increment_flow_control_window(2**31 - 1 - 65535)
        download = await client.get("/archive/big/")
        # Its window shut until the server holds a whole batch for it: then one write of a batch (two
        # stall timeouts' worth, 512 KiB), which the socket cannot take, holds the send lock.
        await until(lambda: bool(connections) and buffered(connections[0], download) >= SEND_BATCH)
        client.connection.increment_flow_control_window(2**30, stream_id=download)
        await client.flush()
        lock = connections[0].send_lock
        await until(lock.locked)
        [write_ends] = [scope.deadline for scope, _ in LIMITS.writes]
        assert write_ends - trio.current_time() == pytest.approx(2 * stall_timeout)  # a batch: two stall timeouts
        small = await client.get("/healthz")
        await until(lambda: lock.statistics().tasks_waiting == 1)  # its HEADERS, encoded, wait for the lock
        mock_clock.jump(1.5 * stall_timeout)  # past the answer's deadline, not the write's
        mock_clock.autojump_threshold = 5  # if all waits 5 s (a hang, not this test's case): the next deadline
        while small not in client.ended | client.reset:
            assert await client.read_some(), "the connection ended"
        mock_clock.autojump_threshold, mock_clock.rate = math.inf, 1  # time runs again: no deadline matters now
        while download not in client.reset:  # stalled: a 64 KiB chunk's wait is one stall timeout
            assert await client.read_some(), "the connection ended"
        headers: list[tuple[bytes, bytes]] = []
        answer = await client.get("/healthz")
        client.connection.increment_flow_control_window(2**30, stream_id=answer)
        await client.flush()
        with trio.fail_after(20):
            while answer not in client.ended:
                data = await client.stream.receive_some(65536)
                assert data, "the connection ended"
                for event in client.connection.receive_data(data):  # h2 raises if its HPACK table is out of step
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == answer:
                        headers = list(event.headers)
                    elif isinstance(event, h2.events.StreamEnded):
                        client.ended.add(event.stream_id)
                await client.flush()
        await client.stream.aclose()
    assert small in client.reset  # cut at its deadline, after the bytes h2 had encoded went out
    assert (b":status", b"200") in headers and (b"content-type", b"application/json") in headers


def buffered(connection: TCPServer, stream_id: int) -> int:
    """Bytes the server holds for HTTP/2 stream ``stream_id`` of ``connection``, not yet written (0 before any)."""
    buffer = getattr(connection.protocol.protocol, "stream_buffers", {}).get(stream_id)
    return 0 if buffer is None else len(buffer.buffer)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_deflated_download_to_a_client_that_stops_reading_is_cut_at_the_stall_timeout(
    attacked_storage: Path, protocol: str
) -> None:
    # Deflate mode: chunked over HTTP/1.1 (no length), the producer's zlib output held a chunk behind.
    async with archiver_process(attacked_storage, stall_timeout="1", compression="6") as server:
        if protocol == "HTTP/1.1":
            sock = await open_non_reader(address_of(server.url), b"/archive/big/")
            head = await sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
            await wait_until_no_producer(server.process.pid, timeout=30)
            received = bytearray(head)
            with trio.fail_after(10):
                while data := await sock.recv(1 << 20):
                    received += data
            sock.close()
            assert not received.endswith(b"\r\n0\r\n\r\n"), "aborted, never ended as if complete"
        else:
            attacker = RawH2Client(await trio.open_tcp_stream(*address_of(server.url)))
            await attacker.start()
            stream = await attacker.get("/archive/big/")
            with trio.fail_after(30):
                while stream not in attacker.reset:
                    await attacker.read_some()
            await wait_until_no_producer(server.process.pid, timeout=10)
            await attacker.stream.aclose()
            assert not attacker.ended
        metrics = await metrics_of(server.url)
        await normal_download_works(server.url, attacked_storage, protocol)
    assert metrics['archiver_downloads_finished_total{outcome="stalled"}'] == 1
    assert metrics["archiver_downloads_in_flight"] == 0
    assert b"stalled: the client took less than 256 KiB in 1 s" in server.output


async def test_an_http2_connection_whose_write_stalled_is_closed_never_written_on(attacked_storage: Path) -> None:
    # hypercorn_tcp patch 1: a socket write cut at its deadline may have sent part of its bytes, and
    # HTTP/2's frames after it would be read from the middle of one.  The connection is closed at
    # once: what the client then reads are whole frames and the end, not the keep-alive timeout (5 s).
    async with archiver_process(attacked_storage, stall_timeout="1") as server:
        attacker = await socket_bound_h2_client(address_of(server.url))
        stream = await attacker.get("/archive/big/")  # and nothing read: the writes wait on the socket
        with trio.fail_after(30):  # stalled, or (under load, the socket's deadline first) the client gone
            while b"download big for 127.0.0.1: " not in server.output:
                await trio.sleep(0.05)
        with trio.fail_after(3), contextlib.suppress(trio.BrokenResourceError):  # closed, or reset
            while await attacker.read_some():  # h2 raises on a frame read from its middle
                pass
        await attacker.stream.aclose()
    assert stream not in attacker.ended


@pytest.fixture(params=["big", pytest.param("huge", marks=pytest.mark.slow)])
def ranged_album(request: pytest.FixtureRequest, attacked_storage: Path) -> str:
    """The large album, or (slow run) a 4 GB one of sparse files: ranges of the last file's last byte."""
    if request.param == "huge":
        for index in range(4):
            path = attacked_storage / "huge" / f"video-{index}.mp4"
            path.parent.mkdir(exist_ok=True)
            with path.open("wb") as file:
                file.truncate(1 << 30)
    return str(request.param)


async def test_ranges_from_one_client_run_at_most_its_job_cap(attacked_storage: Path, ranged_album: str) -> None:
    requests = 64
    statuses: list[int] = []
    peak_producers = 0
    polite_seconds = 0.0
    async with archiver_process(attacked_storage) as server:
        pid = server.process.pid
        done = trio.Event()
        async with polite_client(server.url) as client:
            # Once the costliest byte (zip read all the last file for it); now one sendfile at its offset.
            end_record = (await client.get(f"/archive/{ranged_album}/", headers={"Range": "bytes=-22"})).content
            last_data_byte = int.from_bytes(end_record[16:20], "little") - 1
        # What that byte must be: the last byte of the album's last file (in byte order of its path).
        last_file = max((p for p in (attacked_storage / ranged_album).rglob("*") if p.is_file()), key=os.fsencode)
        with last_file.open("rb") as file:
            file.seek(-1, os.SEEK_END)
            expected_byte = file.read(1)

        async def watch_producers() -> None:
            nonlocal peak_producers
            while not done.is_set():
                peak_producers = max(peak_producers, len(producer_processes(pid)))
                await trio.sleep(0.005)

        async def last_byte(client: httpx.AsyncClient) -> None:
            byte_range = f"bytes={last_data_byte}-{last_data_byte}"
            response = await client.get(f"/archive/{ranged_album}/", headers={"Range": byte_range})
            statuses.append(response.status_code)
            assert response.status_code in (206, 503)
            if response.status_code == 206:  # helper 105: its length was all this looked at
                assert response.content == expected_byte

        limits = httpx.Limits(max_connections=requests)
        async with (
            httpx.AsyncClient(verify=CLIENT_TLS, base_url=server.url, limits=limits, timeout=60) as attacker,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(watch_producers)
            async with trio.open_nursery() as requests_nursery:
                for _ in range(requests):
                    requests_nursery.start_soon(last_byte, attacker)
                polite_started = trio.current_time()
                await normal_download_works(server.url, attacked_storage)
                polite_seconds = trio.current_time() - polite_started
            done.set()
        metrics = await metrics_of(server.url)
    # The attacker's ranges at once (ARCHIVER_MAX_JOBS_PER_CLIENT), and the polite client's.
    assert peak_producers <= 4 + 1
    # The cap is shown at work by the huge album (the slow run): here a range of one byte ends
    # within a few ms, and whether any meets another's job is the machine's timing.
    if ranged_album == "huge":  # each range holds its job ~2 s: the cap must turn some away
        assert statuses.count(503) > 0
    # Refused by its range cap, or by its walk queue: each 503 is counted once, by reason.
    refused = sum(
        metrics[f'archiver_downloads_rejected_total{{reason="{reason}"}}'] for reason in ("range_limit", "walk_limit")
    )
    assert refused == statuses.count(503)
    record_figure(
        f"{requests} concurrent ranges of the last file's last byte on the "
        f"{album_mb(attacked_storage, ranged_album):.0f} MB album "
        f"from one address: at most {peak_producers} producers at once, {statuses.count(206)} served, "
        f"{statuses.count(503)} refused (503); another client's download took {polite_seconds:.2f} s meanwhile"
    )


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def idle_http2_connection(address: tuple[str, int]) -> trio.SocketStream:
    """A connection that sends the HTTP/2 preface and SETTINGS, and then nothing."""
    stream = await trio.open_tcp_stream(*address)
    client = RawH2Client(stream)
    await client.start()
    return stream


async def wait_for_close(stream: trio.SocketStream) -> None:
    """Read (and drop) what the server sends until it closes the connection."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass  # reset: closed too
    await stream.aclose()


@pytest.mark.parametrize(
    "descriptors, max_jobs, connections",
    [
        (256, 8, 400),
        # The measurement in the issue: 1,100 idle connections under systemd's default limit.
        pytest.param(1024, 64, 1100, marks=pytest.mark.slow),
    ],
)
async def test_idle_http2_flood_is_closed_and_leaves_descriptors_for_downloads(
    attacked_storage: Path, descriptors: int, max_jobs: int, connections: int
) -> None:
    port = 0  # the kernel's choice: the URL is read from the "Running on" line
    # The server under a descriptor limit, as systemd's LimitNOFILE sets it.
    command = [
        sys.executable,
        "-c",
        f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({descriptors}, {descriptors})); "
        f"os.execv(sys.executable, [sys.executable, '-m', 'archiver', *sys.argv[1:]])",
        *("-H", "127.0.0.1", "-P", str(port), "-D", str(attacked_storage)),
    ]
    async with launched(command, {"ARCHIVER_MAX_JOBS": str(max_jobs)}) as server:
        pid = server.process.pid
        baseline = open_descriptors(pid)
        address = address_of(server.url)
        async with polite_client(server.url, "HTTP/2") as connected_before:
            assert (await connected_before.get("/healthz")).status_code == 200
            started = trio.current_time()
            flood = [await idle_http2_connection(address) for _ in range(connections)]
            during = open_descriptors(pid)
            # The client connected before the flood still gets its archive: the producer's pipes found descriptors.
            response = await connected_before.get("/archive/small/")
            assert response.status_code == 200
            assert read_archive(response.content) == files_on_disk(attacked_storage / "small")
        # Every flood connection is closed: past the limit at once, the rest after the keep-alive timeout.
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for stream in flood:
                    nursery.start_soon(wait_for_close, stream)
        closed_after = trio.current_time() - started
        await normal_download_works(server.url, attacked_storage, "HTTP/2")
        with trio.fail_after(10):
            while open_descriptors(pid) > baseline + 2:
                await trio.sleep(0.05)
        after = open_descriptors(pid)
    assert during < descriptors
    assert b"Too many open files" not in server.output
    assert b"connection limit reached" in server.output
    record_figure(
        f"{connections} idle HTTP/2 connections under a {descriptors}-descriptor limit: server descriptors "
        f"{baseline} -> {during} during, {after} after; all closed within {closed_after:.1f} s; "
        f"downloads served during and after"
    )


async def test_http2_buffers_do_not_outlive_the_stream(attacked_storage: Path) -> None:
    # In this process, to see its garbage: what a stalled stream buffered must
    # go with the stream, not wait, unreachable, for a gc run.
    settings = Settings(settle_time=0, storage_dir=attacked_storage, host="127.0.0.1", port=0)
    async with running_server(settings) as url:
        gc.collect()
        gc.disable()
        try:
            attacker = RawH2Client(await trio.open_tcp_stream(*address_of(url)))
            await attacker.start()
            for _ in range(4):
                await attacker.get("/archive/big/")
            await attacker.read_until_quiet()
            await attacker.stream.aclose()
            await wait_until_no_producer(os.getpid(), timeout=10)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            unreachable = sum(len(o) for o in gc.garbage if isinstance(o, (bytes, bytearray, memoryview)))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert unreachable < 64 * 1024


@pytest.mark.slow
async def test_steady_slow_reader_is_never_cut(attacked_storage: Path) -> None:
    rate = 50_000  # bytes/s: a slow mobile link
    seconds = 90
    stall_timeout = 10  # a sixth of the default: each 256 KiB of a chunk takes 5.2 s at this rate
    async with archiver_process(attacked_storage, stall_timeout=str(stall_timeout)) as server:
        pid = server.process.pid
        sock = await open_non_reader(address_of(server.url), b"/archive/big/")
        received = 0
        started = trio.current_time()
        ahead = []
        while (elapsed := trio.current_time() - started) < seconds:
            data = await sock.recv(8192)
            assert data, f"cut after {received} bytes, {elapsed:.0f} s"
            received += len(data)
            await trio.sleep_until(started + received / rate)
            # How far the producer is ahead of the client: what the pipe, channel and sockets hold.
            ahead.append(sum(_bytes_written(child.pid) for child in producer_processes(pid)) - received)
        metrics = await metrics_of(server.url)
        sock.close()
    assert metrics['archiver_downloads_finished_total{outcome="stalled"}'] == 0
    assert metrics["archiver_downloads_in_flight"] == 1
    # The producer stayed a few MB ahead of a 72 MB album: the buffers were full and
    # every write waited on the client, for most of the run.
    assert max(ahead) < 8e6
    record_figure(
        f"steady reader at {rate / 1000:.0f} kB/s for {seconds} s, stall timeout {stall_timeout} s: not cut, "
        f"{received / 1e6:.1f} MB received; producer ahead by at most {max(ahead) / 1e6:.1f} MB (buffers full, "
        f"server writes paced by the client)"
    )


@pytest.fixture(scope="module")
def many_files_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An album of 20,000 tiny files: what a download holds per file, not per byte, shows."""
    root = tmp_path_factory.mktemp("many-files")
    for index in range(20_000):
        folder = root / "many" / f"d{index // 1000:02d}"
        if not index % 1000:
            folder.mkdir(parents=True)
        (folder / f"{index:05d}.jpg").write_bytes(b"%d" % index)
    write_tree(root / "small", {"photo.jpg": os.urandom(200_000), "notes.txt": b"notes"})
    return root


@pytest.mark.slow  # a stress test (~12-14 s) that prints its figure
async def test_tail_ranges_that_are_never_read_hold_bounded_memory_and_no_producer(many_files_storage: Path) -> None:
    # 16 HTTP/2 streams (4 addresses, each at its cap of 4) ask for the central directory (1.2 MB,
    # generated, no producer) and never open their windows.  Each holds the per-file data of its
    # tail (~60 bytes a file) and its buffers, until the client leaves.
    addresses = ("127.0.0.1", "127.0.0.3", "127.0.0.4", "127.0.0.5")
    requests = 4 * len(addresses)
    async with archiver_process(many_files_storage) as server:
        pid = server.process.pid
        async with polite_client(server.url) as client:
            whole = await client.get("/archive/many/")  # warms the CRC index and the allocator
        central = int.from_bytes(whole.content[-6:-2], "little")
        before = resident_kib(pid)
        attackers = [RawH2Client(await connect_from(local, address_of(server.url))) for local in addresses]
        for attacker in attackers:
            await attacker.start()
            for _ in range(4):
                await attacker.get("/archive/many/", ("range", f"bytes={central}-"))
        with trio.fail_after(30):  # every album walked, every tail started
            while (await metrics_of(server.url))["archiver_downloads_in_flight"] < requests:
                await trio.sleep(0.05)
        for attacker in attackers:
            await attacker.read_until_quiet()
        growth = (resident_kib(pid) - before) / 1024
        producers = len(producer_processes(pid))
        await normal_download_works(server.url, many_files_storage)
        for attacker in attackers:
            assert not attacker.ended
            await attacker.stream.aclose()
        with trio.fail_after(30):
            while (metrics := await metrics_of(server.url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.1)
    assert producers == 0
    assert metrics['archiver_downloads_finished_total{outcome="cancelled"}'] == requests
    record_figure(
        f"{requests} HTTP/2 streams at a closed window on the generated central directory of a 20,000-file "
        f"album: no producer, server RSS +{growth:.1f} MB ({growth / requests:.2f} MB a stream)"
    )
    # A stream's buffers (3 MB, as at a zero window above) and ~60 bytes a file (names, sizes, mtimes,
    # modes, offsets, CRCs), with room to spare: 100.
    assert growth < requests * (3 + 100 * 20_000 / MB)


@pytest.mark.parametrize("launch", ["archiver", "hypercorn", WORKERS_LAUNCH])
async def test_a_client_that_stops_reading_does_not_hold_shutdown_past_grace(
    attacked_storage: Path, launch: str
) -> None:
    # Found by a hostile review: the shielded socket write gave up only at the 60 s stall timeout.
    # With workers (a second review), Hypercorn's master stops them by an event, not a signal: a
    # worker holding such a reader waited for its stall timeout, and a worker that has ended gets
    # the master's SIGTERM, so one non-reader in each worker is the case that shows it.
    command, env = launch_command(launch, 0, grace=1)
    env |= {"ARCHIVER_DIR": str(attacked_storage), "ARCHIVER_STALL_TIMEOUT": "60"}
    async with launched(command, env) as server:
        pid = server.process.pid
        workers = await worker_pids(pid) if launch == WORKERS_LAUNCH else {pid}
        readers = await non_readers_in_every(workers, server.url)
        server.process.terminate()
        with trio.fail_after(15):  # the grace period (1 s) and the close, not the 60 s stall timeout
            assert await server.process.wait() == 0
        for reader in readers:
            reader.close()
    # Logged as what cut them, not as clients leaving.
    assert b"client disconnected" not in server.output
    assert b"cancelled during shutdown" in server.output


async def test_a_client_that_stops_reading_during_the_grace_period_does_not_hold_shutdown_past_it(
    attacked_storage: Path,
) -> None:
    # The test above stops reading before the stop: its write is in flight when the grace period
    # begins.  Here the client reads on after the stop, so that writes begin during the grace
    # period, and then stops: such a write is given the grace period's end too, not the stall timeout.
    # A grace period of 6 s: 4 MB read, 4 KiB at a time, within 1 s of a 2 s one failed 4 of 5 runs
    # on a loaded machine (helper 151).
    command, env = launch_command("archiver", 0, grace=6)
    env |= {"ARCHIVER_DIR": str(attacked_storage), "ARCHIVER_STALL_TIMEOUT": "60"}
    async with launched(command, env) as server:
        reader = await open_non_reader(address_of(server.url), b"/archive/big/")
        await reader.recv(12)
        assert await wait_for_producer_output_to_stop(server.process.pid) >= 1  # backed up behind the socket
        server.process.terminate()
        with trio.fail_after(10):
            while b"received SIGTERM" not in server.output:
                await trio.sleep(0.02)
        read = 0
        with trio.fail_after(4):  # well within the grace period: the writes that take these bytes begin in it
            while read < 4 * 1024 * 1024:
                read += len(await reader.recv(65536))
        with trio.fail_after(20):  # the grace period (6 s) and the close, not the 60 s stall timeout
            assert await server.process.wait() == 0
        reader.close()
    assert b"cancelled during shutdown" in server.output


async def test_a_reload_of_hypercorn_workers_is_a_stop_within_grace_and_a_start(attacked_storage: Path) -> None:
    # SIGHUP to Hypercorn's master stops every worker (the same event as a stop), waits for them
    # all, and starts new ones: not a rolling restart. Clients that stopped reading must not hold it.
    command, env = launch_command(WORKERS_LAUNCH, 0, grace=1)
    env |= {"ARCHIVER_DIR": str(attacked_storage), "ARCHIVER_STALL_TIMEOUT": "60"}
    async with launched(command, env) as server:
        master = server.process.pid
        old_workers = await worker_pids(master)
        readers = await non_readers_in_every(old_workers, server.url)
        old_helpers = spawner_processes(master) + launcher_processes(master) + producer_processes(master)
        server.process.send_signal(signal.SIGHUP)
        with trio.fail_after(15):  # the grace period (1 s) and the close, not the 60 s stall timeout
            while any(process_state(worker) not in (None, "Z") for worker in old_workers):
                await trio.sleep(0.05)
        with trio.fail_after(15):  # two new workers' start
            async with make_client(server.url, "HTTP/1.1") as client:
                response = await client.get("/archive/small/")
        assert response.status_code == 200
        assert read_archive(response.content) == files_on_disk(attacked_storage / "small")
        assert not old_workers & await worker_pids(master)
        # Ended (init reaps a launcher whose spawner ended first): each sees its worker's end on its
        # socket, which a loaded machine may take a moment to run.
        with trio.fail_after(10):
            while [process for process in old_helpers if process_state(process.pid) not in (None, "Z")]:
                await trio.sleep(0.05)
        for reader in readers:
            reader.close()
    assert b"client disconnected" not in server.output


async def non_readers_in_every(workers: set[int], url: str) -> list[trio.socket.SocketType]:
    """Clients that stopped reading ``/archive/big/``, until each of ``workers`` holds one's producer, backed up."""
    readers = []
    with trio.fail_after(60):
        while not all(producer_processes(worker) for worker in workers):
            reader = await open_non_reader(address_of(url), b"/archive/big/")
            readers.append(reader)
            # Which worker takes a connection is the kernel's choice, and a worker's share (4)
            # may be full: past it, a 503, and another try.
            await reader.recv(12)  # and it reads nothing more
            assert len(readers) <= 32, "the connections do not reach every worker"
    for worker in workers:
        assert await wait_for_producer_output_to_stop(worker) >= 1  # backed up behind the socket
    return readers


async def many_requests_and_gone(address: tuple[str, int], path: str, streams: int) -> None:
    """HTTP/2: ``streams`` GETs on one connection, closed as soon as the first answer begins, nothing read after."""
    attacker = RawH2Client(await trio.open_tcp_stream(*address))
    await attacker.start()
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", path)]
    for _ in range(streams):
        stream_id = attacker.connection.get_next_available_stream_id()
        attacker.connection.send_headers(stream_id, headers, end_stream=True)
        attacker.received[stream_id] = 0
    await attacker.flush()
    while not any(attacker.received.values()) and not attacker.reset and await attacker.read_some():
        pass  # SETTINGS, then the first HEADERS or DATA: the service is answering
    await attacker.stream.aclose()


async def test_http2_requests_of_a_client_gone_do_not_run_on(attacked_storage: Path) -> None:
    # Helper 61: 20 GETs on one connection, closed 20 ms later.  Closed came from a writing task
    # while the reader was still making streams, and the streams made meanwhile (and those whose
    # end was told from a cancelled task) were never told: their downloads ran on into the closed
    # connection, for 162 s at a rate limit, and were logged as complete.
    async with archiver_process(attacked_storage, rate_limit="2000000") as server:
        for _ in range(6):
            await many_requests_and_gone(address_of(server.url), "/archive/big/", 20)
        # Well within the stall timeout (60 s a 256 KiB), which would end a download left running.
        with trio.fail_after(10):
            while (metrics := await metrics_of(server.url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.05)
        producers = producer_processes(server.process.pid)
        await normal_download_works(server.url, attacked_storage, "HTTP/2")
    assert producers == []
    assert metrics['archiver_downloads_finished_total{outcome="completed"}'] == 0
    assert b"download big for 127.0.0.1: complete" not in server.output


async def test_a_connection_closed_with_a_pipelined_request_waiting_ends(attacked_storage: Path) -> None:
    # Helper 61: a download and a range pipelined on one HTTP/1.1 connection, the client gone while
    # the download is being sent.  The writing task closed the connection, and the reading task,
    # paused on the pipelined range, waited for ever: a descriptor a client, and SIGTERM waited
    # out the whole grace period.
    async with archiver_process(attacked_storage, rate_limit="2000000") as server:
        pid = server.process.pid
        await normal_download_works(server.url, attacked_storage)  # descriptors the service keeps are open
        baseline = open_descriptors(pid)
        for reset in (True, False) * 5:
            with socket.create_connection(address_of(server.url)) as sock:
                sock.sendall(
                    b"GET /archive/big/ HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /archive/big/ HTTP/1.1\r\nHost: x\r\nRange: bytes=-1\r\n\r\n"
                )
                assert (await trio.to_thread.run_sync(sock.recv, 1000)).startswith(b"HTTP/1.1 200 ")
                if reset:  # RST, as a download manager's abort; else FIN, as a closed tab
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with trio.fail_after(10):
            while open_descriptors(pid) > baseline or (await metrics_of(server.url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        stopping = trio.current_time()
        with trio.fail_after(5):  # the grace period is 10 s: nothing is left to wait for
            await server.process.wait()
    record_figure(
        f"10 HTTP/1.1 clients gone with a pipelined request waiting: descriptors back to {baseline}, "
        f"idle service stopped {trio.current_time() - stopping:.2f} s after SIGTERM"
    )


@pytest.mark.parametrize("reset_when", ["before the answer", "after the answer"])
async def test_an_http2_connection_whose_downloads_the_client_reset_is_closed_when_idle(
    attacked_storage: Path, reset_when: str
) -> None:
    # Helper 62: a reset stream's app ends without the StreamClosed that restarts the keep-alive
    # timer, so a client that reset its download and then said nothing held the connection (a
    # descriptor, a connection slot) for ever, and SIGTERM waited out the grace period.
    async with archiver_process(attacked_storage, rate_limit="2000000") as server:
        attacker = RawH2Client(await trio.open_tcp_stream(*address_of(server.url)))
        await attacker.start()
        stream_id = await attacker.get("/archive/big/")
        if reset_when == "after the answer":
            while not attacker.received[stream_id]:
                assert await attacker.read_some()
        attacker.connection.reset_stream(stream_id)
        await attacker.flush()
        reset_at = trio.current_time()
        with trio.fail_after(15):  # the keep-alive timeout is 5 s
            while await attacker.read_some():
                pass  # the rest of what was in flight, then GOAWAY, then the close
        closed_after = trio.current_time() - reset_at
        with trio.fail_after(10):
            while (await metrics_of(server.url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.05)
    assert 4 < closed_after < 12, closed_after  # the keep-alive timeout, with room for a loaded machine


@pytest.mark.parametrize(
    "how",
    [
        "window never opened, connection closed",
        "window never opened, stream reset",
        "socket full, closed",
        # Helper 140: a range of one whole chunk (512 KiB) at a closed window: the chunk's send waits
        # at the stream's buffer limit, and was cancelled as the client left; counted as made, the
        # range was logged complete though none of it had been handed over whole.
        "one chunk's range, window never opened, connection closed",
        "one chunk's range, window never opened, stream reset",
    ],
)
async def test_a_download_whose_tail_the_client_left_unread_is_not_complete(attacked_storage: Path, how: str) -> None:
    # Helpers 62, 63: the whole archive handed to the server, its tail held (in the stream's buffer
    # at a closed window, or in the write of its last batch to a full socket), and the client
    # leaves: the server dropped the tail and the download's last send returned as if it went
    # out, logged "complete".  (Over HTTP/1.1 the same holds for a last write still blocked when
    # the client leaves, but whether the last chunk, often just the central directory, blocks
    # depends on the kernel's buffers: no test of its own.)
    ranged = how.startswith("one chunk's range")
    write_tree(attacked_storage / "tail", {"photo.jpg": os.urandom(1_600_000 if ranged else 400_000)})
    headers = [("range", f"bytes=0-{512 * 1024 - 1}")] if ranged else []
    async with archiver_process(attacked_storage) as server:
        async with polite_client(server.url) as client:
            length = len((await client.get("/archive/tail/", headers=dict(headers))).content)  # and its CRC indexed
        sent_before = (await metrics_of(server.url))["archiver_bytes_sent_total"]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await trio.to_thread.run_sync(sock.connect, address_of(server.url))
        attacker = RawH2Client(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
        await attacker.start()
        if how == "socket full, closed":  # windows wide open: the batch waits on the socket, not on h2
            attacker.connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            attacker.connection.increment_flow_control_window(2**30)
        if ranged:  # not even the first 64 KiB of a window: the whole chunk waits in the stream's buffer
            attacker.connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        stream_id = await attacker.get("/archive/tail/", *headers)
        with trio.fail_after(10):  # every byte handed to the server, whose send waits on the client
            while (await metrics_of(server.url))["archiver_bytes_sent_total"] < sent_before + length:
                await trio.sleep(0.05)
        if how.endswith("stream reset"):
            attacker.connection.reset_stream(stream_id)
            await attacker.flush()
        else:
            sock.close()
        with trio.fail_after(10):
            while (metrics := await metrics_of(server.url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.05)
    assert metrics['archiver_downloads_finished_total{outcome="completed"}'] == 1  # the polite one
    assert metrics['archiver_downloads_finished_total{outcome="cancelled"}'] == 1
    assert f"download tail for 127.0.0.1: client disconnected, {length} bytes sent".encode() in server.output


async def test_a_download_reset_while_its_connection_is_stalled_ends_at_once(attacked_storage: Path) -> None:
    # Helper 79 on 9a7b1ab: a stream reset by a client that stopped reading (its socket full, a
    # batch of another stream stuck in the write) ended only with that write's deadline (up to
    # twice the stall timeout; never with ARCHIVER_STALL_TIMEOUT=inf): its end waited to learn
    # whether the write in flight had taken the last of its bytes.
    write_tree(attacked_storage / "mid", {"photo.jpg": os.urandom(500_000)})
    async with archiver_process(attacked_storage) as server:  # the stall timeout: 60 s
        attacker = await socket_bound_h2_client(address_of(server.url))
        mid = await attacker.get("/archive/mid/")
        with trio.fail_after(10):  # its first DATA: its headers went before any write could stall
            while not attacker.received[mid]:
                assert await attacker.read_some()
        await attacker.get("/archive/big/")
        # mid's archive all handed over (its producer gone), big's backed up behind the socket.
        # (A stream whose headers wait behind a stalled write is not told of its reset until the
        # stall timeout: the connection's reader waits on the same socket. Not this case.)
        with trio.fail_after(30):
            while await wait_for_producer_output_to_stop(server.process.pid) > 1:
                pass
        attacker.connection.reset_stream(mid)
        await attacker.flush()
        with trio.fail_after(5):
            while (await metrics_of(server.url))["archiver_downloads_in_flight"] > 1:
                await trio.sleep(0.05)
        await attacker.stream.aclose()
    assert b"download mid for 127.0.0.1: client disconnected" in server.output
