"""A `NodeLayerCache` (group ``layercache.dev``, version ``v1alpha1``) parsed at the edge.

The operator writes ``spec`` (what this node should hold, in fetch order); the agent reads
it here into typed values and writes ``status``. The CRD schema has checked types, enums
and patterns already; this module checks what it cannot (a digest the agent can verify, a
repository that parses as ``host/path``) and raises `InvalidNodeSpecError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from layercache.agent.disksavings import Sharing
from layercache.digest import Digest, InvalidDigestError, chain_ids
from layercache.reference import InvalidReferenceError, Reference, parse_reference

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

GROUP: Final = "layercache.dev"
VERSION: Final = "v1alpha1"
PLURAL: Final = "nodelayercaches"

Source = Literal["Upstream", "Peer"]


class InvalidNodeSpecError(ValueError):
    """A field of a NodeLayerCache's spec cannot be used; names the object and the field."""

    def __init__(self, name: str, field: str, problem: str) -> None:
        super().__init__(f"NodeLayerCache {name}: spec.{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class WantedLayer:
    """One layer to hold: blob ``digest`` of ``size`` bytes, found upstream in ``repository``.

    ``source`` says whether this node seeds it from the registry (``Upstream``) or takes it
    from one of ``peers`` (node names, most likely first), falling back to upstream.
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


@dataclass(frozen=True)
class NodeSpec:
    """The parts of a NodeLayerCache the agent acts on.

    ``layers`` in fetch order; ``images`` are references pinned by digest to pull whole
    through CRI once their layers are held, ``image_caches`` the caches wanting each (empty
    from an older operator); ``caches`` the LayerCaches (``namespace/name``) wanting
    something here; ``generation`` is ``metadata.generation``; ``counters`` and
    ``conditions`` are what the status held when the object was read.
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
    chains: tuple[WantedChain, ...] = ()
    #: What the disk-savings figures need: planned images and wanted chains.
    sharing: Sharing = field(default_factory=Sharing)

    @property
    def wanted(self) -> frozenset[Digest]:
        """The digests of `layers`."""
        return frozenset(layer.digest for layer in self.layers)


def _layer(name: str, index: int, raw: Mapping[str, Any]) -> WantedLayer:
    field = f"layers[{index}]"
    try:
        digest = Digest(str(raw.get("digest", "")))
    except InvalidDigestError as error:
        raise InvalidNodeSpecError(name, f"{field}.digest", error.reason) from None
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidNodeSpecError(name, f"{field}.size", "needs a byte count >= 0")
    repository_text = str(raw.get("repository", ""))
    try:
        repository = parse_reference(repository_text)
    except InvalidReferenceError as error:
        raise InvalidNodeSpecError(name, f"{field}.repository", error.reason) from None
    source = raw.get("source")
    if source not in ("Upstream", "Peer"):
        raise InvalidNodeSpecError(name, f"{field}.source", "must be Upstream or Peer")
    peers = tuple(str(peer) for peer in raw.get("peers") or ())
    caches = tuple(str(cache) for cache in raw.get("caches") or ())
    return WantedLayer(digest, size, str(raw.get("mediaType", "")), repository, source, peers,
                       caches)


def _digests(name: str, field: str, raw: Any) -> tuple[Digest, ...]:
    try:
        return tuple(Digest(str(value)) for value in raw or ())
    except InvalidDigestError as error:
        raise InvalidNodeSpecError(name, field, error.reason) from None


def _chain(name: str, index: int, raw: Mapping[str, Any],
           layers: Mapping[Digest, WantedLayer]) -> WantedChain:
    field = f"chains[{index}]"
    (chain_id,) = _digests(name, f"{field}.chainID", [raw.get("chainID", "")])
    blobs = _digests(name, f"{field}.layers", raw.get("layers"))
    diff_ids = _digests(name, f"{field}.diffIDs", raw.get("diffIDs"))
    if not blobs or len(blobs) != len(diff_ids):
        raise InvalidNodeSpecError(name, f"{field}.diffIDs",
                                   f"{len(diff_ids)} diff IDs for {len(blobs)} layers")
    if (absent := next((d for d in blobs if d not in layers), None)) is not None:
        raise InvalidNodeSpecError(name, f"{field}.layers", f"{absent} is not in spec.layers")
    if chain_ids(diff_ids)[-1] != chain_id:
        raise InvalidNodeSpecError(name, f"{field}.chainID",
                                   f"{chain_id} is not the chain ID of diffIDs")
    return WantedChain(chain_id, blobs, diff_ids, _count(raw, "unpackedBytes"),
                       tuple(str(cache) for cache in raw.get("caches") or ()))


def _count(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    return value if isinstance(value, int) and value >= 0 else 0


def parse_node_spec(obj: Mapping[str, Any]) -> NodeSpec:
    """Parse a NodeLayerCache object as the API returns it (a dict).

    A digest listed twice keeps its first position (fetch order).

    Raises:
        InvalidNodeSpecError: a layer's digest, size, repository or source is unusable; a
            chain's digests are malformed, its layers are not in spec.layers, or its
            chain ID is not that of its diff IDs.

    """
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name", ""))
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    layers: dict[Digest, WantedLayer] = {}
    for index, raw in enumerate(spec.get("layers") or ()):
        layer = _layer(name, index, raw)
        layers.setdefault(layer.digest, layer)
    chains = tuple(_chain(name, index, raw, layers)
                   for index, raw in enumerate(spec.get("chains") or ()))
    images = tuple(str(image["reference"]) for image in spec.get("images") or ()
                   if image.get("reference"))
    counted = status.get("bytes") or {}
    return NodeSpec(
        name=name,
        generation=int(metadata.get("generation") or 0),
        layers=tuple(layers.values()),
        images=images,
        caches=tuple(str(cache) for cache in spec.get("caches") or ()),
        paused=bool(spec.get("paused", False)),
        counters=Counters(_count(counted, "upstream"), _count(counted, "peer"),
                          _count(counted, "servedToPeers")),
        conditions=tuple(status.get("conditions") or ()),
        image_caches={str(image["reference"]): tuple(str(c) for c in image.get("caches") or ())
                      for image in spec.get("images") or () if image.get("reference")},
        chains=chains,
        sharing=Sharing.parse(spec),
    )
