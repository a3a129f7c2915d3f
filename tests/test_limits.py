"""Limits on one client: who the client is behind proxies, and its job count."""

from __future__ import annotations

import pytest

from archiver.config import Settings, SettingsError
from archiver.limits import ClientJobs, ClientLimitReached, TokenBucket, TrustedProxies, connection_limit

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
        ("127.0.0.1", "not-an-address", "not-an-address"),  # as given: one bucket, like any client
        ("::1", "2001:db8::7", "2001:db8::7"),
        (None, "198.51.100.1", "unknown"),
    ],
)
def test_client_address_trusts_only_configured_proxies(
    peer: str | None, forwarded_for: str | None, client: str
) -> None:
    assert PROXIES.client_address(peer, forwarded_for) == client


def test_client_jobs_are_counted_per_client_and_given_back() -> None:
    jobs = ClientJobs(per_client=2)
    jobs.acquire("a")
    jobs.acquire("a")
    jobs.acquire("b")
    with pytest.raises(ClientLimitReached):
        jobs.acquire("a")
    assert jobs.held_by("a") == 2
    jobs.release("a")
    jobs.acquire("a")
    for client in ("a", "a", "b"):
        jobs.release(client)
    assert jobs.held_by("a") == jobs.held_by("b") == 0


def test_connection_limit_leaves_descriptors_for_the_jobs() -> None:
    assert connection_limit(500, max_jobs=64) == 500  # set explicitly
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    derived = connection_limit(0, max_jobs=8)
    assert 16 <= derived <= soft - 8 * 6


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ARCHIVER_TRUSTED_PROXIES", "nginx.local"),
        ("ARCHIVER_STALL_TIMEOUT", "0"),
        ("ARCHIVER_MAX_JOBS_PER_CLIENT", "0"),
        ("ARCHIVER_MAX_CONNECTIONS", "-1"),
    ],
)
def test_bad_limits_are_refused(variable: str, value: str) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({variable: value})


def test_limits_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "ARCHIVER_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1",
            "ARCHIVER_STALL_TIMEOUT": "30",
            "ARCHIVER_MAX_JOBS_PER_CLIENT": "2",
            "ARCHIVER_MAX_CONNECTIONS": "1000",
        }
    )
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.0.2.1")
    assert (settings.stall_timeout, settings.max_jobs_per_client, settings.max_connections) == (30, 2, 1000)


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
