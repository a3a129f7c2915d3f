"""The archive's HTTP semantics beside nginx's: one archive, served by both, asked the same (RFC 9110 13, 14).

nginx serves the bytes the service sent as a static file, with its own ETag and a Last-Modified.  Each
row is a request, sent to both over HTTP/1.1 and over HTTP/2; the service's answer (status,
Content-Range, Content-Length, the bytes) must be nginx's, unless the row says why not (RFC 9110 or the
README): then the row gives the service's status and Content-Range.  Helper 189 compared ~220 such
requests and ~400 generated Range values; the differences left are the reasons below, and one was a
fault (an If-Match or If-None-Match value that is no list of entity tags, now answered as nginx does).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from archiver.config import Settings

from .conftest import ctimes_settled, free_port, http11_request, server_in_thread, write_tree
from .test_deploy import NGINX, needs_nginx

PATH = "/archive/album/"
HUGE = "9" * 25  # past 2^64
EARLY = "Thu, 01 Jan 1970 00:00:00 GMT"

# Why the service answers otherwise than nginx (the service's answer is right by these).
SEVERAL = "several ranges: the whole archive (README, Resuming; RFC 9110 14.2 lets a server ignore Range)"
INVALID = "an invalid range: ignored, the whole archive (RFC 9110 14.2: ignore or reject); nginx rejects (416)"
CLAMPED = "a last byte past the end is the end (RFC 9110 14.1.2); nginx refuses a number past 2^63"
BLANKS = "blanks around '=' and '-' are read (README, Limits: Range numbers); nginx ignores such a Range"
HEAD_RANGE = "Range is GET's alone: a HEAD gets the 200's headers (RFC 9110 14.2: MUST ignore); nginx answers 206"
NO_DATE = "no Last-Modified is sent, so a date validates nothing (RFC 9110 13.1.3-5; README, Resuming)"
LIST_FIELD = "If-Match and If-None-Match lines are one list (RFC 9110 5.3); nginx 1.22 refuses a second line"

Row = tuple[str, list[tuple[str, str]], tuple[int, str | None] | None, str]
# (method, headers, the service's (status, Content-Range) where it differs, why).  In header values
# {etag} is the server's own ETag, {other} the other server's, {date} nginx's Last-Modified.
ROWS: list[Row] = [
    # Ranges.
    ("GET", [("Range", "bytes=0-0")], None, ""),
    ("GET", [("Range", "bytes=0-")], None, ""),
    ("GET", [("Range", "bytes=-1")], None, ""),
    ("GET", [("Range", "bytes=-0")], None, ""),  # a suffix of nothing: 416
    ("GET", [("Range", "bytes={last}-")], None, ""),
    ("GET", [("Range", "bytes={length}-")], None, ""),
    ("GET", [("Range", "bytes={last}-{past}")], None, ""),
    ("GET", [("Range", "bytes=0-{last}")], None, ""),
    ("GET", [("Range", "bytes={length}-{past}")], None, ""),
    ("GET", [("Range", "BYTES=0-1")], None, ""),
    ("GET", [("Range", "bytes=000010-00020")], None, ""),
    ("GET", [("Range", "bytes=9223372036854775807-")], None, ""),
    ("GET", [("Range", f"bytes={HUGE}-")], None, ""),
    ("GET", [("Range", "items=0-1")], None, ""),
    ("GET", [("Range", "bytes=0-1,5-6")], (200, None), SEVERAL),
    ("GET", [("Range", "bytes=0-0,{length}-")], (200, None), SEVERAL),
    ("GET", [("Range", "bytes=5-1")], (200, None), INVALID),
    ("GET", [("Range", "bytes=a-b")], (200, None), INVALID),
    ("GET", [("Range", f"bytes=0-{HUGE}")], (206, "bytes 0-{last}/{length}"), CLAMPED),
    ("GET", [("Range", f"bytes=-{HUGE}")], (206, "bytes 0-{last}/{length}"), CLAMPED),
    ("GET", [("Range", "bytes = 0-1")], (206, "bytes 0-1/{length}"), BLANKS),
    ("HEAD", [("Range", "bytes=0-0")], (200, None), HEAD_RANGE),
    ("HEAD", [("Range", "bytes={length}-")], (200, None), HEAD_RANGE),
    # If-Range.
    ("GET", [("Range", "bytes=0-9"), ("If-Range", "{etag}")], None, ""),
    ("GET", [("Range", "bytes=0-9"), ("If-Range", "W/{etag}")], None, ""),
    ("GET", [("Range", "bytes=0-9"), ("If-Range", "{other}")], None, ""),
    ("GET", [("Range", "bytes=0-9"), ("If-Range", "garbage")], None, ""),
    ("GET", [("Range", "bytes={length}-"), ("If-Range", "{etag}")], None, ""),
    ("GET", [("Range", "bytes={length}-"), ("If-Range", "{other}")], None, ""),
    ("GET", [("If-Range", "{etag}")], None, ""),
    ("GET", [("Range", "bytes=0-9"), ("If-Range", "{date}")], (200, None), NO_DATE),
    # If-Match, If-None-Match.
    ("GET", [("If-Match", "*")], None, ""),
    ("GET", [("If-Match", "{etag}")], None, ""),
    ("GET", [("If-Match", '"a", {etag}')], None, ""),
    ("GET", [("If-Match", ", {etag} ,")], None, ""),
    ("GET", [("If-Match", "W/{etag}")], None, ""),
    ("GET", [("If-Match", "{other}")], None, ""),
    ("GET", [("If-Match", "{etag}x")], None, ""),
    ("GET", [("If-Match", '"a", *')], None, ""),
    ("HEAD", [("If-Match", "{other}")], None, ""),
    ("GET", [("If-Match", "{other}"), ("Range", "bytes={length}-")], None, ""),
    ("GET", [("If-Match", "{etag}"), ("Range", "bytes=0-9")], None, ""),
    ("GET", [("If-None-Match", "{etag}")], None, ""),
    ("GET", [("If-None-Match", "W/{etag}")], None, ""),
    ("GET", [("If-None-Match", "*")], None, ""),
    ("GET", [("If-None-Match", '"a", {etag}')], None, ""),
    ("GET", [("If-None-Match", "{other}")], None, ""),
    ("GET", [("If-None-Match", "{etag}x")], None, ""),
    ("GET", [("If-None-Match", "{etag};")], None, ""),
    ("GET", [("If-None-Match", '*, "a"')], None, ""),
    ("HEAD", [("If-None-Match", "{etag}")], None, ""),
    ("GET", [("If-None-Match", "{etag}"), ("Range", "bytes=0-9")], None, ""),
    ("GET", [("If-None-Match", "{other}"), ("Range", "bytes=0-9")], None, ""),
    ("GET", [("If-Match", "{other}"), ("If-None-Match", "{etag}")], None, ""),
    ("GET", [("If-None-Match", "{other}"), ("If-None-Match", "{etag}")], (304, None), LIST_FIELD),
    # Dates.
    ("GET", [("If-Modified-Since", "{date}")], (200, None), NO_DATE),
    ("GET", [("If-Unmodified-Since", EARLY)], (200, None), NO_DATE),
    # Methods.
    ("POST", [], None, ""),
    ("PUT", [], None, ""),
    ("DELETE", [], None, ""),
    ("OPTIONS", [], None, ""),
]


@contextmanager
def nginx_serving(archive: bytes, workdir: Path) -> Iterator[tuple[int, int]]:
    """nginx serving ``archive`` as a static file at PATH: its HTTP/1.1 port and its h2c (prior knowledge) port."""
    assert NGINX is not None
    workdir.mkdir()
    (workdir / "album.zip").write_bytes(archive)
    # Run as root, nginx's workers would read as nobody, whom pytest's folders (0700) keep out; as
    # anyone else the user line is ignored.
    user = pwd.getpwuid(os.geteuid()).pw_name
    for attempt in range(3):
        ports = free_port(), free_port()
        while ports[1] == ports[0]:
            ports = ports[0], free_port()
        (workdir / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {workdir}/nginx.pid; error_log {workdir}/error.log;
user {user};
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
    uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
    server {{
        listen 127.0.0.1:{ports[0]};
        listen 127.0.0.1:{ports[1]} http2;
        location = {PATH} {{ root {workdir}; try_files /album.zip =404; default_type application/zip; }}
    }}
}}
""")
        process = subprocess.Popen([NGINX, "-c", str(workdir / "nginx.conf"), "-p", str(workdir)])
        try:
            # It writes its pid file once its ports are bound and listening.
            deadline = time.monotonic() + 10
            while process.poll() is None and not (workdir / "nginx.pid").exists():
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.02)
            if process.returncode is None:
                yield ports
                return
            log = (workdir / "error.log").read_text() if (workdir / "error.log").exists() else ""
            assert "Address already in use" in log and attempt < 2, f"nginx exited at its start:\n{log}"
        finally:
            process.terminate()
            process.wait(10)


