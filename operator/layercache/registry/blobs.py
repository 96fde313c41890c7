"""Stream blobs from a registry into a sink, verifying the digest as the bytes arrive.

``GET /v2/<name>/blobs/<digest>`` (OCI distribution-spec, "Pulling blobs"), with:

- the digest computed while streaming (`layercache.oci.digest.DigestVerifier`); on a mismatch
  the sink is told to discard and `DigestMismatchError` is raised — a sink never keeps
  bytes that were not verified, and nothing unverified is handed back;
- resume with ``Range: bytes=N-`` (RFC 9110 §14) after a connection reset or a short body;
  a server that ignores Range (``200`` instead of ``206``) or answers another start makes
  us restart from byte 0 with an emptied sink, never append a whole body to a partial one;
- the whole download, resumes included, in one retry budget (`RetryPolicy`);
- more bytes than the descriptor's size is a final error (hostile or broken server);
- foreign / non-distributable layers refused up front (`NonDistributableLayerError`): they
  are reported by resolution, never fetched.

Sinks: `MemorySink` (small blobs: configs), `FileSink` (a file, renamed into place only
when verified), `CallbackSink` (an async callback per chunk plus a discard callback), or
anything with the `BlobSink` methods (the agent's containerd content writer).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

import httpx

from layercache import httprange
from layercache.oci.digest import Digest, DigestMismatchError, DigestVerifier
from layercache.oci.mediatypes import layer_type
from layercache.oci.reference import Reference
from layercache.registry.client import RegistryClient
from layercache.registry.errors import (
    BlobNotFoundError,
    BlobTooLargeError,
    IncompleteBodyError,
    NonDistributableLayerError,
    RegistryDigestMismatchError,
)
from layercache.registry.manifest import MAX_LAYER_BYTES

__all__ = [
    "BlobSink",
    "CallbackSink",
    "FileSink",
    "MemorySink",
    "fetch_blob",
    "fetch_blob_bytes",
    "refused_resume",
]

log = logging.getLogger(__name__)



@runtime_checkable
class BlobSink(Protocol):
    """Where a blob's bytes go, in this order of calls.

    Any number of ``write``, with ``reset`` possibly in between (start again at byte 0),
    then exactly one of ``commit`` (all bytes verified) or ``discard`` (failed).
    """

    async def write(self, data: bytes) -> None:
        """Append ``data`` (the next bytes of the blob, in order)."""

    async def reset(self) -> None:
        """Drop everything written so far: the blob starts again at byte 0."""

    async def discard(self) -> None:
        """The transfer failed or the digest did not match: drop everything, for good."""

    async def commit(self, digest: Digest, size: int) -> None:
        """All ``size`` bytes were written and hash to ``digest``: keep them."""


class MemorySink:
    """Collects a blob in memory; `data` is readable only after a verified commit."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._committed = False

    async def write(self, data: bytes) -> None:
        """Append ``data``."""
        self._buffer += data

    async def reset(self) -> None:
        """Forget what was written."""
        self._buffer.clear()

    async def discard(self) -> None:
        """Forget what was written, for good."""
        self._buffer.clear()
        self._committed = False

    async def commit(self, digest: Digest, size: int) -> None:
        """Mark the bytes verified."""
        assert len(self._buffer) == size, (digest, size, len(self._buffer))
        self._committed = True

    @property
    def data(self) -> bytes:
        """The verified blob.

        Raises:
            RuntimeError: nothing was committed (still streaming, or discarded).

        """
        if not self._committed:
            raise RuntimeError("no verified blob in this sink")
        return bytes(self._buffer)


