"""Shared state under random interleavings: schedules of requests, cancellations and album changes drawn by hypothesis.

Two real services (each in a thread, a Trio run of its own; one stores, one deflates) serve the
same albums and share one CRC index file.  Each example starts many requests at once (whole
downloads, ranges, HEADs, conditional ones; over HTTP/1.1 and HTTP/2; from several client
addresses behind the trusted proxy), cuts some at a random byte count or time (a connection
closed, an HTTP/2 stream reset with RST_STREAM, its connection kept; a window kept shut for a
while), and changes the albums between and during them (touch, a byte rewritten in place, with
its mtime put back or not, a file replaced, added, deleted).  After each example, once nothing
runs: every job slot, fair share, walk turn, planned file, thread token and gauge is back to 0
and the caches within their bounds; every download started has finished with an outcome, none
failed; no CRC kept, in memory or in the file, for a file's present key is not that file's; and
every archive that ended cleanly is one the album was at some moment of its request (rendered
here, ``expected_archive``).  The job slots and the walk turns are also driven alone, by drawn
programs on a mock clock, their books checked after each step: they found a slot on its way to
a client not counted against its share (helper 194).  The schedules found no fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sqlite3
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from archiver.archive.crc_index import PARTIAL_ENTRIES
from archiver.archive.listing import WalkProgress
from archiver.config import Settings
from archiver.web.app import create_app
from archiver.web.limits import (
    RECLAIM_WAIT,
    FairShareExceeded,
    Job,
    JobLimitReached,
    JobSlots,
    RangeLimitReached,
    WalkLimitReached,
)
from archiver.web.metrics import OUTCOMES
from archiver.web.routes import Routes
from archiver.web.walk_turns import ClientWalks

from .conftest import (
    CLIENT_TLS,
    expected_archive,
    files_on_disk,
    own_descriptors,
    producer_children,
    read_archive,
    write_tree,
)
from .test_observability import samples

BIG = "big"  # asked for its archive's end only: its central directory, which needs every CRC
ALBUMS = ("a", "b", "c", BIG)


@dataclass
class Served:
    url: str
    routes: Routes
    token: trio.lowlevel.TrioToken
    idle_tasks: int | None = None  # the tasks on its loop when first idle

    def on_loop(self, function: Callable[[], Any]) -> Any:
        """``function()`` on the server's event loop (its state is the loop's)."""
        return trio.from_thread.run_sync(function, trio_token=self.token)


@contextmanager
def served(settings: Settings) -> Iterator[Served]:
    """A real server in a thread with a Trio run of its own, and its routes' shared state."""
    app = create_app(settings)
    routes = app.view_functions["archive"].__self__  # type: ignore[union-attr]  # a bound method of Routes
    assert isinstance(routes, Routes)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 1
    started: list[Served] = []
    ready = threading.Event()
    shutdown: list[trio.Event] = []

    async def run() -> None:
        shutdown.append(trio.Event())
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown[0].wait))
            started.append(Served(binds[0], routes, trio.lowlevel.current_trio_token()))
            ready.set()

    thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield started[0]
    finally:
        trio.from_thread.run_sync(shutdown[0].set, trio_token=started[0].token)
        thread.join(30)
        assert not thread.is_alive()


