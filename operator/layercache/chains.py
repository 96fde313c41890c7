"""The planner's chains: which prefixes of a node's images to unpack, in what order.

Internal to `layercache.planner` (step 4 of its module docstring), kept apart so each file
holds one concern. A *chain* is a prefix of an image's layers; containerd keys its unpacked
form (a committed snapshot) by the prefix's chain ID (OCI image-spec ``config.md``,
`layercache.digest.chain_ids`), so a CRI pull of any image built on it skips fetching and
unpacking those layers.

A chain is a candidate when at least ``min_shared_by`` distinct images (manifests) of the
node's platform start with it, and every layer of it is in the node's blob order. Chains
are ordered by where their last blob comes in that order (a chain can be unpacked once its
blobs are held), then shortest first (a chain's parent is always listed before it), then by
chain ID. A node takes the chains whose blobs it holds, then the longest prefix of them
whose estimated unpacked size fits what the blobs left of its budget.

Unpacked size: nothing is known before the first unpack, so the plan uses an estimate,
`estimate_unpacked_bytes`: a compressed layer (gzip, zstd) is counted at
`COMPRESSION_RATIO` times its blob size, an uncompressed one at its size. A chain's own
snapshot holds only its top layer's files (overlayfs stacks the parents' directories), so
a chain costs its top layer's estimate.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Generic, NamedTuple, TypeVar, overload

from layercache.digest import Digest, chain_ids

if TYPE_CHECKING:
    from layercache.image import Layer, ResolvedImage

__all__ = ["COMPRESSION_RATIO", "Chain", "ChainOrder", "PlatformChains", "PrefixCatalogue",
           "Run", "chain_order", "estimate_unpacked_bytes"]

#: Estimated unpacked bytes per compressed byte of a gzip or zstd layer. Measured here: the
#: Debian minbase rootfs is 170 MB as a tar and 56 MB gzipped (3.0); OS and language
#: runtime layers are typically 2.5-3.5. Erring high keeps a budget from being overrun.
COMPRESSION_RATIO: Final = 3

T = TypeVar("T")


class Run(Sequence[T], Generic[T]):
    """A read-only slice of a shared tuple, shared by many node plans without copying."""

    __slots__ = ("_items", "_start", "_stop")

    def __init__(self, items: tuple[T, ...], start: int = 0, stop: int | None = None) -> None:
        """View ``items[start:stop]`` without copying it."""
        self._items = items
        self._start = start
        self._stop = len(items) if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[T, ...]: ...
    def __getitem__(self, index: int | slice) -> T | tuple[T, ...]:
        if isinstance(index, slice):
            return self._items[self._start : self._stop][index]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._items[self._start + index % len(self)]

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(self._items, self._start, self._stop)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<{len(self)} items>)"


def estimate_unpacked_bytes(layer: Layer) -> int:
    """Estimated bytes of ``layer`` unpacked on disk (see the module docstring)."""
    compressed = layer.media_type.endswith(("gzip", "zstd"))
    return layer.size * COMPRESSION_RATIO if compressed else layer.size


class Chain(NamedTuple):
    """A chain to unpack: ``chain_id``; ``layers`` base first; estimated bytes; sharing.

    ``unpacked_bytes`` estimates its own snapshot (its top layer, `estimate_unpacked_bytes`);
    ``shared_by`` counts the distinct images of the platform that start with it. A tuple
    (not a dataclass) and ``layers`` a view of its image's layers: a plan of 10,000 images
    makes ~10^5 of them.
    """

    chain_id: Digest
    layers: Sequence[Layer]
    unpacked_bytes: int
    shared_by: int

    @property
    def diff_ids(self) -> tuple[Digest, ...]:
        """The layers' diff IDs, base first."""
        return tuple(layer.diff_id for layer in self.layers)


