"""Resolution rules (index → platform → config → diff IDs) on an in-memory registry."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import pytest

from layercache.oci.digest import Digest, DigestMismatchError
from layercache.oci.mediatypes import (
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
)
from layercache.registry.client import RegistryClient
from layercache.registry.errors import (
    ManifestError,
    NoMatchingPlatformError,
    UnsupportedManifestError,
)
from layercache.registry.resolve import resolve

HOST = "reg.example"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """Blobs and manifests by digest, tags pointing at digests; HEAD and GET."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.tags: dict[str, str] = {}

    def blob(self, data: bytes) -> dict[str, Any]:
        self.blobs[digest_of(data)] = data
        return {"digest": digest_of(data), "size": len(data)}

    def image(
        self,
        arch: str,
        layers: list[bytes],
        *,
        config_arch: str | None = None,
        diff_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """Push an image manifest; returns its descriptor (no platform)."""
        config = json.dumps(
            {
                "architecture": config_arch or arch,
                "os": "linux",
                "rootfs": {
                    "type": "layers",
                    "diff_ids": diff_ids or [digest_of(b"diff" + layer) for layer in layers],
                },
            }
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, **self.blob(config)},
            "layers": [{"mediaType": GZIP, **self.blob(layer)} for layer in layers],
        }
        return self.manifest(manifest, OCI_MANIFEST)

    def manifest(self, document: dict[str, Any], media_type: str) -> dict[str, Any]:
        body = json.dumps(document).encode()
        self.manifests[digest_of(body)] = (body, media_type)
        return {"mediaType": media_type, "digest": digest_of(body), "size": len(body)}

    def index(self, entries: list[dict[str, Any]], media_type: str = OCI_INDEX) -> dict[str, Any]:
        return self.manifest(
            {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, media_type
        )

    def __call__(self, request: httpx.Request) -> httpx.Response:
        _, _, repo_kind_ref = request.url.path.partition("/v2/app/")
        kind, _, ref = repo_kind_ref.partition("/")
        if kind == "blobs" and ref in self.blobs:
            return httpx.Response(200, content=self.blobs[ref])
        if kind == "manifests":
            digest = self.tags.get(ref, ref)
            if digest in self.manifests:
                body, media_type = self.manifests[digest]
                headers = {
                    "Content-Type": media_type,
                    "Docker-Content-Digest": digest,
                    "Content-Length": str(len(body)),
                }
                return httpx.Response(
                    200, content=b"" if request.method == "HEAD" else body, headers=headers
                )
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})


def platformed(descriptor: dict[str, Any], arch: str, **extra: Any) -> dict[str, Any]:
    return {**descriptor, "platform": {"os": "linux", "architecture": arch}, **extra}


async def run(registry: Registry, platform: str, ref: str = f"{HOST}/app:v1") -> Any:
    async with RegistryClient(transport=httpx.MockTransport(registry)) as client:
        return await resolve(client, ref, platform)


async def test_index_picks_platform_and_reads_diff_ids() -> None:
    reg = Registry()
    amd = reg.image("amd64", [b"base", b"top"])
    arm = reg.image("arm64", [b"arm"])
    attestation = reg.image("unknown", [b"sbom"])
    index = reg.index(
        [
            platformed(amd, "amd64"),
            platformed(arm, "arm64"),
            {
                **attestation,
                "platform": {"os": "unknown", "architecture": "unknown"},
                "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
            },
        ],
        DOCKER_MANIFEST_LIST,
    )
    reg.tags["v1"] = index["digest"]
    image = await run(reg, "linux/arm64")
    assert image.digest == index["digest"] and image.media_type == DOCKER_MANIFEST_LIST
    assert image.manifest_digest == arm["digest"]
    assert [layer.digest for layer in image.layers] == [digest_of(b"arm")]
    assert [layer.diff_id for layer in image.layers] == [digest_of(b"diffarm")]
    amd64 = await run(reg, "linux/amd64")
    assert [layer.size for layer in amd64.layers] == [4, 3]
    assert amd64.layer_bytes == 7
    assert amd64.pinned.digest == index["digest"]
    plan_input = amd64.plan_input({"pool": "gpu"})
    assert plan_input.manifest_digest == amd["digest"]
    assert plan_input.node_selector == {"pool": "gpu"}