def task_count() -> int:
    """The tasks of the Trio run this is called in (on its loop)."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


def idle_state(routes: Routes) -> dict[str, object]:
    """Everything shared between requests that must be back to nothing once no request runs (on the loop)."""
    slots, walks, index = routes.slots, routes.client_walks, routes.crc_index
    return {
        "slots in use": slots.in_use,
        "slots held": dict(slots._held),
        "ranges held": dict(slots._ranges),
        "jobs": {client: len(jobs) for client, jobs in slots._jobs.items()},
        "reclaimed": dict(slots._reclaimed),
        "claims": dict(slots._claims),
        "unclaimed": len(slots._unclaimed),
        "planned files": routes.planned.held,
        "plans held": len(routes.planned._holders),
        "walks queued": dict(walks._queued),
        "walk turns": len(walks._turns),
        "walk activity": len(walks._activity),
        "walks walking": len(walks.everyone._walks),
        "walkers": routes.walkers.borrowed_tokens,
        "resolvers": routes.resolvers.borrowed_tokens,
        "crc readers": index.readers.borrowed_tokens,
        "crc reads": len(index._reading),
        "plans being made": len(routes.plans._making),
        # The caches, within their bounds (README, Limits), and their books right.
        "plan cache within bounds": routes.plans._held
        == sum(plan.count for plan in routes.plans._plans.values())
        <= routes.plans.entries,
        "recent walks within bounds": len(routes.recent_walks._walks) <= routes.recent_walks.albums,
        "crcs within bounds": len(index._crcs) <= index.entries and len(index._partial) <= PARTIAL_ENTRIES,
    }


IDLE = {
    "slots in use": 0,
    "slots held": {},
    "ranges held": {},
    "jobs": {},
    "reclaimed": {},
    "claims": {},
    "unclaimed": 0,
    "planned files": 0,
    "plans held": 0,
    "walks queued": {},
    "walk turns": 0,
    "walk activity": 0,
    "walks walking": 0,
    "walkers": 0,
    "resolvers": 0,
    "crc readers": 0,
    "crc reads": 0,
    "plans being made": 0,
    "plan cache within bounds": True,
    "recent walks within bounds": True,
    "crcs within bounds": True,
}


def wait_idle(server: Served, deadline: float = 15.0) -> dict[str, float]:
    """Poll until no download is in flight and the shared state is idle; the metrics then."""
    with httpx.Client(verify=CLIENT_TLS, base_url=server.url, timeout=30) as client:
        give_up = time.monotonic() + deadline
        while True:
            metrics = samples(client.get("/metrics").text)
            state = server.on_loop(partial(idle_state, server.routes))
            gauges = [
                metrics[name]
                for name in (
                    "archiver_downloads_in_flight",
                    "archiver_album_walks_queued",
                    "archiver_active_clients",
                    "archiver_largest_client_share",
                    "archiver_planned_files",
                )
            ]
            # No task left behind by the requests (a connection's, a download's, a watchdog's): as many
            # as when the service was first idle, the connection this asks over one of them.
            tasks = server.on_loop(task_count)
            if server.idle_tasks is None:
                server.idle_tasks = tasks
            if gauges == [0] * len(gauges) and state == IDLE and not producer_children() and tasks <= server.idle_tasks:
                return metrics
            assert time.monotonic() < give_up, (gauges, state, producer_children(), tasks, server.idle_tasks)
            time.sleep(0.02)


# Album changes: what a user's upload, an editor or a sync does to a file.  Each is one step the
# service can see whole (a write of one byte, a rename, a utime, an unlink), so that every state the
# album is ever in is a snapshot: a truncating write seen between its truncation and its write is a
# state of the album too, an empty file, which a walk may list (and a range of the central directory
# then serve) as faithfully as any other.
CHANGES = ("touch", "rewrite", "replace", "add", "delete", "rewrite-keep-mtime")


@dataclass
class Albums:
    """The albums on disk, and every archive each has been (its snapshots, in order)."""

    storage: Path
    snapshots: dict[str, list[bytes]] = field(default_factory=dict, repr=False)
    files: dict[str, list[dict[str, bytes]]] = field(default_factory=dict, repr=False)  # each snapshot's files
    counter: int = 0

    def create(self) -> None:
        for name in ALBUMS:
            files = {f"{n:02d}.jpg": os.urandom(size) for n, size in enumerate((10, 3000, 70_000, 1))}
            if name == BIG:  # a file whose CRC is read in blocks, shared by the downloads that wait for it
                files = {"big.bin": os.urandom(6 * 1024 * 1024), "small.jpg": b"small"}
            write_tree(self.storage / name, files)
            self.snapshots[name], self.files[name] = [], []
            self.snapshot(name)

    def snapshot(self, name: str) -> None:
        self.snapshots[name].append(expected_archive(self.storage / name))
        self.files[name].append(files_on_disk(self.storage / name))

    def state(self, name: str) -> int:
        return len(self.snapshots[name]) - 1

    def change(self, name: str, change: str, which: int) -> None:
        album = self.storage / name
        files = sorted(album.iterdir())
        path = files[which % len(files)]
        self.counter += 1
        stat = path.stat()
        if change == "touch":
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 1_000_000_000 * self.counter))
        elif change in ("rewrite", "rewrite-keep-mtime") and stat.st_size:
            # In place, its size kept: one byte, written whole or not at all to a reader.
            with path.open("r+b") as file:
                offset = which * 65_537 % stat.st_size
                old = os.pread(file.fileno(), 1, offset)
                os.pwrite(file.fileno(), bytes([old[0] ^ 0xFF]), offset)
            if change == "rewrite-keep-mtime":  # as rsync --inplace with times, or a tool that puts them back
                self.snapshot(name)
                os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        elif name == BIG:  # its large file changed in place only: a new one would be read whole each time
            pass
        elif change == "replace":  # an editor's save: a new file renamed over the old
            staged = self.storage / f".staged-{self.counter}"
            staged.write_bytes(os.urandom(which * 997 % 80_000))
            staged.rename(path)
        elif change == "add":
            staged = self.storage / f".staged-{self.counter}"
            staged.write_bytes(os.urandom(which % 40_000))
            staged.rename(album / f"new-{self.counter}.jpg")
        elif change == "delete" and len(files) > 1:
            path.unlink()
        self.snapshot(name)


@dataclass(frozen=True)
class Request:
    album: str
    protocol: str
    client: int  # which address (X-Forwarded-For, the proxy trusted)
    kind: str  # whole, range, head, conditional
    start_after: float  # seconds
    cut_at: int | None  # bytes of the body after which the client leaves
    give_up_after: float | None  # seconds after which the request is cancelled, wherever it is
    deflated: bool  # to the service that deflates (its own app, sharing the storage and the CRC index's file)
    pause: float  # HTTP/2-reset: at ``cut_at``, its window shut this long, then read on (0: reset there)


def requests(pauses: tuple[float, ...]) -> st.SearchStrategy[Request]:
    return st.builds(
        Request,
        album=st.sampled_from(ALBUMS),
        protocol=st.sampled_from(["HTTP/1.1", "HTTP/2", "HTTP/2-reset"]),
        client=st.integers(0, 3),
        kind=st.sampled_from(["whole", "whole", "range", "head", "conditional"]),
        start_after=st.sampled_from([0.0, 0.0, 0.001, 0.005, 0.02]),
        cut_at=st.one_of(st.none(), st.none(), st.integers(0, 80_000)),
        give_up_after=st.one_of(st.none(), st.none(), st.sampled_from([0.0, 0.001, 0.003, 0.01, 0.03])),
        deflated=st.sampled_from([False, False, False, True]),
        pause=st.sampled_from(pauses),
    )


changes = st.tuples(
    st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.03]),
    st.sampled_from(ALBUMS),
    st.sampled_from(CHANGES),
    st.integers(0, 99),
)


@dataclass
class Answer:
    request: Request
    states: tuple[int, int]  # the album's snapshots from the request's start to its end
    status: int | None = None
    body: bytes = b""
    complete: bool = False  # the body ended as HTTP says a whole one does
    etag: str | None = None
    content_range: str | None = None


class RawH2:
    """One HTTP/2 connection (python h2 over a socket) whose streams a request resets (RST_STREAM) when it leaves.

    httpx closes a response it leaves without a word to the server: the stream stays open until
    the connection closes.  Here a request cut short, or cancelled, resets its stream, the
    connection going on with the others.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.send_lock = trio.Lock()
        self.streams: dict[int, trio.MemorySendChannel[h2.events.Event]] = {}
        self.paused: set[int] = set()  # streams whose window is kept shut: their client has stopped reading
        self.withheld: dict[int, int] = {}  # what of each paused stream's window was not given back

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[RawH2]:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as stream, trio.open_nursery() as nursery:
            client = cls(stream)
            # A window of 16 KiB a stream: one its client keeps shut holds most of an album back.
            client.connection.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 * 1024}
            )
            client.connection.initiate_connection()
            await client.flush()
            nursery.start_soon(client._read)
            yield client
            nursery.cancel_scope.cancel()

    async def flush(self) -> None:
        # Shielded: bytes taken from h2's buffer and sent in part would leave the server's HPACK
        # state behind the client's (a request cancelled as it flushes).
        with trio.CancelScope(shield=True):
            async with self.send_lock:
                if data := self.connection.data_to_send():
                    await self.stream.send_all(data)

    async def _read(self) -> None:
        while data := await self.stream.receive_some(65536):
            for event in self.connection.receive_data(data):
                stream_id = getattr(event, "stream_id", None)
                if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    if event.stream_id in self.paused:  # the connection's window only: the others go on
                        self.connection.increment_flow_control_window(event.flow_controlled_length)
                        self.withheld[event.stream_id] = (
                            self.withheld.get(event.stream_id, 0) + event.flow_controlled_length
                        )
                    else:
                        self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if stream_id in self.streams:
                    self.streams[stream_id].send_nowait(event)
            await self.flush()

    async def request(
        self, path: str, headers: dict[str, str], method: str, answer: Answer, cut_at: int | None, pause: float
    ) -> None:
        stream_id = self.connection.get_next_available_stream_id()
        send, receive = trio.open_memory_channel[h2.events.Event](math.inf)
        self.streams[stream_id] = send
        pseudo = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "x")]
        self.connection.send_headers(stream_id, [*pseudo, *((name.lower(), value) for name, value in headers.items())],
                                     end_stream=True)  # fmt: skip
        body = bytearray()
        try:
            await self.flush()
            async for event in receive:
                if isinstance(event, h2.events.ResponseReceived):
                    fields = {name.decode(): value.decode() for name, value in event.headers}
                    answer.status = int(fields[":status"])
                    answer.etag, answer.content_range = fields.get("etag"), fields.get("content-range")
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    if cut_at is not None and len(body) >= cut_at:
                        if not pause:
                            break
                        # A client that stops reading for a while (its window shut), then reads on.
                        self.paused.add(stream_id)
                        await trio.sleep(pause)
                        self.paused.discard(stream_id)
                        if withheld := self.withheld.pop(stream_id, 0):
                            with contextlib.suppress(h2.exceptions.StreamClosedError):
                                self.connection.increment_flow_control_window(withheld, stream_id)
                            await self.flush()
                        cut_at = None
                elif isinstance(event, h2.events.StreamEnded):
                    answer.complete = True
                    break
                elif isinstance(event, h2.events.StreamReset):
                    break
        finally:
            answer.body = bytes(body)
            del self.streams[stream_id]
            self.paused.discard(stream_id)
            self.withheld.pop(stream_id, None)
            if not answer.complete and self.connection.state_machine.state != h2.connection.ConnectionState.CLOSED:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                await self.flush()


