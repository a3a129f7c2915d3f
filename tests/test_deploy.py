"""The production surface: a real nginx in front (deploy/nginx.conf), and HTTP/2 over TLS."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from hypercorn.config import Config as HypercornConfig

from archiver.config import Settings
from archiver.fences.hypercorn_tcp import write_units
from archiver.web.limits import DESCRIPTORS_PER_JOB, RESERVED_DESCRIPTORS, STALL_UNIT, WALK_DESCRIPTORS
from archiver.web.pages import MESSAGES
from archiver.web.signing import signed_query

from .conftest import (
    CLIENT_TLS,
    ctimes_settled,
    files_on_disk,
    free_port,
    http10_get,
    read_archive,
    running_server,
    wait_until_no_producer_children,
    write_tree,
)
from .test_cli import PROJECT
from .test_observability import samples

UNIT = PROJECT / "deploy" / "archiver@.service"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx-light; .ci/run installs it)"
)


UPSTREAM_SERVERS = re.compile(r"(    server 127\.0\.0\.1:808\d( [^;\n]*)?;\n)+")


def site_config(
    upstreams: Sequence[str], port: int, tls: tuple[Path, Path] | None = None, access_log: Path | None = None
) -> str:
    """deploy/nginx.conf as shipped, pointed at ``upstreams`` and listening on loopback ``port`` (TLS with ``tls``).

    Its access log written to ``access_log``, or none.
    """
    text = (PROJECT / "deploy" / "nginx.conf").read_text()
    text, logs = re.subn(
        r"access_log /var/log/nginx/access\.log (\w+);",
        f"access_log {access_log} \\1;" if access_log else "access_log off;",
        text,
    )
    # The shipped server lines' options (passive health checks) stay as they are.
    options = UPSTREAM_SERVERS.search(text)
    assert options is not None
    servers = "".join(f"    server {upstream}{options.group(2) or ''};\n" for upstream in upstreams)
    text, upstreams_found = UPSTREAM_SERVERS.subn(servers, text)
    listen = f"listen 127.0.0.1:{port};"
    if tls is not None:
        # As Deploying has it: HTTP/2 for browsers, over TLS.
        listen = f"listen 127.0.0.1:{port} ssl http2; ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};"
    text, listens = re.subn(r"listen 80;", listen, text)
    assert upstreams_found == listens == logs == 1, "deploy/nginx.conf changed shape: update this test"
    return text


@asynccontextmanager
async def nginx_in_front(
    service_url: str | Sequence[str], workdir: Path, tls: tuple[Path, Path] | None = None
) -> AsyncIterator[str]:
    """A real nginx on a free loopback port running deploy/nginx.conf before the service(s) (HTTPS with ``tls``)."""
    assert NGINX is not None
    workdir.mkdir()
    for attempt in range(3):
        port = free_port()
        async with _nginx(service_url, workdir, port, tls) as started:
            if started is None and attempt < 2:
                continue  # another process bound the port first (free_port's race)
            assert started is not None, f"port after port was taken: {port}"
            yield started
            return


@asynccontextmanager
async def _nginx(
    service_url: str | Sequence[str], workdir: Path, port: int, tls: tuple[Path, Path] | None
) -> AsyncIterator[str | None]:
    """nginx on ``port``: its URL once it accepts, or None if it could not bind the port."""
    assert NGINX is not None
    urls = [service_url] if isinstance(service_url, str) else service_url
    site = site_config([url.removeprefix("http://") for url in urls], port, tls, workdir / "access.log")
    (workdir / "site.conf").write_text(site)
    (workdir / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {workdir}/nginx.pid; error_log {workdir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
    uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
    include {workdir}/site.conf;
}}
""")
    process = await trio.lowlevel.open_process([NGINX, "-c", str(workdir / "nginx.conf"), "-p", str(workdir)])
    try:
        # nginx says nothing when ready.  It writes its pid file once its port is bound and listening
        # (a probe's connection could be another process's, on the port taken first).
        with trio.fail_after(10):
            while process.poll() is None and not (workdir / "nginx.pid").exists():
                await trio.sleep(0.02)
        if process.returncode is None:
            yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        else:
            log = (workdir / "error.log").read_text() if (workdir / "error.log").exists() else ""
            assert "Address already in use" in log, f"nginx exited at its start:\n{log}"
            yield None
    finally:
        process.terminate()
        with trio.CancelScope(shield=True):
            await process.wait()


