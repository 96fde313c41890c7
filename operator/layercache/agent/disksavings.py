"""Disk savings on one node: what sharing read-only layers and unpacked chains saves.

containerd stores content by digest and snapshots by chain ID, so two images with the same
base layer keep one blob of it, and two images with the same base chain keep one unpacked
snapshot of it. That content addressing is containerd's; layercache plans which blobs and
chains a node holds and measures what holding them once saves (docs/observability.md,
"Disk savings"):

- ``blobs``: bytes of the wanted layer blobs the node's content store holds (``Content.Info``
  sizes: compressed, as stored);
- ``snapshots``: bytes of the wanted chain snapshots committed in the snapshotter
  (``Snapshots.Usage`` of each: its own layer's disk, not its parents');
- ``separate``: the bytes the same planned images would take if each kept its own copy of
  its layers and chains (no sharing): per image, the held blobs of its layers plus the
  usage of the wanted chains that are prefixes of it, summed over the images;
- ``saved`` = ``separate`` - ``blobs`` - ``snapshots`` (never below 0).

Per node, an image listed by two caches counts once; per cache, only that cache's images,
blobs (``spec.layers[].caches``) and chains (``spec.chains[].caches``) count, so a blob two
caches share is in both caches' figures. Inputs come from the NodeLayerCache spec
(`Sharing.parse`: ``imageLayers`` from the operator, ``chains`` when the operator plans
unpacking — absent means no chains wanted) and from containerd, read by `DiskMeter`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layercache.containerd.errors import NotFound
from layercache.containerd.unpack import Snapshots
from layercache.digest import Digest, InvalidDigestError, chain_ids

__all__ = ["DiskFigures", "DiskMeter", "NodeDisk", "Sharing", "WantedChain", "measure"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WantedChain:
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
    chains: tuple[WantedChain, ...] = ()
    diff_ids: Mapping[Digest, Digest] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> Sharing:
        """The sharing facts of a NodeLayerCache ``spec`` (the CRD's camelCase dict).

        Lenient: the agent reports disk figures as well as it can, so an entry it cannot
        use (an index outside ``layers``, a digest that does not parse, ``layers`` and
        ``diffIDs`` of unequal length) is left out, not raised on; the spec's other fields
        are checked by `layercache.agent.nodespec.parse_node_spec`.
        """
        layers: list[Digest | None] = []
        layer_caches: dict[Digest, tuple[str, ...]] = {}
        for raw in spec.get("layers") or ():
            digest = _digest(raw.get("digest"))
            layers.append(digest)
            if digest is not None:
                layer_caches.setdefault(digest, tuple(str(c) for c in raw.get("caches") or ()))
        images: list[tuple[str, tuple[Digest, ...]]] = []
        for raw in spec.get("imageLayers") or ():
            digests: list[Digest] = []
            for index in raw.get("layers") or ():
                found = layers[index] if isinstance(index, int) and 0 <= index < len(
                    layers) else None
                if found is None:
                    break  # a chain is a prefix: nothing above a gap can be named
                digests.append(found)
            if digests:
                images.append((str(raw.get("cache", "")), tuple(digests)))
        chains: list[WantedChain] = []
        diff_ids: dict[Digest, Digest] = {}
        for raw in spec.get("chains") or ():
            chain_id = _digest(raw.get("chainID"))
            if chain_id is None:
                continue
            chains.append(WantedChain(chain_id, tuple(str(c) for c in raw.get("caches") or ())))
            pairs = (raw.get("layers") or [], raw.get("diffIDs") or [])
            if len(pairs[0]) == len(pairs[1]):
                for layer, diff_id in zip(*pairs, strict=True):
                    digest, diff = _digest(layer), _digest(diff_id)
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
class DiskFigures:
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
        return {"blobs": self.blobs, "snapshots": self.snapshots, "separate": self.separate,
                "saved": self.saved}


@dataclass(frozen=True)
class NodeDisk:
    """A node's `DiskFigures`, and those of each cache wanting something on it."""

    node: DiskFigures = DiskFigures()
    caches: Mapping[str, DiskFigures] = field(default_factory=dict)

    def to_status(self) -> dict[str, Any]:
        """``status.disk``: the node's figures and ``caches`` (sorted by cache)."""
        return {**self.node.to_status(),
                "caches": [{"cache": cache, **figures.to_status()}
                           for cache, figures in sorted(self.caches.items())]}


def measure(sharing: Sharing, blob_sizes: Mapping[Digest, int],
            snapshot_usage: Mapping[Digest, int]) -> NodeDisk:
    """The disk figures from the spec's ``sharing`` and what containerd holds.

    Args:
        sharing: the spec's layers, planned images and wanted chains.
        blob_sizes: digest → size (bytes) of the blobs in the content store (others ignored).
        snapshot_usage: chain ID → ``Snapshots.Usage`` size (bytes) of the committed chain
            snapshots (others ignored).

    Returns:
        Node and per-cache figures, as the module docstring defines them.

    """
    held = {d: blob_sizes[d] for d in sharing.layer_caches if d in blob_sizes}
    unpacked = {c.chain_id: snapshot_usage[c.chain_id] for c in sharing.chains
                if c.chain_id in snapshot_usage}
    caches = sorted({c for cs in sharing.layer_caches.values() for c in cs}
                    | {cache for cache, _ in sharing.images}
                    | {c for chain in sharing.chains for c in chain.caches})

    def apart(images: Iterable[tuple[Digest, ...]]) -> int:
        total = 0
        for layers in images:
            total += sum(held.get(d, 0) for d in layers)
            total += sum(unpacked.get(c, 0) for c in sharing.image_chains(layers))
        return total

    node = DiskFigures(sum(held.values()), sum(unpacked.values()),
                       apart({layers for _, layers in sharing.images}))
    per_cache = {}
    for cache in caches:
        per_cache[cache] = DiskFigures(
            sum(size for d, size in held.items() if cache in sharing.layer_caches[d]),
            sum(unpacked[c.chain_id] for c in sharing.chains
                if cache in c.caches and c.chain_id in unpacked),
            apart(layers for owner, layers in sharing.images if owner == cache))
    return NodeDisk(node, per_cache)


class DiskMeter:
    """Reads chain snapshot usage from a node's containerd for `measure`.

    ``snapshots`` is the snapshotter and namespace the chains are unpacked into (the CRI's).
    """

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    async def usage(self, chains: Iterable[WantedChain]) -> dict[Digest, int]:
        """Chain ID → ``Snapshots.Usage`` bytes of each of ``chains`` committed now.

        Raises:
            ContainerdError: listing or a usage call failed (other than a snapshot removed
                between the list and its usage call, which is left out).

        """
        wanted = {c.chain_id for c in chains}
        if not wanted:
            return {}
        found: dict[Digest, int] = {}
        for info in await self.snapshots.list():
            if info.committed and info.name in wanted:
                try:
                    found[Digest(info.name)] = (await self.snapshots.usage(info.name)).size
                except NotFound:
                    continue
        return found

    async def measure(self, sharing: Sharing, blob_sizes: Mapping[Digest, int]
                      ) -> tuple[NodeDisk, int]:
        """`measure` with the usage of ``sharing``'s chains read from containerd now.

        Returns:
            The figures, and how many of the wanted chains are committed.

        """
        usage = await self.usage(sharing.chains)
        return measure(sharing, blob_sizes, usage), len(usage)
