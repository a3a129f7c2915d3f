"""Walks shared: a request that waited while a walk of its album began takes that walk's outcome (``RecentWalks``)."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import httpx
import pytest
import trio

from archiver.archive.entries import EntryPolicy
from archiver.archive.listing import (
    AlbumKeepsChanging,
    AlbumNotFound,
    AlbumRefused,
    ListingFailed,
    SkippedLog,
    WalkGivenUp,
    WalkProgress,
)
from archiver.archive.plan import ArchivePlan
from archiver.archive.plan_cache import PlanCache
from archiver.archive.storage import list_album
from archiver.config import Settings
from archiver.web.preparation import PreparedArchive, RecentWalks, prepare_archive

from .conftest import read_archive, write_tree
from .test_dead_storage import fuse_unavailable, served_gated_album, until_held
from .test_observability import samples


def prepared_for(album: Path) -> PreparedArchive:
    listing = list_album(album, WalkProgress(), lambda folder, device: None, 1000)
    return PreparedArchive(ArchivePlan(album, listing.files, 0, EntryPolicy()), '"tag"', 0)


def test_a_walk_serves_only_the_requests_that_arrived_before_it_began(tmp_path: Path) -> None:
    write_tree(tmp_path / "album", {"a.jpg": b"a"})
    album, walks = tmp_path / "album", RecentWalks()
    prepared = prepared_for(album)
    walks.keep(album, 0, 1_000, prepared)  # tickets, as RecentWalks.ticket gives them
    assert walks.since(album, 0, 999) == prepared
    assert walks.since(album, 0, 0) == prepared
    assert walks.since(album, 0, 1_001) is None  # arrived after it began: may have missed a change
    assert walks.since(album, 6, 0) is None  # another deflate level is another plan
    assert walks.since(tmp_path / "other", 0, 0) is None
    # A walk that began earlier but ended later does not replace a later one's outcome.
    walks.keep(album, 0, 500, prepared_for(album))
    assert walks.since(album, 0, 999) == prepared
    assert (walks.walked, walks.shared) == (2, 3)


def test_tickets_order_arrivals_and_walks_however_close() -> None:
    walks = RecentWalks()
    tickets = [walks.ticket() for _ in range(1000)]
    assert tickets == sorted(set(tickets))  # a clock may read the same twice (helper 131)


def test_a_walk_refused_refuses_the_requests_it_serves_and_an_io_error_serves_none(tmp_path: Path) -> None:
    walks = RecentWalks()
    walks.refused(tmp_path / "uploading", 0, 1_000, AlbumKeepsChanging("a.jpg changed 0.5 s ago", settles_in=60))
    walks.refused(tmp_path / "huge", 0, 1_000, AlbumRefused("more than 10 entries (ARCHIVER_MAX_FILES)"))
    walks.refused(tmp_path / "gone", 0, 1_000, AlbumNotFound("gone"))
    walks.refused(tmp_path / "eio", 0, 1_000, ListingFailed("a.jpg: Input/output error", transient=False))
    walks.refused(tmp_path / "short", 0, 1_000, ListingFailed("Too many open files", transient=True))
    walks.refused(tmp_path / "left", 0, 1_000, WalkGivenUp())
    for _ in range(2):  # each request its own exception
        with pytest.raises(AlbumKeepsChanging, match=r"a\.jpg changed") as changing:
            walks.since(tmp_path / "uploading", 0, 999)
        assert 59 < changing.value.settles_in <= 60  # what is left of it
        with pytest.raises(AlbumRefused, match="more than 10 entries"):
            walks.since(tmp_path / "huge", 0, 999)
        with pytest.raises(AlbumNotFound):
            walks.since(tmp_path / "gone", 0, 999)
    assert walks.since(tmp_path / "uploading", 0, 1_001) is None  # arrived after that walk began
    for other in ("eio", "short", "left"):  # another walk might not meet them
        assert walks.since(tmp_path / other, 0, 0) is None
    assert (walks.walked, walks.shared) == (3, 6)


def test_an_upload_refused_is_walked_again_once_it_said_it_would_have_settled(tmp_path: Path) -> None:
    walks = RecentWalks()
    walks.refused(tmp_path / "uploading", 0, 1_000, AlbumKeepsChanging("a.jpg changed 1.9 s ago", settles_in=0.1))
    walks.refused(tmp_path / "busy", 0, 1_000, AlbumKeepsChanging("changed while listed, 3 times"))  # no time known
    with pytest.raises(AlbumKeepsChanging):
        walks.since(tmp_path / "busy", 0, 0)
    deadline = time.monotonic() + 10
    while True:  # refused until then, then walked again (a 503 whose Retry-After has passed: helper 131)
        try:
            assert walks.since(tmp_path / "uploading", 0, 0) is None
            break
        except AlbumKeepsChanging as refused:
            assert refused.settles_in > 0
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_a_walk_whose_plan_is_gone_serves_nobody(tmp_path: Path) -> None:
    write_tree(tmp_path / "album", {"a.jpg": b"a"})
    walks = RecentWalks()
    walks.keep(tmp_path / "album", 0, 1_000, prepared_for(tmp_path / "album"))  # no one holds the plan
    gc.collect()
    assert walks.since(tmp_path / "album", 0, 0) is None


def test_recent_walks_are_kept_for_a_bounded_number_of_albums(tmp_path: Path) -> None:
    write_tree(tmp_path / "album", {"a.jpg": b"a"})
    prepared, walks = prepared_for(tmp_path / "album"), RecentWalks(albums=2)
    for name in ("a", "b", "c"):
        walks.keep(tmp_path / name, 0, 1_000, prepared)
    assert [walks.since(tmp_path / name, 0, 0) for name in ("a", "b", "c")] == [None, prepared, prepared]


def test_a_request_takes_a_walk_begun_since_it_arrived_instead_of_walking(tmp_path: Path, settings: Settings) -> None:
    write_tree(tmp_path / "album", {"a.jpg": b"a"})
    walks = RecentWalks()
    arrived = walks.ticket()
    prepared = prepared_for(tmp_path / "album")
    walks.keep(tmp_path / "gone", 0, walks.ticket(), prepared)

    def prepare(arrived: int) -> PreparedArchive:
        return prepare_archive(
            tmp_path / "gone", settings, PlanCache(), SkippedLog(), 0, WalkProgress(), _Trust(), walks, arrived
        )

    assert prepare(arrived) == prepared  # not walked: there is no such folder
    with pytest.raises(AlbumNotFound):
        prepare(walks.ticket())  # arrived after that walk began: walked, and not found


class _Trust:
    def learn(self, folder: int, device: int) -> None:
        pass


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
@pytest.mark.parametrize("outcome", ["a plan", "a refusal"])
async def test_requests_waiting_behind_a_walk_share_the_next_one_not_it(tmp_path: Path, outcome: str) -> None:
    # A client's walks go one at a time.  Requests queued behind a walk would each walk the album
    # again after it (16 HEADs at once of 20,000 files: 2.5 CPU-s); those that arrived before a
    # walk began take its outcome.  Never that of a walk already under way when they came: it may
    # have listed a file before it changed.  A refusal too (here: more entries than allowed; an
    # upload under way alike), which costs its walk as much (helper 130).
    env = {"ARCHIVER_MAX_FILES": "1"} if outcome == "a refusal" else {}
    async with served_gated_album(tmp_path, {"a.jpg": b"first", "b.jpg": b"b"}, env) as album:
        client, gate = album.client, album.gate
        gate.write_text("listing")
        answers: list[httpx.Response] = []

        async def get() -> None:
            answers.append(await client.get("/archive/album/"))

        async def scraped() -> dict[str, float]:
            return samples((await client.get("/metrics")).text)

        before = await scraped()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get)
            await until_held(gate)  # the first walk is under way, held in the album's listing
            (album.source / "a.jpg").write_bytes(b"second")  # before the first walk looks at the file
            for _ in range(3):
                nursery.start_soon(get)
            with trio.fail_after(10):
                while (await scraped())["archiver_album_walks_queued"] < 4:
                    await trio.sleep(0.02)
            gate.unlink()
        after = await scraped()
    # The three that came during the first walk: the second walked (after the first), the last two took its outcome.
    assert after['archiver_album_walks_total{how="walked"}'] - before['archiver_album_walks_total{how="walked"}'] == 2
    assert after['archiver_album_walks_total{how="shared"}'] - before['archiver_album_walks_total{how="shared"}'] == 2
    if outcome == "a plan":
        # Every walk saw the change (made before the first looked at the file): the counts, not the
        # bytes, show that the walk under way when the three came served none of them.
        assert [read_archive(response.content) for response in answers] == [{"a.jpg": b"second", "b.jpg": b"b"}] * 4
    else:
        assert [response.status_code for response in answers] == [500] * 4
        assert all("ARCHIVER_MAX_FILES" not in response.text for response in answers)  # the log's, not the page's
