"""Manifest media-type detection and parsing, including hostile bodies, as tables. Pure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from layercache.oci.digest import Digest
from layercache.oci.mediatypes import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    layer_type,
)
from layercache.registry.errors import (
    BlobTooLargeError,
    ManifestError,
    UnsupportedDigestError,
    UnsupportedManifestError,
    UnsupportedMediaTypeError,
)
from layercache.registry.manifest import (
    MAX_LAYER_BYTES,
    MAX_MANIFEST_BYTES,
    ImageIndex,
    ImageManifest,
    detect_media_type,
    parse_config,
    parse_manifest,
)

REF = "127.0.0.1:5000/family/base:v1"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def image(media_type: str | None = OCI_MANIFEST, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": D1, "size": 1234},
        "layers": [
            {"mediaType": OCI_GZIP, "digest": D2, "size": 30_000_000},
            {"mediaType": OCI_GZIP, "digest": D3, "size": 512},
        ],
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    doc.update(changes)
    return doc


def index(media_type: str | None = OCI_INDEX, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": D1,
                "size": 700,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    doc.update(changes)
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# (document, Content-Type header, expected media type)
DETECT = [
    (image(), OCI_MANIFEST, OCI_MANIFEST),
    (image(DOCKER_MANIFEST), DOCKER_MANIFEST, DOCKER_MANIFEST),
    (index(), OCI_INDEX, OCI_INDEX),
    (index(DOCKER_MANIFEST_LIST), DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_LIST),
    # Missing or wrong Content-Type: the body's mediaType decides.
    (image(DOCKER_MANIFEST), None, DOCKER_MANIFEST),
    (image(DOCKER_MANIFEST), "application/octet-stream", DOCKER_MANIFEST),
    (index(), "text/plain; charset=utf-8", OCI_INDEX),
    (image(DOCKER_MANIFEST), OCI_INDEX, DOCKER_MANIFEST),
    # No mediaType in the body (optional in OCI): header when it agrees with the shape …
    (image(None), DOCKER_MANIFEST, DOCKER_MANIFEST),
    (index(None), DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_LIST),
    (image(None), f"{OCI_MANIFEST}; charset=utf-8", OCI_MANIFEST),
    # … else the shape alone, as OCI.
    (image(None), None, OCI_MANIFEST),
    (image(None), OCI_INDEX, OCI_MANIFEST),
    (index(None), "application/json", OCI_INDEX),
    (index(None), DOCKER_MANIFEST, OCI_INDEX),
]


@pytest.mark.parametrize(("document", "content_type", "expected"), DETECT)
def test_detect_media_type(
    document: dict[str, Any], content_type: str | None, expected: str
) -> None:
    assert detect_media_type(document, content_type, REF) == expected
    parsed = parse_manifest(encode(document), content_type, REF)
    assert parsed.media_type == expected
    assert isinstance(
        parsed, ImageIndex if expected in (OCI_INDEX, DOCKER_MANIFEST_LIST) else ImageManifest
    )


def test_parse_image_fields() -> None:
    parsed = parse_manifest(encode(image()), OCI_MANIFEST, REF)
    assert isinstance(parsed, ImageManifest)
    assert parsed.config.digest == Digest(D1) and parsed.config.size == 1234
    assert [(d.digest, d.size, d.media_type) for d in parsed.layers] == [
        (D2, 30_000_000, OCI_GZIP),
        (D3, 512, OCI_GZIP),
    ]
    assert isinstance(parsed.layers[0].digest, Digest)


def test_parse_index_keeps_platform_and_annotations() -> None:
    doc = index()
    doc["manifests"].append(
        {
            "mediaType": OCI_MANIFEST,
            "digest": D2,
            "size": 800,
            "platform": {"os": "unknown", "architecture": "unknown"},
            "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
        }
    )
    parsed = parse_manifest(encode(doc), None, REF)
    assert isinstance(parsed, ImageIndex)
    assert parsed.manifests[1].as_mapping() == doc["manifests"][1]


def _layers(**layer: Any) -> dict[str, Any]:
    return image(layers=[{"mediaType": OCI_GZIP, "digest": D2, "size": 10, **layer}])


# (body, Content-Type, error type, field, fragment of the reason)
BAD: list[tuple[bytes, str | None, type[ManifestError], str, str]] = [
    (b"<html>502 Bad Gateway</html>", "text/html", ManifestError, "body", "not JSON"),
    (b"", None, ManifestError, "body", "not JSON"),
    (b"\xff\xfe", None, ManifestError, "body", "not JSON"),
    (b"[1, 2]", OCI_MANIFEST, ManifestError, "body", "not a JSON object"),
    (b"{}", OCI_MANIFEST, ManifestError, "body", "neither an image manifest"),
    (b" " * (MAX_MANIFEST_BYTES + 1), None, BlobTooLargeError, "body", "exceeds"),
    # Docker schema 1, by body or by header.
    (
        encode({"schemaVersion": 1, "name": "x", "tag": "v1", "fsLayers": []}),
        None,
        UnsupportedManifestError,
        "schemaVersion",
        "schema 1",
    ),
    (
        encode({"name": "x", "fsLayers": [], "signatures": []}),
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        UnsupportedManifestError,
        "schemaVersion",
        "schema 1",
    ),
    (encode(image(schemaVersion=3)), None, ManifestError, "schemaVersion", "expected 2"),
    (encode(image(schemaVersion="2")), None, ManifestError, "schemaVersion", "expected 2"),
    (
        encode(image("application/vnd.example.thing+json")),
        None,
        UnsupportedManifestError,
        "mediaType",
        "neither an image manifest nor an index",
    ),
    # Missing parts.
    (encode(image(layers=[])), None, ManifestError, "layers", "no layers"),
    (
        encode({k: v for k, v in image().items() if k != "config"}),
        None,
        ManifestError,
        "config",
        "missing",
    ),
    (encode(_layers(digest=None)), None, ManifestError, "layers[0].digest", "not a string"),
    (
        encode({k: v for k, v in index().items() if k != "manifests"} | {"layers": []}),
        OCI_INDEX,
        ManifestError,
        "manifests",
        "missing",
    ),
    # Hostile sizes.
    (encode(_layers(size=-1)), None, BlobTooLargeError, "layers[0].size", "negative"),
    (
        encode(_layers(size=MAX_LAYER_BYTES + 1)),
        None,
        BlobTooLargeError,
        "layers[0].size",
        "exceeds the cap",
    ),
    (encode(_layers(size=2**63)), None, BlobTooLargeError, "layers[0].size", "exceeds"),
    (encode(_layers(size=1.5)), None, ManifestError, "layers[0].size", "integer"),
    (encode(_layers(size="10")), None, ManifestError, "layers[0].size", "integer"),
    (
        encode(image(config={"mediaType": OCI_CONFIG, "digest": D1, "size": 1 << 40})),
        None,
        BlobTooLargeError,
        "config.size",
        "exceeds",
    ),
    (
        encode(index(manifests=[{"mediaType": OCI_MANIFEST, "digest": D1, "size": -5}])),
        None,
        BlobTooLargeError,
        "manifests[0].size",
        "negative",
    ),
    # Digests: unknown algorithm vs malformed.
    (
        encode(_layers(digest="blake3:" + "a" * 64)),
        None,
        UnsupportedDigestError,
        "layers[0].digest",
        "unsupported algorithm",
    ),
    (
        encode(_layers(digest="sha256:XYZ")),
        None,
        ManifestError,
        "layers[0].digest",
        "64 lower-case hex",
    ),
    (
        encode(image(config={"mediaType": OCI_CONFIG, "digest": "md5:abc", "size": 1})),
        None,
        UnsupportedDigestError,
        "config.digest",
        "unsupported algorithm",
    ),
    # Media types we cannot use.
    (
        encode(_layers(mediaType="application/vnd.oci.image.layer.v1.tar+gzip+encrypted")),
        None,
        UnsupportedMediaTypeError,
        "layers[0].mediaType",
        "unknown or unsupported",
    ),
    (
        encode(_layers(mediaType="application/vnd.in-toto+json")),
        None,
        UnsupportedMediaTypeError,
        "layers[0].mediaType",
        "unknown or unsupported",
    ),
    (
        encode(
            image(
                config={
                    "mediaType": "application/vnd.cncf.helm.config.v1+json",
                    "digest": D1,
                    "size": 1,
                }
            )
        ),
        None,
        UnsupportedManifestError,
        "config.mediaType",
        "not a container image config",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "error", "field", "reason"), BAD)
def test_rejects(
    body: bytes, content_type: str | None, error: type[ManifestError], field: str, reason: str
) -> None:
    with pytest.raises(error, match=reason) as info:
        parse_manifest(body, content_type, REF)
    assert type(info.value) is error
    assert info.value.field == field
    assert info.value.reference == REF
    assert str(info.value).startswith(f"{REF}: {field}: ")


# Layer media types: OCI and Docker, gzip / zstd / uncompressed, distributable or not.
LAYER_TYPES = [
    ("application/vnd.oci.image.layer.v1.tar", "none", True),
    ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip", True),
    ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd", True),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar", "none", False),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip", False),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", "zstd", False),
    ("application/vnd.docker.image.rootfs.diff.tar", "none", True),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip", True),
    ("application/vnd.docker.image.rootfs.diff.tar.zstd", "zstd", True),
    ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "gzip", False),
    ("application/vnd.docker.image.rootfs.foreign.diff.tar", "none", False),
]


@pytest.mark.parametrize(("media_type", "compression", "distributable"), LAYER_TYPES)
def test_layer_types(media_type: str, compression: str, distributable: bool) -> None:
    kind = layer_type(media_type)
    assert kind is not None
    assert (kind.compression, kind.distributable) == (compression, distributable)
    parsed = parse_manifest(encode(_layers(mediaType=media_type, urls=["https://x/y"])), None, REF)
    assert isinstance(parsed, ImageManifest)
    assert parsed.layers[0].urls == ("https://x/y",)


def test_docker_config_media_type_accepted() -> None:
    doc = image(
        DOCKER_MANIFEST,
        config={"mediaType": DOCKER_CONFIG, "digest": D1, "size": 9},
        layers=[{"mediaType": DOCKER_GZIP, "digest": D2, "size": 10}],
    )
    parsed = parse_manifest(encode(doc), DOCKER_MANIFEST, REF)
    assert isinstance(parsed, ImageManifest)
    assert parsed.config.media_type == DOCKER_CONFIG


def config(diff_ids: list[str], **changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    doc.update(changes)
    return encode(doc)


def test_parse_config() -> None:
    parsed = parse_config(config([D2, D3]), REF, 2)
    assert parsed.diff_ids == (Digest(D2), Digest(D3))
    assert (parsed.os, parsed.architecture, parsed.variant) == ("linux", "amd64", None)


BAD_CONFIGS: list[tuple[bytes, int, type[ManifestError], str, str]] = [
    (b"nope", 1, ManifestError, "body", "not JSON"),
    (config([D2]), 2, ManifestError, "rootfs.diff_ids", "1 diff IDs for 2 layers"),
    (
        config([D2], rootfs={"type": "zfs", "diff_ids": [D2]}),
        1,
        ManifestError,
        "rootfs.type",
        "expected 'layers'",
    ),
    (config([], rootfs=None), 0, ManifestError, "rootfs", "valid dictionary"),
    (
        config(["sha384:" + "a" * 96]),
        1,
        UnsupportedDigestError,
        "rootfs.diff_ids[0]",
        "unsupported algorithm",
    ),
]


@pytest.mark.parametrize(("body", "layers", "error", "field", "reason"), BAD_CONFIGS)
def test_rejects_config(
    body: bytes, layers: int, error: type[ManifestError], field: str, reason: str
) -> None:
    with pytest.raises(error, match=reason) as info:
        parse_config(body, REF, layers)
    assert info.value.field == field
