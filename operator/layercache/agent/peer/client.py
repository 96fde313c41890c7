"""Other agents as blob sources: where they listen, whether they hold a blob, its bytes.

Each agent publishes ``status.peerEndpoint`` (``http://IP:PORT``) on its own
NodeLayerCache; `PeerDirectory` maps a node name to that endpoint by reading the node's
NodeLayerCache (by name, cached for a while). `PeerClient` speaks the peer protocol of
`layercache.agent.peer.server`: ``HEAD``/``GET /v1/blobs/{digest}`` with ``Authorization:
Bearer <peer token>`` and ``Range`` for resumes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any, Final

import httpx
from kubernetes.client.exceptions import ApiException

from layercache import __version__, httprange
from layercache.agent.fetch.transfer import ByteRate, OnBytes, metered, resume_refusal, skip
from layercache.agent.ports import AgentKubePort
from layercache.api import NLC_KIND, InvalidObjectError, NodeLayerCacheStatus
from layercache.containerd.ingest import ResumableSource
from layercache.oci.digest import Digest
from layercache.registry.transport import BlobTransport

__all__ = ["PeerClient", "PeerDirectory", "PeerError", "PeerUnauthorizedError", "blob_url"]

log = logging.getLogger(__name__)

#: Seconds a known endpoint is trusted before the peer's NodeLayerCache is read again.
ENDPOINT_TTL: Final = 30.0
#: Seconds a node found without an endpoint is not looked up again (fetches share a read).
MISSING_TTL: Final = 1.0


class PeerError(Exception):
    """A peer could not serve a blob (unreachable, refused, cut short); try another source."""


class PeerUnauthorizedError(PeerError):
    """A peer refused our peer token (401): the agents' tokens differ."""


class PeerCutError(PeerError):
    """A peer stopped sending mid-body: it died, or its own transfer of a relayed blob failed.

    Either way it holds no whole copy to ask for again soon (a node whose transfer failed
    retries it on its own schedule), so the caller goes to the registry
    (`layercache.agent.fetch.fetcher` says why not to another relaying peer).
    """


def blob_url(endpoint: str, digest: Digest) -> str:
    """The peer URL of blob ``digest`` at ``endpoint`` (``http://IP:PORT``)."""
    return f"{endpoint.rstrip('/')}/v1/blobs/{digest}"


