"""Limits on one client: who the client is behind proxies, and its job count."""

from __future__ import annotations

import io
import logging
import os
import zipfile
from dataclasses import replace

import httpx
import pytest
import trio
import trio.testing

from archiver.archive import ctime_trust
from archiver.archive.producer_program import COPY_LIMIT
from archiver.config import Settings, SettingsError
from archiver.fences.hypercorn_tcp import write_units
from archiver.logs import Quieted
from archiver.web import connection as connection_module
from archiver.web import download as download_module
from archiver.web.clients import TrustedProxies, counted_client
from archiver.web.limits import (
    RECLAIM_WAIT,
    STALL_UNIT,
    FairShareExceeded,
    Job,
    JobLimitReached,
    JobSlots,
    PlanLimitReached,
    PlannedFiles,
    RangeLimitReached,
    TokenBucket,
    WalkLimitReached,
    connection_limit,
)
from archiver.web.walk_turns import ClientWalks

from .conftest import CLIENT_TLS, ctimes_settled, read_archive, running_server, write_tree
from .test_observability import samples

PROXIES = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    "peer, forwarded_for, client",
    [
        ("203.0.113.5", None, "203.0.113.5"),  # no proxy
        ("203.0.113.5", "198.51.100.1", "203.0.113.5"),  # an untrusted peer's header is its own invention
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),  # nginx on the host
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the client wrote the left part itself
        ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),  # two proxies, both trusted
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),  # only proxies: the farthest one
        ("127.0.0.1", " , ", "127.0.0.1"),
        # No address: the walk ends at the last trusted hop (helper 52: a quote reached the log lines).
        ("127.0.0.1", "not-an-address", "127.0.0.1"),
        ("127.0.0.1", 'evil" injected', "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1, bad, 10.1.2.3", "10.1.2.3"),
        # One spelling an address: no zone text (helper 53), no port, lower case, compressed.
        ("127.0.0.1", 'fe80::1%<script>"evil"', "fe80::1"),
        ("127.0.0.1", "2001:DB8:0:0::1", "2001:db8::1"),
        ("127.0.0.1", "198.51.100.1:4711", "198.51.100.1"),
        ("127.0.0.1", "[2001:db8::7]:443", "2001:db8::7"),
        ("127.0.0.1", "[::ffff:198.51.100.1]", "198.51.100.1"),
        ("::1", "2001:db8::7", "2001:db8::7"),
        # Bound to "::": IPv4 peers come as IPv4-mapped IPv6 addresses (helper 44).
        ("::ffff:127.0.0.1", "198.51.100.1", "198.51.100.1"),
        ("::ffff:203.0.113.5", "198.51.100.1", "203.0.113.5"),
        ("127.0.0.1", "::ffff:198.51.100.1", "198.51.100.1"),
        (None, "198.51.100.1", "unknown"),
    ],
)
def test_client_address_trusts_only_configured_proxies(
    peer: str | None, forwarded_for: str | None, client: str
) -> None:
    assert PROXIES.client_address(peer, forwarded_for) == client


def test_job_slots_admit_anyone_above_the_reserve_and_the_fair_share_below_it() -> None:
    slots = JobSlots(64, min_share=4)
    assert slots.reserve == 16
    jobs = [slots.acquire("heavy") for _ in range(48)]  # the README's worked example: one client, 70 downloads
    with pytest.raises(FairShareExceeded):
        slots.acquire("heavy")  # holds 48, its share alone: (64 - 16) // 1
    jobs += [slots.acquire(f"other-{number}") for number in range(16)]  # admitted while any slot is free
    with pytest.raises(JobLimitReached):
        slots.acquire("newcomer")  # (``take`` would reclaim one of heavy's: below)
    assert (slots.active_clients, slots.largest_share(), slots.free) == (17, 48, 0)
    for job in jobs:
        slots.release(job)
    assert (slots.active_clients, slots.largest_share(), slots.in_use) == (0, 0, 0)


def test_the_heaviest_client_yields_first() -> None:
    slots = JobSlots(64, min_share=4)
    for _ in range(10):
        slots.acquire("ten")
    for number in range(50):
        slots.acquire(f"one-{number}")
    assert slots.free == 4  # within the reserve: fair shares apply, max(4, 48 // 51) = 4
    with pytest.raises(FairShareExceeded):
        slots.acquire("ten")
    slots.acquire("one-0")  # holds 1, under its share


def test_the_reserve_is_shared_by_a_share_a_client() -> None:
    # Helper 126: a second address's share was the slots outside the reserve divided by two, 24, and
    # it took the whole reserve: two addresses held all 64 slots, everyone else refused.
    slots = JobSlots(64, min_share=4)
    for _ in range(48):
        slots.acquire("first")
    for _ in range(4):
        slots.acquire("second")
    with pytest.raises(FairShareExceeded):
        slots.acquire("second")
    for number in range(3):
        for _ in range(4):
            slots.acquire(f"other-{number}")
    assert slots.free == 0
    with pytest.raises(JobLimitReached):
        slots.acquire("newcomer")


def test_a_quarter_of_the_slots_rounded_up_is_the_reserve() -> None:
    # 10 slots: 3 in reserve, not 2.  One client takes the 7 above it, and the 8th is refused.
    slots = JobSlots(10, min_share=1)
    assert slots.reserve == 3
    for _ in range(7):
        slots.acquire("heavy")
    with pytest.raises(FairShareExceeded):
        slots.acquire("heavy")


class _Downloads:
    """Jobs taken as ArchiveBody takes them, each aborted (its slot released) when ``end`` asks, as it would be."""

    def __init__(self, slots: JobSlots, nursery: trio.Nursery, *, ending: bool = True) -> None:
        self.slots = slots
        self.nursery = nursery
        self.ending = ending  # False: an aborted download never ends (a producer stuck for ever)
        self.ended: list[str] = []
        self.jobs: list[Job] = []

    async def take(self, client: str) -> Job:
        job: Job | None = None

        def end() -> None:
            assert job is not None
            self.ended.append(job.client)
            if self.ending:
                self.nursery.start_soon(self._release, job)

        job = await self.slots.take(client, end=end)
        self.jobs.append(job)
        return job

    async def _release(self, job: Job) -> None:
        self.slots.release(job)
        self.jobs.remove(job)


