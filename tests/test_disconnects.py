"""The moment a download ends early, and what each moment leaves behind (helper 190's sweep).

Each test serves one album whose records lie where the plan says, lets a client
leave at one byte of it (a record's middle, a record's edge, the end records, the
last byte, the response's end unread) in one way (a close, a reset, a
half-close, reading no more; over HTTP/2 a stream reset beside another stream,
GOAWAY, the connection closed under several streams, a window never opened),
and checks what is left: no producer (running or a zombie), the test process's
descriptors and threads as they were, the job slot and the gauges back, one
log line with the right outcome, and the next download whole and byte for byte
the plan's (the CRC index not poisoned by the cut).

Over HTTP/2 the moment is the server's too: the stream's window is opened by
exactly the bytes to send, so the server has sent that many and waits.  Over
HTTP/1.1 it is the client's: the server is ahead of it by what the sockets hold
(a 4 KiB receive buffer: ~200 KB here).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import socket
import struct
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import h11
import pytest
import trio
from _pytest.mark.structures import ParameterSet

from archiver.config import Settings
from archiver.fences.hypercorn_tcp import LINGER_SECONDS

from .conftest import (
    expected_archive,
    make_client,
    own_descriptors,
    producer_children,
    producer_processes,
    read_archive,
    running_server,
    wait_until_no_producer_children,
    write_tree,
)
from .test_cli import launch_command, launched
from .test_observability import samples

# Sorted as the archive has them: a file whose CRC the producer computes when cold (16 KiB at
# most), one read in a batch, one read block by block (over 4 MiB: large_file_crc), a small last.
ALBUM = {
    "a.txt": b"a" * 3000,
    "b.bin": os.urandom(200_000),
    "c.bin": os.urandom(5 * 1024 * 1024 + 17),
    "d.txt": b"d" * 10,
}
GAUGES = (
    "archiver_downloads_in_flight",
    "archiver_active_clients",
    "archiver_largest_client_share",
    "archiver_planned_files",
)


@dataclass(frozen=True)
class Layout:
    """Where an archive's records lie: its bytes (a whole download's), and each entry's local header."""

    data: bytes
    local: list[int]  # each entry's local header offset
    data_start: list[int]  # each entry's data offset
    central: int  # the central directory's offset

    @classmethod
    def of(cls, data: bytes) -> Layout:
        archive = zipfile.ZipFile(io.BytesIO(data))
        local = [info.header_offset for info in archive.infolist()]
        starts = []
        for offset in local:
            name_length, extra_length = struct.unpack_from("<HH", data, offset + 26)
            starts.append(offset + 30 + name_length + extra_length)
        return cls(data, local, starts, archive.start_dir)

    def position(self, where: str) -> int:
        """The count of body bytes the client takes before it leaves."""
        return {
            "no body byte": 0,
            "in a local header": self.local[1] + 15,
            "at a header/data edge": self.data_start[2],
            "in file data": self.data_start[2] + 1_000_000,
            "at an entry's end": self.local[3],
            "in the central directory": self.central + 20,
            "in the end records": len(self.data) - 15,
            "one byte short": len(self.data) - 1,
            "every byte, end unread": len(self.data),
        }[where]


WHERE = [
    "no body byte",
    "in a local header",
    "at a header/data edge",
    "in file data",
    "at an entry's end",
    "in the central directory",
    "in the end records",
    "one byte short",
    "every byte, end unread",
]


WARMTH = ["cold", "warm"]


def sweep(*axes: list[str], fast: int | None = None) -> list[ParameterSet]:
    """Every combination of ``axes``, all but a few marked slow: the default run keeps the diagonal.

    The diagonal: each value of the first axis once (the first ``fast`` of them, if given), with
    the k-th value of every other axis for its k-th (cycling), so that each value of each axis
    is met in the default run at least once where the axes allow.
    """
    kept = len(axes[0]) if fast is None else fast
    params = []
    for combination in itertools.product(*axes):
        k = axes[0].index(combination[0])
        diagonal = k < kept and all(
            axis.index(value) == k % len(axis) for axis, value in zip(axes[1:], combination[1:], strict=True)
        )
        params.append(pytest.param(*combination, id="-".join(combination), marks=() if diagonal else pytest.mark.slow))
    return params


