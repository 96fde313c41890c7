"""In-memory twins of where the agent's bytes come from: a registry and peer agents.

- `RegistryTwin` is an ``httpx`` transport (`httpx.MockTransport`) answering the OCI
  distribution-spec blob ``GET`` (with ``Range: bytes=N-`` → 206) from a dict, so the real
  `layercache.registry.client.RegistryClient` and the real fetcher run on it. A blob can be
  held back (`hold`) until released, to observe transfers in flight.
- `PeersTwin` is a `layercache.agent.ports.PeerSource` over other nodes' content-store
  twins, by endpoint: ``has`` long-polls until the peer commits the blob or ``wait`` ends,
  as the peer server does; ``source`` streams the committed blob from an offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from layercache.agent.fetch.transfer import ByteRate, OnBytes, metered
from layercache.agent.peer.client import PeerError
from layercache.containerd.ingest import ResumableSource
from layercache.oci.digest import Digest
from twins.content_store import ContentStoreTwin

__all__ = ["PeersTwin", "RegistryTwin"]

_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass
class RegistryTwin:
    """Blobs by digest behind ``/v2/<name>/blobs/<digest>``; `transport` for the client.

    ``requests`` records (digest, first byte asked) per GET; ``sent`` counts body bytes;
    ``in_flight`` the GETs waiting on `hold`; ``status`` answers a digest with that HTTP
    status (and ``headers``) instead of its bytes.
    """

    blobs: dict[Digest, bytes] = field(default_factory=dict)
    requests: list[tuple[Digest, int]] = field(default_factory=list)
    sent: int = 0
    in_flight: set[Digest] = field(default_factory=set)
    status: dict[Digest, tuple[int, dict[str, str]]] = field(default_factory=dict)
    _held: dict[Digest, asyncio.Event] = field(default_factory=dict)

    def add(self, data: bytes) -> Digest:
        """Serve ``data``; its digest."""
        digest = Digest.from_bytes(data)
        self.blobs[digest] = data
        return digest

    def hold(self, digest: Digest) -> None:
        """Answer GETs of ``digest`` only after `release`."""
        self._held[digest] = asyncio.Event()

    def release(self, digest: Digest) -> None:
        """Let the held GETs of ``digest`` (and later ones) be answered."""
        self._held.pop(digest).set()

    @property
    def transport(self) -> httpx.MockTransport:
        """The transport to give `RegistryClient`."""
        return httpx.MockTransport(self._handle)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        match = _BLOB_PATH.match(request.url.path)
        if request.method != "GET" or match is None:
            return httpx.Response(404, json={"errors": [{"code": "NAME_UNKNOWN"}]})
        digest = Digest(match["digest"])
        ranged = request.headers.get("Range", "")
        offset = int(ranged.removeprefix("bytes=").rstrip("-")) if ranged else 0
        self.requests.append((digest, offset))
        held = self._held.get(digest)
        if held is not None:
            self.in_flight.add(digest)
            try:
                await held.wait()
            finally:
                self.in_flight.discard(digest)
        if digest in self.status:
            code, headers = self.status[digest]
            return httpx.Response(code, headers=headers, json={"errors": [{"code": "DENIED"}]})
        data = self.blobs.get(digest)
        if data is None:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        body = data[offset:]
        self.sent += len(body)
        if offset:
            return httpx.Response(206, content=body, headers={
                "Content-Range": f"bytes {offset}-{len(data) - 1}/{len(data)}"})
        return httpx.Response(200, content=body)


class PeersTwin:
    """Peer agents by endpoint, each serving its node's `ContentStoreTwin`.

    ``gets`` records (endpoint, digest, offset) per blob read.
    """

    def __init__(self, stores: dict[str, ContentStoreTwin] | None = None) -> None:
        self.stores = dict(stores or {})
        self.gets: list[tuple[str, Digest, int]] = []

    def _store(self, endpoint: str) -> ContentStoreTwin:
        store = self.stores.get(endpoint)
        if store is None:
            raise PeerError(f"{endpoint}: connection refused")
        return store

    async def has(self, endpoint: str, digest: Digest, wait: float = 0.0) -> bool:
        """Whether the peer holds ``digest``, waiting up to ``wait`` s for it to commit it."""
        store = self._store(endpoint)
        if digest in store.blobs or wait <= 0:
            return digest in store.blobs
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait), store.committed:
                await store.committed.wait_for(lambda: digest in store.blobs)
        return digest in store.blobs

    def source(self, endpoint: str, digest: Digest, size: int, rate: ByteRate,
               on_bytes: OnBytes) -> ResumableSource:
        """A resumable source of the peer's committed blob ``digest``."""
        async def from_offset(offset: int) -> AsyncIterator[bytes]:
            store = self._store(endpoint)
            if digest not in store.blobs:
                raise PeerError(f"{endpoint}: {digest} not held")
            self.gets.append((endpoint, digest, offset))
            async for chunk in metered(store.read(digest, offset), rate=rate,
                                       on_bytes=on_bytes):
                yield chunk

        return from_offset

    async def aclose(self) -> None:
        """Nothing to close."""
