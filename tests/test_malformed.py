"""Malformed input costs one connection, never the process (issue 23).

Each finding has its own test against a real ``python -m archiver`` process
(or, where the launch does not matter, the server in this process); a
hypothesis suite then throws malformed HTTP/1.1 and HTTP/2 at the process,
and after every case a polite client is still served.  The process must be
alive when the module ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import hpack
import httpx
import pytest
from hypercorn.config import Config as HypercornConfig
from hyperframe.frame import PingFrame
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from archiver.fences import hypercorn_h2, hypercorn_h2_frames, hypercorn_h11
from archiver.fences.hypercorn_h11 import BLANK_LINE_BYTES
from archiver.web.app import EMPTY_BODY_WAIT
from archiver.web.pages import MESSAGES, UNPARSED_REQUEST
from archiver.web.ranges import parse_range

from .conftest import CLIENT_TLS, files_on_disk, http11_request, read_archive, record_figure, write_tree
from .test_stress import resident_kib

PROJECT = Path(__file__).resolve().parent.parent
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Service:
    address: tuple[str, int]
    process: subprocess.Popen[bytes]
    storage: Path
    output: bytearray = field(default_factory=bytearray)

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A real ``python -m archiver`` for the whole module; it must still be running at the end."""
    storage = tmp_path_factory.mktemp("malformed")
    write_tree(storage / "small", {"photo.jpg": os.urandom(100_000), "Фото/notes.txt": b"notes"})
    # Larger than the socket buffers hold: a response left unread stays in flight.
    write_tree(storage / "large", {"photo.jpg": os.urandom(16_000_000)})
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(storage)]
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    running = Service(("127.0.0.1", 0), process, storage)
    listening = threading.Event()

    def collect() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            running.output += line
            if match := re.search(rb"Running on http://127\.0\.0\.1:(\d+)", line):
                running.address = ("127.0.0.1", int(match.group(1)))
                listening.set()

    threading.Thread(target=collect, daemon=True).start()
    try:
        assert listening.wait(30), running.output.decode(errors="replace")
        yield running
        assert process.poll() is None, "the service died:\n" + running.output.decode(errors="replace")[-5000:]
        # Whatever the module's tests did, in any order or selection: one line a connection, never a traceback.
        polite_request_works(running)
        assert b"Traceback" not in running.output, running.output.decode(errors="replace")[-5000:]
    finally:
        process.terminate()
        process.wait(15)


def client_errors_of(service: Service) -> dict[str, float]:
    """``archiver_client_errors_total`` by kind."""
    text = httpx.get(f"{service.url}/metrics").text
    found = re.findall(r'^archiver_client_errors_total\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {kind: float(value) for kind, value in found}


def polite_request_works(service: Service) -> None:
    status, _, body = http11_request(service.address, "GET", b"/archive/small/", [])
    assert status == 200
    assert read_archive(body) == files_on_disk(service.storage / "small")


def exchange(address: tuple[str, int], data: bytes, timeout: float = 3.0) -> bytes:
    """Send ``data``, half-close, and read until the server closes (or ``timeout`` passes with nothing)."""
    received = bytearray()
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionError):
            pass
    return bytes(received)


def h2_client(**options: bool) -> h2.connection.H2Connection:
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None, **options)  # type: ignore[arg-type]
    )
    connection.initiate_connection()
    return connection


def h2_events(sock: socket.socket, connection: h2.connection.H2Connection, until: type) -> list[h2.events.Event]:
    """Read and collect events until one of type ``until`` (or the connection ends)."""
    events: list[h2.events.Event] = []
    while not any(isinstance(event, until) for event in events):
        data = sock.recv(65536)
        if not data:
            break
        events += connection.receive_data(data)
        try:
            sock.sendall(connection.data_to_send())
        except ConnectionError:  # closed by the service (a GOAWAY): what it sent before is still to be read
            continue
    return events


