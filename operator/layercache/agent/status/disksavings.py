"""Disk savings on one node: what sharing read-only layers and unpacked chains saves.

containerd stores content by digest and snapshots by chain ID, so two images with the same
base layer keep one blob of it, and two images with the same base chain keep one unpacked
snapshot of it. That content addressing is containerd's; layercache plans which blobs and
chains a node holds and measures what holding them once saves (docs/observability.md,
"Disk savings"):

- ``blobs``: bytes of the wanted layer blobs the node's content store holds (``Content.List``
  sizes: compressed, as stored);
- ``snapshots``: bytes of the committed chain snapshots layercache pinned (our ``gc.root``
  and managed-by labels): ``Snapshots.Usage`` of each, its own layer's disk, not its
  parents';
- ``separate``: the bytes the same planned images would take if each kept its own copy of
  its layers and chains (no sharing): per image, the held blobs of its layers plus the
  usage of the pinned snapshots of its chains (named from its layers' diff IDs), summed
  over the images;
- ``saved`` = ``separate`` - ``blobs`` - ``snapshots`` (never below 0).

Per node, an image listed by two caches counts once; per cache, only that cache's images,
blobs (``spec.layers[].caches``) and snapshots (labelled for it) count, so a blob two
caches share is in both caches' figures. Inputs come from the NodeLayerCache spec
(`Sharing.parse`: ``layers``, ``imageLayers`` from the operator, and ``chains`` when the
operator plans unpacking — absent means none) and from containerd, read by `DiskMeter`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layercache.api.nodelayercache import DiskFigures as ApiDiskFigures
from layercache.api.nodelayercache import NodeCacheDisk, NodeDiskStatus, NodeLayerCacheSpec
from layercache.containerd.errors import NotFound
from layercache.containerd.labels import GC_ROOT_LABEL, caches_of, is_managed
from layercache.containerd.ports import ContentStorePort
from layercache.containerd.unpack import UNCOMPRESSED_LABEL, Snapshots
from layercache.oci.digest import Digest, InvalidDigestError, chain_ids

__all__ = ["DiskMeter", "DiskUse", "Held", "NodeDisk", "SharedChain", "Sharing", "measure"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharedChain:
    """A chain the node should hold unpacked: its ``chain_id`` and the caches wanting it."""

    chain_id: Digest
    caches: tuple[str, ...]


@dataclass(frozen=True)
class Sharing:
    """What the disk figures need of a NodeLayerCache spec.

    ``layer_caches``: layer digest → caches wanting it (``spec.layers``); ``images``: per
    planned image, (cache, its layer digests held here, base first) (``spec.imageLayers``);
    ``chains``: the wanted chains (``spec.chains``); ``diff_ids``: layer digest → diff ID,
    from the chains' ``layers`` and ``diffIDs``, to name each image's chains.
    """

    layer_caches: Mapping[Digest, tuple[str, ...]] = field(default_factory=dict)
    images: tuple[tuple[str, tuple[Digest, ...]], ...] = ()
    chains: tuple[SharedChain, ...] = ()
    diff_ids: Mapping[Digest, Digest] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: NodeLayerCacheSpec | Mapping[str, Any]) -> Sharing:
        """The sharing facts of a NodeLayerCache ``spec`` (the model, or the CRD's dict).

        Lenient: the agent reports disk figures as well as it can, so an entry it cannot
        use (an index outside ``layers``, a digest that does not parse, ``layers`` and
        ``diffIDs`` of unequal length) is left out, not raised on; the spec's other fields
        are checked by `layercache.agent.nodespec.parse_node_spec`.
        """
        if not isinstance(spec, NodeLayerCacheSpec):
            spec = NodeLayerCacheSpec.read_lenient(spec)
        layers: list[Digest | None] = []
        layer_caches: dict[Digest, tuple[str, ...]] = {}
        for layer in spec.layers:
            digest = _digest(layer.digest)
            layers.append(digest)
            if digest is not None:
                layer_caches.setdefault(digest, tuple(layer.caches))
        images: list[tuple[str, tuple[Digest, ...]]] = []
        for image in spec.image_layers:
            digests: list[Digest] = []
            for index in image.layers:
                found = layers[index] if 0 <= index < len(layers) else None
                if found is None:
                    break  # a chain is a prefix: nothing above a gap can be named
                digests.append(found)
            if digests:
                images.append((image.cache, tuple(digests)))
        chains: list[SharedChain] = []
        diff_ids: dict[Digest, Digest] = {}
        for chain in spec.chains:
            chain_id = _digest(chain.chain_id)
            if chain_id is None:
                continue
            chains.append(SharedChain(chain_id, tuple(chain.caches)))
            if len(chain.layers) == len(chain.diff_ids):
                for layer_digest, diff_id in zip(chain.layers, chain.diff_ids, strict=True):
                    digest, diff = _digest(layer_digest), _digest(diff_id)
                    if digest is not None and diff is not None:
                        diff_ids.setdefault(digest, diff)
        return cls(layer_caches, tuple(images), tuple(chains), diff_ids)

    def image_chains(self, layers: Sequence[Digest]) -> tuple[Digest, ...]:
        """The chain IDs of the prefixes of an image's ``layers`` whose diff IDs are known."""
        known: list[Digest] = []
        for digest in layers:
            diff_id = self.diff_ids.get(digest)
            if diff_id is None:
                break
            known.append(diff_id)
        return tuple(chain_ids(known))


def _digest(value: object) -> Digest | None:
    try:
        return Digest(str(value)) if value else None
    except InvalidDigestError:
        return None


@dataclass(frozen=True)
class DiskUse:
    """Bytes on disk by kind, bytes the same images would take apart, and the difference."""

    blobs: int = 0
    snapshots: int = 0
    separate: int = 0

    @property
    def saved(self) -> int:
        """``separate`` minus what is on disk (``blobs`` + ``snapshots``), at least 0."""
        return max(self.separate - self.blobs - self.snapshots, 0)

    def to_status(self) -> dict[str, int]:
        """The ``status.disk`` object (and each ``status.disk.caches[]`` item's figures)."""
        return ApiDiskFigures(blobs=self.blobs, snapshots=self.snapshots,
                              separate=self.separate, saved=self.saved).to_dict()


@dataclass(frozen=True)
class NodeDisk:
    """A node's `DiskUse`, and those of each cache wanting something on it."""

    node: DiskUse = DiskUse()
    caches: Mapping[str, DiskUse] = field(default_factory=dict)

    def to_model(self) -> NodeDiskStatus:
        """``status.disk``: the node's figures and ``caches`` (sorted by cache)."""
        return NodeDiskStatus(**self.node.to_status(), caches=[
            NodeCacheDisk(cache=cache, **figures.to_status())
            for cache, figures in sorted(self.caches.items())])

    def to_status(self) -> dict[str, Any]:
        """`to_model` as the CRD's dict."""
        return self.to_model().to_dict()


@dataclass(frozen=True)
class Held:
    """What containerd holds for us: blobs and the chain snapshots layercache pinned.

    ``blobs``: digest → size (bytes) of the blobs in the content store; ``diff_ids``: layer
    digest → diff ID, from the blobs' ``containerd.io/uncompressed`` labels (set by whoever
    unpacked them); ``snapshots``: chain ID → (``Snapshots.Usage`` bytes, caches labelled
    on it) of the committed snapshots carrying our pin labels.
    """

    blobs: Mapping[Digest, int] = field(default_factory=dict)
    diff_ids: Mapping[Digest, Digest] = field(default_factory=dict)
    snapshots: Mapping[Digest, tuple[int, frozenset[str]]] = field(default_factory=dict)


def measure(sharing: Sharing, held: Held) -> NodeDisk:
    """The disk figures from the spec's ``sharing`` and what containerd holds.

    Blobs count when the spec wants them (each cache: the layers naming it); snapshots when
    layercache pinned them (each cache: the snapshots labelled for it). An image's chains
    are named from its layers' diff IDs (the spec's chains', else the blobs' labels).

    Returns:
        Node and per-cache figures, as the module docstring defines them.

    """
    blobs = {d: held.blobs[d] for d in sharing.layer_caches if d in held.blobs}
    usage = {chain: size for chain, (size, _) in held.snapshots.items()}
    names = Sharing(sharing.layer_caches, sharing.images, sharing.chains,
                    {**held.diff_ids, **sharing.diff_ids})
    caches = sorted({c for cs in sharing.layer_caches.values() for c in cs}
                    | {cache for cache, _ in sharing.images}
                    | {c for chain in sharing.chains for c in chain.caches}
                    | {c for _, labelled in held.snapshots.values() for c in labelled})

    def apart(images: Iterable[tuple[Digest, ...]]) -> int:
        total = 0
        for layers in images:
            total += sum(blobs.get(d, 0) for d in layers)
            total += sum(usage.get(c, 0) for c in names.image_chains(layers))
        return total

    node = DiskUse(sum(blobs.values()), sum(usage.values()),
                       apart({layers for _, layers in sharing.images}))
    per_cache = {
        cache: DiskUse(
            sum(size for d, size in blobs.items() if cache in sharing.layer_caches[d]),
            sum(size for size, labelled in held.snapshots.values() if cache in labelled),
            apart(layers for owner, layers in sharing.images if owner == cache))
        for cache in caches}
    return NodeDisk(node, per_cache)


class DiskMeter:
    """Reads what `measure` needs from a node's containerd: one content and one snapshot list.

    ``store`` is the content store the agent writes to; ``snapshots`` the snapshotter and
    namespace chains are unpacked into (the CRI's).
    """

    def __init__(self, store: ContentStorePort, snapshots: Snapshots) -> None:
        self.store = store
        self.snapshots = snapshots

    async def held(self) -> Held:
        """Blobs, their diff IDs, and the usage of the committed snapshots we pinned.

        Raises:
            ContainerdError: a list or usage call failed (a snapshot removed between the
                list and its usage call is left out, not raised on).

        """
        blobs: dict[Digest, int] = {}
        diff_ids: dict[Digest, Digest] = {}
        for info in await self.store.list():
            blobs[info.digest] = info.size
            if (diff_id := _digest(info.labels.get(UNCOMPRESSED_LABEL))) is not None:
                diff_ids[info.digest] = diff_id
        snapshots: dict[Digest, tuple[int, frozenset[str]]] = {}
        for snap in await self.snapshots.list():
            name = _digest(snap.name)
            if (name is None or not snap.committed or not is_managed(snap.labels)
                    or GC_ROOT_LABEL not in snap.labels):
                continue
            try:
                size = (await self.snapshots.usage(snap.name)).size
            except NotFound:
                continue
            snapshots[name] = (size, caches_of(snap.labels))
        return Held(blobs, diff_ids, snapshots)

    async def measure(self, sharing: Sharing) -> NodeDisk:
        """`measure` with what containerd holds now."""
        return measure(sharing, await self.held())