@needs_nginx
async def test_archive_through_nginx_is_valid(settings: Settings, tmp_path: Path) -> None:
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(300_000), "Фото/2.jpg": b"2"})
    async with (
        running_server(settings) as service,
        nginx_in_front(service, tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front) as client,
    ):
        response = await client.get("/archive/album/")
        missing = await client.get("/archive/missing/")
    assert response.status_code == 200
    assert response.headers["content-disposition"] == 'attachment; filename="album.zip"'
    assert read_archive(response.content) == files_on_disk(settings.storage_dir / "album")
    assert missing.status_code == 404
    assert missing.text.strip() == MESSAGES[404].sentence


@needs_nginx
async def test_nginx_passes_bytes_before_the_archive_is_complete(settings: Settings, tmp_path: Path) -> None:
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    slow = replace(settings, delay=0.2, chunk_size=65536)  # about 3 s for the whole archive
    async with (
        running_server(slow) as service,
        nginx_in_front(service, tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front) as client,
        client.stream("GET", "/archive/album/") as response,
    ):
        chunks = response.aiter_raw()
        await anext(chunks)
        async with httpx.AsyncClient(verify=CLIENT_TLS, base_url=service) as direct:
            metrics = samples((await direct.get("/metrics")).text)
        # The first bytes are here while the service is still sending: nginx did not spool.
        assert metrics["archiver_downloads_in_flight"] == 1
        assert metrics['archiver_downloads_finished_total{outcome="completed"}'] == 0


@needs_nginx
async def test_a_failed_download_is_cut_short_for_an_http10_client_through_nginx_with_compression(
    settings: Settings, tmp_path: Path
) -> None:
    """nginx tells the service its client spoke HTTP/1.0 (X-Client-Protocol): the stored archive, with a length.

    Deflated, the archive would go chunked to nginx and end with the
    connection to the HTTP/1.0 client: a failure mid-way (here a file
    truncated) would look like a whole download.  With a length the client
    sees it is short.
    """
    album = settings.storage_dir / "album"
    write_tree(album, {"a.jpg": os.urandom(400_000), "b.jpg": os.urandom(200_000)})
    slow = replace(settings, compression=6, delay=0.1, chunk_size=65536)
    async with running_server(slow) as service, nginx_in_front(service, tmp_path / "nginx") as front:
        status, headers, body = await http10_get(front, "/archive/album/")
        assert status == 200 and headers["content-length"] == str(len(body))
        assert read_archive(body) == files_on_disk(album)
        host, port = front.removeprefix("http://").rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(b"GET /archive/album/ HTTP/1.0\r\nHost: x\r\n\r\n")
            received = bytearray(await stream.receive_some(65536))
            os.truncate(album / "b.jpg", 1000)  # while a.jpg is still being sent
            with trio.fail_after(30):
                while data := await stream.receive_some(65536):
                    received += data
    head, _, partial = bytes(received).partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    assert b"chunked" not in head.lower()
    assert len(partial) < length


@needs_nginx
async def test_client_leaving_nginx_kills_the_services_producer(large_storage: Path, tmp_path: Path) -> None:
    settings = Settings(settle_time=0, storage_dir=large_storage, host="127.0.0.1", port=0)
    async with running_server(settings) as service, nginx_in_front(service, tmp_path / "nginx") as front:
        async with (
            httpx.AsyncClient(verify=CLIENT_TLS, base_url=front) as client,
            client.stream("GET", "/archive/big/") as response,
        ):
            chunks = response.aiter_raw()
            await anext(chunks)
        # nginx notices the closed client and closes its upstream connection.
        await wait_until_no_producer_children(timeout=10)


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/1.1"])
async def test_download_over_tls_negotiates_protocol_by_alpn(
    settings: Settings, tls_files: tuple[trustme.CA, Path, Path], protocol: str
) -> None:
    ca, certfile, keyfile = tls_files
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(200_000)})
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    http2 = protocol == "HTTP/2"
    async with running_server(settings, certfile=str(certfile), keyfile=str(keyfile)) as url:
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=trust, http1=not http2, http2=http2) as client:
            response = await client.get(f"{url}/archive/album/")
    assert response.http_version == protocol
    assert read_archive(response.content) == files_on_disk(settings.storage_dir / "album")


