"""Blob bytes in motion: the shared rate cap, metering and verification, the upstream source.

A layer is written into containerd from a *resumable source* (`ResumableSource`): called
with the byte offset containerd's ingest already holds (its STAT offset), it yields the
blob's bytes from there. Both sources (the registry here, a peer in `peers`) go through
`metered`, which

- waits on the agent-wide `ByteRate` before handing each chunk on (the consumer pausing is
  what slows the sender: TCP back-pressure), and counts the bytes by source;
- hands each received buffer on as it is (`layercache.containerd.ingest.write_stream` sends
  it as one WRITE): no copy, and no hash.

Verification is containerd's COMMIT check, for every write: containerd's ingest hashes
every byte it is given as it writes it (and, reopening an ingest for a resume, hashes the
part it holds first), and COMMIT with ``expected`` and ``total`` refuses any other digest
or size (``FAILED_PRECONDITION`` "unexpected commit digest", raised as
`layercache.containerd.ingest.ContentDigestMismatchError` with the ingest aborted). So one
hash per byte, containerd's, verifies the whole blob whether it came from byte 0 or was
resumed; a second hash here, as before, checked the same bytes again (1 to 1.5 CPU-s per
GiB) and could never cover a resumed write anyway. Only a committed digest is ever a blob:
wrong bytes end as an aborted ingest, never a blob under our digest.

A resume asks for ``Range: bytes=<offset>-``. A source that answers with other bytes — a
``206`` whose ``Content-Range`` starts elsewhere, or ``416 Range Not Satisfiable`` — raises
`ResumeRefusedError` before a byte is handed on; the fetcher then aborts the ingest and
writes the blob again from byte 0 (`layercache.agent.fetch.fetcher`). A ``200`` (Range ignored) is
read from byte 0 with the part containerd holds skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable

import httpx

from layercache import httprange
from layercache.containerd.ingest import ResumableSource
from layercache.oci.digest import Digest
from layercache.oci.reference import Reference
from layercache.registry.blobs import refused_resume
from layercache.registry.client import RegistryClient
from layercache.registry.errors import BlobNotFoundError, IncompleteBodyError

__all__ = ["ByteRate", "ResumeRefusedError", "metered", "resume_refusal", "skip",
           "upstream_source"]

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


class ResumeRefusedError(Exception):
    """A source would not continue a blob from the ingest's offset (see the module docstring).

    The bytes containerd holds cannot be continued from this source; the write must start
    over from byte 0. ``offset`` is the byte asked for.
    """

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def resume_refusal(what: str, response: httpx.Response, offset: int) -> ResumeRefusedError | None:
    """The refusal in ``response`` to ``Range: bytes=<offset>-`` (``what``: the request), if any.

    A ``206`` whose ``Content-Range`` does not start at ``offset``, or a ``416``, when
    ``offset`` > 0; None for any other answer (a ``200`` is the caller's to skip through).
    """
    refused = refused_resume(response, offset)
    return None if refused is None else ResumeRefusedError(f"{what}: {refused}", offset)


async def skip(chunks: AsyncIterable[bytes], count: int) -> AsyncIterator[bytes]:
    """``chunks`` without their first ``count`` bytes (a server ignored our ``Range``)."""
    async for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:]
        count = 0


async def metered(chunks: AsyncIterable[bytes], *, rate: ByteRate,
                  on_bytes: OnBytes) -> AsyncIterator[bytes]:
    """Pass ``chunks`` (blob bytes) on unchanged, rate-capped and counted.

    Verification is containerd's at COMMIT (see the module docstring); a longer or shorter
    stream is the Write protocol's to refuse (it knows the total).
    """
    async for chunk in chunks:
        await rate.take(len(chunk))
        on_bytes(len(chunk))
        yield chunk


def upstream_source(client: RegistryClient, repository: Reference, digest: Digest, size: int,
                    rate: ByteRate, on_bytes: OnBytes) -> ResumableSource:
    """A resumable source of blob ``digest`` from ``repository``'s registry.

    ``GET /v2/<name>/blobs/<digest>`` (OCI distribution-spec "Pulling blobs") with
    ``Range: bytes=<offset>-`` when resuming; a registry that answers 200 to a Range is
    read from byte 0 and the part containerd holds is skipped; one that answers another
    range or 416 raises `ResumeRefusedError` (the caller starts over from byte 0).
    Authentication, redirects and connection pooling are the `RegistryClient`'s; retries
    are the caller's (each call of the source is one attempt), so a retry resumes where
    containerd's ingest stands.

    Raises (from the iteration):
        ResumeRefusedError: a resume answered with other bytes (206 elsewhere, 416).
        BlobNotFoundError, RegistryAuthError, RegistryStatusError: final answers.
        TransientError: 429, 5xx, a connection failure or a short body.

    Wrong bytes are refused by containerd at COMMIT (module docstring).
    """
    path = f"/v2/{repository.repository}/blobs/{digest}"
    what = f"GET {repository.registry}{path}"

    async def from_offset(offset: int) -> AsyncIterator[bytes]:
        if offset >= size:  # killed between the last WRITE and COMMIT: nothing to send
            return
        headers = httprange.resume_headers(offset)
        async with client.stream("GET", repository, path, headers) as response:
            chunks: AsyncIterable[bytes] = response.aiter_bytes()
            if (refused := resume_refusal(what, response, offset)) is not None:
                raise refused
            if offset and response.status_code == 200:
                chunks = skip(chunks, offset)
            elif response.status_code != (206 if offset else 200):
                await client.raise_for_status(response, what, BlobNotFoundError)
                raise IncompleteBodyError(f"{what}: unexpected HTTP {response.status_code}")
            async for chunk in metered(chunks, rate=rate, on_bytes=on_bytes):
                yield chunk

    return from_offset