async def run_schedule(
    urls: dict[bool, str], albums: Albums, schedule: list[Request], album_changes: list[tuple[float, str, str, int]]
) -> list[Answer]:
    answers: list[Answer] = []
    etags: dict[str, str] = {}

    def one_client(protocol: str, deflated: bool = False) -> httpx.AsyncClient:
        http2 = protocol == "HTTP/2"
        return httpx.AsyncClient(verify=CLIENT_TLS, base_url=urls[deflated], http1=not http2, http2=http2, timeout=30)

    clients = {
        (protocol, deflated): one_client(protocol, deflated) for protocol in ("HTTP/1.1", "HTTP/2") for deflated in urls
    }
    raw: dict[bool, RawH2] = {}

    async def one(request: Request) -> None:
        if request.deflated and request.album == BIG:  # 6 MiB deflated a request: too slow for a schedule
            request = dataclasses.replace(request, album="c")
        await trio.sleep(request.start_after)
        first = albums.state(request.album)
        answer = Answer(request, (first, first))
        headers = {"X-Forwarded-For": f"10.0.0.{request.client}"}
        if request.album == BIG and request.kind != "head":
            headers["Range"] = "bytes=-200"
        elif request.kind == "range":
            headers["Range"] = "bytes=100-80000"
        elif request.kind == "conditional" and request.album in etags:
            headers["If-None-Match"] = etags[request.album]
        method = "HEAD" if request.kind == "head" else "GET"
        if request.protocol == "HTTP/2-reset":
            with trio.move_on_after(request.give_up_after if request.give_up_after is not None else 60):
                path = f"/archive/{request.album}/"
                await raw[request.deflated].request(path, headers, method, answer, request.cut_at, request.pause)
        elif request.give_up_after is None:
            await ask(request, answer, clients[request.protocol, request.deflated], method, headers)
        else:
            # A connection of its own: httpcore's HTTP/2 pool, cancelled as it opens a stream, can
            # release its stream semaphore twice (ValueError) and stay broken for the others.
            async with one_client(request.protocol, request.deflated) as client:
                await ask(request, answer, client, method, headers)
        answer.states = (first, albums.state(request.album))
        if answer.complete and answer.status == 200 and answer.etag and method == "GET":
            etags[request.album] = answer.etag
        answers.append(answer)

    async def ask(
        request: Request, answer: Answer, client: httpx.AsyncClient, method: str, headers: dict[str, str]
    ) -> None:
        with trio.move_on_after(request.give_up_after if request.give_up_after is not None else 60):
            try:
                async with client.stream(method, f"/archive/{request.album}/", headers=headers) as response:
                    answer.status = response.status_code
                    answer.etag = response.headers.get("ETag")
                    answer.content_range = response.headers.get("Content-Range")
                    body = bytearray()
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if request.cut_at is not None and len(body) >= request.cut_at:
                            break
                    else:
                        answer.complete = True
                    answer.body = bytes(body)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.LocalProtocolError):
                pass  # the transfer aborted (a file changed as it was sent, a slot reclaimed)

    async def change(after: float, album: str, how: str, which: int) -> None:
        await trio.sleep(after)
        albums.change(album, how, which)

    async with RawH2.open(urls[False]) as stored, RawH2.open(urls[True]) as deflated:
        raw[False], raw[True] = stored, deflated
        try:
            async with trio.open_nursery() as nursery:
                for request in schedule:
                    nursery.start_soon(one, request)
                for after, album, how, which in album_changes:
                    nursery.start_soon(change, after, album, how, which)
        finally:
            for client in clients.values():
                await client.aclose()
        # Every stream that is not whole has been reset, the connection open: nothing of theirs may
        # still run (httpx's connections, closed, ended theirs).
        for either in urls:
            async with one_client("HTTP/1.1", either) as client:
                with trio.fail_after(10):
                    while samples((await client.get("/metrics")).text)["archiver_downloads_in_flight"]:
                        await trio.sleep(0.01)
    return answers