# Finding 1: one HTTP/2 request with a non-ASCII byte in :path or :method ended the process.  And a
# plain CONNECT has no :path (RFC 9113 8.5): Hypercorn's _create_stream raised UnboundLocalError,
# which ended the connection with its other streams.  Nothing is tunnelled here.
@pytest.mark.parametrize(
    "request_headers",
    [
        [(b":method", b"GET"), (b":path", b"/archive/\xff/"), (b":scheme", b"http"), (b":authority", b"x")],
        [(b":method", b"G\xc3\xa9T"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")],
        [(b":method", b"CONNECT"), (b":authority", b"example.org:443")],
        # A method is case-sensitive (RFC 9110 9.1): Hypercorn upper-cased these, and served "head" as a HEAD
        # (a Content-Length, no body: a protocol error to its client) and "get" as a GET (helper 170).
        [(b":method", b"head"), (b":path", b"/archive/small/"), (b":scheme", b"http"), (b":authority", b"x")],
        [(b":method", b"get"), (b":path", b"/archive/small/"), (b":scheme", b"http"), (b":authority", b"x")],
    ],
    ids=["path", "method", "connect", "head", "get"],
)
def test_a_request_hypercorn_cannot_take_resets_its_stream_only(
    service: Service, request_headers: list[tuple[bytes, bytes]]
) -> None:
    connection = h2_client(validate_outbound_headers=False, normalize_outbound_headers=False)
    with socket.create_connection(service.address, timeout=10) as sock:
        connection.send_headers(1, request_headers, end_stream=True)
        # A polite request on the same connection, after the malformed one.
        connection.send_headers(
            3,
            [(b":method", b"GET"), (b":path", b"/healthz"), (b":scheme", b"http"), (b":authority", b"x")],
            end_stream=True,
        )
        sock.sendall(connection.data_to_send())
        events = h2_events(sock, connection, h2.events.StreamEnded)
    resets = [event for event in events if isinstance(event, h2.events.StreamReset)]
    assert [(reset.stream_id, reset.error_code) for reset in resets] == [(1, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
    assert any(isinstance(event, h2.events.StreamEnded) and event.stream_id == 3 for event in events)
    polite_request_works(service)
    assert b"UnicodeDecodeError" not in service.output and b"UnboundLocalError" not in service.output


@pytest.mark.parametrize(
    "header",
    [
        (b"User-Agent", b"x"),
        (b"connection", b"close"),
        (b"te", b"gzip"),
        (b"user-agent", b"a\r\nforged: line"),
        (b"authorization", b" Bearer secret-token "),
    ],
    ids=["upper-case", "connection", "te", "crlf", "whitespace"],
)
def test_a_request_h2_refuses_closes_its_connection_counted_with_a_line_at_most(
    service: Service, header: tuple[bytes, bytes]
) -> None:
    # Helper 52: GOAWAY(PROTOCOL_ERROR) and nothing in any log, where HTTP/1.1 says what it cannot parse.
    # Such lines are quieted, one every 10 s (helper 85): each such connection is counted, and it
    # has its line unless another's was written in the 10 s before; that the line is written is
    # test_access_log's (a flood of them makes one line).
    before = client_errors_of(service)["http2_protocol_error"]
    connection = h2_client(validate_outbound_headers=False, normalize_outbound_headers=False)
    pseudo = [(b":method", b"GET"), (b":path", b"/healthz"), (b":scheme", b"http"), (b":authority", b"x")]
    with socket.create_connection(service.address, timeout=10) as sock:
        port = sock.getsockname()[1]
        connection.send_headers(1, [*pseudo, header], end_stream=True)
        sock.sendall(connection.data_to_send())
        events = h2_events(sock, connection, h2.events.ConnectionTerminated)
    ended = [event for event in events if isinstance(event, h2.events.ConnectionTerminated)]
    assert [event.error_code for event in ended] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    polite_request_works(service)  # its line is written by now
    assert client_errors_of(service)["http2_protocol_error"] == before + 1
    lines = [line for line in service.output.splitlines() if f"127.0.0.1:{port} ".encode() in line]
    assert all(b"WARNING" in line and b"HTTP/2 connection from" in line for line in lines) and len(lines) <= 1, lines
    assert b"\nforged" not in service.output
    assert b"secret-token" not in service.output  # h2 quotes the value it refused: not logged (helper 54)


def test_streams_reset_before_their_answer_close_their_connection_past_a_budget(service: Service) -> None:
    # Helper 84 ("rapid reset", CVE-2023-44487): HEADERS then RST_STREAM, ~26 bytes, ran the app for
    # each stream, and a reset stream holds no concurrent-stream slot: 1 s of one client's traffic
    # (15,600 streams) kept a core busy 15 s and wrote 31,000 access lines.
    connection = h2_client()
    nope = [(":method", "GET"), (":path", "/archive/nope/"), (":scheme", "http"), (":authority", "x")]
    before = client_errors_of(service)
    with socket.create_connection(service.address, timeout=10) as sock:
        port = sock.getsockname()[1]

        def reset_at_once(count: int) -> None:
            for _ in range(count):
                stream_id = connection.get_next_available_stream_id()
                connection.send_headers(stream_id, nope, end_stream=True)
                connection.reset_stream(stream_id)
            sock.sendall(connection.data_to_send())  # one write: one batch of frames to the server

        reset_at_once(hypercorn_h2.EARLY_RESETS)
        healthz = connection.get_next_available_stream_id()
        connection.send_headers(healthz, [*nope[:1], (":path", "/healthz"), *nope[2:]], end_stream=True)
        sock.sendall(connection.data_to_send())
        answered = h2_events(sock, connection, h2.events.StreamEnded)  # within the budget: served
        # The budget fills up again by 10 a second: these 50 are over it unless this took 5 s.
        reset_at_once(50)
        ended = h2_events(sock, connection, h2.events.ConnectionTerminated)
    assert [event.headers[0] for event in answered if isinstance(event, h2.events.ResponseReceived)] == [
        (b":status", b"200")
    ]
    assert [
        (event.error_code, event.last_stream_id) for event in ended if isinstance(event, h2.events.ConnectionTerminated)
    ] == [(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, healthz)]  # the last stream started: the rest may be retried
    polite_request_works(service)  # the lines of that connection are written by now
    assert b"/archive/nope/" not in service.output  # no stream reset in its batch ran the app
    lines = [line for line in service.output.splitlines() if f"127.0.0.1:{port} ".encode() in line]
    # In either order: the access line is written once the stream's task goes on after its last bytes,
    # which the client may have read, and answered with the flood, first (a CI run, 2026-12-06).
    access, warning = sorted(lines, key=lambda line: b"WARNING" in line) if len(lines) == 2 else (b"", b"")
    assert b'"GET /healthz 2" 200' in access, lines
    assert b"WARNING" in warning and b"closed: 150 streams reset before their answer" in warning, lines
    after = client_errors_of(service)  # what the quieted lines may leave out is counted
    assert after["http2_stream_not_started"] - before["http2_stream_not_started"] == 150
    assert after["http2_reset_flood"] - before["http2_reset_flood"] == 1


def test_requests_reset_in_their_batch_count_to_hypercorns_bound_of_requests_a_connection(service: Service) -> None:
    # A request reset in its batch is never made a stream (patch 10), but counts to Hypercorn's
    # keep_alive_max_requests (1,000): the batch that reaches it retires the connection (patch 17), and
    # with no stream open its GOAWAY (NO_ERROR, naming the last stream started) comes at once, with no
    # request after it (untested until helper 176, by coverage).  Within the reset budget: 60 reset,
    # after 950 answered.
    bound = HypercornConfig().keep_alive_max_requests
    connection = h2_client()
    favicon = [(":method", "GET"), (":path", "/favicon.ico"), (":scheme", "http"), (":authority", "x")]
    with socket.create_connection(service.address, timeout=10) as sock:
        answered = 0
        while answered < bound - 50:
            for _ in range(50):
                connection.send_headers(connection.get_next_available_stream_id(), favicon, end_stream=True)
            sock.sendall(connection.data_to_send())
            events: list[h2.events.Event] = []
            while sum(isinstance(event, h2.events.StreamEnded) for event in events) < 50:
                events += connection.receive_data(sock.recv(65536))
                sock.sendall(connection.data_to_send())
            assert not any(isinstance(event, h2.events.ConnectionTerminated) for event in events)
            answered += 50
        last_answered = connection.highest_outbound_stream_id
        for _ in range(60):
            stream_id = connection.get_next_available_stream_id()
            connection.send_headers(stream_id, favicon, end_stream=True)
            connection.reset_stream(stream_id)
        sock.sendall(connection.data_to_send())
        sock.settimeout(3)
        ended = h2_events(sock, connection, h2.events.ConnectionTerminated)
    assert [
        (event.error_code, event.last_stream_id) for event in ended if isinstance(event, h2.events.ConnectionTerminated)
    ] == [(h2.errors.ErrorCodes.NO_ERROR, last_answered)]


def favicons_answered(sock: socket.socket, connection: h2.connection.H2Connection, count: int) -> None:
    """Have ``count`` requests answered on ``connection``, 50 at a time."""
    favicon = [(":method", "GET"), (":path", "/favicon.ico"), (":scheme", "http"), (":authority", "x")]
    while count:
        batch = min(50, count)
        for _ in range(batch):
            connection.send_headers(connection.get_next_available_stream_id(), favicon, end_stream=True)
        sock.sendall(connection.data_to_send())
        events: list[h2.events.Event] = []
        while sum(isinstance(event, h2.events.StreamEnded) for event in events) < batch:
            events += connection.receive_data(sock.recv(65536))
            sock.sendall(connection.data_to_send())
        assert not any(isinstance(event, h2.events.ConnectionTerminated) for event in events)
        count -= batch


def test_a_connection_at_hypercorns_bound_of_requests_finishes_its_downloads_and_refuses_the_rest(
    service: Service,
) -> None:
    # Helper 179: the request that passed keep_alive_max_requests (1,000) made Hypercorn send its GOAWAY at
    # once, which left h2 sending nothing more: a download in flight on that connection was cut, and the
    # client's next frame ended the connection as a protocol error.  Now (patch 17) the connection takes no
    # request past the bound (REFUSED_STREAM: retried elsewhere), finishes the download, then says GOAWAY
    # (NO_ERROR, naming the last stream started), ignores what follows, and idles out.
    bound = HypercornConfig().keep_alive_max_requests
    expected = httpx.get(f"{service.url}/archive/large/", timeout=30).content  # the archive, fetched on its own
    connection = h2_client()
    favicon = [(":method", "GET"), (":path", "/favicon.ico"), (":scheme", "http"), (":authority", "x")]
    download_request = [(":method", "GET"), (":path", "/archive/large/"), (":scheme", "http"), (":authority", "x")]
    port = 0
    with socket.create_connection(service.address, timeout=10) as sock:
        port = sock.getsockname()[1]
        favicons_answered(sock, connection, bound - 10 - 1)  # 989, then the download, then 20 more
        download = connection.get_next_available_stream_id()
        connection.send_headers(download, download_request, end_stream=True)
        sock.sendall(connection.data_to_send())
        body = bytearray()
        while len(body) < 30_000:  # in flight: its first bytes read, the rest held by its window (not given back)
            for event in connection.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
        later = [connection.get_next_available_stream_id() + 2 * index for index in range(20)]
        for stream_id in later:  # the last 10 started, then 10 past the bound
            connection.send_headers(stream_id, favicon, end_stream=True)
        sock.sendall(connection.data_to_send())
        ended: set[int] = set()
        refused: dict[int, int] = {}
        goaway: list[h2.events.ConnectionTerminated] = []
        while len(ended) + len(refused) < 20 and not goaway:  # the download's window still shut
            for event in connection.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    refused[event.stream_id] = event.error_code
                elif isinstance(event, h2.events.ConnectionTerminated):
                    goaway.append(event)
            sock.sendall(connection.data_to_send())
        assert ended == set(later[:10]) and not goaway
        assert refused == dict.fromkeys(later[10:], h2.errors.ErrorCodes.REFUSED_STREAM)
        connection.acknowledge_received_data(len(body), download)  # now read it all
        sock.sendall(connection.data_to_send())
        while not goaway:
            data = sock.recv(65536)
            assert data, "closed before its GOAWAY"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    assert download not in ended, "DATA after the end"
                    body += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, download)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    goaway.append(event)
            sock.sendall(connection.data_to_send())
        assert download in ended and bytes(body) == expected
        assert read_archive(bytes(body)) == files_on_disk(service.storage / "large")
        assert [(event.error_code, event.last_stream_id) for event in goaway] == [
            (h2.errors.ErrorCodes.NO_ERROR, later[9])  # the last stream started: the refused ones may be retried
        ]
        # A frame after it (h2 would take it for a protocol error) is ignored; the keep-alive timer, 5 s,
        # then closes the connection the client keeps open.
        sock.sendall(PingFrame(0, opaque_data=b"12345678").serialize())
        gone_away = time.monotonic()
        sock.settimeout(15)
        assert sock.recv(65536) == b""
        assert time.monotonic() - gone_away < 10
    polite_request_works(service)  # the lines of that connection are written by now
    lines = [line for line in service.output.splitlines() if f"127.0.0.1:{port} ".encode() in line]
    assert not [line for line in lines if b"WARNING" in line or b"ERROR" in line], lines


def test_a_connection_at_hypercorns_bound_of_requests_goes_away_once_its_last_download_is_reset(
    service: Service,
) -> None:
    # Patch 17: the last stream in flight on a retired connection reset by its client (no StreamClosed
    # from its app): the GOAWAY comes all the same, and the connection idles out.
    bound = HypercornConfig().keep_alive_max_requests
    connection = h2_client()
    download_request = [(":method", "GET"), (":path", "/archive/large/"), (":scheme", "http"), (":authority", "x")]
    with socket.create_connection(service.address, timeout=10) as sock:
        favicons_answered(sock, connection, bound - 1)
        download = connection.get_next_available_stream_id()  # the 1,000th
        connection.send_headers(download, download_request, end_stream=True)
        sock.sendall(connection.data_to_send())
        received = 0
        while received < 30_000:  # in flight, its window not given back
            for event in connection.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
                assert not isinstance(event, h2.events.ConnectionTerminated)
        connection.reset_stream(download, h2.errors.ErrorCodes.CANCEL)
        sock.sendall(connection.data_to_send())
        goaway = h2_events(sock, connection, h2.events.ConnectionTerminated)
        assert [
            (event.error_code, event.last_stream_id)
            for event in goaway
            if isinstance(event, h2.events.ConnectionTerminated)
        ] == [(h2.errors.ErrorCodes.NO_ERROR, download)]
        gone_away = time.monotonic()
        sock.settimeout(15)
        assert sock.recv(65536) == b""  # the keep-alive timer (5 s)
        assert time.monotonic() - gone_away < 10


def test_requests_reset_in_their_batch_leave_nothing_in_the_priority_tree(service: Service) -> None:
    # Helper 85: a request never started kept its PRIORITY, a node of Hypercorn's priority tree never
    # removed; with 950 more nodes (a tree holds 1,000) the connection ended with its downloads.
    connection = h2_client()
    nope = [(":method", "GET"), (":path", "/archive/nope/"), (":scheme", "http"), (":authority", "x")]
    with socket.create_connection(service.address, timeout=10) as sock:
        for _ in range(hypercorn_h2.EARLY_RESETS):
            stream_id = connection.get_next_available_stream_id()
            connection.send_headers(stream_id, nope, end_stream=True, priority_weight=100, priority_depends_on=0)
            connection.reset_stream(stream_id)
        sock.sendall(connection.data_to_send())
        for index in range(950):  # PRIORITY for idle streams far above: 950 nodes
            sock.sendall(struct.pack(">I", 5)[1:] + b"\x02\x00" + struct.pack(">IIB", 100_001 + 2 * index, 0, 15))
        healthz = connection.get_next_available_stream_id()
        connection.send_headers(healthz, [*nope[:1], (":path", "/healthz"), *nope[2:]], end_stream=True)
        sock.sendall(connection.data_to_send())
        events = h2_events(sock, connection, h2.events.StreamEnded)
    assert [event.headers[0] for event in events if isinstance(event, h2.events.ResponseReceived)] == [
        (b":status", b"200")
    ]


def priority_frame(stream_id: int, weight: int) -> bytes:
    """PRIORITY (RFC 9113 6.3, deprecated in 5.3): ``stream_id`` depends on the root with ``weight``."""
    return struct.pack(">I", 5)[1:] + b"\x02\x00" + struct.pack(">IIB", stream_id, 0, weight)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_priority_signals_cost_their_parsing_only(service: Service) -> None:
    # Helper 108 (CVE-2019-9513's shape): Hypercorn kept RFC 7540's priority tree, and with ~1,000
    # streams made siblings each PRIORITY frame rebuilt their order, 1.36 ms of the event loop for
    # 14 bytes.  Ignored now (tests/test_fences.py checks no node is made), and within the budget of
    # frames that ask for nothing (patch 14), these cost their parsing.
    connection = h2_client()
    healthz = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "x")]
    before = cpu_seconds(service.process.pid)
    with socket.create_connection(service.address, timeout=30) as sock:
        sock.sendall(connection.data_to_send())
        siblings = [100_001 + 2 * index for index in range(600)]
        sock.sendall(b"".join(priority_frame(stream_id, 15) for stream_id in siblings))
        sock.sendall(b"".join(priority_frame(siblings[index % 600], 200) for index in range(300)))
        connection.send_headers(connection.get_next_available_stream_id(), healthz, end_stream=True)
        sock.sendall(connection.data_to_send())
        events = h2_events(sock, connection, h2.events.StreamEnded)
    assert [event.headers[0] for event in events if isinstance(event, h2.events.ResponseReceived)] == [
        (b":status", b"200")
    ]
    assert cpu_seconds(service.process.pid) - before < 1  # ~0.02 s: 900 frames parsed, a request


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame as bytes (RFC 9113 section 4.1), whatever it says."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


FRAMES_THAT_ASK_NOTHING = {
    "settings": raw_frame(0x4, 0, 0),
    "ping": raw_frame(0x6, 0, 0, bytes(8)),
    "priority": priority_frame(1, 15),
    "unknown": raw_frame(0x20, 0, 0),
    "empty-data": raw_frame(0x0, 0, 1),  # on the open stream of a request whose body never comes
    "one-byte-data": raw_frame(0x0, 0, 1, b"x"),  # its window given back: it could go on for ever (helper 110)
    "altsvc": raw_frame(0xA, 0, 0, b"\x00\x00"),  # h2 ignores it from a client, and makes no event
    "window-update": raw_frame(0x8, 0, 0, struct.pack(">I", 1)),
    "window-update-closed-stream": raw_frame(0x8, 0, 1, struct.pack(">I", 1)),  # h2 makes no event of it
    # h2 answers it with RST_STREAM and no event (helper 123: uncounted, a core for as long as it liked).
    "end-stream-data-closed-stream": raw_frame(0x0, 0x1, 1),
}


@pytest.mark.parametrize("kind", FRAMES_THAT_ASK_NOTHING)
def test_frames_that_ask_for_nothing_close_their_connection_past_a_budget(service: Service, kind: str) -> None:
    # Helper 108: a connection sending such frames at 8-15 MB/s kept a core busy (~5-10 us each, a read
    # of 64 KiB held the event loop ~45 ms), and a 50 MB download beside it took 4.5 s, not 0.05.
    connection = h2_client()
    healthz = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "x")]
    before = client_errors_of(service)
    with socket.create_connection(service.address, timeout=10) as sock:
        port = sock.getsockname()[1]
        connection.send_headers(1, healthz, end_stream=not kind.endswith("-data"))
        sock.sendall(connection.data_to_send())
        answered = h2_events(sock, connection, h2.events.ResponseReceived)
        # Within the budget, and past it: one write each.
        sock.sendall(FRAMES_THAT_ASK_NOTHING[kind] * (hypercorn_h2_frames.CONTROL_FRAMES // 2))
        sock.sendall(FRAMES_THAT_ASK_NOTHING[kind] * hypercorn_h2_frames.CONTROL_FRAMES * 2)
        ended = h2_events(sock, connection, h2.events.ConnectionTerminated)
    assert [dict(event.headers)[b":status"] for event in answered if isinstance(event, h2.events.ResponseReceived)] == [
        b"200"
    ]
    assert [
        (event.error_code, event.last_stream_id) for event in ended if isinstance(event, h2.events.ConnectionTerminated)
    ] == [(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, 1)]
    assert client_errors_of(service)["http2_frame_flood"] - before.get("http2_frame_flood", 0) == 1
    polite_request_works(service)
    lines = [line for line in service.output.splitlines() if f"127.0.0.1:{port} closed".encode() in line]
    assert len(lines) <= 1 and all(b"WARNING" in line and b"ask for nothing" in line for line in lines), lines
    assert b"WARNING archiver.fences.hypercorn_h2_frames: HTTP/2 connection from 127.0.0.1:" in service.output


def test_a_body_sent_with_a_download_counts_as_asking_for_nothing(service: Service) -> None:
    # No route reads a body.  Until 2026-12-05 DATA of 1 KiB or more went uncounted, and a GET whose
    # body never ended, its download held at a zero window, kept a core busy for as long as the
    # download lasted (35 MB/s of 1 KiB frames, 130 MB/s of 16 KiB ones).
    connection = h2_client()
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    healthz = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "x")]
    request = [(":method", "GET"), (":path", "/archive/large/"), (":scheme", "http"), (":authority", "x")]
    sent, ended = 0, []
    with socket.create_connection(service.address, timeout=10) as sock:
        connection.send_headers(1, healthz)  # a request ended by an empty DATA frame, as some clients do
        connection.send_data(1, b"", end_stream=True)
        connection.send_headers(3, request)
        sock.sendall(connection.data_to_send())
        statuses: list[bytes] = []
        while len(statuses) < 2:
            events = h2_events(sock, connection, h2.events.ResponseReceived)
            statuses += [dict(e.headers)[b":status"] for e in events if isinstance(e, h2.events.ResponseReceived)]
        while not ended and sent < 100_000_000:
            while connection.local_flow_control_window(3) >= 16_384:
                connection.send_data(3, bytes(16_384))
                sent += 16_384
            sock.sendall(connection.data_to_send())
            if not (data := sock.recv(65536)):
                break
            events = connection.receive_data(data)
            ended = [event for event in events if isinstance(event, h2.events.ConnectionTerminated)]
    assert statuses == [b"200", b"200"]
    assert [event.error_code for event in ended] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    frames_paid = hypercorn_h2_frames.CONTROL_FRAMES + 2 * hypercorn_h2_frames.CONTROL_FRAMES_PER_STREAM
    assert sent < (frames_paid + 100) * 16_384, sent  # ~18 MB and what was in flight, not 100 MB
    polite_request_works(service)


