"""call_storage: a call in a worker thread, given up after the storage timeout of silence, never before."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from math import inf

import pytest
import trio

from archiver.archive.listing import AlbumNotFound, WalkProgress
from archiver.web.storage_calls import StorageSilent, call_storage


def _walk_slowly(progress: WalkProgress, steps: int, pause: float) -> str:
    for _ in range(steps):
        threading.Event().wait(pause)  # a stat that takes this long
        progress.steps += 1
    return "listed"


async def test_a_call_that_moves_on_may_take_longer_than_the_timeout() -> None:
    progress = WalkProgress()
    started = trio.current_time()
    result = await call_storage(
        lambda: _walk_slowly(progress, 8, 0.1), timeout=0.4, limiter=trio.CapacityLimiter(1), progress=progress
    )
    assert result == "listed" and trio.current_time() - started > 0.4 * 1.25


async def test_a_silent_call_is_given_up_and_keeps_its_thread_until_it_returns() -> None:
    storage_back = threading.Event()
    limiter = trio.CapacityLimiter(1)
    started = trio.current_time()
    with pytest.raises(StorageSilent, match=r"did not answer for 0\.[3-9]"):
        await call_storage(storage_back.wait, timeout=0.3, limiter=limiter)
    assert 0.3 <= trio.current_time() - started < 0.3 * 1.25 + 0.2
    # The thread still waits on the storage, holding the only token: the next call waits for it, as silently.
    assert limiter.borrowed_tokens == 1
    with pytest.raises(StorageSilent):
        await call_storage(lambda: "never run", timeout=0.3, limiter=limiter)
    storage_back.set()
    with trio.fail_after(5):
        assert await call_storage(lambda: "answered", timeout=0.3, limiter=limiter) == "answered"


async def test_what_the_call_raises_is_raised_as_it_is() -> None:
    def missing() -> None:
        raise AlbumNotFound("x")

    with pytest.raises(AlbumNotFound):  # itself, not in an ExceptionGroup
        await call_storage(missing, timeout=1, limiter=trio.CapacityLimiter(1))


async def test_no_timeout_waits_as_long_as_it_takes() -> None:
    slow = await call_storage(
        lambda: _walk_slowly(WalkProgress(), 3, 0.1), timeout=inf, limiter=trio.CapacityLimiter(1)
    )
    assert slow == "listed"


async def test_a_cancelled_request_abandons_the_call() -> None:
    storage_back = threading.Event()
    with trio.move_on_after(0.2) as scope:
        await call_storage(storage_back.wait, timeout=10, limiter=trio.CapacityLimiter(1))
    assert scope.cancelled_caught
    storage_back.set()


async def test_a_walk_given_up_on_stops_at_its_next_step() -> None:
    progress = WalkProgress()
    limiter = trio.CapacityLimiter(1)
    steps_after: list[int] = []
    stat_returns = threading.Event()

    def walk_with_a_long_stat() -> None:
        progress.step()
        # One stat longer than the timeout: it returns once the call has been given up on (helper
        # 105: a fixed 0.6 s against the 0.3 s timeout raced a loaded machine's event loop).
        stat_returns.wait(10)
        try:
            for _ in range(1000):  # the rest of a large album
                progress.step()
        finally:
            steps_after.append(progress.steps)

    with pytest.raises(StorageSilent):
        await call_storage(walk_with_a_long_stat, timeout=0.3, limiter=limiter, progress=progress)
    stat_returns.set()
    with trio.fail_after(2):
        while limiter.borrowed_tokens:  # the thread ends at its next step, and frees its place
            await trio.sleep(0.01)
    assert steps_after == [1]


async def test_a_walk_whose_request_is_cancelled_stops_at_its_next_step() -> None:
    # A client that leaves while its album is walked must not leave the walk going through the rest.
    progress = WalkProgress()
    limiter = trio.CapacityLimiter(1)
    steps_after: list[int] = []

    def long_walk() -> None:
        try:
            for _ in range(1000):
                progress.step()
                threading.Event().wait(0.01)
        finally:
            steps_after.append(progress.steps)

    with trio.move_on_after(0.2):
        await call_storage(long_walk, timeout=10, limiter=limiter, progress=progress)
    with trio.fail_after(2):
        while limiter.borrowed_tokens:
            await trio.sleep(0.01)
    assert steps_after and steps_after[0] < 100


async def test_a_turn_handed_on_by_a_call_given_up_on_buys_no_timeout_more() -> None:
    # Queued behind a stuck walk, the request's turn comes as that walk is given up: its own
    # walk answers a step or two (the folder opens) and then hangs as the other did.  Moving on
    # to another queue is no movement: it gets its 503 one timeout after it arrived, not two.
    storage_back = threading.Event()
    progress = WalkProgress()
    turn = trio.Event()

    @asynccontextmanager
    async def admission() -> AsyncIterator[None]:
        await turn.wait()
        yield

    def walk_that_hangs() -> None:
        progress.step()  # opened
        progress.step()  # its status read
        storage_back.wait(5)  # its folder's listing never answers

    async def hand_on_the_turn(at: float) -> None:
        await trio.sleep_until(at)
        turn.set()

    # A second's timeout: at 0.4 s, on a machine loaded twice over, the walk's thread was late (2026-12-05).
    timeout = 1.0
    started = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hand_on_the_turn, started + 0.875 * timeout)  # between the third look and the fourth
            with pytest.raises(StorageSilent, match="behind calls that the storage does not answer"):
                await call_storage(
                    walk_that_hangs,
                    timeout=timeout,
                    limiter=trio.CapacityLimiter(1),
                    progress=progress,
                    admission=admission,
                    queue_moved=lambda: ("turn", 0),  # the walk ahead moved nothing
                )
        assert progress.steps == 2  # the walk did start
        assert trio.current_time() - started < timeout * 1.25 + 0.375 * timeout  # not two timeouts
    finally:
        storage_back.set()