@pytest.fixture
def album(storage: Path) -> Path:
    write_tree(storage / "album", ALBUM)
    return storage / "album"


def sweep_settings(storage: Path, **changes: object) -> Settings:
    # One job in all: a slot the cut did not give back is the next download's 503.
    settings = Settings(
        settle_time=0,
        storage_dir=storage,
        host="127.0.0.1",
        port=0,
        max_jobs=2,
        max_jobs_per_client=2,
        stall_timeout=1.0,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


def address_of(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def metrics(url: str) -> dict[str, float]:
    async with make_client(url, "HTTP/1.1") as client:
        return samples((await client.get("/metrics")).text)


def busy_threads() -> list[str]:
    """The names of this process's threads but trio's idle workers ("Trio thread N"): a running job names its thread."""
    return sorted(thread.name for thread in threading.enumerate() if not thread.name.startswith("Trio thread "))


@dataclass
class Baseline:
    descriptors: set[str]
    threads: list[str]
    finished: dict[str, float]


async def baseline(url: str) -> Baseline:
    found = await metrics(url)
    finished = {name: value for name, value in found.items() if name.startswith("archiver_downloads_finished_total")}
    return Baseline(own_descriptors(), busy_threads(), finished)


def download_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("download album for ")]


async def check_left_behind(
    url: str,
    before: Baseline,
    caplog: pytest.LogCaptureFixture,
    outcomes: dict[str, str],
    expected: bytes | None,
    protocol: str = "HTTP/1.1",
    compression: bool = False,
    taken: int | None = None,
    files: dict[str, bytes] = ALBUM,
) -> None:
    """No producer, descriptors, threads, slot and gauges back, the lines' outcomes, the next download whole.

    ``outcomes``: each download's line ends as one of these (outcome label -> the line's phrase).
    """
    await wait_until_no_producer_children(timeout=10)
    with trio.fail_after(10):
        while (found := await metrics(url))["archiver_downloads_in_flight"]:
            await trio.sleep(0.02)
    assert {name: found[name] for name in GAUGES} == dict.fromkeys(GAUGES, 0)
    finished = {
        name.split('"')[1]: value - before.finished.get(name, 0)
        for name, value in found.items()
        if name.startswith("archiver_downloads_finished_total") and value != before.finished.get(name, 0)
    }
    lines = download_lines(caplog)
    assert sum(finished.values()) == len(lines), (finished, lines)
    for line in lines:
        assert any(f": {phrase}" in line for phrase in outcomes.values()), (line, outcomes)
        if taken is not None:  # the bytes the line says went out: at least those the client took
            assert taken <= int(line.split(" bytes sent")[0].rsplit(" ", 1)[1]), (line, taken)
    assert set(finished) <= set(outcomes), (finished, lines)
    with trio.fail_after(10):  # the client's sockets closed, the server's too
        while added := own_descriptors() - before.descriptors:
            await trio.sleep(0.02)
    assert not added
    # The next download: whole and the plan's, byte for byte (no CRC the cut left wrong).
    async with make_client(url, protocol) as client:
        response = await client.get("/archive/album/")
    assert response.status_code == 200
    if expected is not None:
        assert response.content == expected
    assert read_archive(response.content) == files
    await wait_until_no_producer_children(timeout=10)
    # No thread still at work (a CRC reader given up on, a storage call): each back in trio's cache.
    with trio.fail_after(10):
        while busy_threads() != before.threads:
            await trio.sleep(0.02)


# --- HTTP/1.1: the client's moment ---------------------------------------------------------------


def linger_reset(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def http11_cut(
    url: str, target: str, take: int | None, how: str, method: str = "GET", headers: tuple[tuple[str, str], ...] = ()
) -> tuple[int, bytes]:
    """Ask for ``target``, take ``take`` body bytes (None: 10 bytes of the head only), then leave ``how``.

    Returns the status (0 if the head was not read) and the body bytes taken.
    """
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(address_of(url))
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method=method, target=target, headers=[("Host", "x"), *headers])
    await sock.send(connection.send(request) + connection.send(h11.EndOfMessage()))
    status, body = 0, bytearray()
    with trio.fail_after(30):
        if take is None:
            head = b""
            while len(head) < 10:
                head += await sock.recv(10 - len(head))
        else:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    # Never more than the body bytes still to take: chunk framing only makes it less.
                    want = 65536 if status == 0 else take - len(body)
                    if want == 0:
                        break
                    data = await sock.recv(want)
                    assert data, "the server closed first"
                    connection.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    if take == 0 and method == "GET":
                        break
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) >= take:
                        break
                elif isinstance(event, h11.EndOfMessage):
                    break
    assert take is None or len(body) <= take
    await leave_http11(url, sock, how)
    return status, bytes(body)