def test_streams_refused_as_malformed_count_as_asking_for_nothing(service: Service) -> None:
    # Helper 124: a stream whose :path holds a space is reset before its request starts, and none of it
    # was counted: 66,000 of them in 8 s kept a core busy, the connection never closed.
    connection = h2_client(validate_outbound_headers=False)
    bad = [(b":method", b"GET"), (b":path", b"/archive/a b/"), (b":scheme", b"http"), (b":authority", b"x")]
    before = client_errors_of(service)
    ended: list[h2.events.Event] = []
    with socket.create_connection(service.address, timeout=10) as sock:
        for _ in range(2 * hypercorn_h2_frames.CONTROL_FRAMES // 50):  # 50 at a time: within 100 streams open
            for _ in range(50):
                connection.send_headers(connection.get_next_available_stream_id(), bad, end_stream=True)
            sock.sendall(connection.data_to_send())
            resets = 0
            while resets < 50 and not ended and (data := sock.recv(65536)):  # a TimeoutError: a reset missing
                events = connection.receive_data(data)
                resets += sum(isinstance(event, h2.events.StreamReset) for event in events)
                ended = [event for event in events if isinstance(event, h2.events.ConnectionTerminated)]
            if ended:
                break
    assert [event.error_code for event in ended if isinstance(event, h2.events.ConnectionTerminated)] == [
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    ]
    after = client_errors_of(service)
    assert after["http2_frame_flood"] - before.get("http2_frame_flood", 0) == 1
    assert after["http2_malformed_stream"] - before.get("http2_malformed_stream", 0) <= 1_100
    polite_request_works(service)


# A HEADERS frame (END_STREAM, END_HEADERS) whose block is whole in itself: a request, and one refused as malformed.
_FAVICON_BLOCK = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/favicon.ico"), (b":scheme", b"http"),
                                         (b":authority", b"x")])  # fmt: skip
_MALFORMED_BLOCK = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/\xff"), (b":scheme", b"http"),
                                           (b":authority", b"x")])  # fmt: skip


def refused_streams(sock: socket.socket, count: int, stream_id: int = 1) -> int:
    """Make ``count`` streams the service refuses as malformed on ``sock``, within the frame budget: the next stream id.

    ~30 bytes each; a request (``/favicon.ico``, 204) pays for every 90.  Each batch waits for its resets.
    """
    pending = bytearray()
    while count > 0:
        batch = min(90, count)
        frames = [raw_frame(0x1, 0x5, stream_id, _FAVICON_BLOCK)]
        frames += [raw_frame(0x1, 0x5, stream_id + 2 * (1 + n), _MALFORMED_BLOCK) for n in range(batch)]
        sock.sendall(b"".join(frames))
        stream_id += 2 * (1 + batch)
        count -= batch
        resets = 0
        while resets < batch:
            while len(pending) >= 9 and len(pending) >= 9 + (length := int.from_bytes(pending[:3], "big")):
                assert pending[3] != 0x7, f"GOAWAY {pending[9 + 4 : 9 + 8].hex()}"
                resets += pending[3] == 0x3
                del pending[: 9 + length]
            if resets < batch:
                chunk = sock.recv(65536)  # a TimeoutError: a reset missing
                assert chunk, "closed"
                pending += chunk
    return stream_id


def grown_by_refused_streams(service: Service, connections: int, streams: int) -> int:
    """KiB of the service's RSS that ``connections`` connections, each with ``streams`` refused streams, still hold."""
    with socket.create_connection(service.address, timeout=10) as sock:  # what a first such connection allocates
        sock.sendall(PREFACE + raw_frame(0x4, 0, 0))
        refused_streams(sock, 1_000)
    before = server_rss_kib(service)
    with contextlib.ExitStack() as held:
        for _ in range(connections):
            sock = held.enter_context(socket.create_connection(service.address, timeout=10))
            sock.sendall(PREFACE + raw_frame(0x4, 0, 0))
            last = refused_streams(sock, streams) - 2
        grown = server_rss_kib(service) - before
        # The latest are remembered: HEADERS again on one is that stream's error, a RST_STREAM, not the connection's.
        sock.sendall(raw_frame(0x1, 0x5, last, _MALFORMED_BLOCK) + raw_frame(0x6, 0, 0, b"archiver"))
        answered = raw_frames_until(sock, {0x6})
        assert [(kind, payload) for kind, _, payload in answered if kind in (0x3, 0x7)] == [
            (0x3, struct.pack(">I", h2.errors.ErrorCodes.STREAM_CLOSED))
        ]
    polite_request_works(service)
    return grown


def test_a_connection_remembers_how_its_latest_streams_closed_not_each(service: Service) -> None:
    # Helper 175: h2 kept how each stream of a connection closed, up to 65,536 (~125 bytes each), for the
    # connection's life; a stream refused as malformed costs ~30 bytes and a connection may make 100 of them
    # for each request: 65,536 in ~12 s held ~8 MB a connection.  15,000 held ~1.9 MB.
    grown = grown_by_refused_streams(service, connections=1, streams=15_000)
    assert grown < 1_000, grown  # KiB


@pytest.mark.slow
def test_connections_full_of_closed_streams_hold_little(service: Service) -> None:
    started = time.monotonic()
    grown = grown_by_refused_streams(service, connections=4, streams=70_000)
    record_figure(
        f"4 HTTP/2 connections, 70,000 streams refused as malformed each: server RSS +{grown / 1024:.1f} MB "
        f"({grown / 4 / 1024:.2f} MB a connection) in {time.monotonic() - started:.0f} s"
    )
    assert grown < 4 * 1_000, grown  # KiB: +32 MB, 8 a connection, when h2 kept 65,536 of them


def header_blocks(kind: str) -> bytes:
    """A whole header block on stream 1 (END_HEADERS), as HEADERS and CONTINUATIONs (helper 124's shapes)."""
    if kind == "continuations":  # an empty block in 64 frames: each parsed
        return raw_frame(0x1, 0x1, 1) + raw_frame(0x9, 0, 1) * 62 + raw_frame(0x9, 0x4, 1)
    padding = [hpack.NeverIndexedHeaderTuple(f"x-padding-{index}", os.urandom(2_500).hex()) for index in range(12)]
    block = hpack.Encoder().encode(padding, huffman=True)  # never indexed: the same bytes decode alike each time
    assert len(block) > 32_768
    frames = raw_frame(0x1, 0x1, 1, block[:16_384]) + raw_frame(0x9, 0, 1, block[16_384:32_768])
    return frames + raw_frame(0x9, 0x4, 1, block[32_768:])