Answer = tuple[int, str | None, str | None, bytes]


def answer(status: int, headers: dict[str, str], body: bytes) -> Answer:
    """What is compared: status, Content-Range, and for a 200 or 206 its Content-Length and bytes."""
    headers = {name.lower(): value for name, value in headers.items()}
    if status in (200, 206):
        assert "multipart" not in headers.get("content-type", "")
        return status, headers.get("content-range"), headers.get("content-length"), body
    return status, headers.get("content-range"), None, b""


@dataclass
class Served:
    """One server of the pair: where it answers, and the words its requests are written with."""

    port: int  # HTTP/1.1
    h2: httpx.Client  # HTTP/2 (prior knowledge, h2c), its base URL this server's
    words: dict[str, str]  # etag, other, date, length, last, past

    def ask(self, method: str, headers: list[tuple[str, str]]) -> list[Answer]:
        """The answers to the request over HTTP/1.1 and over HTTP/2."""
        sent = [(name, value.format(**self.words)) for name, value in headers]
        http1 = http11_request(("127.0.0.1", self.port), method, PATH.encode(), sent)
        response = self.h2.request(method, PATH, headers=sent)
        assert response.http_version == "HTTP/2"
        return [answer(*http1), answer(response.status_code, dict(response.headers), response.content)]


