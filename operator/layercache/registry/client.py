"""Async OCI distribution client: connections, auth, retries, redirects, manifests.

Follows the OCI distribution-spec (``spec.md``: ``GET /v2/``, ``HEAD``/``GET
/v2/<name>/manifests/<reference>``, ``GET /v2/<name>/blobs/<digest>``) and the distribution
token spec. One `RegistryClient` serves every registry of a process:

- one ``httpx.AsyncClient`` (connection pool) per trust profile — httpx's default roots,
  plus a registry's own CA file when it has one — shared by all requests;
- per registry host, one `HostState` (`layercache.registry.hosts`), shared with every other
  client given the same `RegistryHosts`: it bounds concurrent requests (``max_concurrency``),
  holds every request back while the host rate-limits us (429 ``Retry-After``), counts
  requests by status code, and remembers whether ``HEAD`` on manifests works there;
- TLS verification is always on for ``https``; a registry marked ``insecure`` is spoken to
  in plain HTTP instead (that is what "insecure registry" means to containerd too);
- redirects (blob storage back ends) are followed by hand, dropping ``Authorization`` when
  the origin changes, so registry credentials never reach a storage host, and refusing a
  redirect from ``https`` to ``http`` (a downgrade would expose the bytes and the signed URL);
- no URL query string is ever logged: pre-signed storage URLs carry their credentials there,
  so httpx's own request log lines are redacted (`layercache.redact.RedactingFilter`);
- each logical request runs in one retry loop (`RetryPolicy`); a 401 gets one token
  refresh inside the attempt, which is not a retry.

Manifests are fetched by `layercache.registry.fetch`, blobs streamed by
`layercache.registry.blobs`; both use `stream` and `raise_for_status` from here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Final

import httpx

from layercache import __version__
from layercache.oci.reference import Reference
from layercache.redact import RedactingFilter
from layercache.registry.auth import Authenticator, repository_scope
from layercache.registry.credentials import Keyring
from layercache.registry.errors import (
    BlobTooLargeError,
    RateLimitedError,
    RegistryConfigError,
    RegistryConnectionError,
    RegistryStatusError,
    ServerError,
)
from layercache.registry.hosts import HostState, RegistryHosts
from layercache.registry.retry import RetryPolicy, parse_retry_after
from layercache.registry.transport import BlobTransport
from layercache.registryconfig import RegistryOptions, registry_options

__all__ = ["RegistryClient", "RegistryOptions", "describe", "read_capped", "registry_options"]

log = logging.getLogger(__name__)

USER_AGENT: Final = f"layercache/{__version__}"
MAX_REDIRECTS: Final = 5
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_NOT_FOUND_CODES: Final = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    # httpx's default trust (certifi, SSL_CERT_FILE/SSL_CERT_DIR) plus the registry's CA.
    context = httpx.create_ssl_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def describe(url: httpx.URL, method: str = "GET") -> str:
    """``METHOD host[:port]/path`` for messages: never the query (signed URLs carry secrets)."""
    return f"{method} {url.netloc.decode()}{url.path}"


_REDACT_URLS: Final = RedactingFilter(httpx.URL)
#: Connection pool limits of each trust profile's client.
_LIMITS: Final = httpx.Limits(max_connections=200, max_keepalive_connections=50)
#: Every logger httpx and httpcore log through (a logger's filter does not see records
#: of its children, so each is named).
_HTTP_LOGGERS: Final = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2",
                        "httpcore.proxy", "httpcore.socks")
for _name in _HTTP_LOGGERS:
    logging.getLogger(_name).addFilter(_REDACT_URLS)


class RegistryClient:
    """Talks to OCI registries. Use ``async with RegistryClient(...) as client``.

    ``keyring`` supplies credentials by registry host (None: anonymous). ``registries``
    maps a registry key (`Reference.registry`, e.g. ``127.0.0.1:5000``) to its options;
    others get ``default``. ``timeout`` is httpx's (seconds). ``retry`` is the per-request
    retry policy; its ``max_retry_after`` is also the longest a request waits for a
    rate-limited host before it fails with `RateLimitedError`. ``hosts`` is the per-host
    state to share with other clients of the process (default: this client's own).
    ``transport`` replaces the network (tests: ``httpx.MockTransport``);
    ``transport_factory`` instead builds one transport per trust profile from its TLS
    context (the agent's `layercache.registry.mirrors.MirrorTransport`).
    """

    def __init__(
        self,
        *,
        keyring: Keyring | None = None,
        registries: Mapping[str, RegistryOptions] | None = None,
        default: RegistryOptions | None = None,
        retry: RetryPolicy | None = None,
        timeout: httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        hosts: RegistryHosts | None = None,
        transport_factory: Callable[[ssl.SSLContext], httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self.auth = Authenticator(keyring)
        self.retry = retry or RetryPolicy()
        self._options = dict(registries or {})
        self._default = default or RegistryOptions()
        self._timeout = timeout or httpx.Timeout(30.0, connect=10.0, read=60.0)
        self._transport = transport
        self._transport_factory = transport_factory
        self._clients: dict[Path | None, httpx.AsyncClient] = {}
        self.hosts = hosts if hosts is not None else RegistryHosts()

    def __repr__(self) -> str:
        return f"RegistryClient(registries={sorted(self._options)})"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection pool."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    def options(self, registry: str) -> RegistryOptions:
        """The options for ``registry`` (its own, or the default)."""
        return self._options.get(registry, self._default)

    def base_url(self, reference: Reference) -> str:
        """``http(s)://<api host>`` for ``reference``'s registry."""
        scheme = "http" if self.options(reference.registry).insecure else "https"
        return f"{scheme}://{reference.api_host}"

    def _http(self, registry: str) -> httpx.AsyncClient:
        ca_file = self.options(registry).ca_file
        client = self._clients.get(ca_file)
        if client is None:
            try:
                context = _ssl_context(ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise RegistryConfigError(
                    f"{registry}: cannot load CA file {ca_file}: {exc}"
                ) from None
            transport = self._transport
            if transport is None and self._transport_factory is not None:
                transport = self._transport_factory(context)
            if transport is None:  # aiohttp moves the bytes (layercache.registry.transport)
                transport = BlobTransport(context, _LIMITS)
            client = httpx.AsyncClient(
                verify=context,
                timeout=self._timeout,
                follow_redirects=False,  # by hand: see _follow
                # identity: blob bytes must arrive as stored, or digests and Range break.
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                limits=_LIMITS,
                transport=transport,
            )
            self._clients[ca_file] = client
        return client

    def host(self, registry: str) -> HostState:
        """The shared state of ``registry`` (limiter, HEAD support)."""
        return self.hosts.get(registry, self.options(registry).max_concurrency)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        reference: Reference,
        path: str,
        headers: Mapping[str, str] | None = None,
        *,
        scope: str | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """One attempt at ``method base_url+path``, authenticated, redirects followed.

        Yields the final response with its body unread (any status: classify it with
        `raise_for_status`). Holds one of the host's request slots until the block ends;
        waits first while the host rate-limits us (`HostState.slot`). ``scope`` defaults
        to pull on the reference's repository; ``""`` means none (ping). Transport
        failures, also while the block reads the body, become `RegistryConnectionError`
        (transient).

        Raises:
            AuthenticationError, AccessDeniedError: still 401/403 after one token refresh.
            RegistryConnectionError: connecting, sending or reading failed.
            RateLimitedError: the host rate-limits us for longer than
                ``retry.max_retry_after`` (nothing sent).
            RegistryStatusError: a redirect to a non-HTTP URL, from https to http, or too
                many redirects.

        """
        registry = reference.registry
        if scope is None:
            scope = repository_scope(reference.repository)
        http = self._http(registry)
        url = httpx.URL(self.base_url(reference) + path)
        async with self.host(registry).slot(describe(url, method),
                                            self.retry.max_retry_after) as answered:
            response: httpx.Response | None = None
            try:
                response = await self._authenticated(http, method, url, headers, registry, scope)
                response = await self._follow(http, method, url, response, headers, registry)
                answered(response.status_code,
                         parse_retry_after(response.headers.get("retry-after")))
                yield response
            except httpx.RequestError as exc:  # transport, decoding, redirect loops
                raise RegistryConnectionError(
                    f"{describe(url, method)}: {exc.__class__.__name__}: {exc}"
                ) from None
            finally:
                if response is not None:
                    await response.aclose()

    async def _authenticated(
        self,
        http: httpx.AsyncClient,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str] | None,
        registry: str,
        scope: str,
    ) -> httpx.Response:
        sent = self.auth.header(registry, scope)
        response = await self._send(http, method, url, headers, sent, registry)
        if response.status_code != 401:
            return response
        await response.aclose()
        sent = await self.auth.answer(
            http,
            registry,
            scope,
            response,
            sent,
            allow_plain_http=self.options(registry).insecure,
        )
        response = await self._send(http, method, url, headers, sent, registry)
        if response.status_code in (401, 403):
            await response.aclose()
            raise self.auth.refused(registry, scope, response)
        return response

    async def _send(
        self,
        http: httpx.AsyncClient,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str] | None,
        authorization: str | None,
        registry: str,
    ) -> httpx.Response:
        """One HTTP request, counted for ``registry`` (also when it went to a storage host)."""
        all_headers = dict(headers or {})
        if authorization is not None:
            all_headers["Authorization"] = authorization
        request = http.build_request(method, url, headers=all_headers)
        try:
            response = await http.send(request, stream=True)
        except httpx.RequestError:
            self.hosts.count(registry, "error")
            raise
        self.hosts.count(registry, response.status_code)
        return response

    async def _follow(
        self,
        http: httpx.AsyncClient,
        method: str,
        origin_url: httpx.URL,
        response: httpx.Response,
        headers: Mapping[str, str] | None,
        registry: str,
    ) -> httpx.Response:
        """Follow up to `MAX_REDIRECTS` redirects; credentials only to the first origin.

        A redirect from ``https`` to ``http`` is refused (final): the blob and the signed
        URL would cross the network in clear, open to tampering and replay.
        """
        url = origin_url
        for _ in range(MAX_REDIRECTS):
            location = response.headers.get("location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            await response.aclose()
            previous, url = url, url.join(location)
            if url.scheme not in ("http", "https"):
                raise RegistryStatusError(
                    response.status_code,
                    describe(origin_url, method),
                    detail="redirect to a non-HTTP URL",
                )
            if previous.scheme == "https" and url.scheme == "http":
                raise RegistryStatusError(
                    response.status_code,
                    describe(origin_url, method),
                    detail=f"redirect from https to plain http ({url.netloc.decode()}) "
                    "refused: a downgrade",
                )
            authorization = None
            if _origin(url) == _origin(origin_url):
                authorization = response.request.headers.get("authorization")
            log.debug("%s redirected to %s", describe(origin_url, method), describe(url, method))
            response = await self._send(http, method, url, headers, authorization, registry)
        await response.aclose()
        raise RegistryStatusError(
            response.status_code,
            describe(origin_url, method),
            detail=f"more than {MAX_REDIRECTS} redirects",
        )

    @staticmethod
    async def raise_for_status(
        response: httpx.Response,
        what: str,
        not_found: type[RegistryStatusError] = RegistryStatusError,
    ) -> None:
        """Classify a non-2xx response; returns for 2xx.

        Reads (a bounded part of) the body for distribution error codes.

        Raises:
            RateLimitedError: 429 (transient; ``retry_after`` from the header).
            ServerError: 5xx (transient).
            ``not_found``: 404, or a distribution ``*_UNKNOWN`` code.
            RegistryStatusError: any other status (final).

        """
        status = response.status_code
        if 200 <= status < 300:
            return
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 429:
            raise RateLimitedError(what, retry_after)
        if status >= 500:
            raise ServerError(status, what, retry_after)
        codes = await _error_codes(response)
        if status == 404 or _NOT_FOUND_CODES & set(codes):
            raise not_found(status, what, codes)
        raise RegistryStatusError(status, what, codes)

    async def ping(self, reference: Reference) -> None:
        """``GET /v2/`` on ``reference``'s registry, authenticating if challenged.

        Raises:
            RegistryAuthError: credentials missing or refused.
            RegistryStatusError / TransientError: after the retry budget.

        """
        what = f"GET {reference.registry}/v2/"
        async for attempt in self.retry.retrying(what):
            with attempt:
                async with self.stream("GET", reference, "/v2/", scope="") as response:
                    await self.raise_for_status(response, what)


async def read_capped(response: httpx.Response, cap: int, name: str) -> bytes:
    """The whole body of ``response``, refusing more than ``cap`` bytes.

    Raises:
        BlobTooLargeError: ``Content-Length`` or the bytes received exceed ``cap``.

    """
    length = response.headers.get("content-length")
    if length and length.isdigit() and int(length) > cap:
        raise BlobTooLargeError(name, "body", f"Content-Length {length} exceeds {cap} bytes")
    chunks: list[bytes] = []
    received = 0
    async for chunk in response.aiter_bytes():
        received += len(chunk)
        if received > cap:
            raise BlobTooLargeError(name, "body", f"more than {cap} bytes received")
        chunks.append(chunk)
    return b"".join(chunks)


async def _error_codes(response: httpx.Response) -> tuple[str, ...]:
    """Distribution error codes (``{"errors": [{"code": …}]}``) from an error body."""
    try:
        body = await read_capped(response, 64 * 1024, "error body")
    except (BlobTooLargeError, httpx.HTTPError):
        return ()
    try:
        errors = json.loads(body).get("errors")
        return tuple(str(e["code"]) for e in errors if isinstance(e, dict) and "code" in e)
    except (ValueError, AttributeError, TypeError):
        return ()
