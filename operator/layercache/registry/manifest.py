"""Parse manifests, indexes and image configs at the edge, into typed models.

Documents: OCI image-spec ``manifest.md``, ``image-index.md``, ``config.md`` and
``descriptor.md``; Docker "Image Manifest V2, Schema 2" (manifest and manifest list).

What a registry sends is untrusted. We tolerate what real registries do wrong and refuse
what we cannot use, each time with an error that names the reference and the field:

- ``Content-Type`` missing or wrong, or a body without ``mediaType`` (OCI makes it
  optional): the kind is read from the body's shape (``manifests`` → index; ``config`` and
  ``layers`` → image manifest); a body ``mediaType`` wins over the header, because the
  body is what the digest covers.
- Docker schema 1 → `UnsupportedManifestError`; not JSON, not an object, wrong
  ``schemaVersion``, missing fields → `ManifestError`; no layers → `ManifestError`;
  a config that is not a container image config (artifacts) → `UnsupportedManifestError`.
- sizes negative or beyond the caps below → `BlobTooLargeError`; a digest of an algorithm
  we cannot verify → `UnsupportedDigestError`; an unknown (or encrypted) layer media type
  → `UnsupportedMediaTypeError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Final, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StrictStr,
    ValidationError,
)

from layercache.oci.digest import Digest, InvalidDigestError, UnsupportedDigestAlgorithmError
from layercache.oci.mediatypes import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1_TYPES,
    layer_type,
)
from layercache.registry.errors import (
    BlobTooLargeError,
    ManifestError,
    UnsupportedDigestError,
    UnsupportedManifestError,
    UnsupportedMediaTypeError,
)

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_LAYER_BYTES",
    "MAX_MANIFEST_BYTES",
    "ConfigDescriptor",
    "ImageConfig",
    "ImageIndex",
    "ImageManifest",
    "IndexEntry",
    "LayerDescriptor",
    "detect_media_type",
    "parse_config",
    "parse_manifest",
]

#: Largest manifest or index body we accept, bytes: distribution's own limit (4 MiB).
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
#: Largest config blob, bytes. Real configs are kilobytes; history-heavy ones < 1 MiB.
MAX_CONFIG_BYTES: Final = 16 * 1024 * 1024
#: Largest layer blob, bytes (256 GiB). The biggest real layers (ML runtimes, models baked
#: into images) are tens of GB; anything near 2**63 is garbage or hostile.
MAX_LAYER_BYTES: Final = 256 * 1024**3


_M = TypeVar("_M", bound=BaseModel)


class _SizeError(ValueError):
    pass


class _MediaTypeError(ValueError):
    pass


def _digest(value: object) -> Digest:
    if not isinstance(value, str):
        raise InvalidDigestError(repr(value), "not a string")
    return Digest(value)


def _size(cap: int) -> AfterValidator:
    def check(value: int) -> int:
        if value < 0:
            raise _SizeError(f"size {value} is negative")
        if value > cap:
            raise _SizeError(f"size {value} bytes exceeds the cap of {cap} bytes")
        return value

    return AfterValidator(check)


def _layer_media_type(value: str) -> str:
    if layer_type(value) is None:
        raise _MediaTypeError(f"unknown or unsupported layer media type {value!r}")
    return value


def _config_media_type(value: str) -> str:
    if value not in CONFIG_TYPES:
        raise _MediaTypeError(
            f"config media type {value!r} is not a container image config "
            "(an OCI artifact?): nothing to run, nothing to pre-warm"
        )
    return value


DigestField = Annotated[Digest, PlainValidator(_digest)]


class _Model(BaseModel):
    # Unknown fields (annotations, subject, artifactType …) are allowed by both specs.
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class LayerDescriptor(_Model):
    """A layer descriptor: ``digest``, ``size`` (compressed bytes), ``mediaType``, ``urls``."""

    media_type: Annotated[StrictStr, AfterValidator(_layer_media_type)] = Field(alias="mediaType")
    digest: DigestField
    size: Annotated[StrictInt, _size(MAX_LAYER_BYTES)]
    urls: tuple[StrictStr, ...] = ()
    annotations: dict[str, str] = Field(default_factory=dict)


class ConfigDescriptor(_Model):
    """The config descriptor of an image manifest (size in bytes)."""

    media_type: Annotated[StrictStr, AfterValidator(_config_media_type)] = Field(alias="mediaType")
    digest: DigestField
    size: Annotated[StrictInt, _size(MAX_CONFIG_BYTES)]


class IndexEntry(_Model):
    """A manifest descriptor in an index (size in bytes).

    ``platform`` and ``annotations`` are kept as sent: `select_manifest` reads them.
    """

    media_type: StrictStr | None = Field(default=None, alias="mediaType")
    digest: DigestField
    size: Annotated[StrictInt, _size(MAX_MANIFEST_BYTES)]
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] = Field(default_factory=dict)

    def as_mapping(self) -> dict[str, Any]:
        """The entry as decoded JSON, the shape `select_manifest` takes."""
        return self.model_dump(by_alias=True, exclude_none=True)


class ImageManifest(_Model):
    """An OCI image manifest or Docker schema 2 manifest (``media_type`` says which)."""

    schema_version: StrictInt = Field(alias="schemaVersion")
    media_type: StrictStr = Field(alias="mediaType")
    config: ConfigDescriptor
    layers: tuple[LayerDescriptor, ...] = Field(min_length=1)


class ImageIndex(_Model):
    """An OCI image index or Docker manifest list (``media_type`` says which)."""

    schema_version: StrictInt = Field(alias="schemaVersion")
    media_type: StrictStr = Field(alias="mediaType")
    manifests: tuple[IndexEntry, ...]


class _RootFS(_Model):
    type: StrictStr
    diff_ids: tuple[DigestField, ...]


class ImageConfig(_Model):
    """The parts of an image config we use: platform and ``rootfs.diff_ids`` (base first)."""

    architecture: StrictStr | None = None
    os: StrictStr | None = None
    variant: StrictStr | None = None
    rootfs: _RootFS

    @property
    def diff_ids(self) -> tuple[Digest, ...]:
        """Digests of the uncompressed layer tars, in layer order."""
        return self.rootfs.diff_ids


def _content_type(header: str | None) -> str | None:
    if header is None:
        return None
    return header.partition(";")[0].strip().lower() or None


def detect_media_type(document: Mapping[str, Any], content_type: str | None, reference: str) -> str:
    """The media type of a decoded manifest body.

    From its ``mediaType``, else the ``Content-Type`` header (``content_type``, parameters
    allowed) when it agrees with the body's shape, else the shape alone.

    Raises:
        UnsupportedManifestError: Docker schema 1, or a ``mediaType`` that is neither an
            image manifest nor an index.
        ManifestError: no ``mediaType`` and a shape that is neither.

    """
    header = _content_type(content_type)
    if (
        document.get("schemaVersion") == 1
        or "fsLayers" in document
        or (header in SCHEMA1_TYPES and "mediaType" not in document)
    ):
        raise UnsupportedManifestError(
            reference,
            "schemaVersion",
            "Docker schema 1 manifests are unsupported (deprecated, unverifiable layer "
            "sizes); push the image again as Docker schema 2 or OCI",
        )
    declared = document.get("mediaType")
    if declared is not None:
        if declared in MANIFEST_TYPES or declared in INDEX_TYPES:
            return str(declared)
        raise UnsupportedManifestError(
            reference, "mediaType", f"{declared!r} is neither an image manifest nor an index"
        )
    if "manifests" in document:
        return header if header in INDEX_TYPES else OCI_INDEX
    if "config" in document or "layers" in document:
        return header if header in MANIFEST_TYPES else OCI_MANIFEST
    raise ManifestError(
        reference, "body", "neither an image manifest (config, layers) nor an index (manifests)"
    )


def _decode(body: bytes, reference: str, cap: int, what: str) -> dict[str, Any]:
    if len(body) > cap:
        raise BlobTooLargeError(reference, "body", f"{what} of {len(body)} bytes exceeds {cap}")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(reference, "body", f"{what} is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ManifestError(reference, "body", f"{what} is not a JSON object")
    return document


def parse_manifest(
    body: bytes, content_type: str | None, reference: str
) -> ImageManifest | ImageIndex:
    """Parse a manifest or index body (bytes as received; digest checked by the caller).

    ``reference`` names the document in errors (``host/repo:tag`` or ``…@digest``).
    The result's ``media_type`` is the detected one (`detect_media_type`).

    Raises:
        ManifestError: and its subclasses, as listed in the module docstring.

    """
    document = _decode(body, reference, MAX_MANIFEST_BYTES, "manifest")
    media_type = detect_media_type(document, content_type, reference)
    if document.get("schemaVersion") != 2:
        raise ManifestError(
            reference, "schemaVersion", f"{document.get('schemaVersion')!r}, expected 2"
        )
    document = {**document, "mediaType": media_type}
    model: type[ImageManifest] | type[ImageIndex] = (
        ImageIndex if media_type in INDEX_TYPES else ImageManifest
    )
    return _validate(model, document, reference)


def parse_config(body: bytes, reference: str, layers: int) -> ImageConfig:
    """Parse an image config blob and check it matches a manifest of ``layers`` layers.

    Raises:
        ManifestError: not JSON, ``rootfs.type`` not ``layers``, or a diff ID count that
            differs from the layer count; `UnsupportedDigestError` for a diff ID of an
            algorithm we cannot compute.

    """
    config = _validate(ImageConfig, _decode(body, reference, MAX_CONFIG_BYTES, "config"), reference)
    if config.rootfs.type != "layers":
        raise ManifestError(reference, "rootfs.type", f"{config.rootfs.type!r}, expected 'layers'")
    if len(config.diff_ids) != layers:
        raise ManifestError(
            reference,
            "rootfs.diff_ids",
            f"{len(config.diff_ids)} diff IDs for {layers} layers in the manifest",
        )
    return config


def _validate(model: type[_M], document: dict[str, Any], reference: str) -> _M:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise _translate(exc, reference) from None


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _translate(exc: ValidationError, reference: str) -> ManifestError:
    """The first validation error as our own error type, naming the field."""
    first = exc.errors(include_url=False)[0]
    field = _field_path(first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, UnsupportedDigestAlgorithmError):
        return UnsupportedDigestError(reference, field, cause.reason)
    if isinstance(cause, InvalidDigestError):
        return ManifestError(reference, field, cause.reason)
    if isinstance(cause, _SizeError):
        return BlobTooLargeError(reference, field, str(cause))
    if isinstance(cause, _MediaTypeError):
        if field == "config.mediaType":
            return UnsupportedManifestError(reference, field, str(cause))
        return UnsupportedMediaTypeError(reference, field, str(cause))
    if first["type"] == "too_short" and field == "layers":
        return ManifestError(reference, field, "the manifest has no layers")
    if first["type"] == "missing":
        return ManifestError(reference, field, "missing")
    return ManifestError(reference, field, first["msg"])