@needs_nginx
def test_the_service_answers_as_nginx_does_but_where_a_reason_says(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    write_tree(storage / "album", {"a.jpg": bytes(range(256)) * 100, "b/c.txt": b"c" * 3000, "d.bin": b"\x00" * 40})
    trio.run(ctimes_settled, storage / "album")  # its ETag
    with (
        server_in_thread(Settings(settle_time=0, storage_dir=storage)) as (_, service_port),
        httpx.Client(http1=False, http2=True, timeout=30, base_url=f"http://127.0.0.1:{service_port}") as service_h2,
    ):
        archive = service_h2.get(PATH).content
        with (
            nginx_serving(archive, tmp_path / "nginx") as (nginx_port, nginx_h2c_port),
            httpx.Client(
                http1=False, http2=True, timeout=30, base_url=f"http://127.0.0.1:{nginx_h2c_port}"
            ) as nginx_h2,
        ):
            service_head, nginx_head = service_h2.head(PATH).headers, nginx_h2.head(PATH).headers
            numbers = {"length": str(len(archive)), "last": str(len(archive) - 1), "past": str(len(archive) + 5)}
            words = {**numbers, "date": nginx_head["last-modified"]}
            service = Served(
                service_port, service_h2, {**words, "etag": service_head["etag"], "other": nginx_head["etag"]}
            )
            nginx = Served(nginx_port, nginx_h2, {**words, "etag": nginx_head["etag"], "other": service_head["etag"]})
            for method, headers, differs, why in ROWS:
                row = (method, headers)
                ours = service.ask(method, headers)
                assert ours[0] == ours[1], row  # the same over HTTP/1.1 and HTTP/2
                status, content_range, content_length, body = ours[0]
                if status == 200 and method == "GET":
                    assert body == archive, row
                if status == 206:  # a true slice
                    assert content_range is not None, row
                    first, last = map(int, content_range.removeprefix("bytes ").split("/")[0].split("-"))
                    assert body == archive[first : last + 1] and content_length == str(len(body)), row
                if differs is None:
                    assert ours == nginx.ask(method, headers), row
                else:
                    expected = differs[1].format(**numbers) if differs[1] else None
                    assert (status, content_range) == (differs[0], expected), (row, why)
