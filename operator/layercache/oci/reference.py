"""Image references: parse, validate and normalise ``[registry/]repository[:tag][@digest]``.

Follows the grammar and Docker Hub normalisation of github.com/distribution/reference
(``reference.go``, ``regexp.go``, ``normalize.go`` — what containerd and the kubelet use)::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain "/"] path
    domain           := host [":" port]
    host             := domain-name | IPv4address | "[" IPv6address "]"
    domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    path             := path-component ("/" path-component)*      ; at most 255 characters
    path-component   := [a-z0-9]+ (separator [a-z0-9]+)*
    separator        := [_.] | "__" | "-"+
    tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}

The first ``/``-separated component is a registry host only if it contains ``.`` or ``:``
or is ``localhost``; otherwise the whole name is a Docker Hub path, and a one-component Hub
path gets ``library/``. Where we differ from upstream, on purpose:

- ``Foo/bar``: upstream takes an upper-case first component for a host named ``Foo``; we
  reject it as an upper-case path component. A host without ``.`` or ``:`` is almost always a
  mistyped Hub namespace, and pre-warming must not guess.
- The registry key is canonical: Docker Hub's ``docker.io``, ``index.docker.io`` and
  ``registry-1.docker.io`` are one key (``docker.io``); host names are lower-cased (DNS is
  case-insensitive); IPv6 addresses are compressed; ports lose leading zeros and must be
  1-65535. Upstream keeps the host as written and accepts any digits as a port.
- Digests are checked by `layercache.oci.digest` (sha256/sha512 only), not the looser
  ``[A-Za-z][A-Za-z0-9]*:[0-9a-fA-F]{32,}`` pattern.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

from layercache.oci.digest import Digest, InvalidDigestError

__all__ = [
    "DEFAULT_TAG",
    "DOCKER_HUB",
    "DOCKER_HUB_API_HOST",
    "InvalidReferenceError",
    "Reference",
    "parse_reference",
    "parse_registry_host",
    "parse_registry_hosts",
]

DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_API_HOST: Final = "registry-1.docker.io"
DEFAULT_TAG: Final = "latest"
_HUB_ALIASES: Final = frozenset({DOCKER_HUB, "index.docker.io", DOCKER_HUB_API_HOST})
_OFFICIAL_PREFIX: Final = "library/"
_MAX_PATH: Final = 255
_MAX_TAG: Final = 128

# re.ASCII throughout: Go's RE2 \w is ASCII-only, Python's is Unicode by default.
_PATH_COMPONENT: Final = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)
_DOMAIN_NAME: Final = re.compile(
    r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*",
    re.ASCII,
)
_IPV6: Final = re.compile(r"\[([a-fA-F0-9:]+)\]", re.ASCII)
_IDENTIFIER: Final = re.compile(r"[a-f0-9]{64}", re.ASCII)


class InvalidReferenceError(ValueError):
    """An image reference is invalid; names the reference, the part and what is wrong.

    ``part`` is one of ``reference``, ``registry``, ``port``, ``repository``, ``tag``,
    ``digest``. (Not called ``ReferenceError``: that built-in is about weak references.)
    """

    def __init__(self, reference: str, part: str, reason: str) -> None:
        super().__init__(f"invalid image reference {reference!r}: {part}: {reason}")
        self.reference = reference
        self.part = part
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed, normalised image reference. Build one with `parse_reference`.

    Attributes:
        registry: canonical registry key, ``host[:port]`` (``docker.io`` for Docker Hub).
        repository: path inside the registry, e.g. ``library/ubuntu``.
        tag: the tag; ``latest`` when neither tag nor digest was given; None with a digest only.
        digest: the manifest digest, if given. When both are given both are kept and the
            digest wins for resolution (`manifest_reference`), as in docker's ParseDockerRef.

    """

    registry: str
    repository: str
    tag: str | None
    digest: Digest | None

    @property
    def api_host(self) -> str:
        """Host (and port) to send registry API requests to: Docker Hub's is not docker.io."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_reference(self) -> str:
        """What goes in ``/v2/<repository>/manifests/<reference>``: the digest, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None  # parse_reference never leaves both empty
        return self.tag

    def with_digest(self, digest: Digest) -> Reference:
        """The same reference pinned to ``digest`` (tag kept for display)."""
        return replace(self, digest=Digest(digest))

    def familiar(self) -> str:
        """Short form as docker prints it: no ``docker.io/``, no ``library/`` for one-part paths.

        ``docker.io/library/ubuntu:22.04`` → ``ubuntu:22.04``; other registries are unchanged.
        """
        name = self.name
        first = self.repository.partition("/")[0]
        # Keep docker.io/ where dropping it would make the first component read as a host
        # (docker.io/localhost/x, docker.io/a.b/c); upstream's familiar form does not round-trip
        # there.
        if self.registry == DOCKER_HUB and first != "localhost" and "." not in first:
            name = self.repository
            rest = name.removeprefix(_OFFICIAL_PREFIX)
            if rest != name and "/" not in rest:
                name = rest
        return name + self._suffix()

    def _suffix(self) -> str:
        tag = f":{self.tag}" if self.tag is not None else ""
        digest = f"@{self.digest}" if self.digest is not None else ""
        return tag + digest

    def __str__(self) -> str:
        """Fully-qualified canonical form, e.g. ``docker.io/library/ubuntu:latest``."""
        return self.name + self._suffix()


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference (grammar and deviations: module docstring).

    Examples: ``ubuntu`` → ``docker.io/library/ubuntu:latest``;
    ``localhost:5000/foo@sha256:…`` → registry ``localhost:5000``, tag None, that digest.

    Raises:
        InvalidReferenceError: naming the reference, the part that is wrong and why.

    """
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError(str(text), "reference", "empty")
    if text != text.strip():
        raise InvalidReferenceError(text, "reference", "leading or trailing whitespace")
    if _IDENTIFIER.fullmatch(text):
        raise InvalidReferenceError(
            text, "repository", "a 64-character hex string is an image ID, not a repository"
        )

    rest, at, digest_text = text.partition("@")
    digest = _parse_digest(text, digest_text) if at else None

    # The tag separator is a ':' after the last '/': earlier colons belong to host:port.
    name, tag = rest, None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], _check_tag(text, rest[colon + 1 :])

    registry, path = _split_registry(text, name)
    _check_path(text, path)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def parse_registry_host(text: str) -> str:
    """The canonical registry key of ``host[:port]``, as `parse_reference` gives it.

    ``Reg.Example:05000`` → ``reg.example:5000``; ``index.docker.io`` → ``docker.io``;
    ``[::1]:5000`` stays; an ``http://`` or ``https://`` prefix is dropped. The host must be
    one an image reference can name as its registry (it contains ``.`` or ``:``, or is
    ``localhost``): any other first component is a Docker Hub path, so an entry like
    ``registry`` could never match an image.

    Raises:
        InvalidReferenceError: part ``registry`` or ``port``, naming the entry.

    """
    host = text.strip()
    for scheme in ("http://", "https://"):  # as some users write a registry: dropped
        if host.lower().startswith(scheme):
            host = host[len(scheme):].removesuffix("/")
    if not host:
        raise InvalidReferenceError(text, "registry", "empty")
    if "/" in host or "@" in host:
        raise InvalidReferenceError(text, "registry", "a registry is host[:port], no path")
    if host.lower() != "localhost" and "." not in host and ":" not in host:
        raise InvalidReferenceError(
            text, "registry", f"{host!r} is no registry host: an image reference names one "
            "only with a '.' or ':' in it, or 'localhost' (else it is a Docker Hub path)")
    return _canonical_registry(text, host)


def parse_registry_hosts(values: str | Iterable[str]) -> tuple[str, ...]:
    """Registry keys from comma-separated lists of ``host[:port]`` (blanks ignored).

    One parser for every list of registry hosts a user gives (``--insecure-registry``,
    ``LAYERCACHE_INSECURE_REGISTRIES``): each entry is canonicalised by
    `parse_registry_host`, so it matches `Reference.registry` however it was written.
    Order kept, duplicates dropped.

    Raises:
        InvalidReferenceError: an entry is not a registry host.

    """
    items = [values] if isinstance(values, str) else list(values)
    found = [parse_registry_host(entry) for item in items for entry in item.split(",")
             if entry.strip()]
    return tuple(dict.fromkeys(found))


def _parse_digest(text: str, digest_text: str) -> Digest:
    if not digest_text:
        raise InvalidReferenceError(text, "digest", "empty after '@'")
    try:
        return Digest(digest_text)
    except InvalidDigestError as exc:
        raise InvalidReferenceError(text, "digest", exc.reason) from exc


def _check_tag(text: str, tag: str) -> str:
    if not tag:
        raise InvalidReferenceError(text, "tag", "empty after ':'")
    if len(tag) > _MAX_TAG:
        raise InvalidReferenceError(
            text, "tag", f"{len(tag)} characters long; at most {_MAX_TAG} allowed"
        )
    if not _TAG.fullmatch(tag):
        raise InvalidReferenceError(
            text,
            "tag",
            f"{tag!r} must start with a letter, digit or '_' and hold only those, '.' and '-'",
        )
    return tag


def _split_registry(text: str, name: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    if slash and (first == "localhost" or "." in first or ":" in first):
        registry = _canonical_registry(text, first)
        path = remainder
    else:
        registry, path = DOCKER_HUB, name
    if registry == DOCKER_HUB and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    return registry, path


def _canonical_registry(text: str, domain: str) -> str:
    if domain.startswith("["):
        end = domain.find("]")
        host_text, port_text = domain[: end + 1], domain[end + 1 :]
        match = _IPV6.fullmatch(host_text)
        if end < 0 or match is None:
            raise InvalidReferenceError(
                text, "registry", f"{domain!r}: IPv6 host must be '[' hex and ':' ']'"
            )
        try:
            address = ipaddress.IPv6Address(match.group(1))
        except ValueError as exc:
            raise InvalidReferenceError(text, "registry", f"{host_text!r}: {exc}") from exc
        host = f"[{address.compressed}]"
    else:
        if domain.count(":") > 1:
            raise InvalidReferenceError(
                text, "registry", f"{domain!r}: an IPv6 host must be in brackets, e.g. [::1]:5000"
            )
        host_text, colon, port = domain.partition(":")
        port_text = colon + port
        if not _DOMAIN_NAME.fullmatch(host_text):
            raise InvalidReferenceError(
                text,
                "registry",
                f"{host_text!r} is not a host name, IPv4 address or [IPv6] address",
            )
        host = host_text.lower()
    if port_text:
        host += f":{_check_port(text, port_text)}"
    return DOCKER_HUB if host in _HUB_ALIASES else host


def _check_port(text: str, port_text: str) -> int:
    digits = port_text.removeprefix(":")
    if not port_text.startswith(":") or not digits.isascii() or not digits.isdigit():
        raise InvalidReferenceError(text, "port", f"{port_text!r} must be ':' and digits")
    port = int(digits)
    if not 1 <= port <= 65535:
        raise InvalidReferenceError(text, "port", f"{port} is outside 1-65535")
    return port


def _check_path(text: str, path: str) -> None:
    if len(path) > _MAX_PATH:
        raise InvalidReferenceError(
            text, "repository", f"{len(path)} characters long; at most {_MAX_PATH} allowed"
        )
    for component in path.split("/"):
        if _PATH_COMPONENT.fullmatch(component):
            continue
        if not component:
            reason = "empty path component (doubled or trailing '/')"
        elif _PATH_COMPONENT.fullmatch(component.lower()):
            reason = f"path component {component!r} must be lower-case"
        else:
            reason = (
                f"path component {component!r} must be lower-case letters and digits "
                "joined by '.', '_', '__' or dashes"
            )
        raise InvalidReferenceError(text, "repository", reason)
