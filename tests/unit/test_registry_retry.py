"""Retry policy decisions and Retry-After parsing, as tables. Pure (sleeps are recorded)."""

from __future__ import annotations

import datetime
import random

import pytest

from layercache.oci.digest import Digest, DigestMismatchError
from layercache.registry.errors import (
    AuthenticationError,
    BlobNotFoundError,
    IncompleteBodyError,
    ManifestError,
    RateLimitedError,
    RegistryConnectionError,
    RegistryStatusError,
    ServerError,
)
from layercache.registry.retry import RetryPolicy, parse_retry_after

NOW = datetime.datetime(2026, 11, 29, 12, 0, 0, tzinfo=datetime.UTC)

# (Retry-After value, seconds or None)
RETRY_AFTER = [
    (None, None),
    ("0", 0.0),
    ("7", 7.0),
    ("  120 ", 120.0),
    ("Sun, 29 Nov 2026 12:00:30 GMT", 30.0),  # IMF-fixdate
    ("Sun Nov 29 12:01:00 2026", 60.0),  # asctime
    ("Sun, 29 Nov 2026 11:00:00 GMT", 0.0),  # in the past: no wait
    ("-5", None),  # delay-seconds is 1*DIGIT
    ("1.5", None),
    ("soon", None),
    ("", None),
    ("٣", None),  # a non-ASCII digit is not a DIGIT
]


@pytest.mark.parametrize(("value", "seconds"), RETRY_AFTER)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


WHAT = "GET 127.0.0.1:5000/v2/x/manifests/v1"
DIGEST = Digest("sha256:" + "a" * 64)

# (error, retried?)
DECISIONS = [
    (RegistryConnectionError(f"{WHAT}: ConnectError"), True),
    (ServerError(500, WHAT), True),
    (ServerError(503, WHAT, retry_after=2), True),
    (RateLimitedError(WHAT, retry_after=1), True),
    (IncompleteBodyError(f"{WHAT}: short"), True),
    (RegistryStatusError(400, WHAT), False),
    (RegistryStatusError(405, WHAT), False),
    (BlobNotFoundError(404, WHAT), False),
    (AuthenticationError("127.0.0.1:5000: the configured credentials were rejected"), False),
    (ManifestError("ref", "body", "not JSON"), False),
    (DigestMismatchError(DIGEST, Digest("sha256:" + "b" * 64), 3), False),
    (ValueError("bug"), False),
]


@pytest.mark.parametrize(("error", "retried"), DECISIONS)
def test_is_retryable(error: Exception, retried: bool) -> None:
    assert RetryPolicy.is_retryable(error) is retried


def test_backoff_is_exponential_bounded_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=8.0, rng=random.Random(1))  # noqa: S311 - jitter, not crypto
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (30, 8.0)]:
        waits = {policy.backoff(attempt) for _ in range(50)}
        assert all(base / 2 <= w <= base for w in waits)
        assert len(waits) > 1  # jittered


# (attempt, error, expected minimum wait)
WAITS = [
    (1, ServerError(503, WHAT), 0.25),
    (1, RateLimitedError(WHAT, retry_after=3.0), 3.0),
    (3, RateLimitedError(WHAT, retry_after=0.0), 1.0),
    (1, ServerError(503, WHAT, retry_after=10.0), 10.0),
]


@pytest.mark.parametrize(("attempt", "error", "minimum"), WAITS)
def test_wait_honours_retry_after(attempt: int, error: Exception, minimum: float) -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=4.0)
    assert policy.wait_after(attempt, error) >= minimum


@pytest.mark.parametrize(
    ("attempt", "error", "stop"),
    [
        (1, ServerError(500, WHAT), False),
        (4, ServerError(500, WHAT), False),
        (5, ServerError(500, WHAT), True),
        (1, RateLimitedError(WHAT, retry_after=120.0), False),
        (1, RateLimitedError(WHAT, retry_after=121.0), True),  # the caller waits, not us
    ],
)
def test_gives_up(attempt: int, error: Exception, stop: bool) -> None:
    assert RetryPolicy(attempts=5, max_retry_after=120.0).gives_up(attempt, error) is stop


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


async def run(policy: RetryPolicy, errors: list[Exception]) -> int:
    """Run one request that fails with ``errors`` in turn, then succeeds; attempts made."""
    calls = 0
    async for attempt in policy.retrying(WHAT):
        with attempt:
            calls += 1
            if errors:
                raise errors.pop(0)
    return calls


async def test_loop_retries_transient_then_succeeds() -> None:
    sleep = Recorder()
    policy = RetryPolicy(attempts=5, initial_backoff=0.1, sleep=sleep)
    calls = await run(policy, [RateLimitedError(WHAT, retry_after=2.0), ServerError(503, WHAT)])
    assert calls == 3
    assert sleep.sleeps[0] >= 2.0
    assert 0.1 <= sleep.sleeps[1] <= 0.2


async def test_loop_never_retries_final_errors() -> None:
    sleep = Recorder()
    with pytest.raises(BlobNotFoundError):
        await run(RetryPolicy(sleep=sleep), [BlobNotFoundError(404, WHAT)])
    assert sleep.sleeps == []


async def test_loop_budget_then_last_error() -> None:
    sleep = Recorder()
    errors: list[Exception] = [ServerError(500 + i, WHAT) for i in range(10)]
    with pytest.raises(ServerError) as info:
        await run(RetryPolicy(attempts=3, sleep=sleep), errors)
    assert info.value.status == 502  # the third attempt's error
    assert len(sleep.sleeps) == 2


async def test_loop_long_retry_after_stops_at_once() -> None:
    sleep = Recorder()
    with pytest.raises(RateLimitedError) as info:
        await run(
            RetryPolicy(max_retry_after=60, sleep=sleep), [RateLimitedError(WHAT, retry_after=3600)]
        )
    assert info.value.retry_after == 3600
    assert sleep.sleeps == []


def test_policy_validates() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(initial_backoff=5, max_backoff=1)
