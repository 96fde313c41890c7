"""A `NodeLayerCache` parsed at the edge into what the agent acts on.

The operator writes ``spec`` (what this node should hold, in fetch order); the agent reads
it here and writes ``status``. The wire model (`layercache.api.NodeLayerCache`) checks
types and required fields; this module checks what neither it nor the CRD schema can (a
digest the agent can verify, a repository that parses as ``host/path``, a chain ID that is
that of its diff IDs). Either raises `InvalidNodeSpecError` naming the object and field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from layercache.agent.status.disksavings import Sharing
from layercache.api import GROUP, NLC_PLURAL, VERSION, InvalidNodeSpecError
from layercache.api.nodelayercache import (
    ByteCounters,
    NodeLayerCache,
    SpecChain,
    SpecLayer,
)
from layercache.oci.digest import Digest, InvalidDigestError, chain_ids
from layercache.oci.reference import InvalidReferenceError, Reference, parse_reference

__all__ = [
    "GROUP",
    "PLURAL",
    "VERSION",
    "Counters",
    "InvalidNodeSpecError",
    "NodeSpec",
    "WantedChain",
    "WantedLayer",
    "parse_node_spec",
]

#: The plural of NodeLayerCache (`layercache.api.NLC_PLURAL`), as the agent's calls name it.
PLURAL = NLC_PLURAL

Source = Literal["Upstream", "Peer"]


@dataclass(frozen=True)
class WantedLayer:
    """One layer to hold: blob ``digest`` of ``size`` bytes, found upstream in ``repository``.

    ``source`` says whether this node seeds it from the registry (``Upstream``) or takes it
    from one of ``peers`` (node names, its relay-tree parent first), falling back to upstream.
    ``caches`` (``namespace/name``) want it; only their credentials fetch it (empty from
    an older operator: then those of every cache on the node).
    """

    digest: Digest
    size: int
    media_type: str
    repository: Reference
    source: Source
    peers: tuple[str, ...]
    caches: tuple[str, ...] = ()


@dataclass(frozen=True)
class WantedChain:
    """One chain to unpack: ``chain_id``; blob ``layers`` and their ``diff_ids``, base first.

    ``unpacked_bytes`` is the operator's estimate of its snapshot (reserved on disk before
    unpacking); ``caches`` want it (its snapshot carries their pin labels).
    """

    chain_id: Digest
    layers: tuple[Digest, ...]
    diff_ids: tuple[Digest, ...]
    unpacked_bytes: int = 0
    caches: tuple[str, ...] = ()


@dataclass(frozen=True)
class Counters:
    """The byte counters persisted in status (bytes): they continue across restarts."""

    upstream: int = 0
    peer: int = 0
    served_to_peers: int = 0

    @classmethod
    def of(cls, counted: ByteCounters) -> Counters:
        """The counters of a status's ``bytes`` (a negative one reads as 0)."""
        return cls(max(counted.upstream, 0), max(counted.peer, 0),
                   max(counted.served_to_peers, 0))


@dataclass(frozen=True)
class NodeSpec:
    """The parts of a NodeLayerCache the agent acts on.

    ``layers`` in fetch order; ``images`` are references pinned by digest to pull whole
    through CRI once their layers are held, ``image_caches`` the caches wanting each (empty
    from an older operator), ``image_layers`` each one's layers for this node, base first,
    as the operator resolved them (absent: the agent resolves that image itself);
    ``caches`` the LayerCaches (``namespace/name``) wanting something here; ``generation``
    is ``metadata.generation``; ``counters`` and ``conditions`` are what the status held
    when the object was read.
    """

    name: str
    generation: int
    layers: tuple[WantedLayer, ...]
    images: tuple[str, ...]
    caches: tuple[str, ...]
    paused: bool
    counters: Counters
    conditions: tuple[Mapping[str, Any], ...]
    image_caches: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    image_layers: Mapping[str, tuple[Digest, ...]] = field(default_factory=dict)
    chains: tuple[WantedChain, ...] = ()
    #: What the disk-savings figures need: planned images and wanted chains.
    sharing: Sharing = field(default_factory=Sharing)

    @property
    def wanted(self) -> frozenset[Digest]:
        """The digests of `layers`."""
        return frozenset(layer.digest for layer in self.layers)