async def test_a_full_service_reclaims_the_heaviest_clients_newest_slot_for_a_client_under_its_share() -> None:
    # Before: five addresses (12 + 2 + 2 here; 48 + 4 x 4 of 64) held every slot, everyone else refused.
    slots = JobSlots(16, min_share=2)
    async with trio.open_nursery() as nursery:
        downloads = _Downloads(slots, nursery)
        first = [await downloads.take("first") for _ in range(12)]
        for client in ("second", "third"):
            for _ in range(2):
                await downloads.take(client)
        assert slots.free == 0
        slots.check("newcomer-0")  # admitted before its walk: a slot can be had
        newcomer = await downloads.take("newcomer-0")
        assert downloads.ended == ["first"] and first[-1] not in downloads.jobs  # its newest
        assert (slots.held_by("first"), slots.held_by("newcomer-0"), slots.free) == (11, 1, 0)
        assert newcomer.client == "newcomer-0"
        await downloads.take("newcomer-0")  # under its share of 2 still
        for number in range(1, 5):
            for _ in range(2):
                await downloads.take(f"newcomer-{number}")
        assert downloads.jobs[:2] == first[:2] and slots.held_by("first") == 2  # its share, and the oldest
        for client in ("late", "newcomer-0"):
            with pytest.raises(JobLimitReached):
                slots.check(client)
            with pytest.raises(JobLimitReached):
                await downloads.take(client)  # everyone holds its share at most: nothing to reclaim
        assert downloads.ended == ["first"] * 10 and slots.free == 0 and slots.active_clients == 8


async def test_a_client_reclaims_no_more_than_its_share_however_many_it_asks_at_once() -> None:
    slots = JobSlots(8, min_share=2, reserve=0)
    taken: list[Job] = []
    refused: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        downloads = _Downloads(slots, nursery)
        for _ in range(8):
            await downloads.take("heavy")

        async def ask() -> None:
            try:
                taken.append(await downloads.take("burst"))
            except JobLimitReached as error:
                refused.append(error)

        for _ in range(5):
            nursery.start_soon(ask)  # all five before any slot comes back
    assert len(taken) == 2 and len(refused) == 3 and downloads.ended == ["heavy", "heavy"]
    assert (slots.held_by("heavy"), slots.held_by("burst"), slots.in_use) == (6, 2, 8)


async def test_a_reclaimed_slot_that_does_not_come_back_in_time_is_refused_then_freed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = JobSlots(4, min_share=1, reserve=0)
    async with trio.open_nursery() as nursery:
        downloads = _Downloads(slots, nursery, ending=False)
        for _ in range(4):
            await downloads.take("heavy")
        started = trio.current_time()
        with pytest.raises(JobLimitReached, match="not given back"):
            await downloads.take("newcomer")
        assert trio.current_time() - started == pytest.approx(RECLAIM_WAIT)
        assert downloads.ended == ["heavy"] and slots.held_by("newcomer") == 0
        with pytest.raises(JobLimitReached):
            await downloads.take("second")  # not offered the slow one again: another is aborted
        assert downloads.ended == ["heavy", "heavy"]
        slots.release(downloads.jobs.pop())  # the first aborted download ends at last: its slot is anyone's
        assert (slots.free, slots.held_by("heavy")) == (1, 3)
        await downloads.take("other")  # a free slot: nothing reclaimed
        assert downloads.ended == ["heavy", "heavy"]


async def test_a_slot_reclaimed_for_an_asker_that_left_goes_to_the_next_asker_without_another_abort() -> None:
    # Helper 134: the next asker aborted another download while the first one's slot was on its way back.
    slots = JobSlots(4, min_share=1, reserve=0)
    taken: list[Job] = []
    async with trio.open_nursery() as nursery:
        downloads = _Downloads(slots, nursery, ending=False)
        for _ in range(4):
            await downloads.take("heavy")
        victim = downloads.jobs[-1]
        with trio.CancelScope() as gone:

            async def leave() -> None:
                await trio.testing.wait_all_tasks_blocked()
                gone.cancel()

            nursery.start_soon(leave)
            await downloads.take("first")

        async def ask() -> None:
            taken.append(await downloads.take("second"))

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert downloads.ended == ["heavy"]  # no second download aborted
        downloads.jobs.remove(victim)
        slots.release(victim)  # the aborted download ends: its slot goes to the second asker
    assert [job.client for job in taken] == ["second"]
    assert (slots.free, slots.held_by("heavy"), slots.held_by("first")) == (0, 3, 0)


async def test_a_reclaimed_slot_is_offered_to_askers_that_leave_only_until_its_wait_is_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Helper 135: a stuck download, offered again to each asker that left within the wait, held
    # every next one waiting (12 askers, 36 s), no other download aborted.
    slots = JobSlots(4, min_share=1, reserve=0)
    async with trio.open_nursery() as nursery:
        downloads = _Downloads(slots, nursery, ending=False)  # the aborted one never ends
        for _ in range(4):
            await downloads.take("heavy")
        for number in range(4):
            with trio.move_on_after(RECLAIM_WAIT / 2):  # an asker that gives up early, as curl --max-time
                await downloads.take(f"asker-{number}")
        assert downloads.ended == ["heavy"] * 2  # the third asker came 5 s after the abort: another
        with pytest.raises(JobLimitReached):
            await downloads.take("patient")
        assert len(downloads.ended) == 3


@pytest.mark.parametrize("handed_over", [False, True], ids=["while-it-waits", "as-the-slot-is-handed-over"])
async def test_a_request_that_leaves_while_waiting_for_a_reclaimed_slot_leaves_it_free(handed_over: bool) -> None:
    slots = JobSlots(4, min_share=1, reserve=0)
    async with trio.open_nursery() as nursery:
        downloads = _Downloads(slots, nursery, ending=False)
        for _ in range(4):
            await downloads.take("heavy")
        with trio.CancelScope() as gone:

            async def leave() -> None:
                await trio.testing.wait_all_tasks_blocked()
                gone.cancel()  # the client leaves while its request waits ...
                if handed_over:
                    slots.release(downloads.jobs.pop())  # ... and the slot is handed to it before it runs again

            nursery.start_soon(leave)
            await downloads.take("newcomer")
        assert gone.cancelled_caught
        if not handed_over:
            slots.release(downloads.jobs.pop())  # the aborted download ends after
        assert (slots.free, slots.held_by("newcomer"), slots.held_by("heavy")) == (1, 0, 3)
        await downloads.take("newcomer")  # asked again: a free slot
        assert downloads.ended == ["heavy"]


