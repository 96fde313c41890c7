"""Blob bytes in motion: the shared rate cap, metering and verification, the upstream source.

A layer is written into containerd from a *resumable source* (`ResumableSource`): called
with the byte offset containerd's ingest already holds (its STAT offset), it yields the
blob's bytes from there. Both sources (the registry here, a peer in `peers`) go through
`metered`, which

- waits on the agent-wide `ByteRate` before handing each chunk on (the consumer pausing is
  what slows the sender: TCP back-pressure), and counts the bytes by source;
- hashes the blob while it streams when the write starts at byte 0, and raises
  `DigestMismatchError` after the last byte, before containerd is asked to COMMIT. A
  resumed write cannot hash the bytes a previous process wrote (containerd does not serve
  an ingest's data); for those, containerd's own check at COMMIT (size and digest against
  the expected ones) is the verification, and it refuses a mismatch just the same.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Final

import httpx

from layercache.containerd.ingest import ResumableSource
from layercache.digest import Digest, DigestVerifier
from layercache.reference import Reference
from layercache.registry.client import RegistryClient
from layercache.registry.errors import BlobNotFoundError, IncompleteBodyError

__all__ = ["ByteRate", "content_range_start", "metered", "skip", "upstream_source"]

_CONTENT_RANGE: Final = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)", re.ASCII)

#: Called with each chunk's size in bytes as it is received.
OnBytes = Callable[[int], None]


class ByteRate:
    """One cap on the bytes per second of every transfer together; None means no cap.

    A token bucket without burst, like one link: each `take` reserves the next ``n / rate``
    seconds of it, so concurrent transfers queue behind each other and their sum stays
    under the cap.
    """

    def __init__(self, bytes_per_second: int | None) -> None:
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive, or None for no cap")
        self.bytes_per_second = bytes_per_second
        self._free_at = 0.0

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under the cap."""
        if self.bytes_per_second is None:
            return
        now = asyncio.get_running_loop().time()
        start = max(now, self._free_at)
        self._free_at = start + n / self.bytes_per_second
        await asyncio.sleep(self._free_at - now)


def content_range_start(response: httpx.Response) -> int | None:
    """The first byte of a 206 answer's ``Content-Range`` (RFC 9110 §14.4), or None."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    return int(match.group(1)) if match else None


async def skip(chunks: AsyncIterable[bytes], count: int) -> AsyncIterator[bytes]:
    """``chunks`` without their first ``count`` bytes (a server ignored our ``Range``)."""
    async for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:]
        count = 0


async def metered(chunks: AsyncIterable[bytes], *, digest: Digest, size: int, offset: int,
                  rate: ByteRate, on_bytes: OnBytes) -> AsyncIterator[bytes]:
    """Pass ``chunks`` (blob bytes from ``offset``) on, rate-capped, counted and verified.

    ``size`` is the blob's size in bytes. From offset 0 the bytes are hashed and checked
    against ``digest`` once ``size`` bytes have passed; a longer or shorter stream is the
    Write protocol's to refuse (it knows the total).

    Raises:
        DigestMismatchError: the bytes from 0 hash to another digest (after the last one).

    """
    verifier = DigestVerifier(digest) if offset == 0 else None
    async for chunk in chunks:
        await rate.take(len(chunk))
        on_bytes(len(chunk))
        if verifier is not None:
            verifier.update(chunk)
        yield chunk
    if verifier is not None and verifier.size == size:
        verifier.verify()


def upstream_source(client: RegistryClient, repository: Reference, digest: Digest, size: int,
                    rate: ByteRate, on_bytes: OnBytes) -> ResumableSource:
    """A resumable source of blob ``digest`` from ``repository``'s registry.

    ``GET /v2/<name>/blobs/<digest>`` (OCI distribution-spec "Pulling blobs") with
    ``Range: bytes=<offset>-`` when resuming; a registry that answers 200 to a Range is
    read from byte 0 and the part containerd holds is skipped. Authentication, redirects
    and connection pooling are the `RegistryClient`'s; retries are the caller's (each call
    of the source is one attempt), so a retry resumes where containerd's ingest stands.

    Raises (from the iteration):
        BlobNotFoundError, RegistryAuthError, RegistryStatusError: final answers.
        TransientError: 429, 5xx, a connection failure or a short body.
        DigestMismatchError: see `metered`.

    """
    path = f"/v2/{repository.repository}/blobs/{digest}"
    what = f"GET {repository.registry}{path}"

    async def from_offset(offset: int) -> AsyncIterator[bytes]:
        if offset >= size:  # killed between the last WRITE and COMMIT: nothing to send
            return
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with client.stream("GET", repository, path, headers) as response:
            chunks: AsyncIterable[bytes] = response.aiter_bytes()
            if offset and response.status_code == 206:
                if content_range_start(response) != offset:
                    raise IncompleteBodyError(f"{what}: asked for bytes from {offset}, "
                                              f"got {response.headers.get('content-range')}")
            elif offset and response.status_code == 200:
                chunks = skip(chunks, offset)
            elif response.status_code != 200:
                await client.raise_for_status(response, what, BlobNotFoundError)
                raise IncompleteBodyError(f"{what}: unexpected HTTP {response.status_code}")
            async for chunk in metered(chunks, digest=digest, size=size, offset=offset,
                                       rate=rate, on_bytes=on_bytes):
                yield chunk

    return from_offset