def check_answer(answer: Answer, albums: Albums) -> str:
    """Judge one answer: a clean end is an archive the album was at some moment of its request.

    What was judged: "exact" (the snapshot's bytes), "files" (a walk that saw two changes made
    while it went on, in place, to two files: each entry is its file at some moment of the
    request, and its CRC right), "unjudged" (such a range), or "" (nothing whole to judge).
    """
    request = answer.request
    first, last = answer.states
    possible = albums.snapshots[request.album][first : last + 1]
    assert answer.status in (None, 200, 206, 304, 503), answer
    if not answer.complete or answer.status not in (200, 206) or request.kind == "head":
        return ""
    if request.deflated:  # no ranges, no length: its files, as they were at one moment
        assert answer.status == 200, answer
        entries = read_archive(answer.body)
        versions = albums.files[request.album][first : last + 1]
        if any(entries == files for files in versions):
            return "exact"
        assert last - first >= 2, (request, answer.states, "a deflated archive of files the album never held")
        for name, content in entries.items():
            assert any(files.get(name) == content for files in versions), (request, answer.states, name)
        return "files"
    if answer.status == 200:
        if answer.body in possible:
            return "exact"
        assert last - first >= 2, (request, answer.states, "a whole archive the album never was")
        entries = read_archive(answer.body)  # every record and every CRC right
        versions = albums.files[request.album][first : last + 1]
        for name, content in entries.items():
            assert any(files.get(name) == content for files in versions), (request, answer.states, name)
        return "files"
    assert answer.content_range is not None
    start, end = (int(part) for part in answer.content_range.split()[1].split("/")[0].split("-"))
    if any(archive[start : end + 1] == answer.body for archive in possible):
        return "exact"
    assert last - first >= 2, (request, answer.states, "a range of an archive the album never was")
    return "unjudged"