async def leave_http11(url: str, sock: trio.socket.SocketType, how: str) -> None:
    if how == "close":
        sock.close()
    elif how == "reset":
        linger_reset(sock)
        sock.close()
    elif how == "half-close":
        sock.shutdown(socket.SHUT_WR)
        # Read what comes until the server closes: the service goes on, or ends, but never waits.
        with trio.fail_after(10):
            while await sock.recv(65536):
                pass
        sock.close()
    elif how == "stop reading":
        # The stall timeout (1 s here) ends it (or it ended, every byte handed to the sockets); the
        # socket closed once it has.
        with trio.fail_after(10):
            while (await metrics(url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.05)
        sock.close()
    else:
        raise AssertionError(how)


GONE = {"cancelled": "client disconnected", "completed": "complete"}
STALLED = {"stalled": "stalled: the client took less than", "completed": "complete"}


def http11_outcomes(how: str, left: int | None) -> dict[str, str]:
    """What a download's line may say when an HTTP/1.1 client leaves ``how`` with ``left`` bytes untaken.

    Over 1 MB untaken, the sockets (a 4 KiB receive buffer) cannot have taken the rest: never "complete".
    """
    outcomes = STALLED if how == "stop reading" else GONE
    if left is None or left > 1_000_000:
        outcomes = {label: phrase for label, phrase in outcomes.items() if label != "completed"}
    return outcomes


@pytest.mark.parametrize(
    ("where", "how", "warm"),
    sweep(["inside the head", *WHERE], ["close", "reset", "half-close", "stop reading"], WARMTH),
)
async def test_an_http11_client_leaving_a_stored_download(
    album: Path, caplog: pytest.LogCaptureFixture, where: str, how: str, warm: str
) -> None:
    caplog.set_level(logging.INFO, logger="archiver")
    expected = expected_archive(album)
    layout = Layout.of(expected)
    async with running_server(sweep_settings(album.parent)) as url:
        if warm == "warm":
            async with make_client(url, "HTTP/1.1") as client:
                assert (await client.get("/archive/album/")).content == expected
        before = await baseline(url)
        caplog.clear()
        take = None if where == "inside the head" else layout.position(where)
        _, body = await http11_cut(url, "/archive/album/", take, how)
        assert body == expected[: len(body)]
        left = None if take is None else len(expected) - take
        await check_left_behind(url, before, caplog, http11_outcomes(how, left), expected, taken=take)


@pytest.mark.parametrize(("where", "how"), sweep(WHERE[1::2], ["close", "reset", "half-close"], fast=2))
async def test_an_http11_client_leaving_a_deflated_download(
    album: Path, caplog: pytest.LogCaptureFixture, where: str, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="archiver")
    async with running_server(sweep_settings(album.parent, compression=6)) as url:
        async with make_client(url, "HTTP/1.1") as client:
            whole = (await client.get("/archive/album/")).content
        layout = Layout.of(whole)
        before = await baseline(url)
        caplog.clear()
        take = layout.position(where)
        status, body = await http11_cut(url, "/archive/album/", take, how)
        assert status == 200
        assert body == whole[: len(body)]
        outcomes = http11_outcomes(how, len(whole) - take)
        await check_left_behind(url, before, caplog, outcomes, None, compression=True, taken=take)


# --- HTTP/2: the server's moment ----------------------------------------------------------------


class WindowedH2Client:
    """A raw HTTP/2 client whose streams' windows start closed: each is opened by exactly what it may be sent."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.stream = trio.SocketStream(sock)
        self.connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.body: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.heads: dict[int, int] = {}  # stream -> its status
        self.closed = False

    @classmethod
    async def connect(cls, url: str) -> WindowedH2Client:
        sock = trio.socket.socket()
        await sock.connect(address_of(url))
        client = cls(sock)
        client.connection.initiate_connection()
        client.connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        client.connection.increment_flow_control_window(2**30)  # the connection's: streams' windows decide
        await client.flush()
        return client

    async def flush(self) -> None:
        if data := self.connection.data_to_send():
            await self.stream.send_all(data)

    async def get(self, path: str, window: int, *headers: tuple[str, str], method: str = "GET") -> int:
        stream_id = self.connection.get_next_available_stream_id()
        request = [(":method", method), (":scheme", "http"), (":authority", "x"), (":path", path), *headers]
        self.connection.send_headers(stream_id, request, end_stream=True)
        self.body[stream_id] = bytearray()
        if window:
            self.connection.increment_flow_control_window(window, stream_id)
        await self.flush()
        return stream_id

    async def read_until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(30):
            while not done():
                data = await self.stream.receive_some(65536)
                if not data:
                    self.closed = True
                    return
                for event in self.connection.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        self.body[event.stream_id] += event.data
                    elif isinstance(event, h2.events.ResponseReceived):
                        self.heads[event.stream_id] = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.StreamEnded):
                        self.ended.add(event.stream_id)
                    elif isinstance(event, h2.events.StreamReset):
                        self.reset.add(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.closed = True
                await self.flush()

    async def read_to_close(self) -> None:
        with trio.fail_after(10):
            while not self.closed:
                try:
                    await self.read_until(lambda: self.closed)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.closed = True


H2_WHERE = [where for where in WHERE if where != "every byte, end unread"]  # END_STREAM takes no window


@pytest.mark.parametrize(
    ("where", "how", "warm"), sweep(H2_WHERE, ["reset", "close", "TCP reset", "GOAWAY", "window never opened"], WARMTH)
)
async def test_an_http2_client_leaving_a_stored_download(
    album: Path, caplog: pytest.LogCaptureFixture, where: str, how: str, warm: str
) -> None:
    caplog.set_level(logging.INFO, logger="archiver")
    expected = expected_archive(album)
    take = Layout.of(expected).position(where)
    async with running_server(sweep_settings(album.parent)) as url:
        if warm == "warm":
            async with make_client(url, "HTTP/2") as client:
                assert (await client.get("/archive/album/")).content == expected
        before = await baseline(url)
        caplog.clear()
        client = await WindowedH2Client.connect(url)
        stream_id = await client.get("/archive/album/", take)
        await client.read_until(lambda: len(client.body[stream_id]) >= take and stream_id in client.heads)
        assert client.body[stream_id] == expected[:take]
        outcomes = {"cancelled": "client disconnected"}  # not every byte went: never "complete"
        if how == "reset":
            client.connection.reset_stream(stream_id)
            await client.flush()
        elif how == "close":
            client.sock.close()
        elif how == "TCP reset":
            linger_reset(client.sock)
            client.sock.close()
        elif how == "GOAWAY":
            client.connection.close_connection()
            await client.flush()
            # Hypercorn closes the connection (RFC 9113 6.8 would let the client's streams go on): its
            # downloads end as the client leaving.
            await client.read_to_close()
        elif how == "window never opened":
            await client.read_until(lambda: stream_id in client.reset)  # RST_STREAM at the stall timeout
            outcomes = {"stalled": STALLED["stalled"]}
        with trio.fail_after(10):
            while (await metrics(url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.02)
        client.sock.close()  # (a connection whose stream was reset is kept: it is the client's to close)
        await check_left_behind(url, before, caplog, outcomes, expected, "HTTP/2", taken=take)


@pytest.mark.parametrize(
    ("where",), sweep(["in file data", "no body byte", "in the central directory", "one byte short"], fast=1)
)
async def test_an_http2_stream_reset_beside_another_of_its_connection_leaves_that_one_whole(
    album: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    caplog.set_level(logging.INFO, logger="archiver")
    expected = expected_archive(album)
    take = Layout.of(expected).position(where)
    async with running_server(sweep_settings(album.parent)) as url:
        before = await baseline(url)
        caplog.clear()
        client = await WindowedH2Client.connect(url)
        cut = await client.get("/archive/album/", take)
        other = await client.get("/archive/album/", 64 * 1024)  # goes on, 64 KiB at a time
        await client.read_until(lambda: len(client.body[cut]) >= take and cut in client.heads and other in client.heads)
        client.connection.reset_stream(cut)
        await client.flush()
        client.connection.increment_flow_control_window(len(expected), other)  # the rest of it, and more
        await client.flush()
        await client.read_until(lambda: other in client.ended or other in client.reset or client.closed)
        assert other in client.ended and other not in client.reset and not client.closed
        assert client.body[other] == expected
        assert client.body[cut] == expected[:take]
        client.sock.close()
        await check_left_behind(url, before, caplog, GONE, expected, "HTTP/2")
    lines = download_lines(caplog)
    assert lines[0].startswith("download album for 127.0.0.1: client disconnected"), lines
    assert lines[1].startswith("download album for 127.0.0.1: complete"), lines


@pytest.mark.parametrize(("how",), sweep(["TCP reset", "close"], fast=1))
async def test_an_http2_connection_closed_under_several_streams_ends_each(
    album: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="archiver")
    expected = expected_archive(album)
    layout = Layout.of(expected)
    takes = [layout.position("in a local header"), layout.position("in the central directory")]
    async with running_server(sweep_settings(album.parent)) as url:
        before = await baseline(url)
        caplog.clear()
        client = await WindowedH2Client.connect(url)
        streams = [await client.get("/archive/album/", take) for take in takes]
        await client.read_until(
            lambda: all(len(client.body[s]) >= t and s in client.heads for s, t in zip(streams, takes, strict=True))
        )
        assert producer_children()
        if how == "TCP reset":
            linger_reset(client.sock)
        client.sock.close()
        await check_left_behind(url, before, caplog, {"cancelled": "client disconnected"}, expected, "HTTP/2")
    assert len(download_lines(caplog)) == 2 + 1  # the two cut, the next download


# --- ranges, HEAD, compression over HTTP/2 ----------------------------------------------------


@pytest.mark.parametrize(
    ("ranged", "cut", "protocol", "warm"),
    sweep(
        ["from inside the large file", "a suffix", "from inside a file's data"],
        ["half", "no body byte", "first byte", "one byte short"],
        ["HTTP/2", "HTTP/1.1"],
        WARMTH,
    ),
)
async def test_a_client_leaving_a_range(
    album: Path, caplog: pytest.LogCaptureFixture, protocol: str, warm: str, ranged: str, cut: str
) -> None:
    caplog.set_level(logging.INFO, logger="archiver")
    expected = expected_archive(album)
    layout = Layout.of(expected)
    first = {
        "from inside a file's data": layout.data_start[1] + 100,
        "a suffix": len(expected) - 300,
        "from inside the large file": layout.data_start[2] + 3_000_000,
    }[ranged]
    header = ("range", "bytes=-300" if ranged == "a suffix" else f"bytes={first}-")
    length = len(expected) - first
    take = {"no body byte": 0, "first byte": 1, "half": length // 2, "one byte short": length - 1}[cut]
    async with running_server(sweep_settings(album.parent)) as url:
        if warm == "warm":
            async with make_client(url, "HTTP/1.1") as client:
                assert (await client.get("/archive/album/")).content == expected
        before = await baseline(url)
        caplog.clear()
        if protocol == "HTTP/1.1":
            status, body = await http11_cut(url, "/archive/album/", take, "close", headers=(header,))
        else:
            client = await WindowedH2Client.connect(url)
            stream_id = await client.get("/archive/album/", take, header)
            await client.read_until(lambda: len(client.body[stream_id]) >= take and stream_id in client.heads)
            status, body = client.heads[stream_id], bytes(client.body[stream_id])
            client.connection.reset_stream(stream_id)
            await client.flush()
            with trio.fail_after(10):
                while (await metrics(url))["archiver_downloads_in_flight"]:
                    await trio.sleep(0.02)
            client.sock.close()
        assert status == 206
        assert body == expected[first : first + take]
        outcomes = GONE if protocol == "HTTP/1.1" else {"cancelled": "client disconnected"}
        await check_left_behind(url, before, caplog, outcomes, expected, protocol)


@pytest.mark.parametrize(("how",), sweep(["reset", "close", "half-close"], fast=1))
async def test_a_client_leaving_a_head_request(album: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    caplog.set_level(logging.INFO, logger="archiver")
    expected = expected_archive(album)
    async with running_server(sweep_settings(album.parent)) as url:
        before = await baseline(url)
        caplog.clear()
        await http11_cut(url, "/archive/album/", None, how, method="HEAD")
        await check_left_behind(url, before, caplog, GONE, expected)


@pytest.mark.parametrize(
    ("where", "how"),
    sweep(
        ["in the central directory", "in file data", "no body byte", "in a local header", "one byte short"],
        ["reset", "close", "window never opened"],
        fast=1,
    ),
)
async def test_an_http2_client_leaving_a_deflated_download(
    album: Path, caplog: pytest.LogCaptureFixture, where: str, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="archiver")
    async with running_server(sweep_settings(album.parent, compression=6)) as url:
        async with make_client(url, "HTTP/2") as http:
            whole = (await http.get("/archive/album/")).content
        take = Layout.of(whole).position(where)
        before = await baseline(url)
        caplog.clear()
        client = await WindowedH2Client.connect(url)
        stream_id = await client.get("/archive/album/", take)
        await client.read_until(lambda: len(client.body[stream_id]) >= take and stream_id in client.heads)
        assert client.body[stream_id] == whole[:take]
        outcomes: dict[str, str] = {"cancelled": "client disconnected"}
        if how == "reset":
            client.connection.reset_stream(stream_id)
            await client.flush()
        elif how == "close":
            client.sock.close()
        else:
            await client.read_until(lambda: stream_id in client.reset)
            outcomes = STALLED
        with trio.fail_after(10):
            while (await metrics(url))["archiver_downloads_in_flight"]:
                await trio.sleep(0.02)
        client.sock.close()
        await check_left_behind(url, before, caplog, outcomes, None, "HTTP/2", compression=True)


# --- a graceful stop ------------------------------------------------------------------------------


@pytest.mark.parametrize(("how",), sweep(["HTTP/2 reset", "HTTP/1.1 close", "HTTP/1.1 reset", "HTTP/2 close"], fast=1))
async def test_a_client_leaving_during_the_grace_period_ends_the_stop_at_once(album: Path, how: str) -> None:
    # SIGTERM with a download in flight (its client holding it mid-file), then the client leaves: the
    # stop does not wait out the rest of the grace period (30 s), and leaves no producer.
    command, env = launch_command("archiver", 0, grace=30)
    env |= {"ARCHIVER_DIR": str(album.parent), "ARCHIVER_STALL_TIMEOUT": "60"}
    expected = expected_archive(album)
    take = Layout.of(expected).position("in file data")
    async with launched(command, env) as server:
        if how.startswith("HTTP/2"):
            client = await WindowedH2Client.connect(server.url)
            stream_id = await client.get("/archive/album/", take)
            await client.read_until(lambda: len(client.body[stream_id]) >= take and stream_id in client.heads)
            sock = client.sock
        else:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(address_of(server.url))
            await sock.send(b"GET /archive/album/ HTTP/1.1\r\nHost: x\r\n\r\n")
            received = 0
            with trio.fail_after(10):
                while received < take:
                    received += len(await sock.recv(65536))
        producers = [child.pid for child in producer_processes(server.process.pid)]
        server.process.terminate()
        with trio.fail_after(10):
            while b"received SIGTERM" not in server.output:
                await trio.sleep(0.02)
        if how == "HTTP/2 reset":
            client.connection.reset_stream(stream_id)
            await client.flush()
        else:
            if how.endswith("reset"):
                linger_reset(sock)
            sock.close()
        with trio.fail_after(10):  # not the 30 s of grace
            assert await server.process.wait() == 0
        if not sock.fileno() < 0:
            sock.close()
    with trio.fail_after(10):
        while any(Path(f"/proc/{pid}").exists() for pid in producers):
            await trio.sleep(0.01)
    lines = [line for line in server.output.decode().splitlines() if "download album for" in line]
    assert len(lines) == 1, lines
    assert "cancelled during shutdown" in lines[0] or "client disconnected" in lines[0], lines


# --- an HTTP/2 connection the service closes -------------------------------------------------------


def window_update_of_zero(stream_id: int) -> bytes:
    """A WINDOW_UPDATE frame asking for 0 more bytes: a protocol error (RFC 9113 6.9), which h2 will not send."""
    return struct.pack(">I", 4)[1:] + bytes([0x8, 0]) + struct.pack(">II", stream_id, 0)


async def drain(stream: trio.SocketStream) -> None:
    """Read and drop what comes, until the end."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(1 << 20):
            pass


@pytest.mark.parametrize(
    ("cause", "window"),
    sweep(
        ["a WINDOW_UPDATE of 0 on the stream", "the client's GOAWAY", "a WINDOW_UPDATE of 0"],
        ["open", "closed"],
        fast=2,
    ),
)
async def test_an_http2_connection_the_service_closes_ends_its_downloads_at_once(
    storage: Path, caplog: pytest.LogCaptureFixture, cause: str, window: str
) -> None:
    # Helper 190: a connection closed by the service (a protocol error, a GOAWAY from the client)
    # told its streams only once its lingering close ended (the client closing, or 2 s).  Meanwhile
    # h2 refused every frame and Hypercorn dropped what the apps sent, saying nothing: a download at
    # an open window made its whole archive for nobody at disk speed (50 MB in 0.3 s here), one at
    # a closed window held its producer and slot those 2 s.
    caplog.set_level(logging.INFO, logger="archiver")
    files = {"a.bin": os.urandom(48 * 1024 * 1024)}
    write_tree(storage / "album", files)
    async with running_server(Settings(settle_time=0, storage_dir=storage, host="127.0.0.1", port=0)) as url:
        before = await baseline(url)
        client = await WindowedH2Client.connect(url)
        stream_id = await client.get("/archive/album/", 2**30 if window == "open" else 100_000)
        await client.read_until(lambda: len(client.body[stream_id]) >= 100_000)
        sent_before = (await metrics(url))["archiver_bytes_sent_total"]
        if cause == "the client's GOAWAY":
            client.connection.close_connection()
            await client.flush()
        else:
            await client.stream.send_all(window_update_of_zero(stream_id if cause.endswith("stream") else 0))
        asked = trio.current_time()
        # The client reads on, and keeps its socket open: the service's close lingers its 2 s (not the
        # socket full, whose write would hold the GOAWAY, and the download, until the write's deadline).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, client.stream)
            with trio.fail_after(10):
                while (found := await metrics(url))["archiver_downloads_in_flight"]:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        ended_after = trio.current_time() - asked
        client.sock.close()
        said = "client disconnected" if cause == "the client's GOAWAY" else "connection closed: HTTP/2 protocol error"
        await check_left_behind(url, before, caplog, {"cancelled": said}, None, "HTTP/2", files=files)
    assert ended_after < LINGER_SECONDS, ended_after
    # Not the archive made for nobody: at most what the pipe, the channel and a batch hold beyond.
    assert found["archiver_bytes_sent_total"] - sent_before < 8 * 1024 * 1024


@pytest.mark.slow  # 2 s, and the race is rare: the mechanism's own test is test_fences's
async def test_an_http2_stream_reset_with_its_tail_in_the_server_is_never_complete(
    album: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Helper 190's sweep, 1 run in 12 at "at an entry's end": the window opened up to the last
    # entry, the rest (~300 bytes: the last entry, the central directory) handed over into the
    # stream's buffer, and the client's reset came before the body's end was sent: the download
    # ended outside any send, nothing noted the bytes left in the buffer, and with every byte
    # handed over it was logged complete (``test_fences``: the mechanism, without the race).
    # Here 30 times: before the fix, 4 runs of 8 failed in one sitting, none of 6 in the next.
    caplog.set_level(logging.INFO, logger="archiver")
    expected = expected_archive(album)
    take = Layout.of(expected).position("at an entry's end")
    async with running_server(sweep_settings(album.parent)) as url:
        async with make_client(url, "HTTP/2") as http:
            assert (await http.get("/archive/album/")).content == expected
        before = await baseline(url)
        caplog.clear()
        for _ in range(30):
            client = await WindowedH2Client.connect(url)
            stream_id = await client.get("/archive/album/", take)
            await client.read_until(lambda: len(client.body[stream_id]) >= take and stream_id in client.heads)  # noqa: B023
            client.connection.reset_stream(stream_id)
            await client.flush()
            with trio.fail_after(10):
                while (await metrics(url))["archiver_downloads_in_flight"]:
                    await trio.sleep(0.005)
            client.sock.close()
        lines = download_lines(caplog)
        assert len(lines) == 30
        assert [line for line in lines if "client disconnected" not in line] == []
        caplog.clear()
        before.finished = (await baseline(url)).finished  # the 30 counted above
        await check_left_behind(url, before, caplog, GONE, expected, "HTTP/2")
