"""A fault-injecting HTTP reverse proxy for putting in front of the bed's registries.

Faults come from here, not from a fake registry: the proxy relays every request to the
real registry, streaming both bodies, and on request breaks the answer in one of the ways
real registries and networks do (429 + Retry-After, 5xx, a connection reset or a short
body in the middle of a blob, a body that does not match its digest, a slow answer, a
rate-limit window, a redirect, a resume answered from another byte). It also caps the TOTAL
response byte rate of all connections together, like one uplink, and counts the response
body bytes it relays per path. Those counts are the ground truth for "bytes fetched from
upstream" in tests and benchmarks.

Run it with `python -m testbed.faultproxy --listen 127.0.0.1:PORT --upstream URL` (add
`--tls-cert FILE --tls-key FILE` to serve HTTPS, like a TLS registry). Its control API
lives on the same port under `/_proxy/` and is never forwarded:

* `POST /_proxy/faults` — add a rule (a JSON object, or a list of them; see `Fault`);
  `GET /_proxy/faults` — the rules with the number of firings left;
* `PUT /_proxy/rate` — `{"bytes_per_second": N}` or `{"bytes_per_second": null}` (no cap);
* `GET /_proxy/stats` — see `ProxyStats`;
* `POST /_proxy/reset` — drop every rule and zero every counter (the rate cap stays).

`FaultProxy` is the typed client, `fault_proxy()` starts and stops one for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import socket
import ssl
import struct
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import aiohttp
import httpx
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from testbed import procs

FaultKind = Literal["status", "reset", "truncate", "corrupt", "delay", "redirect", "range"]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)
#: Paths whose response bodies count as blob bytes (distribution API: blob fetches).
BLOB_PATH = re.compile(r"^/v2/.+/blobs/sha256:")
#: The control API's path prefix; requests under it are never relayed.
CONTROL_PREFIX = "/_proxy/"
#: RFC 9110 §7.6.1: connection-specific headers a proxy must not forward.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
#: Upstream chunks are written in pieces of at most this many bytes.
CHUNK = 64 * 1024
READY_TIMEOUT = 20.0

log = logging.getLogger("testbed.faultproxy")


@dataclass
class Fault:
    """One fault rule: which requests it matches, what it does, how often.

    Matching: `path_regex` is searched (`re.search`) in the request path (no query);
    `method` (e.g. "GET"), if set, must equal the request method; `ranged`, if set, must
    equal whether the request carries a `Range` header (True: resumes only). Rules are
    tried in the order they were added; the first matching rule with firings left fires
    once per request.

    Kinds:
        status: answer `status` (required, e.g. 429, 500, 503) without asking upstream, with
            `Retry-After: <retry_after>` (seconds) if given and a distribution-style JSON
            error body.
        reset: relay the upstream status and headers, then `after_bytes` body bytes, then
            reset the connection (TCP RST).
        truncate: the same, but close the connection cleanly (FIN) after `after_bytes`
            bytes although Content-Length promised more.
        corrupt: relay the whole body with the same length, but with the byte at offset
            `after_bytes` (default 0) inverted, so it no longer matches its digest.
        delay: wait `delay_seconds` before forwarding the request, then relay normally.
        redirect: answer `status` (default 307) with `Location: <location>` without asking
            upstream; `{path}` in `location` becomes the request path (a blob store's URL,
            e.g. `http://127.0.0.1:PORT{path}?X-Amz-Signature=…`).
        range: forward the request asking upstream for `Range: bytes=<after_bytes>-`
            (default 0) instead of the range it asked for, so the client gets a real `206`
            whose `Content-Range` starts at another byte than it asked for.
    For reset and truncate `after_bytes` defaults to half the upstream Content-Length. A
    body shorter than the cut point is relayed whole (the rule still counts as fired).

    `times` is how many requests the rule fires for (default 1); None means every one.
    `window_seconds`, if set, replaces `times`: the rule fires for every matching request
    from its first firing until that many seconds later, then never again — a registry's
    rate-limit window, which refuses everything until it ends whatever Retry-After said.
    """

    path_regex: str
    kind: FaultKind
    method: str | None = None
    status: int | None = None
    retry_after: int | None = None
    times: int | None = 1
    after_bytes: int | None = None
    delay_seconds: float | None = None
    window_seconds: float | None = None
    location: str | None = None
    ranged: bool | None = None

    def __post_init__(self) -> None:
        re.compile(self.path_regex)  # raises re.error (a ValueError) when malformed
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.kind == "status" and not (self.status and 100 <= self.status <= 599):
            raise ValueError("a status fault needs a status between 100 and 599")
        if self.kind == "delay" and (self.delay_seconds is None or self.delay_seconds < 0):
            raise ValueError("a delay fault needs delay_seconds >= 0")
        if self.kind == "redirect":
            if not self.location:
                raise ValueError("a redirect fault needs a location")
            self.status = self.status or 307
            if not 300 <= self.status <= 399:
                raise ValueError("a redirect fault's status must be 3xx")
        if self.window_seconds is not None and self.window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1, or null for every request")
        if self.after_bytes is not None and self.after_bytes < 0:
            raise ValueError("after_bytes must not be negative")
        if self.method is not None:
            self.method = self.method.upper()

    @classmethod
    def from_json(cls, data: object) -> Fault:
        """Build a rule from its JSON object (the field names above).

        Raises:
            ValueError: not an object, unknown fields, or an invalid rule.

        """
        if not isinstance(data, dict):
            raise ValueError("a fault rule is a JSON object")
        try:
            return cls(**data)
        except TypeError as exc:  # unknown or missing fields
            raise ValueError(str(exc)) from exc

    def matches(self, method: str, path: str, ranged: bool = False) -> bool:
        """Whether the rule has firings left and matches `method`, `path` and `ranged`.

        `ranged`: whether the request carries a `Range` header. A windowed rule always has
        firings left (the proxy's state knows when its window ends).
        """
        return ((self.times is None or self.times > 0 or self.window_seconds is not None)
                and (self.method is None or self.method == method)
                and (self.ranged is None or self.ranged == ranged)
                and re.search(self.path_regex, path) is not None)


@dataclass(frozen=True)
class RequestCount:
    """How many requests for `method path` got `status` (what the client saw)."""

    method: str
    path: str
    status: int
    count: int


@dataclass(frozen=True)
class ProxyStats:
    """The proxy's counters since start or the last reset.

    Byte counts are response body bytes relayed from upstream and written to clients
    (handed to the client's socket), cut-off and corrupted bodies included, headers and
    chunked-encoding framing excluded. Bodies of injected `status` faults are not upstream
    bytes and are not counted; their requests are.

    Attributes:
        bytes_by_path: request path (no query) → bytes.
        requests: one entry per (method, path, status).
        total_bytes: sum of `bytes_by_path`.
        total_requests: sum of `requests` counts (control requests excluded).
        blob_bytes: bytes of 2xx responses for paths matching `BLOB_PATH`
            (`/v2/<name>/blobs/sha256:…`): blob content, not error bodies.
        faults_fired: fault kind → number of requests it was applied to.

    """

    bytes_by_path: dict[str, int]
    requests: list[RequestCount]
    total_bytes: int
    total_requests: int
    blob_bytes: int
    faults_fired: dict[str, int]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProxyStats:
        """Parse the body of `GET /_proxy/stats`."""
        return cls(
            bytes_by_path=dict(data["bytes_by_path"]),
            requests=[RequestCount(**r) for r in data["requests"]],
            total_bytes=data["total_bytes"], total_requests=data["total_requests"],
            blob_bytes=data["blob_bytes"], faults_fired=dict(data["faults_fired"]),
        )

    def count(self, path: str, method: str | None = None, status: int | None = None) -> int:
        """Requests for `path`, optionally only those with `method` and/or `status`."""
        return sum(r.count for r in self.requests
                   if r.path == path and method in (None, r.method) and status in (None, r.status))


class SharedRate:
    """One byte-rate cap shared by every connection, like a single uplink.

    A token bucket: each write reserves the next `n / rate` seconds of the link's time, so
    concurrent responses queue behind each other. The link may catch up on at most
    `CATCH_UP_SECONDS` of time it sat idle, so the time a writer spends between writes
    (event loop, socket drain) is not lost from the rate: a single stream gets the set rate,
    not a fraction of it, and the total never exceeds rate * (elapsed + CATCH_UP_SECONDS).
    `None` means no cap.
    """

    #: Idle link time (s) that may be made up by later writes: the bucket's burst size.
    CATCH_UP_SECONDS = 0.05

    def __init__(self) -> None:
        self.bytes_per_second: int | None = None
        self._link_free_at = 0.0

    def set(self, bytes_per_second: int | None) -> None:
        """Change the cap (bytes per second, > 0) or lift it (None); applies to the next write."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive, or null for no cap")
        self.bytes_per_second = bytes_per_second
        self._link_free_at = 0.0

    def piece_size(self) -> int:
        """Write size that keeps pacing smooth: about 1/20 s of link time, 1 KiB to 64 KiB."""
        if self.bytes_per_second is None:
            return CHUNK
        return max(1024, min(CHUNK, self.bytes_per_second // 20))

    async def take(self, n: int) -> None:
        """Wait until `n` more bytes fit under the cap."""
        if self.bytes_per_second is None:
            return
        now = asyncio.get_running_loop().time()
        start = max(now - self.CATCH_UP_SECONDS, self._link_free_at)
        self._link_free_at = start + n / self.bytes_per_second
        await asyncio.sleep(self._link_free_at - now)


@dataclass
class _State:
    faults: list[Fault] = field(default_factory=list)
    bytes_by_path: Counter[str] = field(default_factory=Counter)
    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    faults_fired: Counter[str] = field(default_factory=Counter)
    blob_bytes: int = 0
    #: Index of a windowed rule in `faults` → loop time its window ends.
    window_ends: dict[int, float] = field(default_factory=dict)

    def take_fault(self, method: str, path: str, ranged: bool) -> Fault | None:
        now = asyncio.get_running_loop().time()
        for index, fault in enumerate(self.faults):
            if fault.matches(method, path, ranged):
                if fault.window_seconds is not None:
                    assert fault.window_seconds is not None
                    if now >= self.window_ends.setdefault(index, now + fault.window_seconds):
                        continue  # its window is over: spent
                elif fault.times is not None:
                    fault.times -= 1
                self.faults_fired[fault.kind] += 1
                return fault
        return None

    def stats(self) -> dict[str, Any]:
        requests = [RequestCount(m, p, s, n) for (m, p, s), n in sorted(self.requests.items())]
        return asdict(ProxyStats(
            bytes_by_path=dict(self.bytes_by_path), requests=requests,
            total_bytes=sum(self.bytes_by_path.values()),
            total_requests=sum(self.requests.values()),
            blob_bytes=self.blob_bytes,
            faults_fired=dict(self.faults_fired),
        ))


class _Proxy:
    """The aiohttp handlers: control API and the relaying catch-all."""

    def __init__(self, upstream: str, upstream_ca: Path | None) -> None:
        self.upstream = URL(upstream)
        self.upstream_base = str(self.upstream.origin())
        self.state = _State()
        self.rate = SharedRate()
        self._ssl = ssl.create_default_context(cafile=upstream_ca) if upstream_ca else True
        self._session: aiohttp.ClientSession | None = None

    async def session_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        # auto_decompress off: bytes are relayed (and counted) exactly as upstream sent them.
        # No timeout: a rate-capped blob may take as long as it takes.
        async with aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as self._session:
            yield

    def app(self) -> web.Application:
        app = web.Application()
        app.cleanup_ctx.append(self.session_ctx)
        app.router.add_post("/_proxy/faults", self.add_faults)
        app.router.add_get("/_proxy/faults", self.list_faults)
        app.router.add_put("/_proxy/rate", self.set_rate)
        app.router.add_get("/_proxy/stats", self.get_stats)
        app.router.add_post("/_proxy/reset", self.reset)
        # Anything else under /_proxy/ is ours too: never forwarded.
        app.router.add_route("*", CONTROL_PREFIX + "{tail:.*}", self.control_not_found)
        app.router.add_route("*", "/{tail:.*}", self.relay)
        return app

    # --- control API --------------------------------------------------------------------

    async def add_faults(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            items = body if isinstance(body, list) else [body]
            new = [Fault.from_json(item) for item in items]
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"invalid fault rule: {exc}\n") from exc
        self.state.faults.extend(new)
        log.info("faults added: %s", new)
        return web.json_response([asdict(f) for f in self.state.faults], status=201)

    async def list_faults(self, _request: web.Request) -> web.Response:
        return web.json_response([asdict(f) for f in self.state.faults])

    async def set_rate(self, request: web.Request) -> web.Response:
        try:
            self.rate.set((await request.json())["bytes_per_second"])
        except (ValueError, KeyError, TypeError) as exc:
            raise web.HTTPBadRequest(
                text=f"expected {{'bytes_per_second': N|null}}: {exc}\n") from exc
        log.info("rate cap: %s bytes/s", self.rate.bytes_per_second)
        return web.json_response({"bytes_per_second": self.rate.bytes_per_second})

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.state.stats())

    async def reset(self, _request: web.Request) -> web.Response:
        self.state = _State()
        return web.json_response({})

    async def control_not_found(self, request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text=f"no control endpoint {request.method} {request.path}\n")

    # --- relaying -----------------------------------------------------------------------

    async def relay(self, request: web.Request) -> web.StreamResponse:
        fault = self.state.take_fault(request.method, request.path, "Range" in request.headers)
        status = 502
        try:
            if fault is not None and fault.kind in ("status", "redirect"):
                assert fault.status is not None
                status = fault.status
                return self._injected(fault, request.path)
            if fault is not None and fault.kind == "delay":
                await asyncio.sleep(fault.delay_seconds or 0)
            response, status = await self._forward(request, fault)
            return response
        finally:
            # Counted in the current state, like the bytes: a reset mid-request starts afresh.
            self.state.requests[(request.method, request.path, status)] += 1

    def _injected(self, fault: Fault, path: str) -> web.Response:
        assert fault.status is not None
        if fault.kind == "redirect":
            assert fault.location is not None
            return web.Response(status=fault.status,
                                headers={"Location": fault.location.replace("{path}", path)})
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        code = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}.get(fault.status, "UNKNOWN")
        return web.json_response(
            {"errors": [{"code": code, "message": "injected by testbed.faultproxy "
                          f"(rule {fault.path_regex!r})"}]},
            status=fault.status, headers=headers)

    async def _forward(self, request: web.Request,
                       fault: Fault | None) -> tuple[web.StreamResponse, int]:
        """Relay `request` upstream and stream the answer back, applying a body `fault`.

        Returns the response and the status the client saw (502 if upstream was unreachable).
        """
        assert self._session is not None
        # encoded=True: relay the path and query byte for byte (upload state tokens, digests).
        url = URL(self.upstream_base + request.raw_path, encoded=True)
        headers = _request_headers(request.headers)
        if fault is not None and fault.kind == "range":
            headers["Range"] = f"bytes={fault.after_bytes or 0}-"
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False, ssl=self._ssl)
        except aiohttp.ClientError as exc:
            log.warning("upstream %s %s failed: %s", request.method, url, exc)
            return web.json_response({"errors": [{"code": "UNKNOWN", "message": str(exc)}]},
                                     status=502), 502
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(self._response_headers(upstream.headers, request))
            length = upstream.headers.get("Content-Length")
            if length is not None:
                response.content_length = int(length)
            await response.prepare(request)
            cut_at = None
            if fault is not None and fault.kind in ("reset", "truncate"):
                cut_at = fault.after_bytes if fault.after_bytes is not None else (
                    int(length) // 2 if length is not None else 0)
            flip_at = (fault.after_bytes or 0) if fault is not None and fault.kind == "corrupt" \
                else None
            sent = 0
            blob = 200 <= upstream.status < 300 and BLOB_PATH.match(request.path) is not None
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    if flip_at is not None and sent <= flip_at < sent + len(chunk):
                        mutable = bytearray(chunk)
                        mutable[flip_at - sent] ^= 0xFF
                        chunk = bytes(mutable)
                    if cut_at is not None and sent + len(chunk) >= cut_at:
                        sent += await self._write(response, chunk[:cut_at - sent], request.path,
                                                  blob=blob)
                        assert fault is not None
                        await _cut(request, reset=fault.kind == "reset")
                        return response, upstream.status
                    sent += await self._write(response, chunk, request.path, blob=blob)
                await response.write_eof()
            except ConnectionError:
                # The client went away (or we reset it): what was written is counted, and
                # aiohttp ignores a ConnectionError while finishing the response.
                log.info("client left %s %s after %d body bytes", request.method, request.path,
                         sent)
            except aiohttp.ClientPayloadError as exc:
                # Upstream broke off mid-body: pass the break on, so the client sees a short body.
                log.warning("upstream body of %s %s broke after %d bytes: %s", request.method,
                            request.path, sent, exc)
                await _cut(request, reset=False)
            return response, upstream.status

    async def _write(self, response: web.StreamResponse, data: bytes, path: str, *,
                     blob: bool) -> int:
        """Write `data` in rate-capped pieces, counting each piece once it is written."""
        written = 0
        while written < len(data):
            piece = data[written:written + self.rate.piece_size()]
            await self.rate.take(len(piece))
            await response.write(piece)
            written += len(piece)
            # Count against the current state: a reset mid-body starts the new counters.
            self.state.bytes_by_path[path] += len(piece)
            if blob:
                self.state.blob_bytes += len(piece)
        return written

    def _response_headers(self, headers: CIMultiDictProxy[str],
                          request: web.Request) -> CIMultiDict[str]:
        # Content-Length is set from upstream's on the response itself (see _forward).
        drop = HOP_BY_HOP | {"content-length"} | _connection_tokens(headers)
        out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)
        # Upload sessions and redirects name the upstream: send the client back to us.
        if (location := out.get("Location")) and location.startswith(self.upstream_base):
            out["Location"] = f"{request.scheme}://{request.host}" + location[
                len(self.upstream_base):]
        return out


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names listed in Connection, which are hop-by-hop too (RFC 9110 §7.6.1)."""
    return {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}


def _request_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    # Host is dropped so the upstream sees its own name (and builds Locations we rewrite).
    drop = HOP_BY_HOP | {"host"} | _connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


async def _cut(request: web.Request, *, reset: bool) -> None:
    """End the client's connection mid-body: TCP RST if `reset`, else a clean close (FIN).

    Either way the body bytes already written reach the client first; then the response
    can neither finish (aiohttp ignores the ConnectionError it meets) nor be reused.
    """
    transport = request.transport
    if transport is None:
        return
    # abort() drops unsent data, so wait until the kernel has taken every byte written
    # (bounded: a client that stops reading would keep the buffer full for ever).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            # asyncio has no "write buffer empty" event to await, so poll.
            while transport.get_write_buffer_size() > 0 and not transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    if not reset:
        transport.close()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER on with a zero timeout: closing sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `--listen HOST:PORT --upstream URL [--upstream-ca FILE]`; until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m testbed.faultproxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve plain HTTP on")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("--upstream-ca", type=Path, help="CA file to verify an HTTPS upstream")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate")
    parser.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    host, _, port = args.listen.rpartition(":")
    context = None
    if args.tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    web.run_app(_Proxy(args.upstream, args.upstream_ca).app(), host=host, port=int(port),
                print=None, ssl_context=context)


# --- Client and lifecycle for tests ----------------------------------------------------


class FaultProxy:
    """Typed synchronous client of a running proxy (and its process, when we started it).

    `url` is the proxy's base URL (`http://127.0.0.1:PORT`, or `https://` with `ca_file`
    to verify it), `host` the `127.0.0.1:PORT` for image references. Methods raise
    `httpx.HTTPStatusError` when the proxy refuses a request (e.g. an invalid rule: 400).
    """

    def __init__(self, url: str, process: procs.Process | None = None,
                 ca_file: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.host = URL(self.url).raw_authority
        self.process = process
        verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(ca_file))
                                         if ca_file is not None else True)
        self._http = httpx.Client(base_url=self.url, timeout=10, verify=verify)

    def add_fault(self, path_regex: str, kind: FaultKind, *, method: str | None = None,
                  status: int | None = None, retry_after: int | None = None,
                  times: int | None = 1, after_bytes: int | None = None,
                  delay_seconds: float | None = None, window_seconds: float | None = None,
                  location: str | None = None, ranged: bool | None = None) -> Fault:
        """Add a rule (see `Fault` for the meaning of each field) and return it.

        Raises:
            ValueError: the rule is invalid (checked here before it is sent).

        """
        fault = Fault(path_regex, kind, method, status, retry_after, times, after_bytes,
                      delay_seconds, window_seconds, location, ranged)
        self._http.post("/_proxy/faults", json=asdict(fault)).raise_for_status()
        return fault

    def set_rate(self, bytes_per_second: int | None) -> None:
        """Cap the total response rate of all connections (bytes/s), or lift it with None."""
        self._http.put("/_proxy/rate",
                       json={"bytes_per_second": bytes_per_second}).raise_for_status()

    def stats(self) -> ProxyStats:
        """The counters since start or the last `reset`."""
        reply = self._http.get("/_proxy/stats")
        reply.raise_for_status()
        return ProxyStats.from_json(reply.json())

    def reset(self) -> None:
        """Drop all rules and zero all counters; the rate cap is left as it is."""
        self._http.post("/_proxy/reset").raise_for_status()

    def close(self) -> None:
        """Close the client's connections (the proxy keeps running)."""
        self._http.close()

    def stop(self) -> None:
        """Close the client and stop the proxy process if this client started it."""
        self.close()
        if self.process is not None:
            self.process.stop()