def check_crc_index(routes: Routes, storage: Path, index_path: Path) -> None:
    """No CRC kept, in memory or in the index's file, for the key a file has now that is not that file's CRC."""
    present = {}
    for album in ALBUMS:
        for path in (storage / album).iterdir():
            stat = path.stat()
            present[(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)] = zlib.crc32(
                path.read_bytes()
            )
    remembered = dict(routes.crc_index._crcs)
    for key, crc in remembered.items():
        if key[:5] in present:
            assert present[key[:5]] == crc, ("in memory", key)
    routes.crc_index.flush()
    with sqlite3.connect(index_path) as connection:
        rows = connection.execute("SELECT device, inode, size, mtime_ns, ctime_ns, crc FROM crc_v6").fetchall()
    for *key, crc in rows:
        if tuple(key) in present:
            assert present[tuple(key)] == crc, ("in the file", key)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def two_services(tmp_path: Path, stall_timeout: float) -> Iterator[tuple[dict[bool, Served], Albums, Path]]:
    """A service that stores and one that deflates, on the same albums and the same CRC index's file."""
    storage = tmp_path / "storage"
    storage.mkdir()
    index_path = tmp_path / "index.sqlite"
    albums = Albums(storage)
    albums.create()
    settings = Settings(
        settle_time=0,
        storage_dir=storage,
        host="127.0.0.1",
        port=0,
        max_jobs=4,
        max_jobs_per_client=1,
        chunk_size=16 * 1024,
        delay=0.002,  # downloads of a few ms each, overlapping: the slots fill, shares are reclaimed
        index_path=str(index_path),
        stall_timeout=stall_timeout,
    )
    descriptors = own_descriptors()
    threads = set(threading.enumerate())
    with served(settings) as stored, served(dataclasses.replace(settings, compression=6)) as deflated:
        yield {False: stored, True: deflated}, albums, index_path
    # The CRC index's file stays open, and its two threads run, past the app's stop (README, Failure
    # behaviour: a stop does not wait for it); Trio's idle worker threads stay a while, for the next
    # run's calls.  Anything else is a leak.
    opened = {os.readlink(f"/proc/self/fd/{fd}") for fd in own_descriptors() - descriptors}
    assert {path for path in opened if not path.startswith(str(index_path))} == set()
    left = {thread.name for thread in set(threading.enumerate()) - threads}
    assert {name for name in left if not name.startswith("archiver CRC index ")} <= {
        name for name in left if name.startswith("Trio thread")
    }


@pytest.fixture
def interleaved(tmp_path: Path) -> Iterator[tuple[dict[bool, Served], Albums, Path]]:
    with two_services(tmp_path, stall_timeout=60.0) as services:
        yield services


@pytest.fixture
def interleaved_stalling(tmp_path: Path) -> Iterator[tuple[dict[bool, Served], Albums, Path]]:
    with two_services(tmp_path, stall_timeout=1.0) as services:
        yield services