def _layer(name: str, index: int, raw: SpecLayer) -> WantedLayer:
    field = f"layers[{index}]"
    try:
        digest = Digest(raw.digest)
    except InvalidDigestError as error:
        raise InvalidNodeSpecError(name, f"{field}.digest", error.reason) from None
    try:
        repository = parse_reference(raw.repository)
    except InvalidReferenceError as error:
        raise InvalidNodeSpecError(name, f"{field}.repository", error.reason) from None
    return WantedLayer(digest, raw.size, raw.media_type, repository, raw.source,
                       tuple(raw.peers), tuple(raw.caches))


def _digests(name: str, field: str, raw: Sequence[str]) -> tuple[Digest, ...]:
    try:
        return tuple(Digest(value) for value in raw)
    except InvalidDigestError as error:
        raise InvalidNodeSpecError(name, field, error.reason) from None


def _chain(name: str, index: int, raw: SpecChain,
           layers: Mapping[Digest, WantedLayer]) -> WantedChain:
    field = f"chains[{index}]"
    (chain_id,) = _digests(name, f"{field}.chainID", [raw.chain_id])
    blobs = _digests(name, f"{field}.layers", raw.layers)
    diff_ids = _digests(name, f"{field}.diffIDs", raw.diff_ids)
    if not blobs or len(blobs) != len(diff_ids):
        raise InvalidNodeSpecError(name, f"{field}.diffIDs",
                                   f"{len(diff_ids)} diff IDs for {len(blobs)} layers")
    if (absent := next((d for d in blobs if d not in layers), None)) is not None:
        raise InvalidNodeSpecError(name, f"{field}.layers", f"{absent} is not in spec.layers")
    if chain_ids(diff_ids)[-1] != chain_id:
        raise InvalidNodeSpecError(name, f"{field}.chainID",
                                   f"{chain_id} is not the chain ID of diffIDs")
    return WantedChain(chain_id, blobs, diff_ids, raw.unpacked_bytes, tuple(raw.caches))


def _image_layers(name: str, index: int, indexes: Sequence[int],
                  positions: Sequence[Digest]) -> tuple[Digest, ...]:
    """``spec.images[index].layers`` as digests (each an index into ``spec.layers``)."""
    if (bad := next((i for i in indexes if not 0 <= i < len(positions)), None)) is not None:
        raise InvalidNodeSpecError(name, f"images[{index}].layers",
                                   f"{bad} is not an index of spec.layers "
                                   f"({len(positions)} layers)")
    return tuple(positions[i] for i in indexes)


def parse_node_spec(obj: Mapping[str, Any]) -> NodeSpec:
    """Parse a NodeLayerCache object as the API returns it (a dict).

    A digest listed twice keeps its first position (fetch order).

    Raises:
        InvalidNodeSpecError: a spec field has the wrong type or is missing
            (`layercache.api.NodeLayerCacheSpec`); a layer's digest, size, repository or
            source is unusable; a chain's digests are malformed, its layers are not in
            spec.layers, or its chain ID is not that of its diff IDs; an image's layer
            index is not a position of spec.layers.
    """
    obj_model = NodeLayerCache.read(obj)
    name, spec, status = obj_model.name, obj_model.spec, obj_model.status
    layers: dict[Digest, WantedLayer] = {}
    positions: list[Digest] = []  # spec.layers[i]'s digest, for spec.images[].layers
    for index, raw in enumerate(spec.layers):
        layer = _layer(name, index, raw)
        layers.setdefault(layer.digest, layer)
        positions.append(layer.digest)
    chains = tuple(_chain(name, index, raw, layers) for index, raw in enumerate(spec.chains))
    images = [image for image in spec.images if image.reference]
    return NodeSpec(
        name=name,
        generation=obj_model.generation or 0,
        layers=tuple(layers.values()),
        images=tuple(image.reference for image in images),
        caches=tuple(spec.caches),
        paused=spec.paused,
        counters=Counters.of(status.bytes),
        conditions=tuple(c.to_dict() for c in status.conditions),
        image_caches={image.reference: tuple(image.caches) for image in images},
        image_layers={image.reference: _image_layers(name, index, image.layers, positions)
                      for index, image in enumerate(spec.images)
                      if image.reference and image.layers},
        chains=chains,
        sharing=Sharing.parse(spec),
    )