async def test_a_slot_being_handed_to_a_client_counts_against_its_share_and_its_ranges() -> None:
    # Helper 194 (a drawn program of takes and releases, tests/test_interleavings.py): a client
    # waiting for a reclaimed slot was admitted to a slot freed meanwhile at the reserve as if it
    # held none, and held twice its share once the reclaimed one came; and a range waiting so was
    # no range to the range limit.  What is on its way to a client is its own.
    slots = JobSlots(4, min_share=1, reserve=1)
    async with trio.open_nursery() as nursery:
        downloads = _Downloads(slots, nursery, ending=False)  # an aborted download ends when released here
        heavy = [await downloads.take("heavy") for _ in range(3)]  # above the reserve: any client may
        await downloads.take("other")
        taken: list[Job] = []

        async def ask() -> None:
            taken.append(await slots.take("newcomer", ranged=True, end=lambda: None))

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert downloads.ended == ["heavy"] and not taken  # heavy's newest aborted, its slot on its way
        downloads.jobs.remove(heavy[0])
        slots.release(heavy[0])  # another of heavy's downloads ends: one slot free, the reserve
        with pytest.raises(FairShareExceeded):
            slots.check("newcomer")  # its share is the slot on its way
        with pytest.raises(RangeLimitReached):
            slots.check("newcomer", ranged=True)
        slots.check("late")  # anyone else under its share takes the free slot
        downloads.jobs.remove(heavy[2])
        slots.release(heavy[2])  # the aborted download ends: its slot is the newcomer's
        await trio.testing.wait_all_tasks_blocked()
        assert len(taken) == 1 and taken[0].ranged
        assert (slots.held_by("newcomer"), slots.held_by("heavy"), slots.free) == (1, 1, 1)
        with pytest.raises(FairShareExceeded):
            slots.check("newcomer")
        slots.release(taken[0])


def test_ranges_of_one_client_are_capped_even_on_an_idle_service() -> None:
    slots = JobSlots(64, min_share=4)
    ranges = [slots.acquire("manager", ranged=True) for _ in range(4)]
    with pytest.raises(RangeLimitReached):
        slots.acquire("manager", ranged=True)
    slots.acquire("manager")  # a whole download is not a range
    slots.acquire("other", ranged=True)
    slots.release(ranges[0])
    slots.acquire("manager", ranged=True)
    assert slots.held_by("manager") == 5


def test_idle_service_takes_many_downloads_from_one_client() -> None:
    slots = JobSlots(64, min_share=4)
    for _ in range(16):
        slots.acquire("office-behind-nat")
    assert slots.held_by("office-behind-nat") == 16


class _Plan:
    def __init__(self, count: int) -> None:
        self.count = count


def test_planned_files_count_a_shared_plan_once_and_refuse_what_does_not_fit() -> None:
    planned = PlannedFiles(budget=100)
    huge, big, small, other = _Plan(250), _Plan(80), _Plan(20), _Plan(20)
    planned.acquire(huge)  # type: ignore[arg-type]  # no plan held: an album larger than the budget is still served alone
    with pytest.raises(PlanLimitReached):
        planned.acquire(small)
    planned.release(huge)
    for plan in (big, big, big, small):  # the downloads of one album share its plan
        planned.acquire(plan)  # type: ignore[arg-type]
    assert planned.held == 100
    with pytest.raises(PlanLimitReached):
        planned.acquire(other)  # type: ignore[arg-type]
    planned.release(small)  # type: ignore[arg-type]
    planned.acquire(other)  # type: ignore[arg-type]
    for plan in (big, big, big, other):
        planned.release(plan)  # type: ignore[arg-type]
    assert planned.held == 0


async def test_downloads_of_other_albums_past_the_planned_files_are_refused_and_the_same_album_is_not(
    settings: Settings,
) -> None:
    # 64 job slots on 64 albums of ARCHIVER_MAX_FILES files each held ~3.5 GB of plans: bounded.
    write_tree(settings.storage_dir / "slow", {f"{n:03}.jpg": os.urandom(20_000) for n in range(60)})
    write_tree(settings.storage_dir / "other", {f"{n:03}.jpg": b"x" for n in range(50)})
    write_tree(settings.storage_dir / "small", {"a.jpg": b"a"})
    bounded = replace(settings, max_files=100, max_planned_files=100, delay=0.5, chunk_size=65536)
    async with running_server(bounded) as url, client_from(url, "127.0.0.1") as client:
        async with client.stream("GET", "/archive/slow/") as holding:
            assert holding.status_code == 200
            during = samples((await client.get("/metrics")).text)
            refused = await client.get("/archive/other/")
            shared = await client.get("/archive/slow/", headers={"Range": "bytes=0-9"})
            fits = await client.get("/archive/small/")
        with trio.fail_after(10):  # the held download ends once its body sees the client gone
            while samples((await client.get("/metrics")).text)["archiver_downloads_in_flight"]:
                await trio.sleep(0.05)
        after = await client.get("/archive/other/")
        metrics = samples((await client.get("/metrics")).text)
    assert during["archiver_planned_files"] == 60
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert (shared.status_code, fits.status_code, after.status_code) == (206, 200, 200)
    assert read_archive(after.content) == {f"{n:03}.jpg": b"x" for n in range(50)}
    assert metrics['archiver_downloads_rejected_total{reason="plan_limit"}'] == 1
    assert metrics["archiver_planned_files"] == 0


def test_connection_limit_leaves_descriptors_for_the_jobs() -> None:
    assert connection_limit(500, max_jobs=64) == 500  # set explicitly
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    derived = connection_limit(0, max_jobs=8)
    assert 16 <= derived <= soft - 8 * 6


