"""Operators' handles: /healthz and /metrics, read after real downloads."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from archiver.config import Settings

from .conftest import CLIENT_TLS, make_client, read_archive, running_server, wait_until_no_producer_children, write_tree
from .test_cli import Launched, launched


def samples(text: str) -> dict[str, float]:
    """Metric samples as 'name{label="value"}' -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def test_healthz_reports_storage_and_producer(
    settings: Settings, stand_in: Callable[[str], None], tmp_path: Path
) -> None:
    stand_in("exec $REAL_PRODUCER")
    async with running_server(settings) as url, make_client(url, "HTTP/1.1") as c:
        healthy = await c.get("/healthz")
        assert healthy.status_code == 200
        assert healthy.json() == {"status": "ok", "storage": True, "producer": True}
        (tmp_path / "producer").chmod(0)  # the interpreter no longer runs (a broken upgrade)
        failing = await c.get("/healthz")
    assert failing.status_code == 503
    assert failing.json() == {"status": "failing", "storage": True, "producer": False}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
async def test_healthz_is_ok_on_a_storage_root_the_service_may_search_but_not_list(tmp_path: Path) -> None:
    # Helper 52: a root of mode 0711 (the README's way to hide the albums' names) was "storage": false
    # for ever, as /healthz asked for read permission, while every download was served: a load
    # balancer took every instance out.  The service runs as root without the capabilities that
    # pass over permissions; the root belongs to nobody.
    storage = tmp_path / "storage"
    write_tree(storage / "album", {"a.jpg": b"a"})
    os.chown(storage, 65534, 65534)
    storage.chmod(0o711)
    dropped = "-dac_override,-dac_read_search"
    command = [
        *("setpriv", f"--inh-caps={dropped}", f"--bounding-set={dropped}"),
        *(sys.executable, "-m", "archiver", "-D", str(storage), "-H", "127.0.0.1", "-P", "0"),
    ]
    async with launched(command) as server, httpx.AsyncClient(verify=CLIENT_TLS, base_url=server.url) as client:
        health = await client.get("/healthz")
        download = await client.get("/archive/album/")
        storage.chmod(0o700)  # not even searchable: no album can be served
        failing = await client.get("/healthz")
        index = await client.get("/")  # a 500 with a traceback (helper 58): the page, without a sample link
    assert index.status_code == 200 and "/archive/" not in index.text.split("<body", 1)[1].split("</h1>", 1)[0]
    assert (health.status_code, health.json()["storage"]) == (200, True)
    assert download.status_code == 200 and read_archive(download.content) == {"a.jpg": b"a"}
    assert (failing.status_code, failing.json()["storage"]) == (503, False)


async def test_metrics_count_real_downloads(large_storage: Path) -> None:
    write_tree(large_storage / "small", {"a.jpg": os.urandom(10_000)})
    settings = Settings(settle_time=0, storage_dir=large_storage, host="127.0.0.1", port=0, max_jobs=1)
    async with running_server(settings) as url, make_client(url, "HTTP/2") as client:
        complete = await client.get("/archive/small/")
        assert complete.status_code == 200
        async with make_client(url, "HTTP/1.1") as leaving, leaving.stream("GET", "/archive/big/") as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            await anext(chunks)
            during = samples((await client.get("/metrics")).text)
            assert (await client.get("/archive/small/")).status_code == 503  # the one job slot is taken
        await wait_until_no_producer_children(timeout=10)
        # Reaped by the launcher is not yet counted: that waits for the launcher's exit report.
        await finished_downloads(client, 2)
        after = await client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    figures = samples(after.text)
    assert during["archiver_downloads_in_flight"] == 1
    assert figures["archiver_downloads_in_flight"] == 0
    assert figures["archiver_downloads_started_total"] == 2
    assert figures['archiver_downloads_finished_total{outcome="completed"}'] == 1
    assert figures['archiver_downloads_finished_total{outcome="cancelled"}'] == 1
    assert figures['archiver_downloads_finished_total{outcome="failed"}'] == 0
    assert figures['archiver_downloads_rejected_total{reason="job_limit"}'] == 1
    assert figures["archiver_download_duration_seconds_count"] == 2
    assert figures["archiver_bytes_sent_total"] > len(complete.content)


async def test_metrics_count_failures(settings: Settings, stand_in: Callable[[str], None]) -> None:
    write_tree(settings.storage_dir / "album", {"a.jpg": bytes(4_000_000)})  # more than the stand-in writes
    stand_in("$REAL_PRODUCER | head -c 2000000\nexit 9")
    async with running_server(settings) as url, make_client(url, "HTTP/1.1") as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get("/archive/album/")
        figures = samples((await c.get("/metrics")).text)
    assert figures['archiver_downloads_finished_total{outcome="failed"}'] == 1