@pytest.mark.parametrize("kind", ["large", "continuations"])
def test_header_blocks_on_a_reset_stream_count_by_their_cost(service: Service, kind: str) -> None:
    # Helper 124: h2 decodes a block whole (HPACK, in Python) before it finds its stream reset, and each
    # counted as one frame: 37.5 KB blocks, 7.3 ms each, ~8 CPU-s a connection before the cut; or 64
    # frames parsed for one counted (0.56 CPU-s a connection).
    frames = header_blocks(kind)
    connection = h2_client(validate_outbound_headers=False)
    bad = [(b":method", b"GET"), (b":path", b"/archive/a b/"), (b":scheme", b"http"), (b":authority", b"x")]
    with socket.create_connection(service.address, timeout=10) as sock:
        connection.send_headers(1, bad, end_stream=True)  # reset by the service: stream 1 closed by a reset
        sock.sendall(connection.data_to_send())
        h2_events(sock, connection, h2.events.StreamReset)
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # 40 of the 1,000 before
                sock.sendall(frames)
        ended = h2_events(sock, connection, h2.events.ConnectionTerminated)  # a TimeoutError: never closed
    assert [event.error_code for event in ended if isinstance(event, h2.events.ConnectionTerminated)] == [
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    ]
    polite_request_works(service)


def test_requests_whose_header_blocks_pass_16_kib_count_their_excess(service: Service) -> None:
    # Each is answered 431, once h2 has decoded it whole (~0.2 ms a KiB, in Python): 37.5 KB blocks,
    # 7.3 ms each, were a request each, and a connection had 1,000 of them (helper 124's shape, opened).
    padding = [hpack.NeverIndexedHeaderTuple(f"x-padding-{index}", os.urandom(2_500).hex()) for index in range(12)]
    request = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "x"), *padding]
    connection = h2_client()
    statuses: list[bytes] = []
    ended: list[h2.events.Event] = []
    with socket.create_connection(service.address, timeout=10) as sock:
        while not ended and len(statuses) < 50:
            connection.send_headers(connection.get_next_available_stream_id(), request, end_stream=True)
            sock.sendall(connection.data_to_send())
            events = h2_events(sock, connection, (h2.events.StreamEnded, h2.events.ConnectionTerminated))
            statuses += [dict(e.headers)[b":status"] for e in events if isinstance(e, h2.events.ResponseReceived)]
            ended = [event for event in events if isinstance(event, h2.events.ConnectionTerminated)]
    assert [event.error_code for event in ended] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM], statuses
    assert set(statuses) == {b"431"} and len(statuses) < 10, statuses
    polite_request_works(service)


def raw_frames_until(sock: socket.socket, kinds: set[int]) -> list[tuple[int, int, bytes]]:
    """The server's frames, (type, flags, payload), read until one of ``kinds`` (or the connection ends)."""
    frames: list[tuple[int, int, bytes]] = []
    data = b""
    while not any(kind in kinds for kind, _, _ in frames) and (chunk := sock.recv(65536)):
        data += chunk
        while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
            length = int.from_bytes(data[:3], "big")
            frames.append((data[3], data[4], data[9 : 9 + length]))
            data = data[9 + length :]
    return frames


def test_settings_count_by_their_size_and_unknown_ones_are_not_kept(service: Service) -> None:
    # Helper 125: a SETTINGS frame of 16 KiB holds 2,730 settings, and h2 kept a history of each id it
    # was sent, known or not, for the connection's life: 24 such frames held ~49 MiB a connection,
    # never given back; each cost ~11 ms to act on, and counted as one frame.
    def settings(first: int) -> bytes:
        return raw_frame(0x4, 0, 0, b"".join(struct.pack(">HI", first + index, 1) for index in range(2_730)))

    ping = raw_frame(0x6, 0, 0, b"archiver")
    before = resident_kib(service.process.pid)
    with socket.create_connection(service.address, timeout=10) as sock:  # within the budget: three
        sock.sendall(PREFACE + raw_frame(0x4, 0, 0) + b"".join(settings(0x100 + n * 2_730) for n in range(3)) + ping)
        acknowledged = raw_frames_until(sock, {0x6})  # the PING's answer: the SETTINGS before it were acted on
    grown = resident_kib(service.process.pid) - before
    with socket.create_connection(service.address, timeout=10) as sock:  # past it: twenty
        sock.sendall(PREFACE + raw_frame(0x4, 0, 0) + b"".join(settings(0x100 + n * 2_730) for n in range(20)))
        ended = raw_frames_until(sock, {0x7})
    assert [(kind, payload) for kind, _, payload in acknowledged if kind == 0x6] == [(0x6, b"archiver")]
    assert grown < 3_000, grown  # KiB: 6.8-7.9 MB when they were kept
    goaways = [payload for kind, _, payload in ended if kind == 0x7]
    assert [int.from_bytes(payload[4:8], "big") for payload in goaways] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    polite_request_works(service)


def test_headers_on_a_stream_its_client_reset_count_as_asking_for_nothing(service: Service) -> None:
    # Helper 123: h2 answers each with RST_STREAM(STREAM_CLOSED) and no event, and every HEADERS went
    # uncounted, as if it made a request: 750,000 in 5 s, a core busy, the connection never closed.
    connection = h2_client()
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    request = [(":method", "GET"), (":path", "/archive/large/"), (":scheme", "http"), (":authority", "x")]
    before = client_errors_of(service)
    with socket.create_connection(service.address, timeout=10) as sock:
        connection.send_headers(1, request, end_stream=True)
        sock.sendall(connection.data_to_send())
        answered = h2_events(sock, connection, h2.events.ResponseReceived)
        connection.reset_stream(1)
        sock.sendall(connection.data_to_send())
        # END_STREAM | END_HEADERS, ":method: GET" (index 2 of HPACK's static table), again and again
        sock.sendall(raw_frame(0x1, 0x5, 1, b"\x82") * hypercorn_h2_frames.CONTROL_FRAMES * 2)
        ended = h2_events(sock, connection, h2.events.ConnectionTerminated)
    assert [dict(event.headers)[b":status"] for event in answered if isinstance(event, h2.events.ResponseReceived)] == [
        b"200"
    ]
    assert [event.error_code for event in ended if isinstance(event, h2.events.ConnectionTerminated)] == [
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    ]
    assert client_errors_of(service)["http2_frame_flood"] - before.get("http2_frame_flood", 0) == 1
    polite_request_works(service)


def logged_line(service: Service, start: str, timeout: float = 10) -> bytes:
    """The service's first log line containing ``start``, waited for (a download's line comes as its task ends)."""
    deadline = time.monotonic() + timeout
    while not (found := [line for line in bytes(service.output).splitlines() if start.encode() in line]):
        assert time.monotonic() < deadline, f"no line with {start!r}"
        time.sleep(0.05)
    return found[0]


@pytest.mark.parametrize("flood", ["frame", "reset"])
def test_the_downloads_of_a_connection_closed_for_a_flood_say_so(service: Service, flood: str) -> None:
    # Logged "client disconnected" until 2026-12-05, as if the user had cancelled: an operator
    # could tell them apart only by the connection's WARNING, quieted to one every 10 s.
    connection = h2_client()
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})  # held: no byte of its body
    request = [(":method", "GET"), (":path", "/archive/large/"), (":scheme", "http"), (":authority", "x")]
    nope = [(":method", "GET"), (":path", "/archive/nope/"), (":scheme", "http"), (":authority", "x")]
    with socket.create_connection(service.address, timeout=10) as sock:
        connection.send_headers(1, request, end_stream=True)
        sock.sendall(connection.data_to_send())
        answered = h2_events(sock, connection, h2.events.ResponseReceived)
        if flood == "frame":
            sock.sendall(FRAMES_THAT_ASK_NOTHING["ping"] * hypercorn_h2_frames.CONTROL_FRAMES * 2)
        else:
            for _ in range(hypercorn_h2.EARLY_RESETS + 50):
                stream_id = connection.get_next_available_stream_id()
                connection.send_headers(stream_id, nope, end_stream=True)
                connection.reset_stream(stream_id)
            sock.sendall(connection.data_to_send())
        ended = h2_events(sock, connection, h2.events.ConnectionTerminated)
    assert [dict(event.headers)[b":status"] for event in answered if isinstance(event, h2.events.ResponseReceived)] == [
        b"200"
    ]
    assert [event.error_code for event in ended if isinstance(event, h2.events.ConnectionTerminated)] == [
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    ]
    line = logged_line(service, f"download large for 127.0.0.1: connection closed: HTTP/2 {flood} flood")
    assert b" INFO " in line, line
    polite_request_works(service)


@pytest.mark.parametrize(
    ("kind", "requests", "frames"),
    [
        ("ping", 30, 2 * hypercorn_h2_frames.CONTROL_FRAMES),
        ("window-update", 300, 3 * hypercorn_h2_frames.WINDOW_UPDATES // 2),
    ],
)
def test_a_connection_banks_no_burst_of_frames_that_ask_for_nothing(
    service: Service, kind: str, requests: int, frames: int
) -> None:
    # Helper 110: the allowance grew with each request and second, uncapped: a connection that had made
    # 30 requests could then hold the event loop with 4,000 frames at once.  The bucket holds 1,000.
    # WINDOW_UPDATEs have a bucket of their own, earned by requests (two each) and by DATA frames
    # sent: 300 requests earn 600 and more, and it holds 1,000 all the same.
    connection = h2_client()
    healthz = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "x")]
    with socket.create_connection(service.address, timeout=10) as sock:
        for _ in range(requests):
            connection.send_headers(connection.get_next_available_stream_id(), healthz, end_stream=True)
            sock.sendall(connection.data_to_send())
            h2_events(sock, connection, h2.events.StreamEnded)
        sock.sendall(FRAMES_THAT_ASK_NOTHING[kind] * frames)
        ended = h2_events(sock, connection, h2.events.ConnectionTerminated)
    assert [event.error_code for event in ended if isinstance(event, h2.events.ConnectionTerminated)] == [
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    ]


@pytest.mark.parametrize(
    "window",
    [
        65_535,
        4_096,
    ],
)
def test_a_client_that_opens_its_windows_for_every_frame_it_reads_is_served_whole(
    service: Service, window: int
) -> None:
    # The budget's other side: two WINDOW_UPDATEs for the stream and one for the connection after every
    # DATA frame (more than usual clients send: they mostly wait for half a window) stay within it; with
    # a 4 KiB window too, whose frames are 4 KiB at most (helper 109: nghttp -w 12 was cut at 37 MB).
    connection = h2_client()
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    request = [(":method", "GET"), (":path", "/archive/large/"), (":scheme", "http"), (":authority", "x")]
    received, length, ended = 0, -1, False
    frame_sizes: Counter[int] = Counter()  # what the server sent: said if it is cut (once, in a slow run)
    with socket.create_connection(service.address, timeout=10) as sock:
        port = sock.getsockname()[1]
        connection.send_headers(1, request, end_stream=True)
        sock.sendall(connection.data_to_send())
        while not ended and (data := sock.recv(65536)):
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    length = int(dict(event.headers)[b"content-length"])
                elif isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    frame_sizes[event.flow_controlled_length] += 1
                    received += len(event.data)
                    half = event.flow_controlled_length // 2  # the stream's window in two steps
                    for increment in (half, event.flow_controlled_length - half):
                        # The last DATA and the END_STREAM may come in one read: the stream is closed then.
                        with contextlib.suppress(h2.exceptions.StreamClosedError):
                            if increment:
                                connection.increment_flow_control_window(increment, 1)
                    connection.increment_flow_control_window(event.flow_controlled_length)
                ended = ended or isinstance(event, (h2.events.StreamEnded, h2.events.ConnectionTerminated))
            sock.sendall(connection.data_to_send())
    said = [line for line in service.output.splitlines() if f"127.0.0.1:{port}".encode() in line]
    assert received == length > 16_000_000, (received, frame_sizes.most_common(8), said)
    assert connection.state_machine.state is not h2.connection.ConnectionState.CLOSED