def start_fault_proxy(workdir: Path, upstream_url: str, *, upstream_ca: Path | None = None,
                      tls: tuple[Path, Path, Path] | None = None,
                      ready_timeout: float = READY_TIMEOUT,
                      address: str = "127.0.0.1") -> FaultProxy:
    """Start a proxy in front of `upstream_url` on a free port of `address`; wait until it answers.

    `tls` = (certificate, key, CA file): serve HTTPS with that certificate (its SAN must
    hold 127.0.0.1) and verify it with the CA. Its log is `workdir/faultproxy-PORT.log`
    and its working directory `workdir`.

    Raises:
        procs.ComponentError: it exited or did not answer in `ready_timeout` seconds (it is
            stopped first).

    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    argv: list[str | Path] = [sys.executable, "-m", "testbed.faultproxy",
                              "--listen", f"{address}:{port}", "--upstream", upstream_url]
    if upstream_ca is not None:
        argv += ["--upstream-ca", upstream_ca]
    if tls is not None:
        argv += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    process = procs.Process(f"faultproxy-{port}", argv, log=workdir / f"faultproxy-{port}.log",
                            cwd=workdir).start()
    scheme = "https" if tls is not None else "http"
    proxy = FaultProxy(f"{scheme}://{address}:{port}", process,
                       ca_file=tls[2] if tls is not None else None)
    try:
        process.wait_ready(lambda: proxy.stats() is not None, ready_timeout)
    except BaseException:
        proxy.stop()
        raise
    return proxy


@contextlib.contextmanager
def fault_proxy(workdir: Path, upstream_url: str, *, upstream_ca: Path | None = None,
                tls: tuple[Path, Path, Path] | None = None) -> Iterator[FaultProxy]:
    """Run a proxy in front of `upstream_url` for the duration of the block, then stop it.

    `tls` as for `start_fault_proxy`.
    """
    proxy = start_fault_proxy(workdir, upstream_url, upstream_ca=upstream_ca, tls=tls)
    try:
        yield proxy
    finally:
        proxy.stop()


if __name__ == "__main__":
    main()