@given(
    schedule=st.lists(requests(pauses=(0.0, 0.0, 0.0, 0.2)), min_size=1, max_size=10),
    album_changes=st.lists(changes, max_size=3),
)
# Not shrunk: a failing schedule costs a wait for the idle state's deadline (15 s), and shrinking one
# tries hundreds; the example drawn is reported as it is.
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
def test_shared_state_is_idle_and_every_archive_true_after_any_schedule(
    interleaved: tuple[dict[bool, Served], Albums, Path],
    schedule: list[Request],
    album_changes: list[tuple[float, str, str, int]],
) -> None:
    run_and_check(interleaved, schedule, album_changes)


@pytest.mark.slow
@given(
    schedule=st.lists(requests(pauses=(0.0, 0.0, 0.2, 1.5, 1.5)), min_size=1, max_size=12),
    album_changes=st.lists(changes, max_size=4),
)
@settings(
    max_examples=int(os.environ.get("INTERLEAVINGS_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
def test_shared_state_is_idle_and_every_archive_true_after_any_schedule_with_stalls(
    interleaved_stalling: tuple[dict[bool, Served], Albums, Path],
    schedule: list[Request],
    album_changes: list[tuple[float, str, str, int]],
) -> None:
    # More and longer schedules, and clients that stop reading for longer than the stall timeout.
    run_and_check(interleaved_stalling, schedule, album_changes)


def run_and_check(
    services: tuple[dict[bool, Served], Albums, Path],
    schedule: list[Request],
    album_changes: list[tuple[float, str, str, int]],
) -> None:
    """Run ``schedule`` and ``album_changes``; then check every answer, and each service's books and CRCs."""
    servers, albums, index_path = services
    errors = _Errors()
    logging.getLogger("archiver").addHandler(errors)
    try:
        before = {deflated: wait_idle(server) for deflated, server in servers.items()}
        urls = {deflated: server.url for deflated, server in servers.items()}
        answers = trio.run(run_schedule, urls, albums, schedule, album_changes)
        after = {deflated: wait_idle(server) for deflated, server in servers.items()}
    finally:
        logging.getLogger("archiver").removeHandler(errors)
    for answer in answers:
        check_answer(answer, albums)
    for deflated, server in servers.items():
        counts = {name: after[deflated][name] - before[deflated][name] for name in after[deflated]}
        finished = {
            outcome: counts[f'archiver_downloads_finished_total{{outcome="{outcome}"}}'] for outcome in OUTCOMES
        }
        assert counts["archiver_downloads_started_total"] == sum(finished.values()), (deflated, counts)
        assert finished["failed"] == 0, finished
        server.on_loop(partial(check_crc_index, server.routes, albums.storage, index_path))
        check_served_as_they_are(server.url, deflated, albums)
    assert [record.getMessage() for record in errors.records] == []


def check_served_as_they_are(url: str, deflated: bool, albums: Albums) -> None:
    """Once nothing runs and nothing changes, a request for each album gets it as it is now, whatever came before.

    A plan or a walk's outcome kept from before a change (``RecentWalks``, ``PlanCache``) is no
    wrong byte: the producer refuses a file that is not the one listed.  But it is a ``503`` (or a
    transfer cut) at every request until it goes: only a request after the changes sees that.
    """
    with httpx.Client(verify=CLIENT_TLS, base_url=url, timeout=30, headers={"X-Forwarded-For": "10.0.1.1"}) as client:
        for album in ALBUMS:
            if album == BIG:
                if deflated:
                    continue
                response = client.get(f"/archive/{album}/", headers={"Range": "bytes=-200"})
                assert (response.status_code, response.content) == (206, albums.snapshots[album][-1][-200:]), album
            elif deflated:
                response = client.get(f"/archive/{album}/")
                assert response.status_code == 200, (album, response.status_code)
                assert read_archive(response.content) == albums.files[album][-1], album
            else:
                response = client.get(f"/archive/{album}/")
                assert (response.status_code, response.content) == (200, albums.snapshots[album][-1]), album


# --- The job slots alone: hypothesis-drawn programs of takes, releases, cancellations and clock jumps. ---


@dataclass
class _Holder:
    """A task that takes a job slot as a download does, and holds it until told, cancelled, or its job is ended."""

    client: str
    ranged: bool
    linger: float | None  # once its ``end`` is called: seconds until it gives the slot back (None: until cancelled)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    job: Job | None = None
    outcome: str = "asking"  # holding, refused, done, cancelled
    ended: int = 0  # times its ``end`` was called
    asked: float = 0.0  # when it asked (trio time)
    finish: trio.Event = field(default_factory=trio.Event)


async def _hold(slots: JobSlots, holder: _Holder) -> None:
    ended = trio.Event()

    def end() -> None:
        holder.ended += 1
        ended.set()

    holder.asked = trio.current_time()
    # What it held, and was being handed, as it asked: admitted only under its share at the reserve.
    busy = slots.free <= slots.reserve
    had = slots.held_by(holder.client) + slots._claims[holder.client]
    ranges_had = slots._ranges[holder.client] + slots._range_claims[holder.client]
    with holder.scope:
        try:
            job = await slots.take(holder.client, holder.ranged, end)
        except (JobLimitReached, FairShareExceeded, RangeLimitReached):
            holder.outcome = "refused"
            return
        assert not busy or had < slots.min_share, (holder, had)
        assert not holder.ranged or ranges_had < slots.min_share, (holder, ranges_had)
        holder.job, holder.outcome = job, "holding"
        try:
            async with trio.open_nursery() as nursery:

                async def on_end() -> None:
                    await ended.wait()
                    if job.reclaimed and holder.linger is not None:
                        await trio.sleep(holder.linger)
                        nursery.cancel_scope.cancel()
                    else:
                        await trio.sleep_forever()

                nursery.start_soon(on_end)
                await holder.finish.wait()
                nursery.cancel_scope.cancel()
        finally:
            holder.outcome = "done"
            slots.release(job)
    if holder.scope.cancelled_caught:
        holder.outcome = "cancelled"


def _check_slots(slots: JobSlots, holders: list[_Holder]) -> None:
    """What the slots' books say agrees with itself and with the tasks holding them."""
    jobs = [job for client_jobs in slots._jobs.values() for job in client_jobs]
    assert slots.in_use == sum(slots._held.values()) == len(jobs) <= slots.total
    assert all(
        count > 0
        for counts in (slots._held, slots._ranges, slots._reclaimed, slots._claims)
        for count in counts.values()
    )
    for client, client_jobs in slots._jobs.items():
        assert client_jobs and slots._held[client] == len(client_jobs)
        assert slots._ranges[client] == sum(job.ranged for job in client_jobs)
        assert slots._reclaimed[client] == sum(job.reclaimed for job in client_jobs)
        assert all(job.client == client for job in client_jobs)
    claims: Counter[str] = Counter(job.claim.client for job in jobs if job.claim is not None)
    assert slots._claims == claims
    assert slots._range_claims == Counter(
        job.claim.client for job in jobs if job.claim is not None and job.claim.ranged
    )
    assert all(job.reclaimed and job.claim is None and job in jobs for job in slots._unclaimed)
    # Every job is a holder's, once every task has run: a slot handed over has reached its asker.
    held = [holder.job for holder in holders if holder.outcome == "holding"]
    assert sorted(map(id, jobs)) == sorted(map(id, held))
    for holder in holders:
        assert holder.ended <= 1  # a download is aborted once at most
        assert not holder.ended or (holder.job is not None and holder.job.reclaimed)
        # Nobody waits for a slot past RECLAIM_WAIT: it is handed over, or the request refused.
        assert holder.outcome != "asking" or trio.current_time() - holder.asked <= RECLAIM_WAIT


# Takes most often, by few clients, so that the slots fill with one client above its share and others
# ask: reclaims, handed-over slots, askers that leave or time out.
take = st.tuples(
    st.just("take"),
    st.sampled_from([0, 1, 1, 2, 2, 3]),
    st.sampled_from([False, False, False, True]),
    st.sampled_from([None, 0.0, 1.0, 10.0]),
)
steps = st.lists(
    st.one_of(
        take,
        take,
        take,
        st.tuples(st.just("finish"), st.integers(0, 63)),
        st.tuples(st.just("cancel"), st.integers(0, 63)),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 1.0, 3.0, 6.0])),
    ),
    min_size=6,
    max_size=60,
)