@dataclass
class GrantsRead:
    received: int  # bytes of the album
    closed: int | None  # the GOAWAY's error code, if the connection was closed
    cpu: float  # the service's CPU-s meanwhile


def read_through_grants(
    service: Service, grants: list[int], enough: int, stalled: int = 0, extra: int = 0
) -> GrantsRead:
    """A large album read over raw HTTP/2, the stream's window given in ``grants``.

    Each grant in turn, once every byte granted before it came (so each is a
    frame of its size, or more frames), with three WINDOW_UPDATEs: the
    stream's in two halves, the connection's.  The client stops once it has
    ``enough`` bytes.  ``stalled`` more streams on the connection, asked
    first, are answered (a 404 page) and never given a window; ``extra``
    more WINDOW_UPDATEs of a byte for the connection with each grant.
    """
    connection = h2_client()
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    missing = [(":method", "GET"), (":path", f"/archive/{'0' * 32}/"), (":scheme", "http"), (":authority", "x")]
    request = [(":method", "GET"), (":path", "/archive/large/"), (":scheme", "http"), (":authority", "x")]
    with socket.create_connection(service.address, timeout=10) as sock:
        for _ in range(stalled):
            connection.send_headers(connection.get_next_available_stream_id(), missing, end_stream=True)
        sock.sendall(connection.data_to_send())
        answered = 0
        while answered < stalled:
            events = h2_events(sock, connection, h2.events.ResponseReceived)
            answered += sum(isinstance(event, h2.events.ResponseReceived) for event in events)
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(stream_id, request, end_stream=True)
        connection.increment_flow_control_window(grants[0], stream_id)
        received, granted, returned, turn = 0, grants[0], 0, 1
        before = cpu_seconds(service.process.pid)
        sock.sendall(connection.data_to_send())
        while received < enough and (data := sock.recv(65536)):
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += event.flow_controlled_length
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return GrantsRead(received, event.error_code, cpu_seconds(service.process.pid) - before)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    return GrantsRead(received, None, cpu_seconds(service.process.pid) - before)
            if received == granted:
                grant = grants[turn % len(grants)]
                for increment in (grant // 2, grant - grant // 2):
                    if increment:
                        connection.increment_flow_control_window(increment, stream_id)
                connection.increment_flow_control_window(received - returned)
                for _ in range(extra):
                    connection.increment_flow_control_window(1)
                granted, returned, turn = granted + grant, received, turn + 1
            sock.sendall(connection.data_to_send())
    return GrantsRead(received, None, cpu_seconds(service.process.pid) - before)


def test_a_window_given_back_in_a_large_and_a_small_piece_is_served(service: Service) -> None:
    # The slow run's cut (2026-12-05): a 4 KiB window split once stays split, 4,048 + 48 bytes, and a
    # 48-byte frame earned 0.19 of the three WINDOW_UPDATEs this client spends on it: cut at 2.25 MB.
    read = read_through_grants(service, [4_048, 48], enough=6_000_000)
    assert (read.received >= 6_000_000, read.closed) == (True, None), read


@pytest.mark.parametrize(
    ("grants", "cut_before"),
    [
        ([1], hypercorn_h2_frames.WINDOW_UPDATES),  # ~500 frames: each pays for 3/2048 of a WINDOW_UPDATE
        ([1024, 1, 1], 2_000_000),  # helper 120: a short frame's own bytes filled the bank twice over
        ([342], 1_000_000),  # helper 120: a third of a KiB counted in full on its own
        # 3.2 MB of 16 KiB frames first bank 16 short frames, not 1,600: cut within ~530 bytes
        ([16_384] * 200 + [1] * 2_000, 200 * 16_384 + 2_000),
    ],
    ids=["bytes", "a-KiB-and-two-bytes", "thirds-of-a-KiB", "bytes-after-3-MB"],
)
def test_a_window_opened_in_tiny_pieces_does_not_pay_for_itself(
    service: Service, grants: list[int], cut_before: int
) -> None:
    # Two or three WINDOW_UPDATEs for each grant, a frame a round trip, for ever: a KiB sent pays for six
    # at most, and these clients spend ~2,000, 7 and 9 for each KiB (helper 120: 0.6 CPU-s a MB, served).
    before = client_errors_of(service)
    read = read_through_grants(service, grants, enough=4_000_000)
    assert read.closed == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert read.received < cut_before, read
    assert client_errors_of(service)["http2_frame_flood"] - before.get("http2_frame_flood", 0) == 1
    polite_request_works(service)


def test_downloads_on_one_connection_share_its_window_evenly(service: Service) -> None:
    # Four downloads on one connection, its window python h2's own (64 KiB, given back as read): when
    # the window opened, Hypercorn woke the streams in the order they were made and the first took it
    # all, each time; each stream had half the bytes of the one before (40, 18 and 8 MB of 80 when
    # the first ended).  Served least lately first, each has about what the others have.
    connection = h2_client()
    request = [(":method", "GET"), (":path", "/archive/large/"), (":scheme", "http"), (":authority", "x")]
    streams = [1, 3, 5, 7]
    received, length, first_ended = dict.fromkeys(streams, 0), 0, None
    with socket.create_connection(service.address, timeout=10) as sock:
        for stream_id in streams:
            connection.send_headers(stream_id, request, end_stream=True)
        sock.sendall(connection.data_to_send())
        while first_ended is None and (data := sock.recv(65536)):
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    length = int(dict(event.headers)[b"content-length"])
                elif isinstance(event, h2.events.DataReceived):
                    received[event.stream_id] += len(event.data)
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and first_ended is None:
                    first_ended = dict(received)
            sock.sendall(connection.data_to_send())
    assert first_ended is not None and length > 16_000_000
    # Served first unblocked first: 8, 4 and 2 MB of 16 (40, 18 and 8 of 80); served in turn, 10.7-16 MB (a
    # producer that lags has its turns taken by the others: 3/4 failed 1 run in 6).
    assert min(first_ended.values()) > length // 2, (first_ended, length)


def test_window_updates_past_what_the_frames_pay_for_end_a_download(service: Service) -> None:
    # Frames of 16 KiB pay for four WINDOW_UPDATEs each, however many bytes they carry: a client that
    # sends twelve for each (its window, and nine bytes more) is cut within the bucket's 1,000.
    read = read_through_grants(service, [16_384], enough=8_000_000, extra=9)
    assert read.closed == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert read.received < 3_000_000, read  # ~125 frames: 2 MB


def test_streams_held_at_a_zero_window_cost_little_while_another_is_read(service: Service) -> None:
    # Helper 120: Hypercorn's priority tree found the next stream to send by popping every blocked one
    # off a heap, at each frame sent, and each WINDOW_UPDATE of the connection woke every stream: with
    # 99 streams held at a zero window, one read 4 KiB at a time cost 4.5 times the CPU a MB (0.22 s
    # against 0.05; here 3.3 times).  Streams served in turn from a queue: ~1.5 times (the 99 woken).
    alone = read_through_grants(service, [4_096], enough=4_000_000)
    beside = read_through_grants(service, [4_096], enough=4_000_000, stalled=99)
    assert (alone.received >= 4_000_000, beside.received >= 4_000_000, beside.closed) == (True, True, None)
    assert beside.cpu < 2 * alone.cpu + 0.02, (beside.cpu, alone.cpu)


def test_a_frame_longer_than_the_limit_ends_its_connection_at_its_header(service: Service) -> None:
    # Helper 108: h2 checked a frame's length only once the whole frame had come: a header announcing
    # 16 MiB had the server buffer 16 MiB first (64 connections: +1.1 GB of RSS, which stayed).
    connection = h2_client()
    with socket.create_connection(service.address, timeout=3) as sock:
        sock.sendall(connection.data_to_send())
        sock.sendall(struct.pack(">I", 0xFFFFFF)[1:] + b"\x00\x00" + struct.pack(">I", 1) + bytes(1000))
        events = h2_events(sock, connection, h2.events.ConnectionTerminated)  # a TimeoutError: still waiting
    assert [event.error_code for event in events if isinstance(event, h2.events.ConnectionTerminated)] == [
        h2.errors.ErrorCodes.FRAME_SIZE_ERROR
    ]


def test_a_header_block_is_refused_once_it_passes_64_kib(service: Service) -> None:
    # Helper 123: h2 held up to 64 CONTINUATIONs of 16 KiB, ~1 MiB a connection, before it refused a
    # block whose decoded list may not pass 64 KiB (64 connections: +86 MiB of RSS, not given back).
    request = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "x")]
    padding = [(f"x-padding-{index}", os.urandom(2_500).hex()) for index in range(12)]  # ~60 KB, ~38 KB coded
    connection = h2_client()
    with socket.create_connection(service.address, timeout=3) as sock:
        connection.send_headers(1, request + padding, end_stream=True)  # in frames of 16 KiB: taken, and answered
        sock.sendall(connection.data_to_send())
        answered = h2_events(sock, connection, h2.events.StreamEnded)
        # Six frames of 16 KiB and no end: refused at the fifth's header.
        block = bytes(16_384)
        sock.sendall(raw_frame(0x1, 0x1, 3, block) + raw_frame(0x9, 0, 3, block) * 5)  # no END_HEADERS
        ended = h2_events(sock, connection, h2.events.ConnectionTerminated)  # a TimeoutError: still taking them
    assert [dict(event.headers)[b":status"] for event in answered if isinstance(event, h2.events.ResponseReceived)] == [
        b"431"  # past the service's own 16 KiB for a request's head
    ]
    assert [event.error_code for event in ended if isinstance(event, h2.events.ConnectionTerminated)] == [
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    ]
    polite_request_works(service)


def test_a_client_offering_a_larger_hpack_table_is_answered_from_the_default_one(service: Service) -> None:
    # Helper 108: a client's SETTINGS_HEADER_TABLE_SIZE of 2**32-1 had the server keep every header it
    # sent on the connection: each redirect's Location, echoing a request target of up to 16 KiB.
    connection = h2_client()
    connection.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**32 - 1})
    with socket.create_connection(service.address, timeout=10) as sock:
        for index in range(3):
            stream_id = connection.get_next_available_stream_id()
            connection.send_headers(stream_id, [(":method", "GET"), (":path", f"/archive/small?{index}{'q' * 3000}"),
                                                (":scheme", "http"), (":authority", "x")], end_stream=True)  # fmt: skip
            sock.sendall(connection.data_to_send())
            events = h2_events(sock, connection, h2.events.StreamEnded)
            assert [
                dict(event.headers)[b":status"] for event in events if isinstance(event, h2.events.ResponseReceived)
            ] == [b"308"]
    assert connection.decoder.header_table.maxsize <= 4096


