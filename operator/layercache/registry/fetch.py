"""Fetch manifests: ``HEAD`` for a tag's digest, ``GET`` with the digest verified.

OCI distribution-spec, "Pulling manifests" and "Checking if content exists": a manifest is
addressed by tag or digest under ``/v2/<name>/manifests/<reference>``; the registry names
its digest in ``Docker-Content-Digest``. What we verify:

- by digest: the body must hash to that digest (its algorithm);
- by tag: the body must hash to ``Docker-Content-Digest`` when the registry sends it;
  without it, the digest is the body's sha256 (what containerd records too).

Bodies are read with a cap (`MAX_MANIFEST_BYTES`) and parsed by
`layercache.registry.manifest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from layercache.oci.digest import Digest, InvalidDigestError
from layercache.oci.digest import UnsupportedDigestAlgorithmError as _UnsupportedAlgorithm
from layercache.oci.mediatypes import ACCEPT_MANIFESTS
from layercache.oci.reference import Reference
from layercache.registry.client import RegistryClient, read_capped
from layercache.registry.errors import (
    ManifestError,
    ManifestNotFoundError,
    RegistryDigestMismatchError,
    UnsupportedDigestError,
)
from layercache.registry.manifest import (
    MAX_MANIFEST_BYTES,
    ImageIndex,
    ImageManifest,
    parse_manifest,
)

__all__ = ["FetchedManifest", "ManifestHead", "get_manifest", "head_manifest"]


@dataclass(frozen=True)
class ManifestHead:
    """What ``HEAD`` on a manifest told: digest, media type and size (bytes) if sent."""

    digest: Digest
    media_type: str | None
    size: int | None


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index as fetched and verified.

    ``digest`` verified, ``media_type`` detected, ``size`` in bytes of the raw ``body``,
    ``manifest`` the parsed document.
    """

    digest: Digest
    media_type: str
    size: int
    body: bytes
    manifest: ImageManifest | ImageIndex


#: Error statuses of a manifest HEAD that say nothing about HEAD support: auth, rate limit.
_HEAD_NOT_REFUSALS: Final = frozenset({401, 403, 429})
#: Passing server errors: GET once instead, but HEAD stays the first choice for the host
#: (marking it would cost a manifest GET per refresh for an hour after one blip).
_HEAD_TRANSIENT: Final = frozenset({500, 502, 503, 504})


def _manifest_path(reference: Reference, target: str) -> str:
    return f"/v2/{reference.repository}/manifests/{target}"


async def head_manifest(client: RegistryClient, reference: Reference) -> ManifestHead | None:
    """``HEAD`` the manifest of ``reference`` (its digest, else its tag).

    Returns None when HEAD cannot answer: fall back to `get_manifest`. That is the case
    when the answer has no ``Docker-Content-Digest``, is 404 (some registries do not
    implement HEAD; GET then says what is missing), or is any other error but 401/403
    (auth) and 429 (rate limit): 405, 501, 500, 400 … — registries that serve GET answer
    those. Such a refusal is not retried. A refusal that will happen again (405, 501, 400 …:
    any but 500/502/503/504) marks the host (`HostState.head_refused`) so its manifests are
    asked with GET alone for a while; a host already marked is not asked with HEAD at all.

    Raises:
        RegistryAuthError, RateLimitedError, TransientError: as for GET.
        ManifestError: a malformed ``Docker-Content-Digest``.

    """
    host = client.host(reference.registry)
    if not host.head_supported():
        return None
    path = _manifest_path(reference, reference.manifest_reference)
    what = f"HEAD {reference.registry}{path}"
    async for attempt in client.retry.retrying(what):
        with attempt:
            async with client.stream(
                "HEAD", reference, path, {"Accept": ACCEPT_MANIFESTS}
            ) as response:
                status = response.status_code
                if status == 404:
                    return None
                if status >= 400 and status not in _HEAD_NOT_REFUSALS:
                    if status not in _HEAD_TRANSIENT:
                        host.head_refused(status)
                    return None
                await client.raise_for_status(response, what, ManifestNotFoundError)
                header = response.headers.get("docker-content-digest")
                if not header:
                    return None
                length = response.headers.get("content-length")
                return ManifestHead(
                    _header_digest(str(reference), header),
                    response.headers.get("content-type"),
                    int(length) if length and length.isdigit() else None,
                )
    raise AssertionError("unreachable: the retry loop returns or raises")


async def get_manifest(
    client: RegistryClient, reference: Reference, target: str | None = None
) -> FetchedManifest:
    """``GET`` and parse a manifest or index.

    ``target`` is a digest or tag (default: the reference's own).

    Raises:
        ManifestNotFoundError: no such manifest.
        RegistryDigestMismatchError: (a `DigestMismatchError`) the body does not hash to
            the expected digest.
        ManifestError: (and subclasses) malformed, unsupported or oversized.
        RegistryAuthError, RegistryStatusError, TransientError: from the client.

    """
    target = target or reference.manifest_reference
    path = _manifest_path(reference, target)
    by_digest = ":" in target  # tags cannot hold ':'
    name = f"{reference.name}@{target}" if by_digest else f"{reference.name}:{target}"
    what = f"GET {reference.registry}{path}"
    body, header, content_type = b"", None, None
    async for attempt in client.retry.retrying(what):
        with attempt:
            async with client.stream(
                "GET", reference, path, {"Accept": ACCEPT_MANIFESTS}
            ) as response:
                await client.raise_for_status(response, what, ManifestNotFoundError)
                body = await read_capped(response, MAX_MANIFEST_BYTES, name)
                header = response.headers.get("docker-content-digest")
                content_type = response.headers.get("content-type")
    expected: Digest | None = None
    if by_digest:
        expected = _header_digest(name, target)
    elif header:
        expected = _header_digest(name, header)
    digest = Digest.from_bytes(body, expected.algorithm if expected else "sha256")
    if expected is not None and digest != expected:
        raise RegistryDigestMismatchError(expected, digest, len(body))
    parsed = parse_manifest(body, content_type, name)
    return FetchedManifest(digest, parsed.media_type, len(body), body, parsed)


def _header_digest(name: str, text: str) -> Digest:
    try:
        return Digest(text.strip())
    except _UnsupportedAlgorithm as exc:
        raise UnsupportedDigestError(name, "Docker-Content-Digest", exc.reason) from None
    except InvalidDigestError as exc:
        raise ManifestError(name, "Docker-Content-Digest", exc.reason) from None
