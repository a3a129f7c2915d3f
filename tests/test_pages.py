"""The pages a person sees when an answer is not a download: real pages in Russian for browsers, text for curl."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import httpx
import pytest
import trio
import trustme

from archiver.archive import producer
from archiver.config import Settings
from archiver.fences import hypercorn_h11
from archiver.web.pages import MESSAGES, NO_INSTANCE, UNPARSED_REQUEST

from .browser import CHROMIUM, HEADLESS, chromium_tmpdir
from .conftest import CLIENT_TLS, free_port, producer_script, running_server, write_tree
from .test_deploy import needs_nginx, nginx_in_front
from .test_signing import SECRET

# What Chromium sends for a page it navigates to.
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


@asynccontextmanager
async def pages_server(settings: Settings, tmp_path: Path, **changes: object) -> AsyncIterator[tuple[str, Path]]:
    """A server with an album, whose producer can be taken away (chmod 0 the script yielded) to get a 503."""
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(10_000)})
    (command,) = producer_script(tmp_path, "producer", "exec $REAL_PRODUCER")
    with mock.patch.object(producer, "COMMAND", (command,)):
        async with running_server(replace(settings, **changes)) as url:  # type: ignore[arg-type]
            yield url, Path(command)


async def answers(client: httpx.AsyncClient, producer_command: Path) -> dict[int, httpx.Response]:
    """One answer of each error status the service gives, for ``client``'s Accept."""
    found = {
        404: await client.get("/archive/no-such-album/"),
        405: await client.post("/archive/album/"),
        412: await client.get("/archive/album/", headers={"If-Match": '"an earlier archive"'}),
        416: await client.get("/archive/album/", headers={"Range": "bytes=999999999-"}),
        431: await client.get("/archive/album/", headers={"X-Padding": "a" * 20_000}),
    }
    producer_command.chmod(0)  # the producer cannot run
    found[503] = await client.get("/archive/album/")
    return found


async def test_requests_hypercorn_refuses_unread_get_the_sentence_too(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # These never reach the app: h11 refuses them, and Hypercorn answered with an empty body.  Nor
    # does a target that is not a path, which a fence answers: a bare 400 until helper 81.
    monkeypatch.setattr(hypercorn_h11, "_unparsed_lines", {})  # a line each 10 s: not another test's
    write_tree(settings.storage_dir / "album", {"photo.jpg": b"p"})
    async with running_server(settings) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        caplog.set_level(logging.INFO, logger="archiver")
        for head, status, message in [
            # A head over h11's 16 KiB still arriving (a browser's cookies): no line end yet.
            (b"GET /archive/album/ HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 20_000, 431, MESSAGES[431]),
            # Raw UTF-8 in the request line (curl sends a URL as typed; browsers %-encode it).
            ("GET /archive/album/?filename=Отпуск HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400, UNPARSED_REQUEST),
            *(
                (b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target, 400, UNPARSED_REQUEST)
                for target in (b"?x", b"*", b"ftp://x/archive/album/")  # http(s):// is served as its path
            ),
        ]:
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(head)
            answer = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some():
                    answer += chunk
            await stream.aclose()
            status_line, _, rest = answer.partition(b"\r\n")
            headers, _, body = rest.partition(b"\r\n\r\n")
            assert status_line.split(b" ")[1] == b"%d" % status
            assert b"content-type: text/plain; charset=utf-8" in headers.lower()
            # As every error answer: never cached, no Referer (README, "Error answers are pages").
            assert b"cache-control: no-store" in headers.lower()
            assert b"referrer-policy: no-referrer" in headers.lower()
            assert body.decode() == message.sentence + "\n"
            if not head.startswith((b"GET ?", b"GET *", b"GET http")):
                # No request exists for the access log: the service's log says it instead.
                assert f"refused a request from 127.0.0.1 that HTTP/1.1 cannot parse: {status}" in caplog.text


def assert_is_a_page(response: httpx.Response, status: int) -> None:
    text = response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<html lang="ru">' in text
    assert f"<title>{MESSAGES[status].title}</title>" in text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert MESSAGES[status].sentence in text
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r"<script|<link|<img|src=|url\(|https?://", text)


async def test_browsers_get_pages_and_curl_gets_the_sentence(settings: Settings, tmp_path: Path) -> None:
    async with pages_server(settings, tmp_path) as (url, producer_command):
        async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=url, headers={"Accept": BROWSER_ACCEPT}) as browser:
            pages = await answers(browser, producer_command)
        producer_command.chmod(0o755)
        async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=url, headers={"Accept": "*/*"}) as curl:
            texts = await answers(curl, producer_command)
    for status in (404, 405, 412, 416, 431, 503):
        assert pages[status].status_code == texts[status].status_code == status
        assert_is_a_page(pages[status], status)
        assert texts[status].headers["content-type"] == "text/plain; charset=utf-8"
        assert texts[status].text == MESSAGES[status].sentence + "\n"
    assert pages[503].headers["retry-after"] == texts[503].headers["retry-after"] == "5"
    assert pages[416].headers["content-range"].startswith("bytes */")
    assert set(pages[405].headers["allow"].split(", ")) == {"HEAD", "GET"}