class FileSink:
    """Writes a blob to ``path`` via a hidden ``.<name>.partial`` file beside it.

    The partial file is renamed to ``path`` only on a verified commit (atomic on one file
    system) and deleted on discard, so ``path`` never holds unverified bytes. File I/O runs
    in a worker thread so the event loop never blocks on the disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self._file: IO[bytes] | None = None

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self._file = self.partial.open("wb")
        return self._file

    async def write(self, data: bytes) -> None:
        """Append ``data`` to the partial file."""
        await asyncio.to_thread(self._open().write, data)

    async def reset(self) -> None:
        """Truncate the partial file to zero bytes."""

        def truncate() -> None:
            handle = self._open()
            handle.seek(0)
            handle.truncate()

        await asyncio.to_thread(truncate)

    async def discard(self) -> None:
        """Close and delete the partial file."""

        def remove() -> None:
            if self._file is not None:
                self._file.close()
                self._file = None
            self.partial.unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    async def commit(self, digest: Digest, size: int) -> None:
        """Flush, fsync and rename the partial file to ``path``."""

        def finish() -> None:
            handle = self._open()
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            self._file = None
            self.partial.replace(self.path)

        await asyncio.to_thread(finish)


class CallbackSink:
    """Hands each chunk to ``on_data``; ``on_discard`` is told to drop what it got.

    ``on_discard`` is awaited both for a restart (server ignored Range) and for a failed
    transfer: either way everything passed to ``on_data`` so far is void. ``on_commit``,
    if given, is awaited with (digest, size) once the bytes are verified.
    """

    def __init__(
        self,
        on_data: Callable[[bytes], Awaitable[None]],
        on_discard: Callable[[], Awaitable[None]],
        on_commit: Callable[[Digest, int], Awaitable[None]] | None = None,
    ) -> None:
        self._on_data = on_data
        self._on_discard = on_discard
        self._on_commit = on_commit

    async def write(self, data: bytes) -> None:
        """Pass ``data`` on."""
        await self._on_data(data)

    async def reset(self) -> None:
        """Tell the callback owner to drop what it got."""
        await self._on_discard()

    async def discard(self) -> None:
        """Tell the callback owner to drop what it got."""
        await self._on_discard()

    async def commit(self, digest: Digest, size: int) -> None:
        """Tell the callback owner the bytes are verified."""
        if self._on_commit is not None:
            await self._on_commit(digest, size)


def refused_resume(response: httpx.Response, offset: int) -> str | None:
    """Why ``response`` refuses a resume from byte ``offset``, or None.

    `layercache.httprange.refused_resume` on the answer's status and ``Content-Range``:
    the one rule for the registry client (`fetch_blob`) and the agent's sources.
    """
    return httprange.refused_resume(response.status_code,
                                    response.headers.get("content-range"), offset)


async def fetch_blob(
    client: RegistryClient,
    reference: Reference,
    digest: Digest,
    size: int | None,
    sink: BlobSink,
    *,
    media_type: str | None = None,
    max_size: int = MAX_LAYER_BYTES,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Download blob ``digest`` of ``reference``'s repository into ``sink``; returns bytes.

    ``size`` is the descriptor's size in bytes (None if unknown: then only the digest and
    the transport's own framing bound the body). ``media_type``, when a layer type, is
    checked for distributability. ``progress`` gets each chunk's byte count (it may see
    bytes that a later restart voids).

    Raises:
        NonDistributableLayerError: a foreign / non-distributable layer media type.
        BlobTooLargeError: ``size`` outside 0..``max_size``, or the server sent more.
        RegistryDigestMismatchError: (a `DigestMismatchError`) the bytes do not hash to
            ``digest`` (the sink discarded them).
        BlobNotFoundError: the registry has no such blob there.
        TransientError: retry budget spent (connection errors, 5xx, 429, short bodies).
        RegistryAuthError, RegistryStatusError: final refusals.

    """
    name = f"{reference.name}@{digest}"
    if media_type is not None:
        kind = layer_type(media_type)
        if kind is not None and not kind.distributable:
            raise NonDistributableLayerError(str(digest), media_type)
    if size is not None and not 0 <= size <= max_size:
        raise BlobTooLargeError(name, "size", f"{size} is outside 0..{max_size} bytes")
    path = f"/v2/{reference.repository}/blobs/{digest}"
    what = f"GET {reference.registry}{path}"
    state = _Download(digest, size, sink, name, progress)
    try:
        async for attempt in client.retry.retrying(what):
            with attempt:
                if state.complete():
                    break
                headers = httprange.resume_headers(state.received)
                async with client.stream("GET", reference, path, headers) as response:
                    await state.accept(client, response, what)
                    await state.consume(response)
                if not state.complete():
                    raise IncompleteBodyError(
                        f"{what}: body ended at byte {state.received} of {size}"
                    )
        try:
            state.verifier.verify()
        except DigestMismatchError as exc:
            raise RegistryDigestMismatchError(exc.expected, exc.actual, exc.size) from None
    except BaseException:
        await sink.discard()
        raise
    await sink.commit(digest, state.received)
    return state.received


class _Download:
    """Progress of one blob download across attempts (offset, hash so far)."""

    def __init__(
        self,
        digest: Digest,
        size: int | None,
        sink: BlobSink,
        name: str,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.digest = digest
        self.size = size
        self.sink = sink
        self.name = name
        self.progress = progress
        self.verifier = DigestVerifier(digest)
        self.received = 0
        self.responded = False  # a body was read at least once (even a zero-byte blob)
        self.finished = False  # the last body ended cleanly

    def complete(self) -> bool:
        if self.size is None:
            return self.finished
        # Known size: the byte count decides, so a body that ends cleanly but short is
        # resumed, and a connection dropped right after the last byte still delivered.
        return self.responded and self.received >= self.size

    async def restart(self) -> None:
        await self.sink.reset()
        self.verifier = DigestVerifier(self.digest)
        self.received = 0

    async def accept(self, client: RegistryClient, response: httpx.Response, what: str) -> None:
        """Check the status against what we asked for; restart from 0 when needed."""
        status = response.status_code
        if self.received and status == 200:
            # Range ignored: this body starts at byte 0. Appending it would corrupt the blob.
            log.info("%s: Range ignored (200), restarting from byte 0", what)
            await self.restart()
            return
        if (refused := refused_resume(response, self.received)) is not None:
            await self.restart()
            raise IncompleteBodyError(f"{what}: {refused}; restarting from byte 0")
        if self.received and status == 206:
            return
        if status != 200:
            await client.raise_for_status(response, what, BlobNotFoundError)
            raise IncompleteBodyError(f"{what}: unexpected HTTP {status} for a blob")

    async def consume(self, response: httpx.Response) -> None:
        self.responded = True
        self.finished = False
        async for chunk in response.aiter_bytes():
            if self.size is not None and self.received + len(chunk) > self.size:
                raise BlobTooLargeError(
                    self.name, "body", f"server sent more than the descriptor's {self.size} bytes"
                )
            self.verifier.update(chunk)
            await self.sink.write(chunk)
            self.received += len(chunk)
            if self.progress is not None:
                self.progress(len(chunk))
        self.finished = True


async def fetch_blob_bytes(
    client: RegistryClient, reference: Reference, digest: Digest, size: int, cap: int
) -> bytes:
    """A small blob (a config) in memory, verified; ``size`` and ``cap`` in bytes.

    Raises:
        as `fetch_blob`, with ``max_size=cap``.

    """
    sink = MemorySink()
    await fetch_blob(client, reference, digest, size, sink, max_size=cap)
    return sink.data