async def test_a_tls_handshake_that_never_ends_holds_its_connection_for_the_shipped_timeout(
    settings: Settings, tls_files: tuple[trustme.CA, Path, Path]
) -> None:
    # Hypercorn waits 60 s for a TLS handshake by default, and its keep-alive timer starts only
    # after it: a client that sent its ClientHello a byte every 0.25 s (or nothing) held its
    # connection, and a connection slot, 12 times as long as one idling in plain HTTP (5 s).
    _ca, certfile, keyfile = tls_files
    shipped = HypercornConfig.from_toml(PROJECT / "hypercorn.toml").ssl_handshake_timeout
    assert shipped <= 10
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x")
    with contextlib.suppress(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = outgoing.read()
    async with running_server(
        settings, certfile=str(certfile), keyfile=str(keyfile), ssl_handshake_timeout=shipped
    ) as url:
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        with trio.fail_after(shipped + 10):
            for byte in client_hello:
                try:
                    await stream.send_all(bytes((byte,)))
                except trio.BrokenResourceError:
                    break
                with trio.move_on_after(0.25):
                    if await stream.receive_some() == b"":
                        break
            else:
                raise AssertionError("the whole ClientHello went before the connection closed")
        closed_after = trio.current_time() - started
        await stream.aclose()
    assert shipped - 1 < closed_after < shipped + 5


def test_hypercorn_toml_documents_tls() -> None:
    text = (PROJECT / "hypercorn.toml").read_text()
    for setting in ("certfile", "keyfile", "alpn_protocols"):
        assert re.search(rf"^# {setting} = ", text, re.MULTILINE), setting
    assert "change workers above" in text
    # Every setting shown commented out, uncommented, leaves a configuration (helper 137: a second
    # bind line there, and a second workers line, were TOML errors: Hypercorn did not start).
    uncommented = re.sub(r"^# ([a-z_]+ = )", r"\1", text, flags=re.MULTILINE)
    config = tomllib.loads(uncommented)
    assert config["certfile"] and config["keyfile"] and config["alpn_protocols"] == ["h2", "http/1.1"]
    assert HypercornConfig.from_mapping(config).alpn_protocols == ["h2", "http/1.1"]


def test_systemd_unit_uses_the_hypercorn_launch_and_env_file() -> None:
    unit = UNIT.read_text()
    assert (
        "ExecStart=/opt/archiver/.venv/bin/hypercorn --config hypercorn.toml --bind 127.0.0.1:%i archiver.asgi:app"
        in unit
    )
    assert "EnvironmentFile=/etc/archiver.env" in unit
    assert "ARCHIVER_DIR=" in (PROJECT / "deploy" / "archiver.env").read_text()


HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "ReadOnlyPaths=/",
    "CapabilityBoundingSet=",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
)


def test_nginx_moves_archives_through_a_buffer_larger_than_a_page() -> None:
    # Unbuffered proxying reads and writes proxy_buffer_size at a time (a page by default):
    # the shipped file ran 8 downloads at once at 0.6 of the rate a 64 KiB buffer gives (bench).
    text = (PROJECT / "deploy" / "nginx.conf").read_text()
    archive_location = text[text.index("location /archive/ {") :]
    match = re.search(r"^\s*proxy_buffer_size (\d+)k;", archive_location, re.MULTILINE)
    assert match is not None and int(match.group(1)) >= 64


def test_nginx_gives_up_on_a_client_after_the_service_does() -> None:
    # The service aborts a download whose client takes nothing for its stall timeout a STALL_UNIT
    # of the chunk it holds; nginx's send_timeout must be longer (the service decides and logs
    # it), and not hours (nginx holds its buffers for a download that is over).
    text = (PROJECT / "deploy" / "nginx.conf").read_text()
    match = re.search(r"^\s*send_timeout (\d+)m;", text[text.index("location /archive/ {") :], re.MULTILINE)
    assert match is not None
    defaults = Settings()
    service_gives_up = defaults.stall_timeout * write_units(defaults.chunk_size, STALL_UNIT)
    assert service_gives_up < int(match.group(1)) * 60 <= 2 * service_gives_up


def test_systemd_unit_is_hardened() -> None:
    lines = UNIT.read_text().splitlines()
    for directive in HARDENING:
        assert directive in lines, directive


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = UNIT.read_text()
    # verify checks that ExecStart exists: point it at this checkout's hypercorn.
    hypercorn = Path(sys.executable).parent / "hypercorn"
    # An instance of the template, as `systemctl enable archiver@8080` makes it.
    instance = tmp_path / "archiver@8080.service"
    instance.write_text(unit.replace("/opt/archiver/.venv/bin/hypercorn", str(hypercorn)))
    result = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "archiver@" not in result.stderr, result.stderr  # no warning about the unit


