"""The agent's HTTP servers: blobs for peer agents, liveness, and metrics on its own port.

Peer protocol (read-only, by digest, agents only):

- ``HEAD /v1/blobs/{digest}`` → 200 with ``Content-Length`` when this node holds the blob
  (or receives it: below), 404 when it does not; with ``?wait=<seconds>`` (at most
  `MAX_WAIT`) a blob not here yet is waited for that long first, answered as soon as it
  becomes available (a long-poll: waiting nodes learn of a layer when its first bytes
  arrive here, instead of polling);
- ``GET /v1/blobs/{digest}`` → the blob, read from containerd's content store
  (``Content.Read``); a single ``Range`` (RFC 9110 §14: ``bytes=a-b``, ``bytes=a-``,
  ``bytes=-n``) gives 206 with ``Content-Range``, an unsatisfiable one 416; several ranges
  are ignored (a full 200, which RFC 9110 allows);
- every blob request needs ``Authorization: Bearer <peer token>``, compared in constant
  time; 401 otherwise (also while no token is loaded);
- only blobs this agent pinned (our managed-by label) are served, so a layer the kubelet
  pulled from a private registry is never handed out; any other is 404;
- cut-through: a blob this agent is still receiving (from upstream or a peer) is served
  from its relay (`layercache.agent.peer.relay`): the bytes received so far at once, then
  the rest as it arrives; if this agent's transfer fails the connection is closed
  mid-body, and the peer resumes elsewhere.

``GET /healthz`` answers 200 while the event loop runs and containerd answers; 503 once
containerd has not answered for `ContainerdLiveness.max_down_seconds` (a socket recreated by a
containerd restart is unreachable through a stale mount, and only a new Pod recovers). Metrics
are served by `metrics_app` on a separate listener, so scraping never competes with, or
exposes, the peer port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from layercache import httprange
from layercache.agent.peer.relay import Relay, RelayFailedError, Relays
from layercache.containerd.errors import ContainerdError
from layercache.containerd.ports import ContentStorePort
from layercache.oci.digest import Digest, InvalidDigestError

__all__ = ["ContainerdLiveness", "PeerServer", "metrics_app", "start_site"]

log = logging.getLogger(__name__)

#: Longest long-poll a ``HEAD ?wait=`` may ask for (seconds).
MAX_WAIT: Final = 30.0


class ContainerdLiveness:
    """Whether containerd has answered recently: the agent's liveness beyond its event loop.

    ``probe`` is a cheap containerd call (any error or a timeout of ``timeout_seconds`` is a
    failure); `check` runs it, and the agent is unhealthy once no probe has succeeded for
    more than ``max_down_seconds`` (a restart of containerd alone is a few seconds, so a
    longer outage means the agent is stuck: the kubelet's liveness probe restarts it).
    ``clock`` gives monotonic seconds. The clock starts at construction, so a fresh agent
    has ``max_down_seconds`` to reach containerd.
    """

    def __init__(self, probe: Callable[[], Awaitable[object]], *,
                 max_down_seconds: float = 60.0, timeout_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.probe = probe
        self.max_down_seconds = max_down_seconds
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self.last_ok = clock()
        self.last_error: str | None = None

    async def check(self) -> None:
        """Run the probe once and record the outcome. Never raises."""
        try:
            await asyncio.wait_for(self.probe(), self.timeout_seconds)
        except Exception as error:  # any failure counts; the reason is kept for /healthz
            self.last_error = str(error) or type(error).__name__
            log.warning("containerd did not answer the liveness probe: %s", self.last_error)
            return
        self.last_ok = self.clock()
        self.last_error = None

    def down_seconds(self) -> float:
        """Seconds since containerd last answered (0 when the last probe succeeded)."""
        return 0.0 if self.last_error is None else self.clock() - self.last_ok

    def healthy(self) -> bool:
        """False once containerd has not answered for more than ``max_down_seconds``."""
        return self.clock() - self.last_ok <= self.max_down_seconds


class PeerServer:
    """Serves this node's pinned blobs from ``store`` to agents holding the peer token.

    ``token`` gives the current token (None: none loaded, every request is refused);
    ``on_served`` is called with each chunk's byte count as it is sent; ``liveness`` (None:
    the event loop alone) makes ``/healthz`` fail while containerd is unreachable;
    ``relays`` (None: none) are the blobs being received, served cut-through.
    """

    def __init__(self, store: ContentStorePort, token: Callable[[], str | None],
                 on_served: Callable[[int], None],
                 liveness: ContainerdLiveness | None = None,
                 relays: Relays | None = None) -> None:
        self.store = store
        self.token = token
        self.on_served = on_served
        self.liveness = liveness
        self.relays = relays

    def app(self) -> web.Application:
        """The aiohttp application: blob routes and ``/healthz``."""
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        # add_get registers HEAD too; the handler tells them apart.
        app.router.add_get("/v1/blobs/{digest}", self.blob)
        return app

    async def healthz(self, _request: web.Request) -> web.Response:
        """Liveness: 200 while the process serves requests and containerd answers, else 503."""
        liveness = self.liveness
        if liveness is not None and not liveness.healthy():
            return web.Response(status=503, text=(
                f"containerd unreachable for {liveness.down_seconds():.0f} s: "
                f"{liveness.last_error}\n"))
        return web.Response(text="ok\n")

    def _authorized(self, request: web.Request) -> bool:
        token = self.token()
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), token.encode())

    async def blob(self, request: web.Request) -> web.StreamResponse:
        """``HEAD``/``GET /v1/blobs/{digest}`` (see the module docstring)."""
        if not self._authorized(request):
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"},
                                text="peer token required\n")
        try:
            digest = Digest(request.match_info["digest"])
        except InvalidDigestError:
            return web.Response(status=400, text="not a digest\n")
        try:
            size, relay = await self._find(digest)
            wait = _wait_seconds(request)
            if size is None and wait and self.relays is not None:
                await self.relays.wait_available(digest, wait)
                size, relay = await self._find(digest)
        except ContainerdError as error:
            log.warning("cannot look up %s for a peer: %s", digest.short, error)
            return web.Response(status=503, text="containerd unavailable\n")
        if request.transport is None or request.transport.is_closing():
            # The asker left during its long-poll (it found the blob elsewhere): answer
            # nothing. Writing the headers would fail, and aiohttp would log each such
            # ordinary end as an error with its traceback.
            return web.Response(status=499)
        if size is None:
            return web.Response(status=404, text="not held\n")
        headers = {"Accept-Ranges": "bytes", "Docker-Content-Digest": str(digest),
                   "Content-Type": "application/octet-stream"}
        try:
            wanted = httprange.parse_range(request.headers.get("Range"), size)
        except httprange.RangeNotSatisfiableError:
            return web.Response(status=416,
                                headers={"Content-Range": httprange.unsatisfied_range(size)})
        start, end = wanted if wanted is not None else (0, size - 1)
        response = web.StreamResponse(status=206 if wanted is not None else 200,
                                      headers=headers)
        if wanted is not None:
            response.headers["Content-Range"] = httprange.content_range(start, end, size)
        response.content_length = end - start + 1
        await response.prepare(request)
        if request.method == "HEAD" or end < start:
            return response
        if relay is not None:
            await self._relay(request, response, relay, start, end + 1)
        else:
            await self._send(response, digest, start, end - start + 1)
        return response

    async def _find(self, digest: Digest) -> tuple[int | None, Relay | None]:
        """(size, relay) of ``digest`` here: committed (no relay), being received, or neither.

        The relay is looked up first: a blob committed between the two lookups is then
        still found by the second.
        """
        relay = self.relays.get(digest) if self.relays is not None else None
        info = await self.store.info(digest)
        if info is not None and info.managed:
            return info.size, None
        if relay is not None:
            return relay.size, relay
        return None, None

    async def _relay(self, request: web.Request, response: web.StreamResponse, relay: Relay,
                     start: int, end: int) -> None:
        """Send bytes ``start`` to ``end`` (excluded) of a blob as this node receives them."""
        try:
            async for view in relay.read(start, end):
                await response.write(view)
                self.on_served(len(view))
            await response.write_eof()
        except (ConnectionError, RelayFailedError) as error:
            # A short body tells the peer to resume elsewhere; closing the connection makes
            # sure it is not mistaken for the end of a keep-alive response.
            log.info("relaying %s to a peer stopped: %s", relay.digest.short, error)
            if request.transport is not None:
                request.transport.close()

    async def _send(self, response: web.StreamResponse, digest: Digest, start: int,
                    length: int) -> None:
        chunks = self.store.read(digest, offset=start, size=length)
        try:
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]  # an async generator
                async for chunk in chunks:
                    await response.write(chunk)
                    self.on_served(len(chunk))
            await response.write_eof()
        except (ConnectionError, ContainerdError) as error:
            # The peer went away, or containerd failed mid-blob: the peer sees a short body
            # and resumes elsewhere; nothing to answer any more.
            log.info("serving %s to a peer stopped: %s", digest.short, error)


def _wait_seconds(request: web.Request) -> float:
    """The long-poll a ``HEAD ?wait=<seconds>`` asks for, within 0 .. `MAX_WAIT` (0: none)."""
    if request.method != "HEAD":
        return 0.0
    try:
        return max(0.0, min(float(request.query.get("wait", "0")), MAX_WAIT))
    except ValueError:
        return 0.0


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """An aiohttp application serving ``registry`` at ``GET /metrics`` (text format)."""

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; returns the runner to `cleanup` at shutdown.

    Raises:
        OSError: the address is taken or cannot be bound.

    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