async def test_exactly_the_connection_limit_is_served_and_a_slot_comes_back_when_one_closes(
    settings: Settings,
) -> None:
    # hypercorn_tcp patch 2 at its edge: ARCHIVER_MAX_CONNECTIONS connections are each answered and
    # kept (keep-alive), the next is closed unanswered as it is accepted, and one closing frees its slot.
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

    async def answered(stream: trio.SocketStream) -> bool:
        await stream.send_all(request)
        with trio.fail_after(10):
            try:
                return (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
            except trio.BrokenResourceError:  # a reset: closed with the request unread
                return False

    async with running_server(replace(settings, max_connections=3)) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        kept = [await trio.open_tcp_stream(host, int(port)) for _ in range(3)]
        try:
            assert [await answered(stream) for stream in kept] == [True, True, True]
            async with await trio.open_tcp_stream(host, int(port)) as past_the_limit:
                assert not await answered(past_the_limit)
            await kept.pop().aclose()
            with trio.fail_after(10):  # the server sees the close when it reads
                while True:
                    async with await trio.open_tcp_stream(host, int(port)) as again:
                        if await answered(again):
                            break
        finally:
            for stream in kept:
                await stream.aclose()


def test_a_descriptor_limit_that_leaves_few_connections_is_said_at_start(caplog: pytest.LogCaptureFixture) -> None:
    # Helper 52: ARCHIVER_MAX_JOBS=200 under 1,024 descriptors cut connections at 16, said only as it did.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        with caplog.at_level(logging.WARNING, logger="archiver"):
            assert connection_limit(0, max_jobs=64) == 1024 - 64 - 130 - 6 * 64  # room: nothing said
            assert connection_limit(0, max_jobs=200) == 16
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [record.getMessage() for record in caplog.records] == [
        "the descriptor limit (1024) leaves 0 client connections beside 200 archive jobs (6 descriptors each): "
        "16 are allowed, and the jobs may run short; raise LimitNOFILE (ulimit -n) or lower ARCHIVER_MAX_JOBS"
    ]


@pytest.mark.parametrize(
    "address, prefix, counted",
    [
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", 56, "2001:db8:1::/56"),
        ("2001:db8:1:2::1", 128, "2001:db8:1:2::1"),  # each address a client
        ("198.51.100.1", 64, "198.51.100.1"),  # IPv4: the address (a home behind its router)
        # An IPv4 client's address inside: NAT64 or SIIT (helper 136: every IPv4 client one), 6to4, Teredo.
        ("64:ff9b::102:304", 64, "1.2.3.4"),
        ("64:ff9b::506:708", 64, "5.6.7.8"),
        ("::ffff:0:102:304", 64, "1.2.3.4"),
        ("2002:102:304:5::1", 64, "1.2.3.4"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", 64, "192.0.2.45"),
        # By address: the whole LAN's link-local addresses are one fe80::/64, and ::/96.
        ("fe80::1", 64, "fe80::1"),
        ("fe80::1%eth0", 64, "fe80::1%eth0"),
        ("::1", 64, "::1"),
        ("::102:304", 64, "::102:304"),
        ("fd12:3456:789a:1::1", 64, "fd12:3456:789a:1::/64"),  # a unique local address: its site's subnet
        ("unknown", 64, "unknown"),  # no peer (TrustedProxies.client_address)
    ],
)
def test_an_ipv6_client_is_counted_by_its_network(address: str, prefix: int, counted: str) -> None:
    assert counted_client(address, prefix) == counted


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ARCHIVER_TRUSTED_PROXIES", "nginx.local"),
        ("ARCHIVER_CLIENT_IPV6_PREFIX", "0"),
        ("ARCHIVER_CLIENT_IPV6_PREFIX", "129"),
        ("ARCHIVER_STALL_TIMEOUT", "0"),
        ("ARCHIVER_STALL_TIMEOUT", "nan"),
        ("ARCHIVER_STORAGE_TIMEOUT", "0"),
        ("ARCHIVER_STORAGE_TIMEOUT", "nan"),
        ("ARCHIVER_MAX_JOBS_PER_CLIENT", "0"),
        ("ARCHIVER_MAX_CONNECTIONS", "-1"),
        ("ARCHIVER_MAX_PLANNED_FILES", "-1"),
        ("ARCHIVER_MAX_PLANNED_FILES", "119999"),  # below ARCHIVER_MAX_FILES: one album would not fit (helper 57)
    ],
)
def test_bad_limits_are_refused(variable: str, value: str) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({variable: value})


def test_the_planned_files_follow_the_largest_album_unless_set() -> None:
    # Helper 58: raising only ARCHIVER_MAX_FILES past the planned files' default stopped the start.
    assert Settings.from_env({}).planned_files_budget == 1_000_000
    assert Settings.from_env({"ARCHIVER_MAX_FILES": "2000000"}).planned_files_budget == 2_000_000
    assert Settings.from_env({"ARCHIVER_MAX_PLANNED_FILES": "300000"}).planned_files_budget == 300_000
    refusal = r"ARCHIVER_MAX_PLANNED_FILES \(300000\) must be at least ARCHIVER_MAX_FILES \(400000\)"
    with pytest.raises(SettingsError, match=refusal):
        Settings.from_env({"ARCHIVER_MAX_PLANNED_FILES": "300000", "ARCHIVER_MAX_FILES": "400000"})


def test_limits_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "ARCHIVER_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1",
            "ARCHIVER_STALL_TIMEOUT": "30",
            "ARCHIVER_STORAGE_TIMEOUT": "120",
            "ARCHIVER_MAX_JOBS_PER_CLIENT": "2",
            "ARCHIVER_MAX_CONNECTIONS": "1000",
            "ARCHIVER_CLIENT_IPV6_PREFIX": "56",
        }
    )
    assert settings.client_ipv6_prefix == 56 and Settings.from_env({}).client_ipv6_prefix == 64
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.0.2.1")
    assert (settings.stall_timeout, settings.storage_timeout) == (30, 120)
    assert (settings.max_jobs_per_client, settings.max_connections) == (2, 1000)


def test_token_bucket_keeps_the_rate_and_caps_what_a_pause_saves() -> None:
    bucket = TokenBucket(rate=1000, burst=2000, now=0.0)
    assert bucket.delay(0.0) == 0  # the first chunk goes at once...
    bucket.spend(500)
    assert bucket.delay(0.0) == pytest.approx(0.5)  # ...and the next waits for its bytes
    assert bucket.delay(0.5) == 0
    bucket.spend(500)
    # A pause of 100 s saves up the burst, not 100 s of rate.
    assert bucket.delay(100.5) == 0
    bucket.spend(2000)
    assert bucket.delay(100.5) == 0
    bucket.spend(1000)
    assert bucket.delay(100.5) == pytest.approx(1.0)


async def test_client_walks_go_one_at_a_time_with_a_bounded_queue() -> None:
    walks = ClientWalks(max_waiting=2)
    order: list[object] = []
    release = trio.Event()

    async def walk(number: int) -> None:
        async with walks.turn("a"):
            order.append(number)
            await release.wait()

    async with trio.open_nursery() as nursery:
        for number in range(3):
            nursery.start_soon(walk, number)
        await trio.testing.wait_all_tasks_blocked()
        assert len(order) == 1  # one walk at a time for a client
        assert walks.queued("a") == 3
        with pytest.raises(WalkLimitReached):  # one walking, two waiting: the next is refused
            async with walks.turn("a"):
                pass
        async with walks.turn("b"):  # another client is not held up
            order.append("b")
        release.set()
    assert order[1] == "b" and sorted(order[:1] + order[2:]) == [0, 1, 2]  # type: ignore[type-var]
    assert walks.queued("a") == 0