def test_systemd_unit_gives_descriptors_for_the_job_and_connection_limits() -> None:
    unit = UNIT.read_text()
    match = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert match is not None
    limit = int(match.group(1))
    # Room for the default jobs and thousands of connections, under the kernel's usual hard cap.
    assert limit - RESERVED_DESCRIPTORS - WALK_DESCRIPTORS - DESCRIPTORS_PER_JOB * Settings().max_jobs >= 10_000
    assert limit <= 1 << 20


@needs_nginx
async def test_nginx_passes_length_and_ranges_through(settings: Settings, tmp_path: Path) -> None:
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(200_000)})
    await ctimes_settled(settings.storage_dir / "album")
    async with (
        running_server(settings) as service,
        nginx_in_front(service, tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front) as client,
    ):
        whole = await client.get("/archive/album/")
        part = await client.get("/archive/album/", headers={"Range": "bytes=10-40", "If-Range": whole.headers["etag"]})
    assert int(whole.headers["content-length"]) == len(whole.content)
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 10-40/{len(whole.content)}"
    assert part.content == whole.content[10:41]


@needs_nginx
async def test_redirect_to_the_slash_works_through_nginx_with_tls(
    settings: Settings, tmp_path: Path, tls_files: tuple[trustme.CA, Path, Path]
) -> None:
    ca, certfile, keyfile = tls_files
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(10_000)})
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    async with (
        running_server(settings) as service,
        nginx_in_front(service, tmp_path / "nginx", tls=(certfile, keyfile)) as front,
        httpx.AsyncClient(base_url=front, verify=trust) as client,
    ):
        redirect = await client.get("/archive/album")
        followed = await client.get("/archive/album", follow_redirects=True)
    assert redirect.status_code == 308
    # The browser resolves it against the https:// URL it asked for, port included.
    assert redirect.next_request is not None and str(redirect.next_request.url) == f"{front}/archive/album/"
    assert followed.status_code == 200
    assert read_archive(followed.content) == files_on_disk(settings.storage_dir / "album")


@needs_nginx
async def test_per_client_job_cap_sees_the_clients_behind_nginx(settings: Settings, tmp_path: Path) -> None:
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    # One job per client, and a download that lasts (about 3 s) while the others ask.
    # Two slots, a fair share of one: the second download of one client is refused.
    capped = replace(settings, max_jobs=2, max_jobs_per_client=1, delay=0.2, chunk_size=65536)
    # Two clients from addresses of their own; nginx (on 127.0.0.1) is the trusted proxy.
    one, other = (
        httpx.AsyncHTTPTransport(verify=CLIENT_TLS, local_address=address) for address in ("127.0.0.3", "127.0.0.2")
    )
    async with (
        running_server(capped) as service,
        nginx_in_front(service, tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front, transport=one) as first,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front, transport=other) as second,
        first.stream("GET", "/archive/album/") as running,
    ):
        assert running.status_code == 200
        chunks = running.aiter_raw()  # kept: a dropped iterator closes the response
        await anext(chunks)
        # Every request reaches the service from nginx's address; X-Forwarded-For tells them apart.
        again = await first.get("/archive/album/", headers={"X-Forwarded-For": "198.51.100.7"})
        elsewhere = await second.head("/archive/album/")
        async with second.stream("GET", "/archive/album/") as parallel:
            parallel_status = parallel.status_code
    assert again.status_code == 503  # the same client, whatever it writes in the header itself
    assert again.headers["retry-after"] == "5"
    assert elsewhere.status_code == 200
    assert parallel_status == 200


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(settings: Settings) -> None:
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    untrusting = replace(
        settings, max_jobs=2, max_jobs_per_client=1, delay=0.2, chunk_size=65536, trusted_proxies=("192.0.2.1",)
    )
    async with (
        running_server(untrusting) as service,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=service) as client,
        client.stream("GET", "/archive/album/") as running,
    ):
        chunks = running.aiter_raw()
        await anext(chunks)
        spoofed = await client.get("/archive/album/", headers={"X-Forwarded-For": "198.51.100.8"})
    assert spoofed.status_code == 503


