"""Resolve an image reference for a platform to its manifest, config and layers.

What a node's containerd would pull, found the way it finds it:

1. the reference to a digest: the digest it names, else ``HEAD`` on the tag
   (``Docker-Content-Digest``), falling back to ``GET`` when HEAD is refused (404, 405,
   501 …; the host is then asked with GET for a while) or carries no digest (OCI
   distribution-spec, "Checking if content exists"). When that digest is the one a
   ``previous`` resolution found, the previous resolution is returned as it is and
   nothing else is fetched: re-resolving an unchanged tag costs one HEAD (registries such
   as Docker Hub count manifest GETs against a pull quota, HEAD not);
2. an index (OCI image index / Docker manifest list) to the entry for the platform, by
   containerd's rules (`layercache.oci.platform.select_manifest`; attestations never chosen);
3. the image manifest's config blob (digest verified) to the layers' diff IDs
   (``rootfs.diff_ids``, OCI image-spec ``config.md``), one per layer, in order.

Every document's digest is verified, and its size against its descriptor.
"""

from __future__ import annotations

from typing import Final

from layercache.oci.digest import Digest
from layercache.oci.image import Layer
from layercache.oci.platform import Platform, PlatformNotFoundError, parse_platform, select_manifest
from layercache.oci.reference import Reference, parse_reference
from layercache.oci.resolved import ResolvedImage
from layercache.registry.blobs import fetch_blob_bytes
from layercache.registry.client import RegistryClient
from layercache.registry.errors import ManifestError, NoMatchingPlatformError
from layercache.registry.fetch import FetchedManifest, get_manifest, head_manifest
from layercache.registry.manifest import MAX_CONFIG_BYTES, ImageIndex, ImageManifest, parse_config

__all__ = ["ResolvedImage", "resolve"]

#: Indexes nested deeper than this are refused (real images nest at most one level).
MAX_INDEX_DEPTH: Final = 3


async def resolve(
    client: RegistryClient,
    reference: Reference | str,
    platform: Platform | str,
    previous: ResolvedImage | None = None,
) -> ResolvedImage:
    """Resolve ``reference`` for ``platform`` (``os/arch[/variant]`` or a `Platform`).

    ``previous`` is an earlier resolution of the same reference and platform: returned as
    it is (the same object) when the reference still points at its digest — no request at
    all for a reference pinned to that digest, a HEAD (or, on a host that refuses HEAD,
    one GET) for a tag. One of another reference or platform is ignored.

    Raises:
        InvalidReferenceError, InvalidPlatformError: unparsable arguments.
        NoMatchingPlatformError: nothing in the image runs on ``platform``.
        ManifestNotFoundError, BlobNotFoundError: the registry lacks the manifest or blob.
        DigestMismatchError: a document does not hash to its digest.
        ManifestError: (and subclasses) malformed, unsupported or oversized documents.
        RegistryAuthError, RegistryStatusError, TransientError: from the client.

    """
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    wanted = parse_platform(platform) if isinstance(platform, str) else platform
    if previous is not None and (previous.reference != ref or previous.platform != wanted):
        previous = None
    if previous is not None and ref.digest == previous.digest:
        return previous  # content-addressed: the same digest is the same image
    top = await _fetch_top(client, ref, previous.digest if previous is not None else None)
    if previous is not None and top is None:
        return previous
    assert top is not None
    document, chosen = top, None
    for depth in range(MAX_INDEX_DEPTH + 1):
        if isinstance(document.manifest, ImageManifest):
            break
        if depth == MAX_INDEX_DEPTH:
            raise ManifestError(str(ref), "manifests", f"indexes nested over {depth} deep")
        document, chosen = await _select(client, ref, document, wanted)
    manifest = document.manifest
    assert isinstance(manifest, ImageManifest)
    name = f"{ref.name}@{document.digest}"
    config_body = await fetch_blob_bytes(
        client, ref, manifest.config.digest, manifest.config.size, MAX_CONFIG_BYTES
    )
    config = parse_config(config_body, f"{ref.name}@{manifest.config.digest}", len(manifest.layers))
    actual = chosen
    if config.os and config.architecture:
        from_config = Platform(config.os, config.architecture, config.variant or "")
        # containerd checks a single manifest's config against the node's platform too.
        if chosen is None and from_config not in wanted.compatible():
            raise NoMatchingPlatformError(name, str(wanted), (str(from_config),))
        actual = actual or from_config
    layers = tuple(
        Layer(digest=d.digest, size=d.size, media_type=d.media_type, diff_id=diff_id)
        for d, diff_id in zip(manifest.layers, config.diff_ids, strict=True)
    )
    return ResolvedImage(
        reference=ref,
        digest=top.digest,
        media_type=top.media_type,
        platform=wanted,
        manifest_platform=actual or wanted,
        manifest_digest=document.digest,
        manifest_media_type=document.media_type,
        manifest_size=document.size,
        config_digest=manifest.config.digest,
        config_size=manifest.config.size,
        config_media_type=manifest.config.media_type,
        layers=layers,
    )


async def _fetch_top(
    client: RegistryClient, ref: Reference, known: Digest | None
) -> FetchedManifest | None:
    """The document ``ref`` points at; None when that is ``known`` (nothing more fetched)."""
    if ref.digest is not None:
        return await get_manifest(client, ref, str(ref.digest))
    head = await head_manifest(client, ref)
    if head is None:
        fetched = await get_manifest(client, ref)
        return None if fetched.digest == known else fetched
    if head.digest == known:
        return None
    fetched = await get_manifest(client, ref, str(head.digest))
    if head.size is not None and head.size != fetched.size:
        raise ManifestError(
            f"{ref.name}@{head.digest}",
            "Content-Length",
            f"HEAD said {head.size} bytes, GET returned {fetched.size}",
        )
    return fetched


async def _select(
    client: RegistryClient, ref: Reference, index: FetchedManifest, wanted: Platform
) -> tuple[FetchedManifest, Platform]:
    assert isinstance(index.manifest, ImageIndex)
    name = f"{ref.name}@{index.digest}"
    entries = [entry.as_mapping() for entry in index.manifest.manifests]
    try:
        chosen = select_manifest(entries, wanted)
    except PlatformNotFoundError as exc:
        note = f" ({exc.attestations} attestation entries ignored)" if exc.attestations else ""
        raise NoMatchingPlatformError(name, str(wanted), exc.offered, note) from None
    position = next(i for i, entry in enumerate(entries) if entry is chosen)
    entry = index.manifest.manifests[position]
    fetched = await get_manifest(client, ref, str(entry.digest))
    if fetched.size != entry.size:
        raise ManifestError(
            name,
            f"manifests[{position}].size",
            f"{entry.size} bytes, but the manifest it names is {fetched.size} bytes",
        )
    return fetched, Platform.from_oci(chosen["platform"])