@given(program=steps, total=st.integers(1, 6), min_share=st.integers(1, 2), reserve=st.integers(0, 2))
@settings(max_examples=int(os.environ.get("SLOTS_EXAMPLES", "300")), deadline=None)
def test_job_slots_keep_their_books_under_any_program(
    program: list[tuple[Any, ...]], total: int, min_share: int, reserve: int
) -> None:
    slots = JobSlots(total, min_share, min(reserve, total))
    holders: list[_Holder] = []
    # First one client fills the slots (above its share while more than the reserve is free): what follows
    # is then mostly reclaims, slots handed over, askers that leave or give up.
    program = [("take", 0, False, linger) for linger in (None, 0.0, 10.0, 1.0, None, 0.0)][:total] + program

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for step in program:
                if step[0] == "take":
                    holder = _Holder(f"client-{step[1]}", step[2], step[3])
                    holders.append(holder)
                    nursery.start_soon(_hold, slots, holder)
                elif step[0] in ("finish", "cancel") and holders:
                    holder = holders[step[1] % len(holders)]
                    (holder.finish.set if step[0] == "finish" else holder.scope.cancel)()
                elif step[0] == "wait":
                    await trio.sleep(step[1])
                await trio.testing.wait_all_tasks_blocked()
                _check_slots(slots, holders)
                held = Counter(holder.client for holder in holders if holder.outcome == "holding")
                # A client admitted with every slot taken got one reclaimed: never past its share so.
                assert all(slots.held_by(client) >= count for client, count in held.items())
            for holder in holders:
                holder.scope.cancel()
        _check_slots(slots, holders)
        assert (slots.in_use, slots.active_clients, slots.largest_share()) == (0, 0, 0)
        assert not (slots._jobs or slots._ranges or slots._reclaimed or slots._claims or slots._range_claims)
        assert not slots._unclaimed

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))


