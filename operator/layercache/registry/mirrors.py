"""Registry mirrors as the node's containerd sees them: ``hosts.toml`` under ``config_path``.

An egress-restricted node pulls through the hosts its containerd is configured with; the
agent's upstream fetches must take the same way, or a node that the kubelet can pull on
gets nothing from layercache. This follows containerd's registry host configuration
(``docs/hosts.md``, ``core/remotes/docker/config/hosts.go``):

- ``config_path`` is one or more directories (``:``-separated). For a registry
  ``host[:port]`` the first of ``<dir>/host_port_``, ``<dir>/host:port`` and
  ``<dir>/_default`` that exists is its host directory (``docker.io`` for Docker Hub);
- its ``hosts.toml`` lists ``[host."<url>"]`` entries, tried first in file order, then
  ``server`` (the top-level fields: ``server``, ``capabilities``, ``ca``, ``skip_verify``,
  ``header``, ``override_path``); without ``server`` the registry itself comes last;
- a host serves only the operations in its ``capabilities`` (default ``pull``,
  ``resolve``, ``push``): a manifest by tag needs ``resolve``, a manifest by digest or a
  blob needs ``pull``;
- a host's URL path is its API root: ``/v2`` is appended unless the path ends in it or
  ``override_path`` is true; a request to a host other than the registry carries
  ``?ns=<registry>``;
- ``ca`` (a path or a list, relative to the host directory) adds trusted CAs for that host;
  ``skip_verify`` turns certificate verification off for it (the operator's choice in
  containerd's own file, so ours too); ``header`` adds request headers;
- a host that fails — no connection, or any 4xx/5xx answer — hands over to the next one,
  as containerd's resolver and fetcher do; the last host's answer or error is the result;
- a host directory without ``hosts.toml`` contributes its ``*.crt`` files as CAs of the
  registry (Docker's certificate layout), as containerd falls back to.

Differences, on purpose: credentials go only to the registry they were given for
(containerd's CRI does the same with the kubelet's pull secrets), so a mirror that asks
for a login (401) counts as failed and the next host is tried; client certificates
(``client``) and per-host ``proxy`` and ``dial_timeout`` are not supported (ignored).
Files are re-read when they change, as containerd reads them at every pull.
"""

from __future__ import annotations

import logging
import re
import ssl
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from layercache.oci.reference import DOCKER_HUB, DOCKER_HUB_API_HOST
from layercache.registry.transport import BlobTransport

__all__ = [
    "HostsConfig",
    "HostsConfigError",
    "HostsDirectory",
    "MirrorTransport",
    "RegistryHost",
    "parse_hosts_toml",
]

log = logging.getLogger(__name__)

ALL_CAPABILITIES: Final = frozenset({"pull", "resolve", "push"})
HOSTS_FILE: Final = "hosts.toml"
DEFAULT_DIRECTORY: Final = "_default"


class HostsConfigError(httpx.TransportError):
    """A ``hosts.toml`` cannot be used; the message names the file and the field.

    A transport error, so the registry client reports it as a connection problem of the
    request that needed the file (retried, and shown in status), as containerd fails the
    pull.
    """


@dataclass(frozen=True)
class RegistryHost:
    """One host to send registry requests to.

    ``url``: scheme, host, port and API root path (``…/v2`` unless ``override_path``);
    ``capabilities``: subset of ``pull``, ``resolve``, ``push``; ``ca``: extra CA files;
    ``skip_verify``: no TLS verification; ``headers``: added to each request.
    """

    url: httpx.URL
    capabilities: frozenset[str] = ALL_CAPABILITIES
    ca: tuple[Path, ...] = ()
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class HostsConfig:
    """A registry's host directory: ``hosts`` to try first, then ``server``.

    ``server`` None means the registry itself, reached as the client addressed it (with
    the CAs of ``default_ca``, Docker's ``*.crt`` files, when the directory has no
    ``hosts.toml``).
    """

    source: str
    hosts: tuple[RegistryHost, ...] = ()
    server: RegistryHost | None = None
    default_ca: tuple[Path, ...] = field(default=())


