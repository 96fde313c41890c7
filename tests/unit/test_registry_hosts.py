"""Per-host limiter decisions, layer retry times and log redaction. Pure: a fake clock.

The same behaviours against the real registry behind the fault proxy are in
tests/integration/test_registry_client.py; these pin the decisions one by one.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from layercache.backoff import RetryTimes
from layercache.redact import redact_urls as redact_url_queries
from layercache.registry.errors import (
    RateLimitedError,
    RegistryConnectionError,
    ServerError,
    retry_after,
)
from layercache.registry.hosts import HEAD_RETRY_SECONDS, HostState, RegistryHosts


class Clock:
    """A clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def _host(clock: Clock) -> HostState:
    return RegistryHosts(clock=clock, sleep=clock.sleep).get("registry.example", 8)


async def test_a_429_blocks_every_later_request_until_retry_after() -> None:
    clock = Clock()
    host = _host(clock)
    async with host.slot("GET a", 120) as answered:
        answered(429, 30.0)
    assert host.blocked_for() == 30.0
    async with host.slot("GET b", 120) as answered:  # waits the block out, then probes
        assert clock.sleeps == [30.0]
        answered(200, None)
    assert not host.limited and host.blocked_for() == 0.0


async def test_a_block_longer_than_the_caller_waits_fails_at_once_with_the_time_left() -> None:
    clock = Clock()
    host = _host(clock)
    async with host.slot("GET a", 120) as answered:
        answered(429, 600.0)
    clock.now += 100
    with pytest.raises(RateLimitedError) as info:
        async with host.slot("GET b", 120):
            pytest.fail("a request was let through")
    assert info.value.retry_after == 500.0
    assert "not sent" in str(info.value)
    assert clock.sleeps == []


async def test_after_a_block_one_probe_goes_first() -> None:
    clock = Clock()
    host = _host(clock)
    async with host.slot("GET a", 120) as answered:
        answered(429, None)  # no Retry-After: no block, but one request at a time
    order: list[str] = []
    release = asyncio.Event()

    async def request(name: str, status: int) -> None:
        async with host.slot(name, 120) as answered:
            order.append(name)
            if name == "probe":
                await release.wait()
            answered(status, None)

    probe = asyncio.create_task(request("probe", 200))
    await asyncio.sleep(0)
    others = [asyncio.create_task(request(f"r{i}", 200)) for i in range(3)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["probe"]  # the others wait for the probe's answer
    release.set()
    await asyncio.gather(probe, *others)
    assert sorted(order) == ["probe", "r0", "r1", "r2"]


async def test_a_probe_without_an_answer_lets_the_next_one_try() -> None:
    clock = Clock()
    host = _host(clock)
    async with host.slot("GET a", 120) as answered:
        answered(429, None)
    with pytest.raises(OSError, match="reset"):
        async with host.slot("probe", 120):
            raise OSError("connection reset")
    async with asyncio.timeout(1), host.slot("next", 120) as answered:
        answered(200, None)
    assert not host.limited


def test_head_refusal_is_remembered_for_a_while() -> None:
    clock = Clock()
    host = _host(clock)
    assert host.head_supported()
    host.head_refused(501)
    assert not host.head_supported()
    clock.now += HEAD_RETRY_SECONDS
    assert host.head_supported()


def test_requests_are_counted_by_host_and_code() -> None:
    seen: list[tuple[str, str]] = []
    hosts = RegistryHosts(lambda host, code: seen.append((host, code)))
    hosts.count("docker.io", 429)
    hosts.count("docker.io", "error")
    assert seen == [("docker.io", "429"), ("docker.io", "error")]
    assert hosts.get("docker.io") is hosts.get("docker.io")


@pytest.mark.parametrize(("error", "seconds"), [
    (RateLimitedError("GET x", 600.0), 600.0),
    (ServerError(503, "GET x", 20.0), 20.0),
    (RateLimitedError("GET x"), None),
    (RegistryConnectionError("GET x"), None),
    (ValueError("no"), None),
    (None, None),
])
def test_retry_after_of_an_error(error: BaseException | None, seconds: float | None) -> None:
    assert retry_after(error) == seconds


def test_layer_retry_never_before_retry_after() -> None:
    times = RetryTimes(initial=2.0, cap=60.0)
    assert times.failed("layer", 0.0) == 2.0
    assert times.failed("layer", 2.0, not_before=600.0) == 602.0  # beyond the cap, too
    assert not times.ready("layer", 601.0)
    assert times.ready("layer", 602.0)
    assert times.failed("layer", 602.0) == 602.0 + 8.0  # the doubling went on: 2, 4, 8
    assert times.failed("other", 0.0, not_before=1.0) == 2.0  # the backoff is longer


@pytest.mark.parametrize(("text", "expected"), [
    ("GET https://s3.example/b/blob?X-Amz-Signature=abc&X-Amz-Credential=k 200",
     "GET https://s3.example/b/blob?<redacted> 200"),
    ('HTTP Request: GET http://127.0.0.1:5000/v2/x/blobs/sha256:1?sig=s "HTTP/1.1 200 OK"',
     'HTTP Request: GET http://127.0.0.1:5000/v2/x/blobs/sha256:1?<redacted> "HTTP/1.1 200 OK"'),
    ("no URL? none", "no URL? none"),
    ("https://registry.example/v2/", "https://registry.example/v2/"),
])
def test_url_queries_are_redacted(text: str, expected: str) -> None:
    assert redact_url_queries(text) == expected


def test_httpx_request_lines_are_logged_without_their_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    url = httpx.URL("https://bucket.s3.example/blob?X-Amz-Signature=secret")
    logging.getLogger("httpx").info('HTTP Request: %s %s "%s %d %s"', "GET", url, "HTTP/1.1",
                                    200, "OK")
    assert caplog.records[-1].getMessage() == (
        'HTTP Request: GET https://bucket.s3.example/blob?<redacted> "HTTP/1.1 200 OK"')