async def test_signed_link_refusal_is_a_page_too(settings: Settings, tmp_path: Path) -> None:
    async with (
        pages_server(settings, tmp_path, link_secret=SECRET) as (url, _),
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client,
    ):
        page = await client.get("/archive/album/", headers={"Accept": BROWSER_ACCEPT})
        text = await client.get("/archive/album/")
    assert page.status_code == text.status_code == 403
    assert_is_a_page(page, 403)
    assert text.text == MESSAGES[403].sentence + "\n"


async def test_favicon_is_no_content_and_no_archive_message(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        pages_server(settings, tmp_path) as (url, _),
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=url) as client,
    ):
        icons = [await client.get("/favicon.ico", headers={"Accept": "image/avif,image/webp,*/*"}) for _ in range(2)]
        index = await client.get("/")  # on the same kept-alive connection
    assert [icon.status_code for icon in icons] == [204, 204]
    assert icons[0].content == b"" and "content-type" not in icons[0].headers
    # RFC 9110 8.6: no Content-Length on a 204 (helper 140: "0"), nor any other framing.
    assert "content-length" not in icons[0].headers and "transfer-encoding" not in icons[0].headers
    assert index.status_code == 200
    assert "Traceback" not in caplog.text and "Error" not in caplog.text


async def test_http11_status_line_has_its_reason_phrase(settings: Settings, tmp_path: Path) -> None:
    async with pages_server(settings, tmp_path) as (url, _):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        lines = []
        for target in (b"/", b"/archive/no-such-album/", b"/favicon.ico"):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                await trio.to_thread.run_sync(sock.sendall, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                lines.append((await trio.to_thread.run_sync(sock.recv, 65536)).split(b"\r\n", 1)[0])
    assert lines == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 204 No Content"]


@needs_nginx
async def test_through_nginx_every_page_is_the_services_or_in_its_words(settings: Settings, tmp_path: Path) -> None:
    async with (
        pages_server(settings, tmp_path) as (url, _),
        nginx_in_front(url, tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front, headers={"Accept": BROWSER_ACCEPT}) as browser,
    ):
        index = await browser.get("/")
        icon = await browser.get("/favicon.ico")
        icon_posted = await browser.post("/favicon.ico")
        health = await browser.get("/healthz")
        metrics = await browser.get("/metrics")
        typo = await browser.get("/archiv/album/")
        cookie = await browser.get("/archive/album/", headers={"Cookie": "a=" + "x" * 17_000})  # over nginx's 16k
        cookie_text = await browser.get("/archive/album/", headers={"Cookie": "a=" + "x" * 17_000, "Accept": "*/*"})
        # A line within nginx's buffer: the service's own limit answers (16 KiB in all), or serves it.
        served = await browser.get("/archive/album/", headers={"Cookie": "a=" + "x" * 12_000})
        over_16_kib = {"Cookie": "a=" + "x" * 12_000, "X-More": "y" * 6_000}
        cookie_long = await browser.get("/archive/album/", headers=over_16_kib)
        # A body over nginx's client_max_body_size (1 MiB): nginx answers before the service's 405.
        body = b"x" * (1024 * 1024 + 1)
        posted = await browser.post("/archive/album/", content=body)
        posted_text = await browser.post("/archive/album/", content=body, headers={"Accept": "*/*"})
        posted_small = await browser.post("/archive/album/", content=b"x")  # the service's own 405
        # TRACE, which nginx refuses itself: its stock English page had no Allow (RFC 9110 15.5.6; helper 170).
        traced = await browser.request("TRACE", "/archive/album/")
        traced_text = await browser.request("TRACE", "/", headers={"Accept": "*/*"})
        # The service's own 400 (a display name it refuses) passes through as it is.
        refused_name = await browser.get("/archive/album/?filename=%ff%fe")
        # Requests nginx cannot parse: an invalid Content-Length after Accept, no Host at all.
        host, port = front.removeprefix("http://").rsplit(":", 1)
        unparsed = [
            await trio.to_thread.run_sync(exchange, (host, int(port)), head)
            for head in (
                f"GET /archive/album/ HTTP/1.1\r\nHost: x\r\nAccept: {BROWSER_ACCEPT}\r\nContent-Length: a\r\n\r\n",
                "GET /archive/album/ HTTP/1.1\r\n\r\n",
            )
        ]
    assert index.status_code == 200
    assert "<title>Архивы фотографий</title>" in index.text
    assert icon.status_code == 204
    assert icon_posted.status_code == 405 and set(icon_posted.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert "<title>" in icon_posted.text  # the service's page
    for internal in (health, metrics):  # operator paths stay internal: the service's own "not found" page
        assert internal.status_code == 404
        assert "<title>Страница не найдена</title>" in internal.text
        assert "storage" not in internal.text and "archiver_" not in internal.text
    assert typo.status_code == 404 and "<title>Страница не найдена</title>" in typo.text
    assert cookie.status_code == cookie_text.status_code == 431
    assert served.status_code == 200 and served.content[:4] == b"PK\x03\x04"
    assert cookie_long.status_code == 431 and "<title>" in cookie_long.text  # the service's page
    assert '<html lang="ru">' in cookie.text and cookie.headers["content-type"] == "text/html; charset=utf-8"
    assert cookie_text.text == MESSAGES[431].sentence + "\n"
    assert posted.status_code == posted_text.status_code == 413
    assert f"<title>{MESSAGES[405].title}</title>" in posted.text and MESSAGES[405].sentence in posted.text
    assert posted.headers["content-type"] == "text/html; charset=utf-8"
    assert posted_text.text == MESSAGES[405].sentence + "\n"
    assert posted_small.status_code == 405 and "allow" in posted_small.headers
    assert traced.status_code == traced_text.status_code == 405
    assert f"<title>{MESSAGES[405].title}</title>" in traced.text and MESSAGES[405].sentence in traced.text
    assert traced_text.text == MESSAGES[405].sentence + "\n"
    for answer in (traced, traced_text):
        assert set(answer.headers["allow"].split(", ")) == {"GET", "HEAD"}
    # Every error, nginx's own and the service's, is kept by no cache.
    for error in (
        icon_posted,
        health,
        typo,
        cookie,
        cookie_text,
        posted,
        posted_text,
        posted_small,
        traced,
        traced_text,
    ):
        assert error.headers["cache-control"] == "no-store", error
        assert error.headers["referrer-policy"] == "no-referrer", error
    assert refused_name.status_code == 400 and f"<title>{MESSAGES[400].title}</title>" in refused_name.text
    (status_html, html), (status_text, text) = unparsed
    assert status_html == status_text == 400
    assert f"<title>{UNPARSED_REQUEST.title}</title>" in html and '<html lang="ru">' in html
    assert text == UNPARSED_REQUEST.sentence + "\n"


@needs_nginx
async def test_through_nginx_over_http2_its_own_refusals_are_in_the_services_words(
    settings: Settings, tmp_path: Path, tls_files: tuple[trustme.CA, Path, Path]
) -> None:
    # What a browser speaks to nginx: HTTP/2 over TLS.  There nginx reads a request's body
    # before its error_page, and a page of its own that checked the size again was a second
    # 413, answered with nginx's stock page (helper 65).  curl: httpx sends a whole body
    # before it reads an answer, and nginx opens no flow-control window for one it refused.
    ca, certfile, keyfile = tls_files
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    body = tmp_path / "body"
    body.write_bytes(b"x" * (1024 * 1024 + 1))  # over client_max_body_size

    async def curl(url: str, *options: str) -> tuple[str, str]:
        command = ["curl", "-sS", "--http2", "--cacert", str(tmp_path / "ca.pem"), *options, url]
        result = await trio.run_process([*command, "-w", "\n%{http_version} %{http_code}"], capture_stdout=True)
        text, _, status = result.stdout.decode().rpartition("\n")
        return status, text

    async with (
        pages_server(settings, tmp_path) as (url, _),
        nginx_in_front(url, tmp_path / "nginx", tls=(certfile, keyfile)) as front,
    ):
        posted = await curl(f"{front}/archive/album/", "-H", f"Accept: {BROWSER_ACCEPT}", "--data-binary", f"@{body}")
        posted_text = await curl(f"{front}/archive/album/", "--data-binary", f"@{body}")
        typo = await curl(f"{front}/archiv/album/", "-H", f"Accept: {BROWSER_ACCEPT}")
    assert posted[0] == posted_text[0] == "2 413"
    assert f"<title>{MESSAGES[405].title}</title>" in posted[1]
    assert posted_text[1] == MESSAGES[405].sentence + "\n"
    assert typo[0] == "2 404" and "<title>Страница не найдена</title>" in typo[1]


@needs_nginx
async def test_through_nginx_a_request_of_http_0_9_is_closed_unanswered(settings: Settings, tmp_path: Path) -> None:
    # A request line without a version is HTTP/0.9, whose answer is its body alone: no status, no
    # length, no chunks, so a download cut short would look whole.  nginx served it the archive
    # (helper 170); the service itself refuses such a line (h11: a 400).  Closed with no byte sent.
    async with pages_server(settings, tmp_path) as (url, _), nginx_in_front(url, tmp_path / "nginx") as front:
        host, port = front.removeprefix("http://").rsplit(":", 1)
        address = (host, int(port))
        unanswered = await trio.to_thread.run_sync(raw_answer, address, b"GET /archive/album/\r\n")
        served = await trio.to_thread.run_sync(raw_answer, address, b"GET /archive/album/ HTTP/1.0\r\n\r\n")
    assert unanswered == b""
    assert served.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\n\r\nPK\x03\x04" in served


@needs_nginx
async def test_through_nginx_a_request_line_it_cannot_parse_still_gets_its_error_page(
    settings: Settings, tmp_path: Path
) -> None:
    # nginx's own 400 and 414 for a request line it could not read have no protocol either: their
    # error_page redirect met the HTTP/0.9 check and was closed unanswered (or reset), the 414 page for
    # a URL over nginx's buffers too (helper 174).
    async with pages_server(settings, tmp_path) as (url, _), nginx_in_front(url, tmp_path / "nginx") as front:
        host, port = front.removeprefix("http://").rsplit(":", 1)
        address = (host, int(port))
        lower = await trio.to_thread.run_sync(raw_answer, address, b"get /archive/album/ HTTP/1.1\r\nHost: x\r\n\r\n")
        control = await trio.to_thread.run_sync(raw_answer, address, b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n")
        long_url = b"GET /archive/album/?" + b"a" * 17_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        too_long = await trio.to_thread.run_sync(raw_answer, address, long_url)
        unanswered = await trio.to_thread.run_sync(raw_answer, address, b"GET /archive/album/\r\n")
    for refused in (lower, control):
        assert refused.startswith(b"HTTP/1.1 400 "), refused[:200]
        assert refused.endswith(b"\r\n\r\n" + (UNPARSED_REQUEST.sentence + "\n").encode())
    assert too_long.startswith(b"HTTP/1.1 414 ") and b"cookie" in too_long, too_long[:200]
    assert unanswered == b""


def raw_answer(address: tuple[str, int], request: bytes) -> bytes:
    """Every byte the server sends for ``request`` until it closes."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


@needs_nginx
async def test_nginx_with_no_instance_up_says_the_service_is_unavailable(tmp_path: Path) -> None:
    # It said the busy page's "too many archives are being downloaded" (helper 82).
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with (
        nginx_in_front(down, tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front) as client,
    ):
        page = await client.get("/archive/album/", headers={"Accept": BROWSER_ACCEPT})
        text = await client.get("/archive/album/")
    assert page.status_code == text.status_code == 503
    assert page.headers["retry-after"] == text.headers["retry-after"] == "5"
    assert f"<title>{NO_INSTANCE.title}</title>" in page.text and NO_INSTANCE.sentence in page.text
    assert text.text == NO_INSTANCE.sentence + "\n"
    assert page.headers["cache-control"] == text.headers["cache-control"] == "no-store"


def exchange(address: tuple[str, int], head: str) -> tuple[int, str]:
    """A raw request as written (no client checks it): the status and the body, read to the close."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head.encode())
        received = b""
        while data := sock.recv(65536):
            received += data
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode()


async def chromium_page(url: str, screenshot: Path, profile: Path) -> str:
    """What headless Chromium shows at ``url``: its DOM after load; a phone-sized screenshot is saved too."""
    flags = [*HEADLESS, f"--user-data-dir={profile}", "--window-size=412,915"]
    assert CHROMIUM is not None
    with chromium_tmpdir() as env:
        await trio.run_process(
            [CHROMIUM, *flags, f"--screenshot={screenshot}", url], capture_stdout=True, capture_stderr=True, env=env
        )
    with chromium_tmpdir() as env:
        dom = await trio.run_process(
            [CHROMIUM, *flags, "--dump-dom", url], capture_stdout=True, capture_stderr=True, env=env
        )
    return dom.stdout.decode()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
async def test_chromium_shows_russian_pages_with_titles(settings: Settings, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"  # kept with the test's temporary files, as CI artefacts
    shots.mkdir()
    seen: dict[str, str] = {}
    async with pages_server(settings, tmp_path) as (url, producer_command):
        seen["index"] = await chromium_page(f"{url}/", shots / "index.png", tmp_path / "profile")
        seen["404"] = await chromium_page(f"{url}/archive/no-such-album/", shots / "404.png", tmp_path / "profile")
        producer_command.chmod(0)
        seen["503"] = await chromium_page(f"{url}/archive/album/", shots / "503.png", tmp_path / "profile")
    signed = settings.storage_dir.parent / "signed"
    signed.mkdir()
    async with pages_server(replace(settings, storage_dir=signed), tmp_path / "signed", link_secret=SECRET) as (
        url,
        _,
    ):
        seen["403"] = await chromium_page(f"{url}/archive/album/", shots / "403.png", tmp_path / "profile")
    titles = {"index": "Архивы фотографий", "404": MESSAGES[404].title, "503": MESSAGES[503].title}
    titles["403"] = MESSAGES[403].title
    for name, dom in seen.items():
        assert f"<title>{titles[name]}</title>" in dom, dom
        visible = re.sub(r"<[^>]+>|<style>.*?</style>", " ", dom.split("<body>", 1)[1], flags=re.DOTALL)
        letters = [char for char in visible if char.isalpha()]
        cyrillic = [char for char in letters if "\u0400" <= char <= "\u04ff"]
        assert len(cyrillic) > 0.8 * len(letters), visible  # the visible text is Russian
        screenshot = shots / f"{name}.png"
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 5_000