async def finished_downloads(client: httpx.AsyncClient, count: int) -> dict[str, float]:
    """The metrics once ``count`` downloads have finished (their outcome is counted as the body ends)."""
    with trio.fail_after(10):
        while True:
            figures = samples((await client.get("/metrics")).text)
            if (
                sum(value for key, value in figures.items() if key.startswith("archiver_downloads_finished_total"))
                >= count
            ):
                return figures
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    "pacing", [{"delay": 0.3, "chunk_size": 131_072}, {"rate_limit": 300_000, "chunk_size": 16_384}]
)
async def test_paced_downloads_that_arrive_whole_count_as_completed(
    settings: Settings, pacing: dict[str, float], caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 18: the pause before the next read outlasted curl, which closes the
    # connection as soon as it has Content-Length bytes.
    write_tree(settings.storage_dir / "album", {"a.jpg": os.urandom(400_000)})
    paced = replace(settings, **pacing)  # type: ignore[arg-type]
    async with running_server(paced) as url, make_client(url, "HTTP/1.1") as client:
        for _ in range(2):
            fetched = await trio.run_process(["curl", "-sS", "-o", "/dev/null", f"{url}/archive/album/"], check=False)
            assert fetched.returncode == 0
        figures = await finished_downloads(client, 2)
    assert figures['archiver_downloads_finished_total{outcome="completed"}'] == 2
    assert figures['archiver_downloads_finished_total{outcome="cancelled"}'] == 0
    assert "client disconnected" not in caplog.text


@pytest.mark.parametrize("compression", [0, 6])
async def test_http2_downloads_that_arrive_whole_count_as_completed(
    settings: Settings, compression: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Helper 78: curl --http2-prior-knowledge closes its connection as soon as it has END_STREAM,
    # and of 300 such downloads of a one-file album 82 were logged "client disconnected", every
    # byte received: the download's end saw the connection closed while its stream's buffer,
    # written and empty, was not yet let go, and took that for a tail the server dropped.
    write_tree(settings.storage_dir / "album", {"report.csv": b"day,photos\n1,12\n2,9\n"})
    downloads = 50  # a fifth to a quarter of them failed: all 50 pass by chance once in 10**5
    deflated = replace(settings, compression=compression)
    async with running_server(deflated) as url, make_client(url, "HTTP/1.1") as client:
        for _ in range(downloads):
            command = ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", f"{url}/archive/album/"]
            assert (await trio.run_process(command, check=False)).returncode == 0
        figures = await finished_downloads(client, downloads)
    assert figures['archiver_downloads_finished_total{outcome="completed"}'] == downloads
    assert "client disconnected" not in caplog.text


async def test_a_file_name_cannot_break_or_forge_a_log_line(storage: Path) -> None:
    """Names are the uploaders': a line break or a terminal escape in one is escaped in the service's log."""
    write_tree(storage / "album", {"ok.jpg": b"ok", "evil\x1b[2J.jpg": b"escape"})
    (storage / "album" / "x\n2026-12-01 00:00:00,000 ERROR archiver: forged").write_bytes(b"left out")
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(storage)]
    async with launched(command) as server, make_client(server.url, "HTTP/1.1") as client:
        response = await client.get("/archive/album/")
        assert response.status_code == 200
        # Nor a request path (Hypercorn's access line, %-decoded).
        probe = await client.get("/archive/lo%0AFORGED%20ACCESS%20LINE%1B[2K/")
        assert probe.status_code == 404
    lines = server.output.decode().splitlines()
    assert not any(line.startswith("FORGED ACCESS LINE") for line in lines)
    assert any("/archive/lo\\x0aFORGED ACCESS LINE\\x1b[2K/" in line for line in lines)
    skipped = [line for line in lines if "skipped album/x" in line]
    assert skipped == [
        skipped[0].split(" INFO ")[0]
        + " INFO archiver.archive.listing: skipped album/x\\x0a2026-12-01 00:00:00,000 ERROR archiver: forged:"
        " line break in name"
    ]
    assert not any(line.startswith("2026-12-01 00:00:00,000 ERROR") for line in lines)
    assert "\x1b" not in server.output.decode()
    # The download's own line counts what was left out (helper 67: an operator reading only those).
    (download,) = [line for line in lines if "archiver.web.download: download album for" in line]
    assert download.endswith(f"(of {len(response.content)}, 2 files, 1 left out: see 'skipped')"), download


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_bytes_sent_of_a_download_the_client_left_are_bytes_the_server_took(storage: Path, protocol: str) -> None:
    """The download's line and ``archiver_bytes_sent_total`` count no chunk the server did not take.

    Helper 191's day of traffic: two downloads in three that a client left were logged, and
    counted, one chunk (512 KiB) above their access lines: the chunk taken from the producer
    after the client had gone, whose write the server dropped; one that aria2c left before its
    head went out was ``client disconnected, 524288 bytes sent`` beside an access line of
    ``- -``.  The access line counts a chunk whose send was under way as the client left, which
    the download's line does not: it is the higher of the two, by that chunk at most.
    """
    write_tree(storage / "small", {"a.jpg": os.urandom(10_000)})
    write_tree(storage / "large", {f"{index}.jpg": os.urandom(4 * 1024 * 1024) for index in range(8)})
    command = [sys.executable, "-m", "archiver", "-H", "127.0.0.1", "-P", "0", "-D", str(storage)]
    async with launched(command, env={"ARCHIVER_SETTLE_TIME": "0"}) as server:
        async with make_client(server.url, protocol) as client:
            assert (await client.get("/archive/small/")).status_code == 200
        for leaving_clients in range(1, 6):
            async with (
                make_client(server.url, protocol) as leaving,
                leaving.stream("GET", "/archive/large/") as response,
            ):
                received = 0
                async for data in response.aiter_raw():
                    received += len(data)
                    if received > 1_500_000:
                        break
            with trio.fail_after(10):  # each download's two lines before the next: paired in order
                while (
                    len(lines := download_lines(server)) <= leaving_clients
                    or len(access := archive_access_lines(server)) <= leaving_clients
                ):
                    await trio.sleep(0.02)  # polling the output the server has written
        async with make_client(server.url, "HTTP/1.1") as client:
            figures = samples((await client.get("/metrics")).text)
    assert [outcome for outcome, _ in lines] == ["complete"] + ["client disconnected"] * 5, lines
    assert lines[0][1] == access[0][1]
    assert [sent for _, sent in lines] == [sent for _, sent in access], (lines, access)
    assert figures["archiver_bytes_sent_total"] == sum(sent for _, sent in lines)


async def test_a_downloads_line_says_what_its_bytes_sent_are_of(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The archive's length, and a range's first and last byte (helper 191: an operator could not tell how far
    a client that left had come, nor a range's line from a whole archive's); a deflated archive has none."""
    write_tree(settings.storage_dir / "album", {"a.jpg": os.urandom(100_000), "b.jpg": b"b"})
    caplog.set_level(logging.INFO, logger="archiver.web.download")
    deflating = replace(settings, compression=6)
    async with running_server(settings) as url, running_server(deflating) as deflated_url:
        async with make_client(url, "HTTP/1.1") as client:
            whole = await client.get("/archive/album/")
            part = await client.get("/archive/album/", headers={"Range": "bytes=100-199"})
            await finished_downloads(client, 2)
        async with make_client(deflated_url, "HTTP/1.1") as client:
            assert (await client.get("/archive/album/")).status_code == 200
            await finished_downloads(client, 1)
    assert (whole.status_code, part.status_code) == (200, 206)
    length = len(whole.content)
    lines = [record.getMessage() for record in caplog.records if record.name == "archiver.web.download"]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"download album for 127.0.0.1: complete, {length} bytes sent in "), lines
    assert lines[0].endswith(f" s (of {length}, 2 files)"), lines
    assert lines[1].startswith("download album for 127.0.0.1: complete, 100 bytes sent in "), lines
    assert lines[1].endswith(f" s (bytes 100-199 of {length}, 2 files)"), lines
    assert lines[2].endswith(" s (2 files)"), lines


async def test_a_refusals_page_is_no_archive_byte(settings: Settings) -> None:
    """``archiver_bytes_sent_total`` counts archives, not the ``503`` page of a download refused as it started."""
    write_tree(settings.storage_dir / "held", {"a.jpg": os.urandom(60_000), "b.jpg": b"b"})
    write_tree(settings.storage_dir / "other", {"a.jpg": b"a", "b.jpg": b"b"})
    limited = replace(settings, max_files=2, max_planned_files=2, rate_limit=60_000, chunk_size=16_384)
    async with running_server(limited) as url, make_client(url, "HTTP/1.1") as client:
        async with make_client(url, "HTTP/1.1") as holder, holder.stream("GET", "/archive/held/") as held:
            chunks = held.aiter_bytes()
            received = await anext(chunks)
            refused = await client.get("/archive/other/")  # its plan does not fit beside the held one
            async for data in chunks:
                received += data
        figures = await finished_downloads(client, 1)
    assert (held.status_code, refused.status_code) == (200, 503)
    assert figures['archiver_downloads_rejected_total{reason="plan_limit"}'] == 1
    assert figures["archiver_bytes_sent_total"] == len(received)


def download_lines(server: Launched) -> list[tuple[str, int]]:
    """Each download's line in the service's log: its outcome and its bytes sent."""
    pattern = re.compile(rb"archiver\.web\.download: download \S+ for \S+: ([^,]+), (\d+) bytes sent")
    return [(match[1].decode(), int(match[2])) for match in pattern.finditer(bytes(server.output))]


def archive_access_lines(server: Launched) -> list[tuple[bytes, int]]:
    """Each archive's access line: its status and its body bytes (a request that had no answer: 0)."""
    pattern = re.compile(rb'"GET /archive/\S+/ \S+" (\d{3}|-) (\d+|-) "')
    return [(match[1], int(match[2]) if match[2] != b"-" else 0) for match in pattern.finditer(bytes(server.output))]