@pytest.mark.parametrize("path", [b"/healthz", b"?x"])  # a 405, a 400: both answered before the body
def test_http2_body_data_after_the_answer_costs_nothing_but_itself(service: Service, path: bytes) -> None:
    # RFC 9113 lets a client go on sending a body its stream was answered before: Hypercorn raised
    # KeyError for the DATA, which ended the connection and every download on it (found by helper 32).
    connection = h2_client(validate_outbound_headers=False)
    with socket.create_connection(service.address, timeout=10) as sock:
        connection.send_headers(1, [(b":method", b"POST"), (b":path", path), (b":scheme", b"http"),
                                    (b":authority", b"x")])  # fmt: skip
        sock.sendall(connection.data_to_send())
        answered = h2_events(sock, connection, h2.events.StreamEnded)
        connection.send_data(1, b"late body", end_stream=True)
        connection.send_headers(3, [(b":method", b"GET"), (b":path", b"/favicon.ico"), (b":scheme", b"http"),
                                    (b":authority", b"x")], end_stream=True)  # fmt: skip
        sock.sendall(connection.data_to_send())
        events = h2_events(sock, connection, h2.events.StreamEnded)
    statuses = {
        event.stream_id: dict(event.headers)[b":status"]
        for event in answered + events
        if isinstance(event, h2.events.ResponseReceived)
    }
    assert statuses == {1: b"405" if path == b"/healthz" else b"400", 3: b"204"}
    assert b"KeyError" not in service.output


@pytest.mark.parametrize("body", [b"Content-Length: 10", b"Transfer-Encoding: chunked", None])
def test_a_405_before_a_body_says_the_connection_closes(service: Service, body: bytes | None) -> None:
    # RFC 9110 10.1.1, RFC 9112 9.6: an answer sent before the request's body is read SHOULD say
    # whether the connection closes; Hypercorn closes it (helper 143: a keep-alive client found it
    # closed).  With no body the connection lives on: a request pipelined after it is answered.
    head = b"POST /archive/small/ HTTP/1.1\r\nHost: x\r\n" + (body + b"\r\n" if body else b"") + b"\r\n"
    with socket.create_connection(service.address, timeout=10) as sock:
        sock.sendall(head if body else head + b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"HTTP/1.1 405 " not in answer or b"\r\n\r\n" not in answer.split(b"HTTP/1.1 405 ", 1)[1]:
            answer += sock.recv(65536)
        if body is None:
            while b"HTTP/1.1 204 " not in answer:
                answer += sock.recv(65536)
        else:
            while data := sock.recv(65536):  # closed by the server, the body unread
                answer += data
    final_head = answer.split(b"HTTP/1.1 405 ", 1)[1].split(b"\r\n\r\n", 1)[0].lower()
    assert (b"connection: close" in final_head) == (body is not None)


# Finding 2: ten HTTP/1.1 requests at once with an illegal chunk header ended the process.
def test_illegal_chunk_headers_at_once_cost_their_connections_only(service: Service) -> None:
    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    for _ in range(5):
        answers: list[bytes] = []

        def send(answers: list[bytes] = answers) -> None:
            answers.append(exchange(service.address, request))

        threads = [threading.Thread(target=send) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(answer.startswith(b"HTTP/1.1 4") or answer == b"" for answer in answers), answers
        polite_request_works(service)
    assert b"BusyResourceError" not in service.output


# Finding 4: a Range of blanks cost CPU with the square of its length.
def test_range_parsing_is_linear_and_capped() -> None:
    header = "bytes=" + " " * 64_000 + "x"
    started = time.process_time()
    for _ in range(10):
        assert parse_range(header, 10_000) is None
    assert time.process_time() - started < 0.05  # CPU seconds for ten 64 kB headers; was ~3 s for one
    assert parse_range("bytes=" + " " * 180 + "5-9", 100) is not None  # under the cap: still read


# Finding 6: connections that should close stayed open for 120 s and more.
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /archive/small/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /archive/small/ HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part of the body",
    ],
    ids=["close", "close-archive", "http10-archive", "http10", "unfinished-body"],
)
def test_connection_closes_when_http_says_it_must(service: Service, request_bytes: bytes) -> None:
    with socket.create_connection(service.address, timeout=5) as sock:
        sock.sendall(request_bytes)  # no half-close: the server must close of its own accord
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):  # a TimeoutError here fails the test
            received += chunk
    assert received.startswith(b"HTTP/1.1 ")
    assert time.monotonic() - started < 5


