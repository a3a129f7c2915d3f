"""The access log: one line per request, with the status that went out and the bytes that did."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import NoReturn

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio

from archiver import logs
from archiver.config import Settings
from archiver.web import app as app_module
from archiver.web import routes as routes_module

from .conftest import http11_request, make_client, running_server, write_tree
from .test_cli import Launched, launched

# Hypercorn's default format: ... "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LINE = re.compile(rb'"(?P<method>[A-Z]+) (?P<path>\S+) (?P<version>\S+)" (?P<status>\S+) (?P<bytes>\S+) "')


@pytest.fixture
def log_storage(tmp_path: Path) -> Path:
    write_tree(tmp_path / "small", {"a.jpg": os.urandom(50_000)})
    write_tree(tmp_path / "large", {f"{index}.jpg": os.urandom(4 * 1024 * 1024) for index in range(16)})
    return tmp_path


def access_lines(server: Launched, path: str) -> list[dict[str, bytes]]:
    return [match.groupdict() for match in LINE.finditer(bytes(server.output)) if match["path"] == path.encode()]


async def logged(server: Launched, path: str, count: int = 1) -> list[dict[str, bytes]]:
    """The access lines for ``path`` once there are ``count`` of them, and those of a request made after them.

    A stray second line would come by the time a later request's own line
    is written: that request's, on a new connection, is waited for too.
    """
    await _lines_written(server, path, count)
    global _sentinels
    _sentinels += 1
    sentinel = f"/archive/sentinel-{_sentinels}/"
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{server.url}{sentinel}")).status_code == 404
    await _lines_written(server, sentinel, 1)
    return access_lines(server, path)


_sentinels = 0


async def _lines_written(server: Launched, path: str, count: int) -> None:
    with trio.fail_after(10):
        while len(access_lines(server, path)) < count:
            await trio.sleep(0.02)  # polling the output the server has written (collected by ``launched``)


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_one_access_line_per_request_with_real_status_and_bytes(log_storage: Path, protocol: str) -> None:
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(log_storage)]
    async with launched(command) as server, make_client(server.url, protocol) as client:
        complete = await client.get("/archive/small/")
        assert [(line["status"], line["bytes"]) for line in await logged(server, "/archive/small/")] == [
            (b"200", str(len(complete.content)).encode())
        ]
        await client.get("/archive/missing/")
        assert [line["status"] for line in await logged(server, "/archive/missing/")] == [b"404"]
        await client.get("/archive/small")
        assert [(line["status"], line["bytes"]) for line in await logged(server, "/archive/small")] == [(b"308", b"0")]
        await client.head("/archive/small/")
        lines = await logged(server, "/archive/small/", count=2)
        assert [(line["method"], line["status"], line["bytes"]) for line in lines][1:] == [(b"HEAD", b"200", b"0")]
        # A client that leaves (closes its connection) in the middle of a download.
        async with make_client(server.url, protocol) as leaving, leaving.stream("GET", "/archive/large/") as response:
            chunks = response.aiter_raw()
            await anext(chunks)
            total = int(response.headers["content-length"])
        # The client left: its 200 and what went out before, not "- -".
        (cancelled,) = await logged(server, "/archive/large/")
        assert cancelled["status"] == b"200"
        assert 0 < int(cancelled["bytes"]) < total


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_hypercorns_own_404_for_a_host_not_served_is_logged_once_with_its_status(
    log_storage: Path, protocol: str
) -> None:
    # Hypercorn answers itself, never asking the app, a request for a host not in its ``server_names``
    # (hypercorn.toml, --server-name): logged once, with its status (hypercorn_access's copy of
    # _send_error_response; untested until helper 176, by coverage).  The sentinel requests of
    # ``logged`` are such requests too.
    hypercorn = str(Path(sys.executable).with_name("hypercorn"))
    command = [hypercorn, "--config", "hypercorn.toml", "--bind", "127.0.0.1:0", "--server-name", "photos.example"]
    async with (
        launched([*command, "archiver.asgi:app"], {"ARCHIVER_DIR": str(log_storage)}) as server,
        make_client(server.url, protocol) as client,
    ):
        served = await client.get("/archive/small/", headers={"Host": "photos.example"})
        assert served.status_code == 200
        other = await client.get("/archive/small/", headers={"Host": "other.example"})
        assert (other.status_code, other.content) == (404, b"")
        lines = await logged(server, "/archive/small/", count=2)
    assert [(line["status"], line["bytes"]) for line in lines] == [
        (b"200", str(len(served.content)).encode()),
        (b"404", b"0"),
    ]


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_hypercorns_own_500_for_an_app_that_ended_without_an_answer_is_logged_once_with_its_status(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    # A fault escaping the app itself (planted: in a route, then in the 500 page that answers it): Hypercorn
    # answers 500 with no body, logged once, with its status (untested until helper 176, by coverage).
    def faulty(*arguments: object, **keywords: object) -> NoReturn:
        raise RuntimeError("a planted fault")

    monkeypatch.setattr(routes_module, "page", faulty)
    monkeypatch.setattr(app_module, "error_page", faulty)
    access = logging.getLogger("tests.access")
    with caplog.at_level(logging.INFO, logger=access.name):
        async with running_server(settings, accesslog=access) as url, make_client(url, protocol) as client:
            answer = await client.get("/")
            assert (await client.get("/favicon.ico")).status_code == 204  # its line written after the 500's
    assert (answer.status_code, answer.content) == (500, b"")
    lines = [LINE.search(record.getMessage().encode()) for record in caplog.records if record.name == access.name]
    assert [(line["path"], line["status"], line["bytes"]) for line in lines if line] == [
        (b"/", b"500", b"0"),
        (b"/favicon.ico", b"204", b"0"),
    ]


async def test_clients_that_close_at_once_are_logged_with_their_status(log_storage: Path) -> None:
    # Like curl: one request a connection, closed as soon as the response is in.
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(log_storage)]
    async with launched(command) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        # Ten each: the race (the client closing while the headers of a response without a body
        # are being sent) is a matter of microseconds.
        for path, status in (("/archive/small", b"308"), ("/archive/nowhere/", b"404"), ("/archive/small/", b"200")):
            for _ in range(10):
                await trio.to_thread.run_sync(http11_request, (host, int(port)), "GET", path.encode(), [])
            assert [line["status"] for line in await logged(server, path, count=10)] == [status] * 10, path


async def test_no_header_forges_a_line_or_a_field(log_storage: Path) -> None:
    """HTTP/1.1 allows bytes from 0x80 in a header.  In a User-Agent, U+0085 (a line break to
    Python's ``splitlines`` and to log shippers) and U+009B (a terminal's CSI) made a second,
    fake access line (helper 44); a quote ends a field early.  All escaped now."""
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(log_storage)]
    forged = b'ok\x85[02/Dec/2026:07:00:00 +0000] 10.0.0.1:1 - - "GET /archive/forged/ 1.1" 200 999 "-" "x\x9b31m'
    async with launched(command) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)

        def request() -> None:
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(
                    b"GET /archive/missing/ HTTP/1.1\r\nHost: x\r\nUser-Agent: " + forged + b'\r\nReferer: a"b\\c\r\n'
                    b"Connection: close\r\n\r\n"
                )
                while sock.recv(65536):
                    pass

        await trio.to_thread.run_sync(request)
        (line,) = await logged(server, "/archive/missing/")
    assert line["status"] == b"404"
    output = bytes(server.output).decode("utf-8", "replace")
    assert "\x85" not in output and "\x9b" not in output
    (logged_line,) = [text for text in output.splitlines() if "/archive/missing/" in text or "/archive/forged/" in text]
    assert '"a\\"b\\\\c"' in logged_line and "ok\\x85[02/Dec" in logged_line and "x\\x9b31m" in logged_line


async def test_a_long_header_or_path_makes_no_long_line(log_storage: Path) -> None:
    # Found by helper 47: a User-Agent of 7,000 control bytes, each escaped to four, made a 42 KB
    # line; over HTTP/2 HPACK repeats one for a few bytes a request. Each field keeps 256 characters.
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(log_storage)]
    async with launched(command) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)

        def request() -> None:
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(
                    b"GET /archive/" + b"%9B" * 2000 + b"/?" + b"q" * 3000 + b" HTTP/1.1\r\nHost: x\r\n"
                    b"User-Agent: " + b"\x9b" * 7000 + b"\r\nReferer: " + b"\\" * 7000 + b"\r\n"
                    b"Connection: close\r\n\r\n"
                )
                while sock.recv(65536):
                    pass

        await trio.to_thread.run_sync(request)
        with trio.fail_after(10):
            while b'"' + b"\\\\" * 256 + b'..."' not in server.output:
                await trio.sleep(0.02)
    (line,) = [text for text in bytes(server.output).decode().splitlines() if '"GET /archive/' in text]
    assert len(line) < 4 * (4 * 256 + 10), len(line)  # four fields of 256 characters, each escaped to at most four
    assert '"' + "\\x9b" * 256 + '..."' in line and "q" * 257 not in line


async def test_no_name_or_method_a_client_chooses_makes_a_long_line(log_storage: Path) -> None:
    # Found by helper 84: a name refused before it was checked (a filename not in UTF-8, a link not
    # signed) went whole into the service's INFO line, and the method whole into the access line:
    # 15 KB and 60 KB lines, at 10 MB of log a second from one client.
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(log_storage)]
    long_name = "a" * 15_000
    async with launched(command, {"ARCHIVER_LINK_SECRET": "s" * 32}) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        address = (host, int(port))
        target = f"/archive/{long_name}/".encode()
        not_utf8 = await trio.to_thread.run_sync(http11_request, address, "GET", target + b"?filename=%FF", [])
        unsigned = await trio.to_thread.run_sync(http11_request, address, "GET", target, [])
        with socket.create_connection(address, timeout=30) as sock:
            sock.sendall(b"Q" * 10_000 + b" /archive/small/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            long_method = await trio.to_thread.run_sync(sock.recv, 65536)
        async with make_client(server.url, "HTTP/2") as client:
            h2_method = await client.request("M" * 60_000, f"{server.url}/archive/small/")
        with trio.fail_after(10):
            while bytes(server.output).count(b'" 4') < 4:  # the four access lines
                await trio.sleep(0.02)
    assert (not_utf8[0], unsigned[0], long_method[:12], h2_method.status_code) == (400, 403, b"HTTP/1.1 405", 431)
    lines = bytes(server.output).decode().splitlines()
    assert max(len(line) for line in lines) < 1_000, max(lines, key=len)[:300]
    assert sum("refused " + "a" * 256 + "... for " in line for line in lines) == 2


def test_lines_a_client_can_repeat_are_quieted(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    quieted = logs.Quieted(logging.getLogger("archiver.test"), logging.WARNING, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="archiver.test"):
        for step in range(25):  # a line each second for 25 s
            quieted.log("refused %d", step)
            now[0] += 1
    assert [record.getMessage() for record in caplog.records] == [
        "refused 0",
        "refused 10 (9 more such lines left out since the last)",
        "refused 20 (9 more such lines left out since the last)",
    ]


async def test_requests_a_client_repeats_at_its_own_rate_make_a_line_each_ten_seconds(log_storage: Path) -> None:
    # Helper 84: a line for each request HTTP/1.1 cannot parse (2,200 a second, a connection each) and
    # a WARNING for each HTTP/2 stream with a malformed :path (~13 bytes a stream with HPACK); helper 85:
    # one for each HTTP/2 connection closed for a protocol error (a stream that depends on itself).
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(log_storage)]
    async with launched(command) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)

        def flood() -> None:
            for _ in range(30):
                with socket.create_connection((host, int(port)), timeout=30) as sock:
                    sock.sendall("GET /archive/small/?filename=Отпуск HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    while sock.recv(65536):
                        pass
            connection = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
            )
            connection.initiate_connection()
            bad = [(b":method", b"GET"), (b":path", b"/archive/\xff/"), (b":scheme", b"http"), (b":authority", b"x")]
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                for _ in range(30):
                    connection.send_headers(connection.get_next_available_stream_id(), bad, end_stream=True)
                sock.sendall(connection.data_to_send())
                resets = 0
                while resets < 30 and (data := sock.recv(65536)):
                    resets += sum(isinstance(event, h2.events.StreamReset) for event in connection.receive_data(data))
            assert resets == 30
            for _ in range(30):
                with socket.create_connection((host, int(port)), timeout=30) as sock:
                    # PRIORITY: stream 1 depends on itself, weight 16 (RFC 9113 5.3.1: a protocol error).
                    sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                    sock.sendall(b"\x00\x00\x05\x02\x00\x00\x00\x00\x01\x00\x00\x00\x01\x0f")
                    while sock.recv(65536):
                        pass

        await trio.to_thread.run_sync(flood)
        status, _, metrics = await trio.to_thread.run_sync(http11_request, (host, int(port)), "GET", b"/metrics", [])
    assert status == 200
    output = bytes(server.output)
    # At INFO, as the README says: a client's bytes that are not HTTP are not the operator's fault.
    assert (
        output.count(
            b"INFO archiver.fences.hypercorn_h11: refused a request from 127.0.0.1 that HTTP/1.1 cannot parse: 400"
        )
        == 1
    )
    assert output.count(b"malformed or missing :method or :path") == 1
    assert output.count(b"WARNING archiver.fences.hypercorn_h2: HTTP/2 connection from") == 1
    # Each is counted all the same.
    for kind in ("http1_unparsable", "http2_malformed_stream", "http2_protocol_error"):
        assert f'archiver_client_errors_total{{kind="{kind}"}} 30.0'.encode() in metrics