# --- Walk turns alone: walks that wait, walk, fail, are given up on or refused, in any order. ---


@given(
    program=st.lists(
        st.one_of(
            st.tuples(st.just("walk"), st.integers(0, 2), st.sampled_from(["done", "fail", "hang"])),
            st.tuples(st.just("step"), st.integers(0, 63)),
            st.tuples(st.just("end"), st.integers(0, 63)),
            st.tuples(st.just("give up"), st.integers(0, 63)),
        ),
        max_size=50,
    ),
    max_waiting=st.integers(0, 3),
)
@settings(max_examples=int(os.environ.get("SLOTS_EXAMPLES", "300")), deadline=None)
def test_walk_turns_are_one_at_a_time_in_order_and_left_empty(program: list[tuple[Any, ...]], max_waiting: int) -> None:
    turns = ClientWalks(max_waiting)
    walks: list[dict[str, Any]] = []
    walking: Counter[str] = Counter()
    order: dict[str, list[int]] = {}

    async def walk(number: int, client: str, how: str, scope: trio.CancelScope, finish: trio.Event) -> None:
        progress = WalkProgress()
        walks[number]["progress"] = progress
        with scope:
            try:
                async with turns.turn(client, progress):
                    walking[client] += 1
                    order.setdefault(client, []).append(number)
                    walks[number]["state"] = "walking"
                    try:
                        await finish.wait()
                        walks[number]["ended"] = True  # its work done, a 404 or a 500 too; not given up on
                        if how == "fail":
                            raise OSError("EIO")
                    finally:
                        walking[client] -= 1
            except WalkLimitReached:
                walks[number]["state"] = "refused"
                return
            except OSError:
                pass
        walks[number]["state"] = "left"

    async def run() -> None:
        moved_before = 0
        async with trio.open_nursery() as nursery:
            for step in program:
                if step[0] == "walk":
                    client = f"client-{step[1]}"
                    queued = turns.queued(client)
                    walks.append(
                        {"client": client, "state": "waiting", "scope": trio.CancelScope(), "finish": trio.Event()}
                    )
                    number = len(walks) - 1
                    nursery.start_soon(walk, number, client, step[2], walks[number]["scope"], walks[number]["finish"])
                    await trio.testing.wait_all_tasks_blocked()
                    # Refused exactly when more than max_waiting were queued already.
                    assert (walks[number]["state"] == "refused") == (queued > max_waiting), (queued, walks[number])
                elif walks:
                    chosen = walks[step[1] % len(walks)]
                    if step[0] == "step" and "progress" in chosen:
                        chosen["progress"].steps += 1
                    elif step[0] == "end":
                        chosen["finish"].set()
                    elif step[0] == "give up":
                        chosen["scope"].cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert all(count <= 1 for count in walking.values()), walking  # one walk at a time a client
                waiting = Counter(walk["client"] for walk in walks if walk["state"] in ("waiting", "walking"))
                assert dict(turns._queued) == dict(waiting) and turns.waiting_or_walking == waiting.total()
                assert set(turns._turns) == set(turns._activity) == set(waiting)
                # Only the walk holding a client's turn moves its queue; walks that ended, not given up on.
                assert all(len(activity._walks) <= 1 for activity in turns._activity.values())
                ended = sum(1 for each in walks if each.get("ended") and each["state"] == "left")
                assert turns.everyone.finished == ended
                # A client's queue moves on once its walk holds a turn: nobody waits while nobody walks.
                for client in waiting:
                    assert walking[client] == 1, (client, walks)
                moved = turns.everyone.moved()
                assert moved >= moved_before  # what the queued measure progress by never goes back
                moved_before = moved
            for each in walks:
                each["scope"].cancel()
        assert not (turns._queued or turns._turns or turns._activity or turns.everyone._walks)
        # In arrival order: each client's walks held their turns in the order they came.
        for client, numbers in order.items():
            assert numbers == sorted(numbers), (client, numbers)

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
