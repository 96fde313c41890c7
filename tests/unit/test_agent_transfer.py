"""Metering, skipping, the shared rate cap, backoff and the disk guard."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from layercache.agent.fetch.fetcher import failure_reason
from layercache.agent.fetch.transfer import (
    ByteRate,
    ResumeRefusedError,
    metered,
    resume_refusal,
    skip,
)
from layercache.agent.peer.client import PeerError, PeerUnauthorizedError
from layercache.agent.status.disk import DiskGuard, DiskPressureError
from layercache.backoff import RetryTimes
from layercache.oci.digest import Digest, DigestMismatchError
from layercache.registry.errors import BlobNotFoundError, RateLimitedError, ServerError

BLOB = bytes(range(256)) * 40


async def _chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def _collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def test_metered_passes_each_buffer_on_as_it_is_and_counts() -> None:
    counted: list[int] = []
    chunks = [chunk async for chunk in _chunks(BLOB)]

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    out = [chunk async for chunk in metered(source(), rate=ByteRate(None),
                                            on_bytes=counted.append)]
    assert all(a is b for a, b in zip(out, chunks, strict=True))  # no copy, no regrouping
    assert counted == [len(chunk) for chunk in chunks]


async def test_metered_leaves_verification_to_containerds_commit() -> None:
    # Wrong bytes pass: one hash per byte, containerd's, refuses them at COMMIT
    # (tests/integration/test_agent_faults.py, test_containerd_content.py).
    corrupt = BLOB[:-1] + b"\x00"
    out = await _collect(metered(_chunks(corrupt), rate=ByteRate(None),
                                 on_bytes=lambda _n: None))
    assert out == corrupt


async def test_skip_drops_what_containerd_already_holds() -> None:
    assert await _collect(skip(_chunks(BLOB, 300), 1234)) == BLOB[1234:]


async def test_byte_rate_caps_the_sum_of_transfers() -> None:
    rate = ByteRate(100_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(rate.take(10_000) for _ in range(3)))
    assert loop.time() - started >= 0.29  # 30 kB at 100 kB/s, shared


def test_backoff_doubles_to_a_cap_and_forgets_on_success() -> None:
    retry = RetryTimes(2.0, 5.0)
    assert retry.failed("a", 100.0) == 102.0
    assert retry.failed("a", 100.0) == 104.0
    assert retry.failed("a", 100.0) == 105.0
    assert not retry.ready("a", 104.0) and retry.ready("a", 105.0)
    assert retry.earliest() == 105.0
    retry.succeeded("a")
    assert retry.ready("a", 0.0) and retry.earliest() is None


@pytest.mark.parametrize(("error", "reason"), [
    (DigestMismatchError(Digest.from_bytes(b"a"), Digest.from_bytes(b"b"), 1), "DigestMismatch"),
    (BlobNotFoundError(404, "GET x"), "UpstreamNotFound"),
    (RateLimitedError("GET x"), "UpstreamRateLimited"),
    (ServerError(503, "GET x"), "UpstreamUnavailable"),
    (PeerUnauthorizedError("401"), "PeerUnauthorized"),
    (PeerError("reset"), "PeerUnavailable"),
    (DiskPressureError("NodeDiskPressure", "full"), "NodeDiskPressure"),
    (RuntimeError("?"), "InternalError"),
])
def test_failure_reasons_are_camel_case(error: BaseException, reason: str) -> None:
    assert failure_reason(error) == reason


async def test_disk_guard_reserves_and_refuses(tmp_path: Path) -> None:
    async def locate() -> Path:
        return tmp_path

    stat = os.statvfs(tmp_path)
    available = stat.f_bavail * stat.f_frsize
    guard = DiskGuard(locate, min_free_percent=0)
    await guard.reserve(available // 2)
    assert guard.reserved == available // 2 and guard.refusal is None
    with pytest.raises(DiskPressureError) as refused:
        await guard.reserve(available)  # with the first reservation: more than is free
    assert refused.value.reason == "DiskPressure" and guard.refusal is refused.value
    guard.release(available // 2)
    guard.node_pressure = True
    with pytest.raises(DiskPressureError, match="DiskPressure") as node:
        await guard.reserve(1)
    assert node.value.reason == "NodeDiskPressure"


async def test_disk_guard_refuses_when_the_filesystem_is_unknown(tmp_path: Path) -> None:
    async def locate() -> Path:
        return tmp_path / "missing"

    with pytest.raises(DiskPressureError) as refused:
        await DiskGuard(locate, 10).reserve(1)
    assert refused.value.reason == "ImageFsUnknown"


def _answer(status: int, content_range: str | None = None) -> httpx.Response:
    headers = {"Content-Range": content_range} if content_range else {}
    return httpx.Response(status, headers=headers)


@pytest.mark.parametrize(("status", "content_range", "offset", "refused"), [
    (206, "bytes 1000-9999/10000", 1000, False),  # the range asked for
    (206, "bytes 0-9999/10000", 1000, True),  # another start
    (206, None, 1000, True),  # no Content-Range at all
    (416, "bytes */10000", 1000, True),
    (200, None, 1000, False),  # Range ignored: the caller skips
    (416, None, 0, False),  # not a resume: the status is the caller's to classify
])
def test_resume_refusal(status: int, content_range: str | None, offset: int,
                        refused: bool) -> None:
    found = resume_refusal("GET x", _answer(status, content_range), offset)
    assert (found is not None) == refused
    if found is not None:
        assert isinstance(found, ResumeRefusedError) and found.offset == offset
        assert f"from {offset}" in str(found)