def client_from(url: str, address: str, protocol: str = "HTTP/1.1") -> httpx.AsyncClient:
    """An httpx client whose connections come from ``address`` (a loopback address: a client of its own)."""
    http2 = protocol == "HTTP/2"
    transport = httpx.AsyncHTTPTransport(
        verify=CLIENT_TLS,
        local_address=address,
        limits=httpx.Limits(max_connections=100),
        http1=not http2,
        http2=http2,
    )
    return httpx.AsyncClient(verify=CLIENT_TLS, base_url=url, transport=transport, timeout=60)


@pytest.mark.parametrize("addresses", ["one address", "one IPv6 /64"])
async def test_one_clients_listings_do_not_hold_up_another_clients_first_byte(
    settings: Settings, addresses: str
) -> None:
    # Issue 23: 100 HEADs from one address held a polite download 34.5 s behind their walks.  Each
    # of another album here: HEADs of one album queued at once share its walks (RecentWalks).  A
    # home's /64 is one client however many of its addresses it uses (behind nginx, X-Forwarded-For).
    heads = 30 if addresses == "one address" else 15
    for album in range(heads):
        write_tree(settings.storage_dir / f"many-{album}", {f"{i:05d}.jpg": b"x" for i in range(1000)})
    write_tree(settings.storage_dir / "small", {"photo.jpg": os.urandom(10_000)})
    answered = 0
    async with running_server(settings) as url, client_from(url, "127.0.0.1") as attacker:
        first_answered = trio.Event()

        async def head(album: int) -> None:
            nonlocal answered
            headers = {"X-Forwarded-For": f"2001:db8:1:2::{album + 1}"} if addresses == "one IPv6 /64" else {}
            assert (await attacker.head(f"/archive/many-{album}/", headers=headers)).status_code == 200
            answered += 1
            first_answered.set()

        async with trio.open_nursery() as nursery, client_from(url, "127.0.0.2") as polite:
            for album in range(heads):
                nursery.start_soon(head, album)
            await first_answered.wait()
            response = await polite.get("/archive/small/")
            answered_meanwhile = answered
        assert response.status_code == 200
        assert read_archive(response.content)["photo.jpg"]
    assert answered == heads  # all served, one after another
    assert answered_meanwhile <= heads // 3, f"the polite download waited behind {answered_meanwhile} walks"


async def test_a_download_over_the_limits_is_refused_before_its_album_is_listed(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refusal's line is quieted, one a second for each reason (helper 84): on a clock that stands
    # still here, the first is written and the two after it are counted only.
    logger = logging.getLogger(connection_module.__name__)
    lines = {
        reason: Quieted(logger, logging.WARNING, 1.0, clock=lambda: 0.0) for reason in connection_module._refusal_lines
    }
    monkeypatch.setattr(connection_module, "_refusal_lines", lines)
    write_tree(settings.storage_dir / "slow", {"photo.jpg": os.urandom(1024 * 1024)})
    # Listing this album logs its skipped entry: the sign that it was walked.
    write_tree(settings.storage_dir / "other", {"photo.jpg": b"x", "line\nbreak": b"y"})
    one_job = replace(settings, max_jobs=1, delay=0.5, chunk_size=65536)
    async with running_server(one_job) as url, client_from(url, "127.0.0.1") as client:
        async with client.stream("GET", "/archive/slow/") as holding:
            assert holding.status_code == 200
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="archiver"):
                refused = [await client.get("/archive/other/") for _ in range(3)]
            assert [response.status_code for response in refused] == [503] * 3
            assert refused[0].headers["retry-after"] == "5"
            app_lines = [record for record in caplog.records if record.name.startswith("archiver")]
        metrics = samples((await client.get("/metrics")).text)
    assert "skipped" not in caplog.text  # no walk
    assert len(app_lines) == 1 and app_lines[0].levelno == logging.WARNING  # one line for the three
    assert app_lines[0].getMessage().startswith("refused other for 127.0.0.1: ")
    assert lines["job_limit"].left_out == 2
    assert metrics['archiver_downloads_rejected_total{reason="job_limit"}'] == 3


async def test_a_conditional_request_that_needs_no_job_is_answered_when_every_job_is_busy(
    settings: Settings,
) -> None:
    # A browser downloading an archive again sends If-None-Match: its 304 needs no job, nor a 412.
    write_tree(settings.storage_dir / "slow", {"photo.jpg": os.urandom(1024 * 1024)})
    write_tree(settings.storage_dir / "other", {"photo.jpg": b"x"})
    await ctimes_settled(settings.storage_dir / "other")
    one_job = replace(settings, max_jobs=1, delay=0.5, chunk_size=65536)
    async with running_server(one_job) as url, client_from(url, "127.0.0.1") as client:
        etag = (await client.head("/archive/other/")).headers["etag"]
        async with client.stream("GET", "/archive/slow/") as holding:
            assert holding.status_code == 200
            unchanged = await client.get("/archive/other/", headers={"If-None-Match": etag})
            changed = await client.get("/archive/other/", headers={"If-Match": '"an earlier archive"'})
            # One that does need the job still waits for it.
            needed = await client.get("/archive/other/", headers={"If-Match": etag})
        metrics = samples((await client.get("/metrics")).text)
    assert (unchanged.status_code, changed.status_code, needed.status_code) == (304, 412, 503)
    assert unchanged.headers["content-type"] == "application/zip"  # the 200's: a cache keeps it
    assert metrics['archiver_downloads_rejected_total{reason="job_limit"}'] == 1


