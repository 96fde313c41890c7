"""Media types of manifests, configs and layers (OCI image-spec, Docker image manifest v2).

Sources: OCI image-spec ``media-types.md``, ``manifest.md``, ``image-index.md``,
``layer.md``; Docker's "Image Manifest V2, Schema 2"; containerd ``images/mediatypes.go``,
which also recognises the Docker uncompressed and zstd layer types, so we do too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "ACCEPT_MANIFESTS",
    "CONFIG_TYPES",
    "DOCKER_CONFIG",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_SCHEMA1_MANIFEST",
    "DOCKER_SCHEMA1_SIGNED",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Compression",
    "LayerType",
    "layer_type",
]

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"

#: Image manifests (one platform: a config and layers).
MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
#: Indexes / manifest lists (one entry per platform).
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
#: Config blobs of runnable container images.
CONFIG_TYPES: Final = frozenset({OCI_CONFIG, DOCKER_CONFIG})
#: Schema 1: deprecated, unsupported by containerd's default config since 2.0; we refuse it.
SCHEMA1_TYPES: Final = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED})

#: The ``Accept`` header for manifest requests: every type we can parse. Without it a
#: distribution registry may down-convert to schema 1 or answer with the wrong type.
ACCEPT_MANIFESTS: Final = ", ".join(
    (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
)

Compression = Literal["gzip", "zstd", "none"]


@dataclass(frozen=True, slots=True)
class LayerType:
    """What a layer media type says about its blob.

    ``compression`` is how the tar is compressed; ``distributable`` is False for foreign /
    non-distributable layers, which registries need not serve and we never fetch.
    """

    media_type: str
    compression: Compression
    distributable: bool


#: (distributable base, non-distributable base, suffix → compression) per family.
_LAYER_FAMILIES: Final[tuple[tuple[str, str, dict[str, Compression]], ...]] = (
    (
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        {"": "none", "+gzip": "gzip", "+zstd": "zstd"},
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        {"": "none", ".gzip": "gzip", ".zstd": "zstd"},
    ),
)


def _table() -> dict[str, LayerType]:
    table: dict[str, LayerType] = {}
    for distributable_base, foreign_base, suffixes in _LAYER_FAMILIES:
        for suffix, compression in suffixes.items():
            for base, distributable in ((distributable_base, True), (foreign_base, False)):
                table[base + suffix] = LayerType(base + suffix, compression, distributable)
    return table


_LAYER_TYPES: Final = _table()


def layer_type(media_type: str) -> LayerType | None:
    """Classify a layer media type; None when it is not a layer type we know.

    Media types are compared exactly (they are case-sensitive identifiers in practice and
    every registry echoes them verbatim). Encrypted layers (``+encrypted``) and artifact
    blobs (``application/vnd.in-toto+json`` …) are not layers we can pre-warm: None.
    """
    return _LAYER_TYPES.get(media_type)
