"""Signed, expiring links: without a valid signature no archive, no producer, no hint; with one, ranges too."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from archiver.config import Settings, SettingsError
from archiver.logs import Quieted
from archiver.web import routes as routes_module
from archiver.web.pages import MESSAGES
from archiver.web.signing import LinkRefused, check_link, parse_duration, signed_query

from .conftest import CLIENT_TLS, ctimes_settled, files_on_disk, make_client, read_archive, running_server, write_tree
from .test_cli import PROJECT

SECRET = "correct horse battery staple"


def signed(name: str, expires: float, secret: str = SECRET) -> str:
    return f"/archive/{name}/?{signed_query(secret.encode(), name, int(expires))}"


@pytest.fixture
def signing_settings(settings: Settings) -> Settings:
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(100_000), "b.txt": b"b"})
    return replace(settings, link_secret=SECRET)


async def test_signed_link_opens_the_archive_and_resumes(signing_settings: Settings, protocol: str) -> None:
    url = signed("album", time.time() + 60)
    await ctimes_settled(signing_settings.storage_dir / "album")
    async with running_server(signing_settings) as server, make_client(server, protocol) as client:
        whole = await client.get(url)
        part = await client.get(url, headers={"Range": "bytes=100-", "If-Range": whole.headers["etag"]})
        head = await client.head(url)
    assert whole.status_code == 200
    assert read_archive(whole.content) == files_on_disk(signing_settings.storage_dir / "album")
    assert part.status_code == 206
    assert part.content == whole.content[100:]
    assert head.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        # Ids of their own: a signed link's depends on the time (pytest-xdist's workers, collecting
        # a second apart, would disagree on the tests' names and stop the run).
        pytest.param("/archive/album/", id="no signature"),
        pytest.param("/archive/album/?expires=99999999999", id="no sig"),
        pytest.param(signed("album", time.time() - 1), id="expired"),
        pytest.param(signed("other", time.time() + 60).replace("/other/", "/album/"), id="another album's"),
        pytest.param(signed("album", time.time() + 60, secret="another secret"), id="another secret"),
        pytest.param(signed("album", time.time() + 60).replace("expires=", "expires=1"), id="expiry changed"),
        pytest.param("/archive/album/?expires=" + "9" * 5000 + "&sig=" + "A" * 43, id="expiry of 5000 digits"),
        pytest.param("/archive/album/?expires=1e99&sig=x", id="expiry not an integer"),
    ],
)
async def test_missing_bad_or_expired_signature_is_403_and_starts_nothing(
    signing_settings: Settings, producer_starts: Path, path: str
) -> None:
    async with running_server(signing_settings) as server, make_client(server, "HTTP/1.1") as client:
        response = await client.get(path)
        unknown = await client.get(path.replace("/album/", "/no-such-album/"))
    assert response.status_code == 403
    assert response.text.strip() == MESSAGES[403].sentence
    assert unknown.status_code == 403  # the same answer: nothing says whether an album exists
    assert producer_starts.read_text() == ""


async def test_refused_links_and_names_write_a_line_a_second_of_each_kind(
    signing_settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 175: each refusal wrote an INFO line, and costs the service no walk and no thread: one client
    # on one kept-alive connection wrote ~900 lines a second, beside their access lines.
    # Lines of their own: the module's are quiet for a second after another test's (helper 179).
    lines_by_kind = {
        kind: Quieted(logging.getLogger(routes_module.__name__), logging.INFO, 1.0)
        for kind in routes_module._refusal_lines
    }
    monkeypatch.setattr(routes_module, "_refusal_lines", lines_by_kind)
    refused = [
        f"/archive/album/?expires={int(time.time()) + 60}&sig={'A' * 43}",  # a bad signature
        "/archive/album/",  # none
        signed("album", time.time() - 1),  # expired
        signed("album", time.time() + 60) + "&filename=%FF",  # a file name not in UTF-8
    ]
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="archiver.web.routes"):
        async with running_server(signing_settings) as server, make_client(server, "HTTP/1.1") as client:
            for number in range(400):
                forwarded = {"X-Forwarded-For": f"198.51.100.{number % 200}"}  # many clients, one kind each
                statuses[(await client.get(refused[number % 4], headers=forwarded)).status_code] += 1
    seconds = time.monotonic() - started
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("refused album for ")]
    assert statuses == {403: 300, 400: 100}
    assert 1 <= len(lines) <= 3 * (seconds + 1), (len(lines), seconds)  # three kinds, a line a second each


async def test_refused_links_lines_keep_an_expired_link_apart_and_count_exactly(
    signing_settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 175's kinds, on a clock the test moves (helper 179: the test above counts lines, not what
    # they say): an expired link (what a user with an old one meets) has its own line however many bad
    # signatures come first, and each line after the first counts exactly those its kind left out.
    now = [0.0]
    lines = {
        kind: Quieted(logging.getLogger(routes_module.__name__), logging.INFO, 1.0, clock=lambda: now[0])
        for kind in routes_module._refusal_lines
    }
    monkeypatch.setattr(routes_module, "_refusal_lines", lines)
    bad = f"/archive/album/?expires={int(time.time()) + 60}&sig={'A' * 43}"
    expired = signed("album", time.time() - 1)
    name = signed("album", time.time() + 60) + "&filename=%FF"
    with caplog.at_level(logging.INFO, logger=routes_module.__name__):
        async with running_server(signing_settings) as server, make_client(server, "HTTP/1.1") as client:
            for paths in ([bad] * 50 + [expired] * 3 + [name] * 2, [bad, expired, name]):
                for number, path in enumerate(paths):
                    forwarded = {"X-Forwarded-For": f"198.51.100.{number}"}  # from the trusted 127.0.0.1
                    assert (await client.get(path, headers=forwarded)).status_code in (400, 403)
                now[0] += 1.0
    said = [record.getMessage() for record in caplog.records if record.getMessage().startswith("refused album for ")]
    more = " ({} more such lines left out since the last)"
    # Each line names the client of the first event of its period (README, Logs).
    assert [re.sub(r"expired at \d+", "expired at <t>", line) for line in said] == [
        "refused album for 198.51.100.0: bad signature",
        "refused album for 198.51.100.50: expired at <t>",
        "refused album for 198.51.100.53: filename is not UTF-8",
        "refused album for 198.51.100.0: bad signature" + more.format(49),
        "refused album for 198.51.100.1: expired at <t>" + more.format(2),
        "refused album for 198.51.100.2: filename is not UTF-8" + more.format(1),
    ]


async def test_redirect_keeps_the_signature(signing_settings: Settings) -> None:
    query = signed("album", time.time() + 60).split("?", 1)[1]
    async with running_server(signing_settings) as server, make_client(server, "HTTP/1.1") as client:
        response = await client.get(f"/archive/album?{query}", follow_redirects=True)
    assert response.status_code == 200
    assert response.history[0].headers["location"] == f"album/?{query}"


def test_signature_check_is_strict_about_its_inputs() -> None:
    secret = SECRET.encode()
    good = dict(part.split("=", 1) for part in signed_query(secret, "album", 2000).split("&"))
    check_link(secret, "album", good["expires"], good["sig"], now=1999)
    with pytest.raises(LinkRefused, match="expired"):
        check_link(secret, "album", good["expires"], good["sig"], now=2001)
    with pytest.raises(LinkRefused, match="malformed"):
        check_link(secret, "album", "٣٣", good["sig"], now=0)  # digits of another script


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0d", "99999999d", "36501d", "3153600001s", "9999999999999", "1y", ""])
def test_durations_a_link_cannot_live_are_refused(text: str) -> None:
    # Helper 52: "--ttl 99999999d" printed an expiry of 13 digits, which the service refuses (403),
    # and "--ttl 0" a link already expired.
    with pytest.raises(ValueError):
        parse_duration(text)
    assert parse_duration("36500d") == parse_duration("3153600000s") == 100 * 365 * 86400  # helper 57: 10 digits
    env = {**os.environ, "ARCHIVER_LINK_SECRET": SECRET}
    command = [sys.executable, "-m", "archiver", "sign", "album", "--ttl", text]
    refused = subprocess.run(command, env=env, capture_output=True, text=True)
    assert refused.returncode == 2


async def test_archiver_sign_prints_a_link_the_service_takes(signing_settings: Settings) -> None:
    env = {**os.environ, "ARCHIVER_LINK_SECRET": SECRET}
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "sign", "album", "--ttl", "5m", "--base-url", "https://example.org/"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    link = result.stdout.strip()
    match = re.fullmatch(r"https://example\.org(/archive/album/\?expires=(\d+)&sig=[\w-]{43})", link)
    assert match is not None, link
    assert 290 <= int(match.group(2)) - time.time() <= 301
    async with (
        running_server(signing_settings) as server,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=server) as client,
    ):
        assert (await client.get(match.group(1))).status_code == 200


def test_archiver_sign_without_a_secret_fails_with_a_message() -> None:
    env = {key: value for key, value in os.environ.items() if key != "ARCHIVER_LINK_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "sign", "album"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "ARCHIVER_LINK_SECRET is not set" in result.stderr


async def test_readme_snippet_makes_links_the_service_takes(signing_settings: Settings) -> None:
    readme = (PROJECT / "README.md").read_text()
    snippet = re.search(r"```python\n(# What the CMS does.*?)```", readme, re.DOTALL)
    assert snippet is not None, "README lost the CMS snippet"
    namespace: dict[str, object] = {}
    exec(snippet.group(1), namespace)
    async with running_server(signing_settings) as server, httpx.AsyncClient(verify=CLIENT_TLS) as client:
        link = namespace["archive_link"](server, "album", SECRET, 60)  # type: ignore[operator]
        assert (await client.get(link)).status_code == 200


async def test_a_signed_display_name_cannot_be_changed(signing_settings: Settings) -> None:
    expires = int(time.time()) + 60
    link = f"/archive/album/?{signed_query(SECRET.encode(), 'album', expires, 'Отпуск 2024')}"
    async with (
        running_server(signing_settings) as server,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=server) as client,
    ):
        named = await client.get(link)
        changed = await client.get(link.replace("filename=", "filename=X"))
        dropped = await client.get(link.split("&filename=")[0])
    assert named.status_code == 200
    assert "filename*=UTF-8''%D0%9E" in named.headers["content-disposition"]
    assert changed.status_code == dropped.status_code == 403


def test_archiver_sign_takes_a_display_name(signing_settings: Settings) -> None:
    env = {**os.environ, "ARCHIVER_LINK_SECRET": SECRET}
    command = [sys.executable, "-m", "archiver", "sign", "album", "--filename", "Отпуск 2024"]
    link = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert link.endswith("&filename=%D0%9E%D1%82%D0%BF%D1%83%D1%81%D0%BA%202024")
    expires = int(re.search(r"expires=(\d+)", link).group(1))  # type: ignore[union-attr]
    sig = re.search(r"sig=([\w-]+)", link).group(1)  # type: ignore[union-attr]
    check_link(SECRET.encode(), "album", str(expires), sig, time.time(), "Отпуск 2024")
    too_long = subprocess.run([*command[:-1], "x" * 200], env=env, capture_output=True, text=True)
    assert too_long.returncode == 2 and "longer than" in too_long.stderr


async def test_readme_snippets_make_named_links_the_service_takes(signing_settings: Settings, tmp_path: Path) -> None:
    readme = (PROJECT / "README.md").read_text()
    python = re.search(r"```python\n(# What the CMS does.*?)```", readme, re.DOTALL)
    php = re.search(r"```php\n(<\?php\n// The same in PHP.*?)```", readme, re.DOTALL)
    assert python is not None and php is not None, "README lost a CMS snippet"
    namespace: dict[str, object] = {}
    exec(python.group(1), namespace)
    async with running_server(signing_settings) as server, httpx.AsyncClient(verify=CLIENT_TLS) as client:
        links = [namespace["archive_link"](server, "album", SECRET, 60, "Отпуск 2024")]  # type: ignore[operator]
        if shutil.which("php"):
            (tmp_path / "link.php").write_text(
                php.group(1) + f"\necho archive_link('{server}', 'album', '{SECRET}', 60, 'Отпуск 2024');\n"
            )
            result = await trio.run_process(["php", str(tmp_path / "link.php")], capture_stdout=True)
            links.append(result.stdout.decode().strip())
        for link in links:
            response = await client.get(link)
            assert response.status_code == 200, link
            assert response.headers["content-disposition"].startswith('attachment; filename="Otpusk 2024.zip"')
    assert len(links) == 2 or shutil.which("php") is None


@pytest.mark.parametrize("launch", ["archiver", "hypercorn", "archiver sign"])
def test_a_secret_that_is_not_utf8_is_refused_at_start(launch: str) -> None:
    # An env file saved as cp1251: os.environ keeps the byte as a surrogate, and every signed link was a 500.
    hypercorn = str(Path(sys.executable).with_name("hypercorn"))
    command = {
        "archiver": [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0"],
        "hypercorn": [hypercorn, "--config", "hypercorn.toml", "--bind", "127.0.0.1:0", "archiver.asgi:app"],
        "archiver sign": [sys.executable, "-m", "archiver", "sign", "album"],
    }[launch]
    secret = "Пароль-для-ссылок-архива".encode("cp1251")
    env = {**os.environb, b"ARCHIVER_DIR": b"data", b"ARCHIVER_LINK_SECRET": secret}
    result = subprocess.run(command, env=env, capture_output=True, timeout=60, cwd=PROJECT)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode in (1, 2), stderr  # 2: argparse's error, archiver sign's usage
    assert "is not UTF-8 text" in stderr and "openssl rand -base64 32" in stderr
    assert secret not in result.stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("secret", "said"),
    [
        # One signed link is enough to find a short secret offline (helper 68: "a" and " " were taken).
        ("s3cret", "has 6 bytes besides spaces, fewer than 16"),
        (" " * 40, "has 0 bytes besides spaces"),
        (" fifteen bytes  ", "has 13 bytes besides spaces"),  # 16 with its spaces
    ],
)
def test_a_secret_too_short_to_keep_is_refused(secret: str, said: str, storage: Path) -> None:
    # The same check under every launch (Settings): the launches are shown refusing above.
    with pytest.raises(SettingsError, match=said) as refused:
        Settings(storage_dir=storage, link_secret=secret)
    assert secret.strip() not in str(refused.value) or not secret.strip()
    Settings(storage_dir=storage, link_secret="sixteen bytes ok")
    Settings(storage_dir=storage, link_secret="Ключ ссылок")  # 11 letters, 21 bytes


async def test_the_start_says_whether_links_are_signed(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    # An empty ARCHIVER_LINK_SECRET= is unset: open links, which the operator must be able to see (helper 68).
    caplog.set_level("INFO", logger="archiver")
    for secret, said in [("", "an album's name alone opens it"), (SECRET, "signed and expiring")]:
        caplog.clear()
        async with running_server(replace(settings, link_secret=secret)):
            pass
        assert [record.getMessage() for record in caplog.records if record.getMessage().startswith("links: ")] == [
            f"links: {said}" + (" (ARCHIVER_LINK_SECRET)" if secret else " (ARCHIVER_LINK_SECRET unset)")
        ]


async def test_no_shared_cache_keeps_an_archive_or_a_refusal(signing_settings: Settings, protocol: str) -> None:
    # A cache keyed without the query would serve a signed archive past its expiry, or to anyone (helper 68);
    # a kept 403 or 404 would outlive a new link or an upload.
    url = signed("album", time.time() + 60)
    async with running_server(signing_settings) as server, make_client(server, protocol) as client:
        whole = await client.get(url)
        part = await client.get(url, headers={"Range": "bytes=5-9"})
        head = await client.head(url)
        refused = await client.get("/archive/album/")
        unknown = await client.get(signed("nothing-here", time.time() + 60))
    assert [whole.status_code, part.status_code, head.status_code] == [200, 206, 200]
    assert whole.headers["cache-control"] == part.headers["cache-control"] == head.headers["cache-control"] == "private"
    assert [refused.status_code, unknown.status_code] == [403, 404]
    assert refused.headers["cache-control"] == unknown.headers["cache-control"] == "no-store"
    # Nor a Referer from the page's own requests: it would carry the link's sig (helper 71).
    assert refused.headers["referrer-policy"] == unknown.headers["referrer-policy"] == "no-referrer"