async def test_a_request_answered_whole_is_no_range_to_the_range_limit(settings: Settings) -> None:
    # A browser resuming an album changed since (a stale If-Range) gets the whole archive: a download, not a range.
    write_tree(settings.storage_dir / "slow", {"photo.jpg": os.urandom(1024 * 1024)})
    write_tree(settings.storage_dir / "other", {"photo.jpg": b"x" * 100})
    one_range = replace(settings, max_jobs_per_client=1, delay=0.5, chunk_size=65536)
    async with (
        running_server(one_range) as url,
        client_from(url, "127.0.0.1") as client,
        client.stream("GET", "/archive/slow/", headers={"Range": "bytes=0-"}) as holding,
    ):
        assert holding.status_code == 206
        stale = await client.get("/archive/other/", headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
        several = await client.get("/archive/other/", headers={"Range": "bytes=0-9,20-29"})
        ranged = await client.get("/archive/other/", headers={"Range": "bytes=0-9"})
    assert (stale.status_code, several.status_code, ranged.status_code) == (200, 200, 503)
    assert stale.content == several.content and read_archive(stale.content)["photo.jpg"] == b"x" * 100


@pytest.mark.parametrize("prefix", [64, 128])
async def test_the_addresses_of_one_ipv6_network_are_one_client_to_the_limits(
    settings: Settings, prefix: int, caplog: pytest.LogCaptureFixture
) -> None:
    # A home is given a /64 and may use any of its 2**64 addresses: counted by address, 16 of them
    # reading slowly held every job slot.  Here behind nginx (X-Forwarded-For from 127.0.0.1).
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    # 8 slots, 2 in reserve, a share of 2 once busy; a download lasts ~8 s unless closed.
    held = replace(settings, delay=0.5, chunk_size=65536, max_jobs=8, max_jobs_per_client=2, client_ipv6_prefix=prefix)
    statuses: dict[str, int] = {}
    stop = trio.Event()
    async with (
        running_server(held) as url,
        client_from(url, "127.0.0.1") as nginx,
        trio.open_nursery() as nursery,
    ):

        async def hold(address: str, headers: dict[str, str], answered: trio.Event) -> None:
            async with nginx.stream(
                "GET", "/archive/album/", headers={"X-Forwarded-For": address} | headers
            ) as response:
                statuses[address] = response.status_code
                answered.set()
                if response.status_code in (200, 206):
                    await stop.wait()

        async def download(address: str, headers: dict[str, str] | None = None) -> None:
            answered = trio.Event()
            nursery.start_soon(hold, address, headers or {}, answered)
            await answered.wait()

        for host in range(1, 7):  # 6 slots: 2 free, the reserve
            await download(f"2001:db8:1:2::{host}")
        await download("2001:db8:1:2::7")  # 6 held by its /64 (prefix 64), none by itself (128)
        await download("2001:db8:1:3::1", {"Range": "bytes=0-"})  # another /64
        metrics = samples((await nginx.get("/metrics")).text)
        stop.set()
    assert [statuses[f"2001:db8:1:2::{host}"] for host in range(1, 7)] == [200] * 6
    assert statuses["2001:db8:1:3::1"] == 206
    if prefix == 64:
        assert statuses["2001:db8:1:2::7"] == 503
        assert metrics['archiver_downloads_rejected_total{reason="fair_share"}'] == 1
        assert metrics["archiver_active_clients"] == 2 and metrics["archiver_largest_client_share"] == 6
        # The log names the address, and the network the limit counted.
        assert any("refused album for 2001:db8:1:2::7: 2001:db8:1:2::/64 holds 6 archive jobs" in line
                   for line in caplog.messages)  # fmt: skip
    else:
        assert statuses["2001:db8:1:2::7"] == 200
        assert metrics["archiver_active_clients"] == 8 and metrics["archiver_largest_client_share"] == 1


async def test_sixteen_downloads_at_once_from_one_address_on_an_idle_service(settings: Settings) -> None:
    # Issue 19: an office behind NAT got 4 x 200 and 12 x 503 with 60 of 64 slots free.
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(500_000), "Фото/b.jpg": os.urandom(70_000)})
    async with running_server(settings) as url, client_from(url, "127.0.0.1") as client:
        responses = []

        async def download() -> None:
            responses.append(await client.get("/archive/album/"))

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(download)
    assert [response.status_code for response in responses] == [200] * 16
    assert len({response.content for response in responses}) == 1
    assert read_archive(responses[0].content)["photo.jpg"] == (settings.storage_dir / "album/photo.jpg").read_bytes()


async def test_a_full_service_refuses_the_heaviest_client_first(settings: Settings) -> None:
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    held = replace(settings, delay=0.5, chunk_size=65536)  # a download lasts ~8 s unless closed
    async with running_server(held) as url, trio.open_nursery() as nursery:
        downloads = _HeldDownloads(url, nursery)
        await downloads.open("127.0.1.1", 10)  # idle service: a client may take many
        for number in range(50):
            await downloads.open(f"127.0.2.{number + 1}", 1)
        assert downloads.opened("127.0.1.1") == 10 and downloads.opened() == 60  # 4 free: within the reserve
        heavy = await downloads.clients["127.0.1.1"].head("/archive/album/")  # HEAD takes no slot
        async with downloads.clients["127.0.1.1"].stream("GET", "/archive/album/") as refused_heavy:
            heavy_status = refused_heavy.status_code
            heavy_retry = refused_heavy.headers.get("retry-after")
        await downloads.open("127.0.2.1", 1)  # holds 1: under its share, admitted
        for number in range(3):
            await downloads.open(f"127.0.3.{number + 1}", 1)  # the last free slots
        assert downloads.opened() == 64
        # Every slot taken: one of the heaviest client's, its newest, goes to a client under its share.
        await downloads.open("127.0.4.1", 1)
        reclaimed = await downloads.read_whole(downloads.responses["127.0.1.1"][-1])
        metrics = samples((await downloads.clients["127.0.4.1"].get("/metrics")).text)
        downloads.stop.set()
    await downloads.aclose()
    assert heavy.status_code == 200
    assert (heavy_status, heavy_retry) == (503, "5")
    assert downloads.statuses["127.0.2.1"] == [200, 200]
    assert downloads.statuses["127.0.4.1"] == [200] and not reclaimed
    assert metrics['archiver_downloads_rejected_total{reason="fair_share"}'] == 1
    assert metrics['archiver_downloads_finished_total{outcome="reclaimed"}'] == 1
    assert metrics["archiver_active_clients"] == 55
    assert metrics["archiver_largest_client_share"] == 9