@dataclass(slots=True)
class ChainOrder:
    """One node group's candidate chains in order, and what a node needs to cut a prefix.

    ``ready[i]``: how many blobs of the group order a node must hold for ``chains[i]``;
    ``cum_bytes[i]``: estimated unpacked bytes of ``chains[: i + 1]``.
    """

    chains: tuple[Chain, ...]
    ready: list[int]
    cum_bytes: list[int]

    def cut(self, held_layers: int, free_bytes: int | None) -> tuple[int, int]:
        """(chains taken, chains whose blobs are held but that the budget leaves out)."""
        eligible = bisect.bisect_right(self.ready, held_layers)
        if free_bytes is None:
            return eligible, 0
        taken = min(eligible, bisect.bisect_right(self.cum_bytes, free_bytes))
        return taken, eligible - taken


class PrefixCatalogue:
    """Every image's chain IDs, computed once per manifest."""

    def __init__(self, images: Sequence[ResolvedImage]) -> None:
        """Compute the chain IDs of ``images``' unpackable prefixes (`ResolvedImage.unpackable`)."""
        self.images = images
        by_manifest: dict[Digest, list[Digest]] = {}
        self.ids: list[list[Digest]] = []
        for image in images:
            ids = by_manifest.get(image.manifest_digest)
            if ids is None:
                count = len(image.layers) if image.unpackable is None else image.unpackable
                ids = by_manifest[image.manifest_digest] = chain_ids(
                    layer.diff_id for layer in image.layers[:count])
            self.ids.append(ids)


class PlatformChains:
    """The chains of one platform's images: how many images share each, made on demand.

    Per chain ID one index into flat arrays (sharing count, first image, depth), not a
    dict of tuples: a platform of 10,000 images has ~10^5 chains.
    """

    def __init__(self, prefixes: PrefixCatalogue, members: Sequence[int]) -> None:
        """Count, per chain ID, the distinct manifests among images ``members`` with it."""
        self.prefixes = prefixes
        self.index: dict[Digest, int] = {}
        self.shared, self.image, self.depth = array("l"), array("l"), array("l")
        seen: set[Digest] = set()
        for i in members:
            manifest = prefixes.images[i].manifest_digest
            if manifest in seen:
                continue
            seen.add(manifest)
            for depth, chain_id in enumerate(prefixes.ids[i]):
                k = self.index.get(chain_id)
                if k is None:
                    self.index[chain_id] = len(self.shared)
                    self.shared.append(1)
                    self.image.append(i)
                    self.depth.append(depth)
                else:
                    self.shared[k] += 1
        self._made: dict[int, Chain] = {}

    def chain(self, chain_id: Digest) -> Chain:
        """The `Chain` of ``chain_id`` (one object per platform, shared by its groups)."""
        k = self.index[chain_id]
        made = self._made.get(k)
        if made is None:
            depth = self.depth[k]
            layers = self.prefixes.images[self.image[k]].layers
            made = self._made[k] = Chain(
                chain_id, Run(layers, 0, depth + 1), estimate_unpacked_bytes(layers[depth]),
                self.shared[k])
        return made


def chain_order(platform: PlatformChains, members: Sequence[int],
                position: Mapping[Digest, int], min_shared_by: int) -> ChainOrder:
    """Order the chains of images ``members`` for one node group (module docstring).

    ``position`` maps each blob digest of the group's order to its index there.
    """
    prefixes, index, shared = platform.prefixes, platform.index, platform.shared
    ready: dict[Digest, int] = {}
    for i in members:
        layers = prefixes.images[i].layers
        last = -1
        for depth, chain_id in enumerate(prefixes.ids[i]):
            known = ready.get(chain_id)
            if known is not None:  # from another image: as ready as it was there
                last = max(last, known - 1)
                continue
            at = position.get(layers[depth].digest)
            # Left out, and so is every chain above it (sharing only falls with depth).
            if at is None or shared[index[chain_id]] < min_shared_by:
                break
            last = max(last, at)
            ready[chain_id] = last + 1
    depth_of = platform.depth
    ordered = sorted(ready, key=lambda c: (ready[c], depth_of[index[c]], c))
    chains = tuple(map(platform.chain, ordered))
    return ChainOrder(
        chains=chains,
        ready=[ready[c] for c in ordered],
        cum_bytes=list(itertools.accumulate(c.unpacked_bytes for c in chains)),
    )