class PeerDirectory:
    """Node name → peer endpoint, from each node's ``status.peerEndpoint``.

    A node without an endpoint (no NodeLayerCache, no agent yet) is asked again on a lookup
    `MISSING_TTL` seconds later (every fetch waiting on it shares that one read); a known
    endpoint is reused for `ENDPOINT_TTL` seconds.
    """

    def __init__(self, kube: AgentKubePort, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.clock = clock
        self._known: dict[str, tuple[str, float]] = {}
        self._missing: dict[str, float] = {}  # node → when it was found without one
        self._locks: dict[str, asyncio.Lock] = {}

    async def endpoint(self, node: str) -> str | None:
        """The endpoint of ``node``'s agent, or None when it has published none (yet)."""
        known = self._known.get(node)
        if known is not None and self.clock() - known[1] < ENDPOINT_TTL:
            return known[0]
        async with self._locks.setdefault(node, asyncio.Lock()):
            known = self._known.get(node)
            if known is not None and self.clock() - known[1] < ENDPOINT_TTL:
                return known[0]
            missing = self._missing.get(node)
            if known is None and missing is not None and self.clock() - missing < MISSING_TTL:
                return None
            try:
                obj = await self.kube.get_cache(node)
            except ApiException as error:
                log.warning("cannot read NodeLayerCache %s for its endpoint: HTTP %s",
                            node, error.status)
                return known[0] if known else None
            endpoint = _peer_endpoint(node, obj)
            if endpoint is None or not endpoint.startswith(("http://", "https://")):
                self._known.pop(node, None)
                self._missing[node] = self.clock()
                return None
            self._missing.pop(node, None)
            self._known[node] = (endpoint, self.clock())
            return endpoint

    def forget(self, node: str) -> None:
        """Drop the cached endpoint of ``node`` (it stopped answering)."""
        self._known.pop(node, None)


class PeerClient:
    """Asks peers for blobs; ``token`` gives the current peer token (None: none loaded).

    ``timeout`` bounds connecting and each read (seconds).
    """

    def __init__(self, token: Callable[[], str | None], timeout: float = 30.0) -> None:
        self.token = token
        self.timeout = timeout
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=5.0),
            headers={"User-Agent": f"layercache-agent/{__version__}",
                     "Accept-Encoding": "identity"},
            transport=BlobTransport())

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    def _headers(self, offset: int = 0) -> dict[str, str]:
        token = self.token()
        if token is None:
            raise PeerUnauthorizedError("no peer token loaded: cannot ask peers")
        return {"Authorization": f"Bearer {token}", **httprange.resume_headers(offset)}

    async def has(self, endpoint: str, digest: Digest, wait: float = 0.0) -> bool:
        """Whether the peer at ``endpoint`` holds blob ``digest`` (``HEAD``: 200 or 404).

        ``wait`` > 0: a long-poll (``?wait=``): the peer answers as soon as it holds or
        receives the blob, else after up to ``wait`` seconds (an older agent at once).

        Raises:
            PeerUnauthorizedError: the peer refused our token (or we have none).
            PeerError: the peer is unreachable or answered something else.

        """
        url = blob_url(endpoint, digest)
        try:
            response = await self.http.head(
                url, headers=self._headers(), params={"wait": f"{wait:g}"} if wait else None,
                timeout=httpx.Timeout(self.timeout + wait, connect=5.0))
        except httpx.HTTPError as error:
            raise PeerError(f"HEAD {url}: {error.__class__.__name__}") from None
        if response.status_code == 401:
            raise PeerUnauthorizedError(f"HEAD {url}: peer refused our token (401)")
        if response.status_code in (200, 404):
            return response.status_code == 200
        raise PeerError(f"HEAD {url}: HTTP {response.status_code}")

    def source(self, endpoint: str, digest: Digest, size: int, rate: ByteRate,
               on_bytes: OnBytes) -> ResumableSource:
        """A resumable source of blob ``digest`` (``size`` bytes) from the peer at ``endpoint``.

        Raises (from the iteration):
            ResumeRefusedError: a resume answered with other bytes (206 elsewhere, 416).
            PeerUnauthorizedError, PeerError: the peer cannot serve it (any other failure,
                including a body cut short).
            (Wrong bytes are refused by containerd at COMMIT: `layercache.agent.fetch.transfer`.)

        """
        url = blob_url(endpoint, digest)

        async def from_offset(offset: int) -> AsyncIterator[bytes]:
            if offset >= size:  # the ingest is complete: nothing left to send
                return
            request = self.http.build_request("GET", url, headers=self._headers(offset))
            try:
                response = await self.http.send(request, stream=True)
            except httpx.HTTPError as error:
                raise PeerError(f"GET {url}: {error.__class__.__name__}") from None
            try:
                chunks = self._body(url, response, offset)
                async for chunk in metered(chunks, rate=rate, on_bytes=on_bytes):
                    yield chunk
            finally:
                await response.aclose()

        return from_offset

    async def _body(self, url: str, response: httpx.Response,
                    offset: int) -> AsyncIterator[bytes]:
        status = response.status_code
        if status == 401:
            raise PeerUnauthorizedError(f"GET {url}: peer refused our token (401)")
        if (refused := resume_refusal(f"GET {url}", response, offset)) is not None:
            raise refused
        if status not in (200, 206):
            raise PeerError(f"GET {url}: HTTP {status}")
        chunks: AsyncIterable[bytes] = response.aiter_bytes()
        if offset and status == 200:
            chunks = skip(chunks, offset)
        try:
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as error:
            raise PeerCutError(f"GET {url}: {error.__class__.__name__} mid-body") from None


def _peer_endpoint(node: str, obj: Mapping[str, Any] | None) -> str | None:
    """``status.peerEndpoint`` of NodeLayerCache ``obj``; None when absent or unreadable."""
    try:
        status = NodeLayerCacheStatus.from_dict((obj or {}).get("status"), NLC_KIND, node,
                                                "status")
    except InvalidObjectError as error:
        log.warning("%s; no peer endpoint", error)
        return None
    return status.peer_endpoint