async def test_a_download_reclaimed_while_its_head_is_written_sends_the_head_whole_and_is_then_cut(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 133: the head's write may wait (for the connection's send lock) after the download is
    # marked as sending its head; a reclaim then cut that write, and the client had no answer at all.
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    held = replace(settings, delay=0.5, chunk_size=65536, max_jobs=4, max_jobs_per_client=1)  # reserve 1
    head_waits, head_may_go, reclaimed = trio.Event(), trio.Event(), trio.Event()
    paused: list[bool] = []
    victims: list[download_module.ArchiveBody] = []
    send_within, reclaim = connection_module._send_within, download_module.ArchiveBody._reclaim

    async def head_held_once(send: object, event: dict[str, object], timeout: float) -> None:
        if event["type"] == "http.response.start" and paused == [True]:
            paused.append(True)
            head_waits.set()
            await head_may_go.wait()
        await send_within(send, event, timeout)  # type: ignore[arg-type]

    def reclaim_noted(body: download_module.ArchiveBody) -> None:
        reclaim(body)
        victims.append(body)
        reclaimed.set()

    monkeypatch.setattr(connection_module, "_send_within", head_held_once)
    monkeypatch.setattr(download_module.ArchiveBody, "_reclaim", reclaim_noted)
    async with running_server(held) as url, trio.open_nursery() as nursery:
        downloads = _HeldDownloads(url, nursery)
        await downloads.open("127.0.9.1", 2)
        paused.append(True)  # the next head waits, as for the lock
        victim_answered, newcomer_answered = trio.Event(), trio.Event()
        nursery.start_soon(downloads._hold, "127.0.9.1", victim_answered)
        await head_waits.wait()
        await downloads.open("127.0.9.2", 1)  # every slot taken
        downloads.clients["127.0.9.3"] = client_from(url, "127.0.9.3")
        nursery.start_soon(downloads._hold, "127.0.9.3", newcomer_answered)  # reclaims the one whose head waits
        await reclaimed.wait()
        head_may_go.set()
        with trio.fail_after(10):
            await victim_answered.wait()
            victim = await downloads.read_whole(downloads.responses["127.0.9.1"][2])
            await newcomer_answered.wait()
        metrics = samples((await downloads.clients["127.0.9.1"].get("/metrics")).text)
        await downloads.aclose()
        downloads.stop.set()
    assert downloads.statuses["127.0.9.1"] == [200] * 3 and not victim  # the head whole, then the transfer cut
    assert victims[0]._writes.cut  # the writes after the head cut, as a slow reader's would block
    assert downloads.statuses["127.0.9.3"] == [200]
    assert metrics['archiver_downloads_finished_total{outcome="reclaimed"}'] == 1


async def test_a_download_reclaimed_before_its_head_is_refused_with_a_503_and_logged_as_reclaimed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Its first chunk came, its head not sent yet (helpers 133, 134: hard to hit from outside).  Never
    # "completed" (helper 134: the whole archive in that chunk would have been; the tail hold keeps
    # the central directory for a later chunk, but the body checks the head went out all the same).
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    write_tree(settings.storage_dir / "small", {"note.txt": b"a few bytes"})
    held = replace(settings, delay=0.5, chunk_size=65536, max_jobs=4, max_jobs_per_client=1)  # reserve 1
    chunk_came, reclaimed = trio.Event(), trio.Event()
    next_chunk, reclaim = download_module.ArchiveBody.__anext__, download_module.ArchiveBody._reclaim

    async def held_after_the_chunk(body: download_module.ArchiveBody) -> bytes:
        chunk = await next_chunk(body)
        if body.name == "small":
            chunk_came.set()
            await trio.sleep_forever()  # until the reclaim cancels it, its head not sent
        return chunk

    def reclaim_noted(body: download_module.ArchiveBody) -> None:
        reclaim(body)
        reclaimed.set()

    monkeypatch.setattr(download_module.ArchiveBody, "__anext__", held_after_the_chunk)
    monkeypatch.setattr(download_module.ArchiveBody, "_reclaim", reclaim_noted)
    caplog.set_level(logging.INFO, logger="archiver.web.download")
    async with running_server(held) as url, trio.open_nursery() as nursery:
        downloads = _HeldDownloads(url, nursery)
        await downloads.open("127.0.10.1", 2)
        victim: list[httpx.Response] = []

        async def get_small() -> None:
            victim.append(await downloads.clients["127.0.10.1"].get("/archive/small/"))

        nursery.start_soon(get_small)
        await chunk_came.wait()
        await downloads.open("127.0.10.2", 1)  # every slot taken
        await downloads.open("127.0.10.3", 1)  # reclaims the small one
        await reclaimed.wait()
        metrics = samples((await downloads.clients["127.0.10.3"].get("/metrics")).text)
        await downloads.aclose()
        downloads.stop.set()
    assert victim[0].status_code == 503 and victim[0].headers["retry-after"] == "5"
    assert downloads.statuses["127.0.10.3"] == [200]
    assert metrics['archiver_downloads_finished_total{outcome="reclaimed"}'] == 1
    assert metrics['archiver_downloads_finished_total{outcome="completed"}'] == 0
    assert any("download small for 127.0.10.1: reclaimed:" in line and "(refused before the head)" in line
               for line in caplog.messages)  # fmt: skip


class _HeldDownloads:
    """Downloads begun from several addresses and kept open (their job slots held) until ``stop``."""

    def __init__(self, url: str, nursery: trio.Nursery, protocol: str = "HTTP/1.1") -> None:
        self.url = url
        self.nursery = nursery
        self.protocol = protocol
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.statuses: dict[str, list[int]] = {}
        self.responses: dict[str, list[httpx.Response]] = {}  # those answered 200, oldest first
        self.stop = trio.Event()

    def opened(self, address: str | None = None) -> int:
        return sum(len(self.responses.get(one, [])) for one in ([address] if address else self.statuses))

    async def open(self, address: str, count: int) -> None:
        """Begin ``count`` downloads from ``address``, one after another, each answered before the next."""
        if address not in self.clients:
            self.clients[address] = client_from(self.url, address, self.protocol)
        for _ in range(count):
            answered = trio.Event()
            self.nursery.start_soon(self._hold, address, answered)
            await answered.wait()

    async def _hold(self, address: str, answered: trio.Event) -> None:
        async with self.clients[address].stream("GET", "/archive/album/") as response:
            self.statuses.setdefault(address, []).append(response.status_code)
            if response.status_code == 200:
                self.responses.setdefault(address, []).append(response)
            answered.set()
            if response.status_code == 200:
                await self.stop.wait()

    @staticmethod
    async def read_whole(response: httpx.Response) -> bool:
        """Read the rest of ``response``: False if its transfer was aborted (an aborted one ends at once)."""
        try:
            await response.aread()
        except httpx.TransportError:
            return False
        return True

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
async def test_five_addresses_cannot_hold_every_slot(settings: Settings, protocol: str) -> None:
    # Before: the first address took the 12 slots above the reserve, and four took its 4 (a share of
    # 2 each, 48 and 4 x 4 of 64 slots by default): five addresses reading just above the stall rate
    # held every slot for hours, everyone else refused.  Now each newcomer under its share takes the
    # heaviest client's newest download's slot, until every client holds its share at most.
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    # 16 slots, 4 in reserve, a share of 2 once busy; a download lasts ~8 s unless closed.
    held = replace(settings, delay=0.5, chunk_size=65536, max_jobs=16, max_jobs_per_client=2)
    async with running_server(held) as url, trio.open_nursery() as nursery:
        downloads = _HeldDownloads(url, nursery, protocol)
        await downloads.open("127.0.6.1", 12)
        for number in (2, 3):
            await downloads.open(f"127.0.6.{number}", 2)
        for number in range(5):
            await downloads.open(f"127.0.7.{number + 1}", 2)  # each takes 2 of the first's
        first = downloads.responses["127.0.6.1"]
        reclaimed = [not await downloads.read_whole(response) for response in first[2:]]
        for address in ("127.0.8.1", "127.0.6.1", "127.0.7.1"):
            await downloads.open(address, 1)  # every client at its share: refused
        metrics = samples((await downloads.clients["127.0.8.1"].get("/metrics")).text)
        # Connections closed first: the unread HTTP/2 streams' answers wait in sockets no one reads, which
        # this in-process server's shutdown (no signal) would wait out for the stall timeout.
        await downloads.aclose()
        downloads.stop.set()
    assert downloads.statuses["127.0.6.1"] == [200] * 12 + [503]
    assert all(downloads.statuses[f"127.0.7.{number}"] == [200, 200] for number in range(2, 6))
    assert downloads.statuses["127.0.8.1"] == [503] and downloads.statuses["127.0.7.1"] == [200, 200, 503]
    # The newest ten aborted, and only they: the oldest two kept.
    assert reclaimed == [True] * 10 and metrics['archiver_downloads_finished_total{outcome="reclaimed"}'] == 10
    assert metrics['archiver_downloads_rejected_total{reason="job_limit"}'] == 3
    assert (metrics["archiver_active_clients"], metrics["archiver_largest_client_share"]) == (8, 2)
    # Every slot still held: over HTTP/2 the first's two oldest go on, on the connection of the ten reset.
    assert metrics["archiver_downloads_in_flight"] == 16