async def test_compatible_platform_is_chosen_and_reported() -> None:
    reg = Registry()
    i386 = reg.image("386", [b"old"])
    reg.tags["v1"] = reg.index([platformed(i386, "386")])["digest"]
    image = await run(reg, "linux/amd64")  # amd64 nodes run 386 images, as containerd says
    assert str(image.platform) == "linux/amd64"
    assert str(image.manifest_platform) == "linux/386"


async def test_no_matching_platform_names_reference_and_offers() -> None:
    reg = Registry()
    reg.tags["v1"] = reg.index([platformed(reg.image("arm64", [b"a"]), "arm64")])["digest"]
    with pytest.raises(
        NoMatchingPlatformError,
        match=r"reg\.example/app@sha256:.*linux/s390x.*"
        r"it offers: linux/arm64",
    ):
        await run(reg, "linux/s390x")


async def test_single_manifest_for_another_platform_is_refused() -> None:
    reg = Registry()
    reg.tags["v1"] = reg.image("arm64", [b"a"])["digest"]
    with pytest.raises(NoMatchingPlatformError, match="offers: linux/arm64"):
        await run(reg, "linux/amd64")


async def test_nested_index() -> None:
    reg = Registry()
    inner = reg.index([platformed(reg.image("amd64", [b"x"]), "amd64")])
    reg.tags["v1"] = reg.index([platformed(inner, "amd64")])["digest"]
    image = await run(reg, "linux/amd64")
    assert [layer.digest for layer in image.layers] == [digest_of(b"x")]


async def test_index_entry_size_must_match() -> None:
    reg = Registry()
    entry = platformed(reg.image("amd64", [b"x"]), "amd64")
    entry["size"] += 1
    reg.tags["v1"] = reg.index([entry])["digest"]
    with pytest.raises(ManifestError, match=r"manifests\[0\]\.size"):
        await run(reg, "linux/amd64")


async def test_diff_id_count_must_match_layers() -> None:
    reg = Registry()
    reg.tags["v1"] = reg.image("amd64", [b"a", b"b"], diff_ids=[digest_of(b"only one")])["digest"]
    with pytest.raises(ManifestError, match="1 diff IDs for 2 layers") as info:
        await run(reg, "linux/amd64")
    assert info.value.field == "rootfs.diff_ids"


async def test_config_blob_is_verified() -> None:
    reg = Registry()
    descriptor = reg.image("amd64", [b"a"])
    manifest = json.loads(reg.manifests[descriptor["digest"]][0])
    config = manifest["config"]["digest"]
    reg.blobs[config] = reg.blobs[config].replace(b"amd64", b"AMD64")  # same size, other bytes
    reg.tags["v1"] = descriptor["digest"]
    with pytest.raises(DigestMismatchError) as info:
        await run(reg, "linux/amd64")
    assert info.value.expected == Digest(config)


async def test_pinned_reference_skips_tag_lookup() -> None:
    reg = Registry()
    descriptor = reg.image("amd64", [b"a"])
    image = await run(reg, "linux/amd64", f"{HOST}/app@{descriptor['digest']}")
    assert image.digest == image.manifest_digest == descriptor["digest"]


async def test_artifact_is_not_an_image() -> None:
    reg = Registry()
    artifact = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", **reg.blob(b"{}")},
        "layers": [{"mediaType": GZIP, **reg.blob(b"chart")}],
    }
    reg.tags["v1"] = reg.manifest(artifact, OCI_MANIFEST)["digest"]
    with pytest.raises(UnsupportedManifestError, match=r"config\.mediaType"):
        await run(reg, "linux/amd64")