def test_a_get_with_an_empty_chunked_body_is_served(service: Service) -> None:
    # What nginx sends upstream for an HTTP/2 client's GET ended by an empty DATA frame (helper 124:
    # refused with a 400 through nginx when every chunked body was).
    with socket.create_connection(service.address, timeout=5) as sock:
        sock.sendall(b"GET /archive/small/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        connection = h11.Connection(h11.CLIENT)
        connection.send(h11.Request(method="GET", target="/archive/small/", headers=[("Host", "x")]))
        status, body = 0, b""
        while not isinstance(event := connection.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
    assert status == 200
    assert read_archive(body) == files_on_disk(service.storage / "small")


def test_a_get_whose_chunked_body_does_not_end_is_refused(service: Service) -> None:
    started = time.monotonic()
    with socket.create_connection(service.address, timeout=30) as sock:
        sock.sendall(b"GET /archive/large/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # no half-close: the service closes
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert time.monotonic() - started >= EMPTY_BODY_WAIT  # a lower bound: however busy the machine


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Transfer-Encoding: chunked\r\n", b"1\r\nx\r\n" * 1000),
        (b"Content-Length: 5\r\n", b"x" * 5),
    ],
    ids=["chunked", "length"],
)
@pytest.mark.parametrize("path", [b"/archive/large/", b"/healthz"])
def test_a_request_with_a_body_is_refused_and_its_connection_closed(
    service: Service, framing: bytes, body: bytes, path: bytes
) -> None:
    # Helper 123: no route reads a body, and h11 parses a chunked one a chunk at a time (~11 us each): a
    # GET sending 1-byte chunks beside its own download kept a core busy for as long as the download ran.
    with socket.create_connection(service.address, timeout=5) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):  # no half-close: a TimeoutError fails the test, the connection kept
            answer += chunk
    head, _, page = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"\r\nconnection: close" in head.lower(), answer
    assert page.decode() == UNPARSED_REQUEST.sentence + "\n"
    # A GET that says its body is empty is a GET.
    status, _, _ = http11_request(service.address, "GET", b"/healthz", [("Content-Length", "0")])
    assert status == 200


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n",  # obsolete line folding
    ],
    ids=["length-first", "chunked-first", "folded"],
)
def test_a_request_framed_two_ways_is_refused_and_its_connection_closed(service: Service, framing: bytes) -> None:
    # Helper 108: h11 framed such a request by Transfer-Encoding and kept the connection, where RFC 9112
    # 6.3 says the server MUST close after answering it (a front that framed it by Content-Length would
    # take the bytes after the chunked body for the next request: smuggling).
    for attempt in range(10):
        padding = b"X-Padding: %b\r\n" % (b"a" * 20_000) if attempt == 0 else b""  # a 431's head too (helper 110)
        with socket.create_connection(service.address, timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + padding + framing + b"\r\n0\r\n\r\n")
            sock.sendall(b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")  # no half-close
            answer = b""
            while chunk := sock.recv(65536):  # a TimeoutError here fails the test: the connection stayed open
                answer += chunk
        # With the padding, h11 may refuse the head itself if it came in pieces: its 431 closes too.
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ") if padding else b"HTTP/1.1 400 ")
        assert answer.count(b"HTTP/1.1 ") == 1
        if answer.startswith(b"HTTP/1.1 400 "):  # what happened, not the default 400's bad filename (helper 138)
            assert answer.partition(b"\r\n\r\n")[2].decode() == UNPARSED_REQUEST.sentence + "\n"
    polite_request_works(service)  # the lines of those connections are written by now
    # Helper 109: the close from the app's task read what the client still sent, and the reading
    # task, woken, found the socket busy (2 in 9): a WARNING for an error that was none.
    assert b"BusyResourceError" not in service.output


# Finding 8: a header over the README's 16 KiB limit was accepted over HTTP/1.1.
@pytest.mark.parametrize("size", [20_000, 65_000])
def test_headers_over_16_kib_get_431(service: Service, size: int) -> None:
    status, _, _ = http11_request(service.address, "GET", b"/archive/small/", [("X-Padding", "a" * size)])
    assert status == 431
    with httpx.Client(verify=CLIENT_TLS, http1=False, http2=True, timeout=10) as client:
        # HTTP/2: Hypercorn takes a header block of up to 64 KiB, the app refuses past 16.
        assert client.get(f"{service.url}/archive/small/", headers={"X-Padding": "a" * 20_000}).status_code == 431
    assert http11_request(service.address, "GET", b"/archive/small/", [("X-Padding", "a" * 8_000)])[0] == 200


def server_rss_kib(service: Service) -> int:
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def closes_within(address: tuple[str, int], request: bytes, timeout: float) -> float:
    """Send ``request`` on a kept-alive connection, read its answer, then the server's close: seconds it took."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        started = time.monotonic()
        while sock.recv(65536):  # a TimeoutError here fails the test: the connection stayed open
            pass
    return time.monotonic() - started


# Found by a hostile tester after the fixes above (issue 23's review).
def test_a_kept_alive_connection_closes_after_the_keep_alive_timeout_once_idle(service: Service) -> None:
    # Quart-Trio cancelled the task that restarts Hypercorn's idle timer: a connection that had
    # carried one request stayed open for ever (100 of them locked everyone out).
    http11 = b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n"
    connection = h2_client()
    connection.send_headers(1, [(b":method", b"GET"), (b":path", b"/favicon.ico"), (b":scheme", b"http"),
                                (b":authority", b"x")], end_stream=True)  # fmt: skip
    results: list[float] = []
    threads = [
        threading.Thread(target=lambda data=data: results.append(closes_within(service.address, data, 15)))
        for data in (http11, connection.data_to_send())
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and all(seconds < 10 for seconds in results)  # keep_alive_timeout is 5 s


def trickled_until_closed(address: tuple[str, int], start: bytes, trickled: bytes, limit: float) -> float:
    """Send ``start``, then ``trickled`` a byte every 0.25 s: seconds until the server closed the connection.

    AssertionError if it is still open after ``limit`` s or ``trickled`` ran out first.
    """
    with socket.create_connection(address, timeout=limit) as sock:
        sock.sendall(start)
        started = time.monotonic()
        sock.settimeout(0.25)
        for byte in trickled:
            try:
                sock.send(bytes((byte,)))
                while sock.recv(65536):  # an answer to the start (SETTINGS), not the end
                    pass
                return time.monotonic() - started
            except TimeoutError:
                assert time.monotonic() - started < limit, "still open"
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
    raise AssertionError("everything was sent before the connection closed")


def test_a_request_trickled_a_byte_at_a_time_holds_its_connection_for_the_keep_alive_timeout(service: Service) -> None:
    # Slowloris: a head (or an HTTP/2 frame, or a header block) that never ends, one byte every
    # 0.25 s so that no read ever waits long.  Hypercorn's keep-alive timer runs from the
    # connection's start (or its last answer) until a request is whole, whatever arrives: each
    # such connection is closed after 5 s, holding one connection slot (ARCHIVER_MAX_CONNECTIONS).
    head = b"GET /archive/small/ HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: a\r\n" * 100
    connection = h2_client()
    preface = connection.data_to_send()
    request = [(b":method", b"GET"), (b":path", b"/archive/small/"), (b":scheme", b"http"), (b":authority", b"x")]
    connection.send_headers(1, request, end_stream=True)
    headers_frame = connection.data_to_send()
    block = hpack.Encoder().encode([*request, *((b"x-padding-%d" % index, b"a") for index in range(100))])
    unended_block = raw_frame(0x1, 0x1, 1, block[:10])  # HEADERS, END_STREAM, not END_HEADERS
    continuation = raw_frame(0x9, 0x4, 1, block[10:])  # CONTINUATION, END_HEADERS
    cases = {
        "HTTP/1.1 head": (b"", head),
        "HTTP/2 HEADERS frame": (preface, headers_frame),
        "HTTP/2 header block": (preface + unended_block, continuation),
        "HTTP/1.1 blank lines": (b"", b"\r\n" * 40),  # skipped before a request line, as nginx does
    }
    closed_after: dict[str, float] = {}

    def trickle(name: str, start: bytes, trickled: bytes) -> None:
        closed_after[name] = trickled_until_closed(service.address, start, trickled, limit=20)

    threads = [threading.Thread(target=trickle, args=(name, *case)) for name, case in cases.items()]
    for thread in threads:
        thread.start()
    polite_request_works(service)  # meanwhile
    for thread in threads:
        thread.join()
    assert set(closed_after) == set(cases)
    assert all(4 < seconds < 12 for seconds in closed_after.values()), closed_after  # keep_alive_timeout is 5 s


@pytest.mark.parametrize(
    "first, status",
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"200"),
        (b"GET ?x HTTP/1.0\r\n\r\n", b"400"),
        (b"GET ?x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"400"),
    ],
)
def test_what_follows_a_request_that_closes_its_connection_is_not_read(
    service: Service, first: bytes, status: bytes
) -> None:
    # RFC 9112 9.6: after "close", no further request is processed.  h11 read the pipelined bytes
    # as an error: a 400 came in place of the first answer, or none came (found by helper 33).
    for _ in range(5):
        with socket.create_connection(service.address, timeout=10) as sock:
            sock.sendall(first + b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")  # no half-close (see README)
            answer = b""
            while chunk := sock.recv(65536):  # the server closes after its one answer
                answer += chunk
        assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == status
        assert answer.count(b"HTTP/1.") == 1


def test_what_a_client_sends_after_a_request_that_closes_its_connection_is_dropped_as_it_comes(
    service: Service,
) -> None:
    # Bytes that come in later reads, once the client's side must close: the fence has Hypercorn read
    # on (NEED_DATA, so that the end of input is seen), and h11 would keep every byte in its buffer.
    # hypercorn_h11's handle drops them; the test above sends its bytes with the request, in one read.
    # With the drop taken out, 64 MiB sent during a download grew the server by ~80 MB and took a
    # minute to send (found by helper 169, by coverage: no test reached the drop).
    before = server_rss_kib(service)
    junk = b"x" * (1 << 20)
    with socket.create_connection(service.address, timeout=30) as sock:
        sock.sendall(b"GET /archive/large/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = bytearray(sock.recv(65536))  # the answer has begun: the request was read whole
        started = time.monotonic()
        for _ in range(64):
            sock.sendall(junk)
        sending = time.monotonic() - started
        grown_mib = (server_rss_kib(service) - before) / 1024
        while chunk := sock.recv(1 << 20):
            answer += chunk
    head, body = bytes(answer).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert read_archive(body) == files_on_disk(service.storage / "large")
    assert grown_mib < 16, f"server RSS grew {grown_mib:.1f} MiB for 64 MiB sent after the request"
    assert sending < 10, f"64 MiB took {sending:.1f} s to send"
    polite_request_works(service)


def test_a_connection_the_client_closed_ends_with_its_response_not_at_the_keep_alive_timeout(service: Service) -> None:
    # Hypercorn's keep-alive timer held it in CLOSE-WAIT for 5 s: polite clients one after another
    # filled a small ARCHIVER_MAX_CONNECTIONS (found by helper 32).
    for _ in range(5):
        with socket.create_connection(service.address, timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}\n"):
                answer += sock.recv(65536)
            sock.shutdown(socket.SHUT_WR)  # as curl's close: the server reads its end
            started = time.monotonic()
            assert sock.recv(65536) == b""  # a TimeoutError here: the connection was kept
            assert time.monotonic() - started < 4  # not the keep-alive timeout's 5 s (1 was tight: helper 151)


@pytest.mark.parametrize(
    "target, host",
    [
        (b"http://x/archive/small/", b"y"),
        (b"HTTP://x:80/archive/small/?a=1", b"a b"),  # the target's authority stands for the Host field
        (b"https://[::1]:8443/archive/small/", b"x"),
    ],
)
def test_a_request_target_in_absolute_form_is_served_as_its_path(service: Service, target: bytes, host: bytes) -> None:
    # RFC 9112 3.2.2: a server MUST accept it (helper 143: a 400).
    request = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    answer = b""
    with socket.create_connection(service.address, timeout=10) as sock:  # not half-closed: a client that left
        sock.sendall(request)
        while data := sock.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert read_archive(body)["Фото/notes.txt"] == b"notes"


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/9.9", b"HTTP/0.9"])
def test_a_request_line_of_another_major_version_is_505_and_its_connection_closed(
    service: Service, version: bytes
) -> None:
    # RFC 9110 15.6.6, RFC 9112 2.3 (helper 170): h11 takes any "HTTP/<digit>.<digit>", and such a request was
    # served with its version in the scope, past every guard that tells HTTP/1.x by it: this GET's chunked
    # body was not refused (helper 123's lever), and "HTTP/0.9" got a deflated archive close-delimited.
    with socket.create_connection(service.address, timeout=5) as sock:
        sock.sendall(b"GET /archive/large/ " + version + b"\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # no half-close: a TimeoutError fails the test, the connection kept
            answer += chunk
    head, _, page = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 ") and b"\r\nconnection: close" in head.lower(), answer[:300]
    assert page.decode() == UNPARSED_REQUEST.sentence + "\n"
    # A higher minor version is HTTP/1.1 (RFC 9110 2.5): its body refused as any; and the preface still opens HTTP/2.
    refused = exchange(service.address, b"GET /archive/small/ HTTP/1.2\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
    assert refused.startswith(b"HTTP/1.1 400 ")
    assert http11_request(service.address, "GET", b"/archive/small/", [])[0] == 200
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        assert client.get(f"{service.url}/archive/small/").status_code == 200


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
def test_a_head_of_another_major_version_is_505_without_a_body(service: Service, version: bytes) -> None:
    # h11 frames the answer to a HEAD with no body: the page sent after the 505's head was h11's
    # LocalProtocolError ("Too much data for declared Content-Length"), the connection ended by an
    # error, a WARNING and a connection_error counted for each such request (helper 174).
    with socket.create_connection(service.address, timeout=5) as sock:
        sock.sendall(b"HEAD /archive/small/ " + version + b"\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # no half-close: a TimeoutError fails the test, the connection kept
            answer += chunk
    head, _, page = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 ") and b"\r\nconnection: close" in head.lower(), answer[:300]
    assert page == b""
    polite_request_works(service)  # by then the connection's end is logged
    assert b"LocalProtocolError" not in service.output and b"ended by an error" not in service.output


@pytest.mark.parametrize("method", [b"head", b"get", b"Get"])
def test_a_method_with_a_lower_case_letter_is_405_and_its_connection_closed(service: Service, method: bytes) -> None:
    # RFC 9110 9.1: a method is case-sensitive (helper 170).  Hypercorn upper-cases it for the app: "get" was served
    # as a GET, and "head" as a HEAD, whose answer h11 (framing it for the method as sent) cut short with an ERROR
    # and a traceback in the log for each such request.
    with socket.create_connection(service.address, timeout=5) as sock:
        sock.sendall(method + b" /archive/small/ HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # no half-close: a TimeoutError fails the test, the connection kept
            answer += chunk
    head, _, page = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), answer[:300]
    fields = head.lower()
    assert b"\r\nallow: get, head\r\n" in fields
    assert b"\r\nconnection: close" in fields and b"\r\ncache-control: no-store" in fields
    assert page.decode() == MESSAGES[405].sentence + "\n"
    assert b"Too little data for declared Content-Length" not in service.output
    polite_request_works(service)


def test_an_http2_path_in_absolute_form_is_400(service: Service) -> None:
    # RFC 9113 8.3.1: ":path" is origin-form (or "*"); absolute form is HTTP/1.1's (helper 144: served).
    connection = h2_client(validate_outbound_headers=False)
    with socket.create_connection(service.address, timeout=10) as sock:
        connection.send_headers(1, [(b":method", b"GET"), (b":path", b"http://y/archive/small/"),
                                    (b":scheme", b"http"), (b":authority", b"x")], end_stream=True)  # fmt: skip
        sock.sendall(connection.data_to_send())
        events = h2_events(sock, connection, h2.events.StreamEnded)
    assert [dict(event.headers)[b":status"] for event in events if isinstance(event, h2.events.ResponseReceived)] == [
        b"400"
    ]


@pytest.mark.parametrize(
    "host",
    [
        *(b"a b/c", b"user@x", b"x:port", b"", b"x/y", b"[::1", b'x"', b"[zz]", b"%zz", b"%", b"[fe80::1%eth0]"),
        *(b"[1::2::3]", b"[1.2.3.4]", b"[12345::1]:80"),  # an IPv6 address's characters, no IPv6 address
    ],
)
def test_a_host_field_with_an_invalid_value_is_400(service: Service, host: bytes) -> None:
    # RFC 9112 3.2: MUST (helper 143: each of these was served; the last three, an IPv6 address's
    # characters that make none, untested until helper 176, by coverage).
    answer = exchange(service.address, b"GET /archive/small/ HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer.lower()


@pytest.mark.parametrize("target", [b"/healthz", b"/archive/small/", b"/favicon.ico"])
def test_an_http10_request_without_a_host_field_is_served(service: Service, target: bytes) -> None:
    # HTTP/1.0 has no Host field to require (RFC 9112 3.2 asks it of HTTP/1.1): helper 149 found
    # each a 400 (Quart adds an empty one), a health check's included.
    answer = b""
    with socket.create_connection(service.address, timeout=10) as sock:  # not half-closed: a client that left
        sock.sendall(b"GET " + target + b" HTTP/1.0\r\n\r\n")
        while data := sock.recv(65536):  # until the server closes, as HTTP/1.0 has it
            answer += data
    assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 204 ")), answer[:200]


def test_two_host_fields_are_400(service: Service) -> None:
    # RFC 9112 3.2: a server MUST answer 400 to a request with more than one.
    answer = exchange(service.address, b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer.lower()


@pytest.mark.parametrize(
    "host",
    [
        b"example.com",
        b"127.0.0.1:8080",
        b"[::1]:80",
        b"xn--80ak6aa92e.xn--p1ai",
        b"x:",
        b"[fe80::1%25eth0]:8080",
        b"[v1.x]",
        b"%D1%84",
    ],
)
def test_a_host_field_of_any_valid_form_is_served(service: Service, host: bytes) -> None:
    answer = exchange(service.address, b"GET /favicon.ico HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 204 ")


@pytest.mark.parametrize("target", [b"?x", b"*", b"ftp://x/archive/small/"])
def test_a_request_target_that_is_not_a_path_is_400_and_its_connection_lives_on(
    service: Service, target: bytes
) -> None:
    request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    # A request pipelined after it is answered too (the 400 was lost when it said Connection: close).
    answer = exchange(service.address, request + b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"HTTP/1.1 204 " in answer
    # And the connection idles out at the keep-alive timeout (5 s): it stayed open for ever, and a
    # few such held every connection slot (found by helper 29).  Waited out for one target only.
    if target == b"*":
        assert closes_within(service.address, request, 15) < 10
    polite_request_works(service)


ALLOWED_CRLFS = b"\r\n" * (BLANK_LINE_BYTES // 2)


@pytest.mark.parametrize(
    "before, skipped",
    [
        (b"\r\n", True),
        (b"\n\r\n\n", True),  # a line may end with LF alone (RFC 9112 2.2)
        (ALLOWED_CRLFS, True),
        # A request, then blank lines, as after a body: the allowance is a request's.
        (b"\r\n\nGET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n" + ALLOWED_CRLFS, True),
        (ALLOWED_CRLFS + b"\n", False),  # past the allowance: h11's 400, as for any head it cannot parse
        (b"\r", False),  # a bare CR ends no line (RFC 9112 2.2: invalid)
        (b"\r\r\n", False),
    ],
    ids=["a blank line", "LF alone", "the allowance", "after a request", "past it", "a bare CR", "CR CRLF"],
)
def test_a_few_blank_lines_before_a_request_line_are_skipped(service: Service, before: bytes, skipped: bool) -> None:
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line before a request line.  h11
    # read it as a head with no request line: a 400, the connection closed, and the request after
    # the blank line lost.
    with socket.create_connection(service.address, timeout=10) as sock:
        sock.sendall(before + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # no half-close: a client's end is its leaving (README)
            answer += chunk
    answers = re.findall(rb"HTTP/1.1 (\d+) ", answer)
    assert answers == [b"204"] * before.count(b"GET ") + [b"200" if skipped else b"400"]


def first_event_of(pieces: list[bytes]) -> str:
    """What h11, with hypercorn_h11's blank-line patch, makes of the reads ``pieces``: an event's name, or 'refused'."""
    connection = h11.Connection(h11.SERVER)
    next_event = hypercorn_h11._closing_aware(object(), connection, connection.next_event)
    for piece in pieces:
        connection.receive_data(piece)
        try:
            event = next_event()
        except h11.RemoteProtocolError:
            return "refused"
        if event is not h11.NEED_DATA:
            return type(event).__name__
    return "waiting"


@given(
    blank=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n" * 8]), max_size=20).map(b"".join),
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
def test_blank_lines_are_skipped_alike_however_the_reads_cut_them(blank: bytes, cuts: list[int]) -> None:
    data = blank + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    pieces = [data[start:end] for start, end in pairwise(bounds) if end > start]  # no b"": to h11, the end
    # Lines that end in CRLF or LF alone, BLANK_LINE_BYTES at most; a bare CR is no line end.
    skipped = re.fullmatch(rb"(\r\n|\n)*", blank) is not None and len(blank) <= BLANK_LINE_BYTES
    assert first_event_of(pieces) == ("Request" if skipped else "refused")


def test_a_blank_line_in_a_read_of_its_own_is_skipped(service: Service) -> None:
    with socket.create_connection(service.address, timeout=10) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}\n"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"\r")  # its LF in a read after it
            time.sleep(0.05)  # not a synchronisation: a chance for the server to read the CR alone
            sock.sendall(b"\n")


def test_blank_lines_sent_at_full_speed_are_refused_at_once_and_counted(service: Service) -> None:
    # Skipped without a bound, a connection sending blank lines as fast as it could held the event
    # loop skipping 64 KiB of them at each read until the keep-alive timeout, uncounted: a
    # download beside four such connections took 11 s instead of 0.1 (helper 129).
    counted = client_errors_of(service).get("http1_unparsable", 0)
    with socket.create_connection(service.address, timeout=10) as sock:
        # 128 KiB, two of the server's reads: refused within the first, the rest read and dropped
        # (a lingering close, hypercorn_tcp) so that the answer is not lost to a reset.
        sock.sendall(b"\r\n" * 64 * 1024)
        answer = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")  # unbounded, nothing came: the keep-alive timeout closed it
    assert client_errors_of(service).get("http1_unparsable", 0) == counted + 1
    polite_request_works(service)


def test_an_http2_stream_whose_path_is_not_a_path_is_400_and_its_connection_idles_out(service: Service) -> None:
    connection = h2_client(validate_outbound_headers=False)
    connection.send_headers(1, [(b":method", b"GET"), (b":path", b"?x"), (b":scheme", b"http"),
                                (b":authority", b"x")], end_stream=True)  # fmt: skip
    with socket.create_connection(service.address, timeout=15) as sock:
        sock.sendall(connection.data_to_send())
        events = h2_events(sock, connection, h2.events.StreamEnded)
        answered = time.monotonic()
        # The stream over, the connection is idle, and closed at the keep-alive timeout (5 s): it was kept for ever.
        while sock.recv(65536):  # a TimeoutError here fails the test: the connection stayed open
            pass
        idled_out_after = time.monotonic() - answered
    responses = [event for event in events if isinstance(event, h2.events.ResponseReceived)]
    assert dict(responses[0].headers)[b":status"] == b"400"
    assert idled_out_after < 10


def test_a_head_still_arriving_past_16_kib_gets_its_431_without_a_reset(service: Service) -> None:
    # A browser's head of 20 KiB of cookies reaches the server in pieces: h11 refuses it at 16 KiB,
    # and the socket was closed with the rest still coming, which the kernel answers with a reset:
    # Windows then drops the 431 not yet read and shows "connection reset".  Now the rest is read
    # and dropped until the client closes.
    with socket.create_connection(service.address, timeout=10) as sock:
        sock.sendall(b"GET /archive/small/ HTTP/1.1\r\nHost: x\r\n")
        for i in range(200):
            sock.sendall(b"X-Cookie-%03d: " % i + b"a" * 84 + b"\r\n")  # a BrokenPipeError here: reset
            time.sleep(0.002)
        answer = bytearray()
        while chunk := sock.recv(65536):  # a ConnectionResetError here: reset
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_headers_are_counted_as_they_stand_on_the_wire(service: Service) -> None:
    head = b"GET /archive/small/ HTTP/1.1\r\nHost: x\r\n" + b"a:\r\n" * 16_000 + b"\r\n"
    assert exchange(service.address, head).startswith(b"HTTP/1.1 431 ")


def test_request_bodies_are_not_kept_whole(service: Service) -> None:
    # Quart kept up to 16 MB of a body no route reads, a request at a time, while the response ran.
    body = b"x" * 16_000_000
    before = server_rss_kib(service)
    sockets = []
    for _ in range(8):
        sock = socket.create_connection(service.address, timeout=30)
        sockets.append(sock)  # the responses are left unread
        head = b"GET /archive/large/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed once it answered: fine too
            sock.sendall(head + body)
    grown_mib = (server_rss_kib(service) - before) / 1024
    for sock in sockets:
        sock.close()
    assert grown_mib < 8 * 2, f"server RSS grew {grown_mib:.1f} MiB"  # was ~16.6 MiB a request
    polite_request_works(service)


# The fuzz suite: malformed HTTP/1.1 and HTTP/2, then a polite request, every time.

TOKENS = st.sampled_from([b"GET", b"HEAD", b"POST", b"PRI", b"G\xffT", b"", b"get", b"GET GET"])
TARGETS = st.one_of(
    st.sampled_from([b"/", b"/archive/small/", b"/archive/small", b"*", b"/archive/\xff/", b"/archive/%00/", b""]),
    st.binary(max_size=40),
)
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"HTTP/1", b"", b"http/1.1"])
HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"Range",
            b"If-Range",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Connection",
            b"X-Forwarded-For",
            b"Expect",
            b"Upgrade",
        ]
    ),
    st.binary(max_size=12),
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            b"chunked",
            b"-1",
            b"99999999999999999999999",
            b"close",
            b"bytes=0-",
            b"bytes=-1",
            b"100-continue",
            b"h2c",
            b"bytes=" + b" " * 300 + b"1-2",
            b"\xff\xfe",
        ]
    ),
    st.binary(max_size=40),
)
CHUNK_FRAMING = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"-1\r\n",
                b"0\r\n\r\n",
                b"ffffffffffffffffffff\r\n",
                b"1;ext=\xff\r\nx\r\n",
                b"zz\r\n",
                b"5\r\nab\r\n",
                b"\r\n",
                b"0\r\nTrailer: x\r\n\r\n",
            ]
        ),
        st.binary(max_size=20),
    ),
    max_size=4,
).map(b"".join)


@st.composite
def http11_requests(draw: st.DrawFn) -> bytes:
    line = b" ".join([draw(TOKENS), draw(TARGETS), draw(VERSIONS)])
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5))
    separator = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    head = separator.join([line, *(name + b": " + value for name, value in headers)]) + separator * 2
    pipelined = draw(st.sampled_from([b"", b"GET /archive/small/ HTTP/1.1\r\nHost: x\r\n\r\n"]))
    return head + draw(CHUNK_FRAMING) + pipelined


SETTINGS_FRAMES = st.lists(st.tuples(st.integers(0, 10), st.integers(0, 2**32 - 1)), max_size=4).map(
    lambda pairs: raw_frame(0x4, 0, 0, b"".join(struct.pack(">HI", key, value) for key, value in pairs))
)
WINDOW_UPDATES = st.builds(
    lambda stream, increment: raw_frame(0x8, 0, stream, struct.pack(">I", increment)),
    st.sampled_from([0, 1, 3, 2**31 - 1]),
    st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1]),
)
RAW_FRAMES = st.builds(
    raw_frame,
    st.integers(0, 12),  # DATA .. ORIGIN, and unknown types
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 2**31 - 1]),
    st.binary(max_size=64),  # HPACK garbage in HEADERS, bad PRIORITY/RST lengths, ...
)
PSEUDO_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b":method",
                b":path",
                b":scheme",
                b":authority",
                b":status",
                b":protocol",
                b"range",
                b"connection",
                b"Host",
                b"te",
            ]
        ),
        st.one_of(
            st.sampled_from([b"GET", b"/archive/small/", b"http", b"x", b"", b"CONNECT"]), st.binary(max_size=20)
        ),
    ),
    min_size=1,
    max_size=6,
)


@st.composite
def http2_sessions(draw: st.DrawFn) -> bytes:
    """A preface, then a request h2 would refuse to send, and frames no client should."""
    connection = h2_client(validate_outbound_headers=False, normalize_outbound_headers=False)
    try:
        connection.send_headers(1, draw(PSEUDO_HEADERS), end_stream=draw(st.booleans()))
    except h2.exceptions.ProtocolError:
        # Unchecked as it is, h2 still will not frame some: a ":status" of 1xx is an informational
        # response, which a client's stream cannot send.  No bytes to try: draw again.
        reject()
    data = connection.data_to_send()
    frames = draw(st.lists(st.one_of(SETTINGS_FRAMES, WINDOW_UPDATES, RAW_FRAMES), max_size=5))
    return data + b"".join(frames)


def check_survives(service: Service, data: bytes) -> None:
    exchange(service.address, data)
    polite_request_works(service)


@given(data=http11_requests())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_http11(service: Service, data: bytes) -> None:
    check_survives(service, data)


@given(data=http2_sessions())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_http2(service: Service, data: bytes) -> None:
    check_survives(service, data)


@pytest.mark.slow
@given(data=st.one_of(http11_requests(), http2_sessions()))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_long(service: Service, data: bytes) -> None:
    check_survives(service, data)
