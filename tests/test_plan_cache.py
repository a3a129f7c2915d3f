"""The plan cache: one plan an album while any is alive, whoever asks and however the cache turns."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from archiver.archive.listing import AlbumListing
from archiver.archive.plan import ArchivePlan
from archiver.archive.plan_cache import PlanCache
from archiver.archive.storage import list_album

from .conftest import write_tree


def test_two_walks_of_one_album_at_once_get_one_plan(tmp_path: Path) -> None:
    # Helper 53: each walk made a plan of its own, which the planned-files bound counted twice: the
    # second download of an album was refused on an idle service.  The first make() is held until
    # the second get() has found it under way.
    write_tree(tmp_path / "album", {f"{n}.jpg": b"x" for n in range(50)})
    listing = list_album(tmp_path / "album")
    cache = PlanCache()
    made: list[ArchivePlan] = []
    second_waits = threading.Event()

    def make() -> ArchivePlan:
        assert second_waits.wait(10)
        made.append(ArchivePlan(listing.directory, listing.files))
        return made[-1]

    class Arrival(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            second_waits.set()  # the second get() waits for the first's plan: let the first make it
            return super().wait(timeout)

    plans: list[ArchivePlan] = []
    first = threading.Thread(target=lambda: plans.append(cache.get(listing, '"tag"', make)))
    first.start()
    while not cache._making:  # the first has begun its make()
        pass
    (making,) = cache._making.values()
    making.done = Arrival()

    def make_again() -> ArchivePlan:
        raise AssertionError("made a second time")

    waiting = threading.Thread(target=lambda: plans.append(cache.get(listing, '"tag"', make_again)))
    waiting.start()
    first.join(10)
    waiting.join(10)
    assert len(made) == 1 and plans == [made[0], made[0]]


def test_a_plan_pushed_out_of_the_cache_is_still_the_one_while_a_download_holds_it(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_tree(tmp_path / name, {f"{n}.jpg": b"x" for n in range(10)})
    a, b = list_album(tmp_path / "a"), list_album(tmp_path / "b")
    cache = PlanCache(entries=10)  # one album's plan at a time

    made: list[str] = []

    def plan_of(listing: AlbumListing) -> Callable[[], ArchivePlan]:
        def make() -> ArchivePlan:
            made.append(listing.directory.name)
            return ArchivePlan(listing.directory, listing.files)

        return make

    held = cache.get(a, '"a"', plan_of(a))
    cache.get(b, '"b"', plan_of(b))  # a is out of the cache now
    assert cache.get(a, '"a"', plan_of(a)) is held  # a download still holds it: not made again
    assert made == ["a", "b"]
    cache.get(b, '"b"', plan_of(b))  # b made again (a's return pushed it out, and nothing held it), a out
    gone = weakref.ref(held)
    del held
    gc.collect()
    assert gone() is None  # what nothing holds is not kept alive by the cache
    cache.get(a, '"a"', plan_of(a))
    assert made == ["a", "b", "b", "a"]


def test_a_make_that_fails_leaves_the_next_to_make_its_own(tmp_path: Path) -> None:
    write_tree(tmp_path / "album", {"a.jpg": b"a"})
    listing = list_album(tmp_path / "album")
    cache = PlanCache()

    def failing() -> ArchivePlan:
        raise MemoryError

    with pytest.raises(MemoryError):
        cache.get(listing, '"tag"', failing)
    plan = cache.get(listing, '"tag"', lambda: ArchivePlan(listing.directory, listing.files))
    assert plan.count == 1 and not cache._making
