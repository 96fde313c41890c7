"""``NodeLayerCache``: one node's desired layers (spec) and what its agent holds (status).

Field meanings: manifests/crds/layercache.dev_nodelayercaches.yaml.

The operator builds `NodeLayerCacheSpec` (`layercache.plan.distribute.node_spec`) and reads
`NodeLayerCacheStatus` (what each node holds, its byte counters, its conditions); the agent
reads the spec (`layercache.agent.nodespec` checks what the schema cannot: digests,
references, chain IDs) and builds the status (`layercache.agent.status.report.StatusBook`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import Field, ValidationError

from layercache.api.model import Condition, InvalidObjectError, WireModel

__all__ = [
    "ByteCounters",
    "ChainCounts",
    "DiskFigures",
    "HumanBytes",
    "ImageLayers",
    "InvalidNodeSpecError",
    "LayerCounts",
    "NodeCacheDisk",
    "NodeDiskStatus",
    "NodeError",
    "NodeLayerCache",
    "NodeLayerCacheSpec",
    "NodeLayerCacheStatus",
    "SpecChain",
    "SpecImage",
    "SpecLayer",
    "spec_fingerprint",
]

Source = Literal["Upstream", "Peer"]
KIND = "NodeLayerCache"
log = logging.getLogger(__name__)


class InvalidNodeSpecError(InvalidObjectError):
    """A field of a NodeLayerCache's spec cannot be used; names the object and the field.

    ``field`` is the path below ``spec`` (``"layers[3].size"``).
    """

    def __init__(self, name: str, field: str, problem: str) -> None:
        super().__init__(KIND, name, f"spec.{field}", problem)
        self.field = field


# -- spec ------------------------------------------------------------------------------
class SpecLayer(WireModel):
    """``spec.layers[]``: one layer blob to hold, and where to fetch it from."""

    digest: str
    size: int = Field(ge=0)
    media_type: str = ""
    repository: str
    source: Source
    peers: list[str] = Field(default_factory=list)
    caches: list[str] = Field(default_factory=list)


class SpecChain(WireModel):
    """``spec.chains[]``: a layer chain to unpack (``chainID``, blobs and diff IDs base first)."""

    chain_id: str = Field(alias="chainID")
    layers: list[str]
    diff_ids: list[str] = Field(alias="diffIDs")
    unpacked_bytes: int = Field(default=0, ge=0)
    caches: list[str] = Field(default_factory=list)


class SpecImage(WireModel):
    """``spec.images[]``: an image pinned by digest to pull whole (mode Images).

    ``layers``: the image's layers for this node's platform, base first, as indexes into
    ``spec.layers`` (the operator resolved it already; the agent pulls once all are held).
    Empty from an operator older than the field: the agent then resolves the image itself.
    """

    reference: str
    caches: list[str] = Field(default_factory=list)
    layers: list[int] = Field(default_factory=list)


class ImageLayers(WireModel):
    """``spec.imageLayers[]``: one planned image's held layers, as indexes into ``layers``."""

    cache: str
    layers: list[int]


class NodeLayerCacheSpec(WireModel):
    """``spec``, written by the operator only."""

    node_name: str
    layers: list[SpecLayer] = Field(default_factory=list)
    chains: list[SpecChain] = Field(default_factory=list)
    images: list[SpecImage] = Field(default_factory=list)
    caches: list[str] = Field(default_factory=list)
    paused: bool = False
    image_layers: list[ImageLayers] = Field(default_factory=list)

    @classmethod
    def read(cls, name: str, raw: Mapping[str, Any] | None) -> Self:
        """`from_dict` of NodeLayerCache ``name``'s spec; `InvalidNodeSpecError` names the field.

        ``nodeName`` may be absent (it is the object's name; an object the operator is
        still creating has none yet).
        """
        data = {"nodeName": name, **(raw or {})}
        try:
            return cls.from_dict(data, KIND, name, "spec")
        except InvalidObjectError as error:
            raise InvalidNodeSpecError(name, error.path.removeprefix("spec."),
                                       error.problem) from None

    @classmethod
    def read_lenient(cls, raw: Mapping[str, Any] | None) -> NodeLayerCacheSpec:
        """The spec with every unusable list entry left out instead of raised on.

        For figures reported as well as possible (the agent's disk savings): a ``chains``,
        ``images`` or ``imageLayers`` entry that does not validate is dropped; a ``layers``
        entry keeps its place (``imageLayers`` index into it) with only its digest.
        """
        data = dict(raw or {})

        def valid(model: type[WireModel], items: Any) -> list[Any]:
            kept = []
            for item in items if isinstance(items, list) else ():
                try:
                    kept.append(model.model_validate(item))
                except ValidationError:
                    if model is SpecLayer:
                        digest = item.get("digest") if isinstance(item, Mapping) else None
                        kept.append(SpecLayer.model_construct(
                            digest=digest if isinstance(digest, str) else "", size=0,
                            repository="", source="Peer"))
            return kept

        return NodeLayerCacheSpec.model_construct(
            node_name=str(data.get("nodeName", "")),
            layers=valid(SpecLayer, data.get("layers")),
            chains=valid(SpecChain, data.get("chains")),
            images=valid(SpecImage, data.get("images")),
            caches=[str(c) for c in data.get("caches") or ()],
            paused=data.get("paused") is True,
            image_layers=valid(ImageLayers, data.get("imageLayers")))