async def test_two_addresses_cannot_hold_the_whole_reserve(settings: Settings) -> None:
    # Helper 126: the second address's share was (64 - 16) // 2 = 24, and it took the whole reserve:
    # two addresses reading just above the stall rate held every slot for hours, everyone else refused.
    write_tree(settings.storage_dir / "album", {"photo.jpg": os.urandom(1024 * 1024)})
    # 16 slots, 4 in reserve, a share of 2 once busy; a download lasts ~8 s unless closed.
    held = replace(settings, delay=0.5, chunk_size=65536, max_jobs=16, max_jobs_per_client=2)
    statuses: dict[str, list[int]] = {}
    async with running_server(held) as url, trio.open_nursery() as nursery:
        clients: dict[str, httpx.AsyncClient] = {}
        stop = trio.Event()

        async def hold(address: str, answered: trio.Event) -> None:
            async with clients[address].stream("GET", "/archive/album/") as response:
                statuses.setdefault(address, []).append(response.status_code)
                answered.set()
                if response.status_code == 200:
                    await stop.wait()

        async def open_downloads(address: str, count: int) -> None:
            clients.setdefault(address, client_from(url, address))
            for _ in range(count):
                answered = trio.Event()
                nursery.start_soon(hold, address, answered)
                await answered.wait()

        await open_downloads("127.0.5.1", 12)  # the slots above the reserve
        await open_downloads("127.0.5.2", 4)  # before: 4 x 200, its share 12 // 2 = 6
        await open_downloads("127.0.5.3", 1)  # before: 503, every slot held
        stop.set()
    for client in clients.values():
        await client.aclose()
    assert statuses == {"127.0.5.1": [200] * 12, "127.0.5.2": [200, 200, 503, 503], "127.0.5.3": [200]}


def test_the_socket_counts_a_chunk_and_its_framing_as_the_app_counts_the_chunk() -> None:
    # The app gives a chunk one stall timeout per STALL_UNIT; the socket's write of it carries
    # framing too (a chunk header, HTTP/2 frame headers), which must not make it another unit.
    assert write_units(2 * STALL_UNIT, STALL_UNIT) == 2
    assert write_units(2 * STALL_UNIT + len(b"80000\r\n\r\n"), STALL_UNIT) == 2  # chunked, deflate mode
    assert write_units(STALL_UNIT + 16 * 9, STALL_UNIT) == 1  # 16 HTTP/2 frame headers
    assert write_units(STALL_UNIT + 64 * 1024, STALL_UNIT) == 2
    assert write_units(0, STALL_UNIT) == 1


@pytest.mark.parametrize("compression", [0, 6])
async def test_a_download_holds_a_few_bytes_of_its_tail_not_the_central_directory(
    settings: Settings, compression: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helper 76: every download held its archive's tail (the central directory, ~20 MB for 20,000
    # long names) in memory until its producer's exit, eight slow clients +161 MB.  The producer
    # writes the central directory only once every file it sent is checked: its first byte is the
    # proof the tail waited for, and the bytes after it go as they come.
    # What the body holds each time it waits for the producer's next chunk.  (Measured after each
    # chunk it returned, it could read 0 throughout: the last entry's held bytes can go out with
    # the central directory's first chunk, in one return.)
    held: list[int] = []
    next_chunk = download_module.ArchiveBody._next_chunk

    async def measured(body: download_module.ArchiveBody) -> bytes | None:
        held.append(len(body._hold.held))
        return await next_chunk(body)

    monkeypatch.setattr(download_module.ArchiveBody, "_next_chunk", measured)
    album = settings.storage_dir / "album"
    files = {f"a/{i:04d} {'фотография из отпуска ' * 6}.jpg": b"x" for i in range(3_000)}
    # The last file moved by sendfile (past the producer's COPY_LIMIT): stored, the producer then waits
    # for the service to take every byte before it writes the central directory, so that the last
    # entry's last byte, held, and the central directory's first byte never arrive in one chunk.
    # (Copied, they could: then nothing was ever held, and the bound below said nothing.)
    files["z.jpg"] = b"z" * (2 * COPY_LIMIT)
    # And its CRC, read a moment after the file was written, not racy: a racy CRC is checked
    # against the file's bytes, which are then copied, and could arrive with the central
    # directory's first byte after all (1 run in ~8 here, once in a slow run: max(held) == 0).
    monkeypatch.setattr(ctime_trust, "RACY_NS", 0)
    write_tree(album, files)
    chunk_size = 65536
    served = replace(settings, chunk_size=chunk_size, compression=compression)
    async with running_server(served) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/archive/album/")
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert len(response.content) - archive.start_dir > 8 * chunk_size  # a central directory of many chunks
    assert read_archive(response.content) == files
    assert 0 < max(held) <= chunk_size  # was the central directory's size