def test_each_line_of_the_settings_template_is_accepted_as_systemd_reads_it() -> None:
    # systemd's EnvironmentFile keeps a "# ..." after a value as part of it: a commented-out line
    # with a note after its value, once uncommented, stopped the service (found by helper 29).
    lines = (PROJECT / "deploy" / "archiver.env").read_text().splitlines()
    assignments = [line.removeprefix("# ") for line in lines if re.fullmatch(r"(# )?ARCHIVER_[A-Z_]+=.*", line)]
    assert len(assignments) >= 10
    for assignment in assignments:
        name, value = assignment.split("=", 1)
        assert "#" not in value, assignment
        Settings.from_env({name: value})  # SettingsError if the value is refused


async def test_a_head_still_arriving_past_16_kib_over_tls_gets_its_431_without_a_reset(
    settings: Settings, tls_files: tuple[trustme.CA, Path, Path]
) -> None:
    # As over plain TCP (tests/test_malformed.py): the rest of the head is read and dropped before
    # the close.  TLS has no half-close, and the first lingering skipped it (found by helper 33).
    ca, certfile, keyfile = tls_files
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    trust.set_alpn_protocols(["http/1.1"])

    def trickle(host: str, port: int) -> bytes:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            trust.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            sock.sendall(b"GET /archive/album/ HTTP/1.1\r\nHost: x\r\n")
            for i in range(40):
                sock.sendall(b"X-Pad-%02d: " % i + b"a" * 1012 + b"\r\n")  # an SSLError here: reset
                time.sleep(0.005)
            answer = bytearray()
            with contextlib.suppress(ssl.SSLZeroReturnError):
                while chunk := sock.recv(65536):
                    answer += chunk
            return bytes(answer)

    async with running_server(settings, certfile=str(certfile), keyfile=str(keyfile)) as url:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        answer = await trio.to_thread.run_sync(trickle, host, int(port))
    assert answer.startswith(b"HTTP/1.1 431 ")


@needs_nginx
async def test_a_signed_link_through_nginx_works_and_its_signature_stays_out_of_nginxs_log(
    settings: Settings, tmp_path: Path
) -> None:
    # Helper 68: nginx's default log format kept `?expires=...&sig=...`, a working link, in its access log.
    secret = "a secret long enough to sign with"
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1000)})
    query = signed_query(secret.encode(), "album", int(time.time()) + 60)
    async with (
        running_server(replace(settings, link_secret=secret)) as service,
        nginx_in_front(service, tmp_path / "nginx") as front,
        httpx.AsyncClient(verify=CLIENT_TLS, base_url=front) as client,
    ):
        signed = await client.get(f"/archive/album/?{query}")
        unsigned = await client.get("/archive/album/")
        # nginx's own answer, through its error_page: logged as the request, not as the page (helper 149).
        posted = await client.post(f"/archive/album/?{query}", content=b"x" * (2 << 20))
        # nginx logs its 413 once the body it discards is read to its end (a lingering close); a
        # stop before that (SIGTERM: a fast shutdown) drops the line (once in a CI run, session 31).
        access_log = tmp_path / "nginx" / "access.log"
        with trio.fail_after(10):
            while '"POST /archive/album/ HTTP/1.1" 413 ' not in access_log.read_text():
                await trio.sleep(0.02)
    assert [signed.status_code, unsigned.status_code, posted.status_code] == [200, 403, 413]
    log = access_log.read_text()
    assert log.count('"GET /archive/album/ HTTP/1.1" 200 ') == 1, log
    assert log.count('"GET /archive/album/ HTTP/1.1" 403 ') == 1, log
    assert log.count('"POST /archive/album/ HTTP/1.1" 413 ') == 1, log
    assert "sig=" not in log and "expires=" not in log and query.split("sig=")[1] not in log


def test_the_readme_names_every_package_ci_installs() -> None:
    # What a bare machine needs for the tests (README, Development: ".ci/run installs what is missing"):
    # helper 178 found xfsprogs installed by .ci/run and left out of that list.
    script = (PROJECT / ".ci" / "run").read_text()
    packages = set(re.findall(r"missing\+=\(([a-z0-9.+-]+)\)", script))
    assert {"make", "nginx-light", "xfsprogs", "python3-venv"} <= packages  # the pattern reads the script
    development = (PROJECT / "README.md").read_text().split("\n## Development\n")[1]
    assert {package for package in packages if f"`{package}`" not in development} == set()