def _strings(source: str, name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise HostsConfigError(f"{source}: {name}: not a string or a list of strings")


def _host(source: str, where: str, url_text: object, table: Mapping[str, Any],
          directory: Path) -> RegistryHost:
    """A `RegistryHost` from ``url_text`` and the fields of ``table`` (``where`` names it)."""
    if not isinstance(url_text, str) or not url_text:
        raise HostsConfigError(f"{source}: {where}: not a URL string")
    text = url_text if "://" in url_text else "https://" + url_text
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as error:
        raise HostsConfigError(f"{source}: {where}: {url_text!r}: {error}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise HostsConfigError(f"{source}: {where}: {url_text!r} is not an http(s) URL")
    override = table.get("override_path", False)
    skip_verify = table.get("skip_verify", False)
    if not isinstance(override, bool) or not isinstance(skip_verify, bool):
        raise HostsConfigError(f"{source}: {where}: override_path and skip_verify are "
                               "true or false")
    path = url.path.rstrip("/")
    if not override and not path.endswith("/v2"):
        path += "/v2"
    capabilities = ALL_CAPABILITIES
    if "capabilities" in table:
        capabilities = frozenset(_strings(source, f"{where} capabilities",
                                          table["capabilities"]))
        unknown = capabilities - ALL_CAPABILITIES
        if unknown:
            raise HostsConfigError(f"{source}: {where}: unknown capabilities "
                                   f"{sorted(unknown)} (pull, resolve, push)")
    ca = tuple(directory / p for p in _strings(source, f"{where} ca", table["ca"])) \
        if "ca" in table else ()
    headers: list[tuple[str, str]] = []
    raw_headers = table.get("header", {})
    if not isinstance(raw_headers, Mapping):
        raise HostsConfigError(f"{source}: {where}: header is not a table")
    for name, value in raw_headers.items():
        headers += [(str(name), v) for v in _strings(source, f"{where} header {name}", value)]
    return RegistryHost(url.copy_with(path=path, query=None, fragment=None), capabilities, ca,
                        skip_verify, tuple(headers))


def parse_hosts_toml(text: str, directory: Path, source: str = HOSTS_FILE) -> HostsConfig:
    """Parse one ``hosts.toml`` (relative ``ca`` paths are under ``directory``).

    Raises:
        HostsConfigError: not TOML, or a field of the wrong kind (names file and field).

    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise HostsConfigError(f"{source}: not TOML: {error}") from None
    hosts_table = document.get("host", {})
    if not isinstance(hosts_table, Mapping):
        raise HostsConfigError(f"{source}: host: not a table of [host.\"<url>\"] entries")
    hosts = []
    for url_text, table in hosts_table.items():  # tomllib keeps the file's order
        if not isinstance(table, Mapping):
            raise HostsConfigError(f"{source}: host.{url_text!r}: not a table")
        hosts.append(_host(source, f"host.{url_text!r}", url_text, table, directory))
    server = None
    if "server" in document:
        server = _host(source, "server", document["server"], document, directory)
    return HostsConfig(source, tuple(hosts), server)


def _directory_names(registry: str) -> tuple[str, ...]:
    host, colon, port = registry.rpartition(":")
    if colon and port.isdigit() and not registry.endswith("]"):
        return f"{host}_{port}_", registry, DEFAULT_DIRECTORY
    return registry, DEFAULT_DIRECTORY


class HostsDirectory:
    """containerd's ``config_path``: host directories under one or more roots.

    ``roots``: the directories of ``config_path`` in order (a ``:``-separated string is
    split). `config` re-reads a ``hosts.toml`` when its modification time changes.
    """

    def __init__(self, roots: str | Sequence[Path]) -> None:
        if isinstance(roots, str):
            roots = [Path(p) for p in roots.split(":") if p]
        self.roots = tuple(roots)
        self._cache: dict[Path, tuple[int, HostsConfig]] = {}

    def __repr__(self) -> str:
        return f"HostsDirectory({':'.join(map(str, self.roots))})"

    def host_directory(self, registry: str) -> Path | None:
        """The host directory containerd would use for ``registry`` (a registry key)."""
        for name in _directory_names(registry):
            for root in self.roots:
                candidate = root / name
                if candidate.is_dir():
                    return candidate
        return None

    def config(self, registry: str) -> HostsConfig | None:
        """The host configuration for ``registry``; None when it has no host directory.

        Raises:
            HostsConfigError: its ``hosts.toml`` cannot be read or parsed.

        """
        directory = self.host_directory(registry)
        if directory is None:
            return None
        file = directory / HOSTS_FILE
        try:
            stamp = file.stat().st_mtime_ns
        except FileNotFoundError:
            certificates = tuple(sorted(directory.glob("*.crt")))
            return HostsConfig(str(directory), default_ca=certificates) if certificates else None
        except OSError as error:
            raise HostsConfigError(f"{file}: {error}") from None
        cached = self._cache.get(file)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            text = file.read_text()
        except OSError as error:
            raise HostsConfigError(f"{file}: {error}") from None
        parsed = parse_hosts_toml(text, directory, str(file))
        self._cache[file] = (stamp, parsed)
        log.info("registry hosts for %s from %s: %s then %s", registry, file,
                 [str(h.url) for h in parsed.hosts],
                 parsed.server.url if parsed.server else "the registry")
        return parsed


def _registry_of(url: httpx.URL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    key = f"{host}:{url.port}" if url.port else host
    return DOCKER_HUB if key == DOCKER_HUB_API_HOST else key


#: The registry API paths hosts.toml routes: the ping, manifests, blobs, tag lists. Not
#: other ``/v2/`` paths, such as a token realm on the registry's own host (quay.io/v2/auth).
_API_PATH: Final = re.compile(r"/v2/(?:.+/(?:manifests|blobs)/[^/]+|.+/tags/list)?")


def _capability(path: str) -> str:
    # /v2/<name>/manifests/<reference>: a tag needs resolve, a digest (has ':') pull.
    head, _, reference = path.rpartition("/")
    if head.endswith("/manifests") and ":" not in reference:
        return "resolve"
    return "pull"


class MirrorTransport(httpx.AsyncBaseTransport):
    """Sends registry API requests (``/v2/…``) the way ``hosts`` configures, else as asked.

    ``verify``: the TLS context of the registry client this transport serves (its CA
    file): used for the registry itself and for hosts without ``ca``/``skip_verify``.
    ``limits``: connection pool limits of each underlying transport.
    """

    def __init__(self, hosts: HostsDirectory, verify: ssl.SSLContext,
                 limits: httpx.Limits | None = None) -> None:
        self.hosts = hosts
        self._verify = verify
        self._limits = limits or httpx.Limits(max_connections=200, max_keepalive_connections=50)
        self._transports: dict[tuple[tuple[Path, ...], bool], BlobTransport] = {}

    def _transport(self, ca: tuple[Path, ...] = (), skip_verify: bool = False
                   ) -> BlobTransport:
        key = (ca, skip_verify)
        transport = self._transports.get(key)
        if transport is None:
            context: ssl.SSLContext | bool = self._verify
            if skip_verify:
                context = False
            elif ca:
                context = httpx.create_ssl_context()
                try:
                    for file in ca:
                        context.load_verify_locations(cafile=str(file))
                except (OSError, ssl.SSLError) as error:
                    raise HostsConfigError(f"CA file {file}: {error}") from None
            transport = BlobTransport(context, self._limits)
            self._transports[key] = transport
        return transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Try each configured host in turn; see the module docstring."""
        path = request.url.path
        registry = _registry_of(request.url)
        config = self.hosts.config(registry) if _API_PATH.fullmatch(path) else None
        if config is None:
            return await self._transport().handle_async_request(request)
        capability = _capability(path)
        candidates: list[RegistryHost | None] = [
            h for h in config.hosts if capability in h.capabilities]
        candidates.append(config.server)  # None: the registry as the client addressed it
        last = len(candidates) - 1
        for index, host in enumerate(candidates):
            try:
                response, sent = await self._send(request, registry, host, config)
            except httpx.TransportError as error:
                if index == last:
                    raise
                log.info("registry host %s failed (%s); trying the next",
                         host.url.netloc.decode() if host else registry, error)
                continue
            if response.status_code < 400 or index == last:
                location = response.headers.get("location")
                if location is not None and response.is_redirect:
                    response.headers["location"] = str(sent.join(location))
                return response
            log.info("registry host %s answered %s for %s; trying the next",
                     sent.netloc.decode(), response.status_code, path)
            await response.aclose()
        raise AssertionError("unreachable: the last candidate returns or raises")

    async def _send(self, request: httpx.Request, registry: str, host: RegistryHost | None,
                    config: HostsConfig) -> tuple[httpx.Response, httpx.URL]:
        if host is None:
            transport = self._transport(config.default_ca)
            return await transport.handle_async_request(request), request.url
        api_path = host.url.path + request.url.path.removeprefix("/v2")
        url = request.url.copy_with(scheme=host.url.scheme, netloc=host.url.netloc,
                                    path=api_path)
        # Host is the new one's; credentials belong to the registry they were given for,
        # never to a mirror.
        dropped = {"host"} if host.url.netloc == request.url.netloc \
            else {"host", "authorization"}
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in dropped]
        if _registry_of(host.url) != registry:
            url = url.copy_merge_params({"ns": registry})
        sent = httpx.Request(request.method, url, headers=[*headers, *host.headers],
                             extensions=request.extensions)
        transport = self._transport(host.ca, host.skip_verify)
        return await transport.handle_async_request(sent), url

    async def aclose(self) -> None:
        """Close every underlying transport."""
        transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            await transport.aclose()