#: What `spec_fingerprint` leaves out of each ``spec.layers[]`` entry (compared apart).
ASSIGNMENT_FIELDS = frozenset({"source", "peers"})


def spec_fingerprint(spec: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a NodeLayerCache spec (CRD dict) without its node's own fields.

    The canonical JSON (sorted keys, no spaces) of ``spec`` without ``nodeName`` and
    without each layer's ``source`` and ``peers``: what nodes holding the same layers for
    the same caches share, so the operator hashes it once for all of them. Two specs are
    equal when their fingerprints, node names and per-layer (source, peers) are
    (`layercache.controller.nodeindex.SpecRecord`). Any dict: fields it does not know are
    hashed as they are.
    """
    rest = {key: value for key, value in spec.items() if key != "nodeName"}
    layers = rest.get("layers")
    if isinstance(layers, list):
        rest["layers"] = [
            {k: v for k, v in entry.items() if k not in ASSIGNMENT_FIELDS}
            if isinstance(entry, Mapping) else entry for entry in layers]
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# -- status ----------------------------------------------------------------------------
class LayerCounts(WireModel):
    """``status.layers``: of ``spec.layers``, how many, held, and held bytes."""

    wanted: int = 0
    held: int = 0
    bytes_held: int = 0


class ChainCounts(WireModel):
    """``status.chains`` (NodeLayerCache and LayerCache share these three counts)."""

    wanted: int = 0
    unpacked: int = 0
    bytes_unpacked: int = 0


class ByteCounters(WireModel):
    """``status.bytes``: bytes fetched and served since counting started (persisted)."""

    upstream: int = 0
    peer: int = 0
    served_to_peers: int = 0


class HumanBytes(WireModel):
    """``status.human``: byte counts in SI units for ``kubectl get``'s columns."""

    bytes_held: str = ""
    upstream: str = ""
    peer: str = ""


class NodeError(WireModel):
    """``status.errors[]``: one recent failure; ``digest`` absent when not about one layer."""

    digest: str | None = None
    reason: str
    message: str = ""


class DiskFigures(WireModel):
    """Bytes on disk by kind, what the images would take apart, and the difference."""

    blobs: int = 0
    snapshots: int = 0
    separate: int = 0
    saved: int = 0


class NodeCacheDisk(DiskFigures):
    """``status.disk.caches[]``: one cache's figures on this node."""

    cache: str = ""


class NodeDiskStatus(DiskFigures):
    """``status.disk``: the node's figures and each cache's."""

    caches: list[NodeCacheDisk] = Field(default_factory=list)


class NodeLayerCacheStatus(WireModel):
    """``status``, written by that node's agent only.

    Before its first inventory the agent writes only ``bytes``, ``lastSync`` and
    ``peerEndpoint``; `synced` tells the two apart.
    """

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    peer_endpoint: str | None = None
    layers: LayerCounts = LayerCounts()
    chains: ChainCounts = ChainCounts()
    missing: list[str] = Field(default_factory=list)
    bytes: ByteCounters = ByteCounters()
    human: HumanBytes = HumanBytes()
    errors: list[NodeError] = Field(default_factory=list)
    disk_pressure: bool = False
    disk: NodeDiskStatus | None = None
    last_sync: str | None = None

    @classmethod
    def of(cls, obj: Mapping[str, Any] | None) -> NodeLayerCacheStatus:
        """The status of NodeLayerCache ``obj`` (a dict as listed; None: no object yet).

        Lenient, for readers of many objects (the operator, ``layercache status``): one
        agent's unreadable status (`InvalidObjectError`, logged with the object and the
        field) reads as empty, like an agent that has reported nothing yet, and never
        stops the reader going through the other nodes.
        """
        if not obj:
            return cls()
        name = str((obj.get("metadata") or {}).get("name", ""))
        try:
            return cls.from_dict(obj.get("status"), KIND, name, "status")
        except InvalidObjectError as error:
            log.warning("%s; read as no status", error)
            return cls()

    @property
    def synced(self) -> bool:
        """Whether the agent reported an inventory (``missing`` or held layers)."""
        return "missing" in self.model_fields_set or bool(self.layers.held)

    def condition(self, kind: str) -> Condition | None:
        """The condition of type ``kind``, if any."""
        return next((c for c in self.conditions if c.type == kind), None)


class NodeLayerCache(WireModel):
    """A whole NodeLayerCache as listed: name, generation, spec and status."""

    name: str = ""
    generation: int | None = None
    spec: NodeLayerCacheSpec
    status: NodeLayerCacheStatus = NodeLayerCacheStatus()

    @classmethod
    def read(cls, obj: Mapping[str, Any]) -> Self:
        """The model of a NodeLayerCache object as the API returns it.

        The status is read leniently (`NodeLayerCacheStatus.of`): an agent acting on its
        spec must not stop at a status field it cannot read.

        Raises:
            InvalidNodeSpecError: a spec field is unusable; names the object and the field.
        """
        metadata = obj.get("metadata") or {}
        name = str(metadata.get("name", ""))
        generation = metadata.get("generation")
        return cls(name=name, generation=generation if isinstance(generation, int) else None,
                   spec=NodeLayerCacheSpec.read(name, obj.get("spec")),
                   status=NodeLayerCacheStatus.of(obj))
