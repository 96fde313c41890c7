"""The planner's chains: which prefixes of a node's images to unpack, in what order.

Internal to `layercache.plan.planner` (step 4 of its module docstring), kept apart so each file
holds one concern. A *chain* is a prefix of an image's layers; containerd keys its unpacked
form (a committed snapshot) by the prefix's chain ID (OCI image-spec ``config.md``,
`layercache.oci.digest.chain_ids`), so a CRI pull of any image built on it skips fetching and
unpacking those layers.

A chain is a candidate when at least ``min_shared_by`` distinct images (manifests) of the
node's platform start with it, and every layer of it is in the node's blob order. Chains
are ordered by where their last blob comes in that order (a chain can be unpacked once its
blobs are held), then shortest first (a chain's parent is always listed before it), then by
chain ID. A node takes the chains whose blobs it holds, then the longest prefix of them
whose estimated unpacked size fits what the blobs left of its budget.

A chain's blobs are those of the first image (in the planner's order) that starts with it.
One diff ID may come in two blobs (the same layer compressed two ways); such a chain waits
for its parent as well, and a node group whose images have only the other blob leaves it out.

Cost (10,000 images, ~10^5 chains): chains are interned per manifest as a trie over diff
IDs, one depth at a time with C-level bulk operations, each chain ID hashed once; each
platform sorts its chains once, and a node group's chains are a filter of that order.
`Chain` objects are made when a chain is first read (``NodePlan.chains``), once per plan.

Unpacked size: nothing is known before the first unpack, so the plan uses an estimate,
`estimate_unpacked_bytes`: a compressed layer (gzip, zstd) is counted at
`COMPRESSION_RATIO` times its blob size, an uncompressed one at its size. A chain's own
snapshot holds only its top layer's files (overlayfs stacks the parents' directories), so
a chain costs its top layer's estimate.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Generic, NamedTuple, TypeVar, overload

from layercache.oci.digest import Digest, next_chain_id
from layercache.plan.layerorder import LEFT_OUT, drain, sort_ties

if TYPE_CHECKING:
    from layercache.oci.image import Layer, PlanImage

__all__ = ["COMPRESSION_RATIO", "Chain", "ChainOrder", "PlatformChains", "PrefixCatalogue",
           "Run", "chain_order", "estimate_unpacked_bytes"]

#: Estimated unpacked bytes per compressed byte of a gzip or zstd layer. Measured here: the
#: Debian minbase rootfs is 170 MB as a tar and 56 MB gzipped (3.0); OS and language
#: runtime layers are typically 2.5-3.5. Erring high keeps a budget from being overrun.
COMPRESSION_RATIO: Final = 3

T = TypeVar("T")


class Run(Sequence[T], Generic[T]):
    """A read-only slice of a shared sequence, shared by many node plans without copying."""

    __slots__ = ("_items", "_start", "_stop")

    def __init__(self, items: Sequence[T], start: int = 0, stop: int | None = None) -> None:
        """View ``items[start:stop]`` without copying it."""
        self._items = items
        self._start = start
        self._stop = len(items) if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    @property
    def key(self) -> tuple[int, int, int]:
        """Which view this is: equal keys, equal items (while the shared sequence lives)."""
        return id(self._items), self._start, self._stop

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[T, ...]: ...
    def __getitem__(self, index: int | slice) -> T | tuple[T, ...]:
        if isinstance(index, slice):
            return tuple(self._items[self._start : self._stop])[index]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._items[self._start + index % len(self)]

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(self._items, self._start, self._stop)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<{len(self)} items>)"


def estimate_unpacked_bytes(layer: Layer) -> int:
    """Estimated bytes of ``layer`` unpacked on disk (see the module docstring)."""
    return layer.size * unpacked_ratio(layer.media_type)


def unpacked_ratio(media_type: str) -> int:
    """Estimated unpacked bytes per blob byte of a layer of ``media_type``."""
    return COMPRESSION_RATIO if media_type.endswith(("gzip", "zstd")) else 1


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

    chains: Sequence[Chain]
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
    """Every image's unpackable prefixes as chains, each distinct chain once, as an int.

    A trie over diff IDs: chain ``c`` rests on chain ``parent[c]`` (-1: none) and has the
    chain ID ``ids[c]`` (`layercache.oci.digest.next_chain_id`); two prefixes are one chain
    exactly when their diff IDs are equal, so each chain ID is hashed once, not once per
    image. ``rows[i]``: image ``i``'s chains, base first (`PlanImage.unpackable`).
    """

    def __init__(self, images: Sequence[PlanImage]) -> None:
        """Intern the chains of ``images`` (once per manifest)."""
        self.images = images
        firsts: dict[Digest, int] = {}
        row_of = [firsts.setdefault(image.manifest_digest, i) for i, image in enumerate(images)]
        distinct = sorted(firsts.values(), key=lambda i: -_unpackable(images[i]))
        diffs = [[layer.diff_id for layer in images[i].layers[: _unpackable(images[i])]]
                 for i in distinct]
        numbers = dict(zip(dict.fromkeys(itertools.chain.from_iterable(diffs)),
                           itertools.count()))
        names, width = list(numbers), len(numbers)
        coded = [list(map(numbers.__getitem__, row)) for row in diffs]
        shortest_last = [-len(row) for row in coded]  # ascending: images longest first
        self.parent: list[int] = []
        self.ids: list[Digest] = []
        # One trie level (depth) at a time over the images that deep, a prefix of them,
        # with C-level bulk operations: a chain's key is (parent + 1) * width + its diff
        # ID's number, so equal keys are equal diff-ID prefixes.
        columns: list[list[int]] = []
        below: list[int] = []
        for depth in range(-shortest_last[0] if coded else 0):
            deep = bisect.bisect_left(shortest_last, -depth)
            keys = list(map(operator.itemgetter(depth), coded[:deep]))
            if depth:
                keys = list(map(operator.add, keys, map(operator.mul, map(
                    (1).__add__, below[:deep]), itertools.repeat(width))))
            level = dict(zip(dict.fromkeys(keys), itertools.count(len(self.parent))))
            parents = list(map((-1).__add__, map(operator.floordiv, level,
                                                 itertools.repeat(width))))
            diff = list(map(names.__getitem__, map(operator.mod, level, itertools.repeat(width))))
            self.parent.extend(parents)
            self.ids.extend(diff if not depth else list(map(
                next_chain_id, map(self.ids.__getitem__, parents), diff)))
            below = list(map(level.__getitem__, keys))
            columns.append(below)
        # Images with no unpackable layer are in no column: they get empty rows.
        padded = itertools.chain(itertools.zip_longest(*columns), itertools.repeat(()))
        made = dict(zip(distinct, (row[:len(codes)] for row, codes in zip(
            padded, coded, strict=False)), strict=True))
        self.rows: list[Sequence[int]] = list(map(made.__getitem__, row_of))


def _unpackable(image: PlanImage) -> int:
    return len(image.layers) if image.unpackable is None else image.unpackable


_digest = operator.attrgetter("digest")
_size = operator.attrgetter("size")
_media_type = operator.attrgetter("media_type")


class PlatformChains:
    """The chains of one platform's images, each once, and their priority order.

    Built once per platform with C-level bulk operations over flat lists (a platform of
    10,000 images has ~10^5 chains), not a Python loop per chain of every image per group.
    Per chain (an int ``k``, numbered in order of first appearance, so a parent before its
    children): ``shared[k]`` distinct manifests starting with it; ``image[k]`` and
    ``depth[k]``, the first image with it and its top layer's index there (that image's
    blobs are the chain's ``layers``); ``last[k]`` the highest platform-order position
    among those blobs (`LEFT_OUT` if one of them is not in the order). A node group's
    chains are then a filter of one platform-wide sort (`chain_order`).
    """

    def __init__(self, prefixes: PrefixCatalogue, members: Sequence[int],
                 rank: Mapping[Digest, int]) -> None:
        """Index the chains of images ``members``; ``rank`` is the platform's blob order."""
        self.prefixes, self.rank = prefixes, rank
        images = prefixes.images
        first_of: dict[Digest, int] = {}
        self.row: dict[int, int] = {}  # member image → first image of its manifest
        for i in members:
            self.row[i] = first_of.setdefault(images[i].manifest_digest, i)
        firsts = list(first_of.values())
        lengths = [len(prefixes.rows[i]) for i in firsts]
        flat = list(itertools.chain.from_iterable(map(prefixes.rows.__getitem__, firsts)))
        self.index: dict[int, int] = dict(zip(dict.fromkeys(flat), itertools.count()))
        self.chains: list[int] = list(self.index)  # k → the catalogue's chain
        ks = list(map(self.index.__getitem__, flat))
        ends = list(itertools.accumulate(lengths))
        bounds = list(map(slice, [0, *ends], ends))
        self.rows: dict[int, list[int]] = dict(zip(firsts, map(ks.__getitem__, bounds),
                                                   strict=True))
        counts = collections.Counter(ks)
        self.shared = list(map(counts.__getitem__, range(len(self.chains))))
        first = [0] * len(self.chains)  # flat position of each chain's first appearance
        drain(map(first.__setitem__, reversed(ks), range(len(ks) - 1, -1, -1)))
        owner = list(itertools.chain.from_iterable(map(itertools.repeat, firsts, lengths)))
        depths = list(itertools.chain.from_iterable(map(range, lengths)))
        layers = [layer for i, n in zip(firsts, lengths, strict=True)
                  for layer in images[i].layers[:n]]
        blobs = list(map(_digest, layers))
        placed = list(map(rank.get, blobs, itertools.repeat(LEFT_OUT)))
        # Running maximum of each image's blob positions: a prefix can be unpacked once
        # its highest-placed blob is held.
        highest = list(itertools.chain.from_iterable(
            itertools.accumulate(placed[bound], max) for bound in bounds))
        self.image = list(map(owner.__getitem__, first))
        self.depth = list(map(depths.__getitem__, first))
        self.last = list(map(highest.__getitem__, first))
        tops = list(map(layers.__getitem__, first))
        ratios = {t: unpacked_ratio(t) for t in {layer.media_type for layer in tops}}
        self.unpacked = list(map(operator.mul, map(_size, tops),
                                 map(ratios.__getitem__, map(_media_type, tops))))
        # One chain ID from different blobs (a diff ID compressed two ways): the chain's
        # blobs are its first image's; it, and all that rests on it, is made ready no
        # earlier than its parent, and `chain_order` checks its blobs per group.
        other = map(operator.ne, blobs, map(blobs.__getitem__, map(first.__getitem__, ks)))
        self.mixed: set[int] = set(itertools.compress(ks, other))
        if self.mixed:
            for k, at in enumerate(first):
                parent = ks[at - 1] if self.depth[k] else -1
                if k in self.mixed or parent in self.mixed:
                    self.mixed.add(k)
                    self.last[k] = max(self.last[k], self.last[parent] if parent >= 0 else -1)
        self._made: dict[int, Chain] = {}
        self._ordered: dict[int, list[int]] = {}

    def chain_id(self, k: int) -> Digest:
        """The chain ID of chain ``k``."""
        return self.prefixes.ids[self.chains[k]]

    def chain(self, k: int) -> Chain:
        """The `Chain` ``k`` (one object per platform, shared by its groups)."""
        made = self._made.get(k)
        if made is None:
            depth = self.depth[k]
            layers = self.prefixes.images[self.image[k]].layers
            made = self._made[k] = Chain(self.chain_id(k), Run(layers, 0, depth + 1),
                                         self.unpacked[k], self.shared[k])
        return made

    def ordered(self, min_shared_by: int) -> list[int]:
        """Chains with every blob in the order and ``min_shared_by`` sharing, in order.

        By ``last`` (when they can be unpacked), then depth (a parent first), then chain
        ID: one sort of packed ints, and only runs of equal keys sorted by chain ID.
        """
        found = self._ordered.get(min_shared_by)
        if found is None:
            shared, last, depth = self.shared, self.last, self.depth
            keep = [k for k in range(len(shared))
                    if shared[k] >= min_shared_by and last[k] < LEFT_OUT]
            width = max(depth, default=0) + 1
            keys = [last[k] * width + depth[k] for k in keep]
            found = self._ordered[min_shared_by] = sort_ties(
                keep, keys, self.chain_id)
        return found


def chain_order(platform: PlatformChains, members: Sequence[int], member: bytes | None,
                min_shared_by: int) -> ChainOrder:
    """Order the chains of images ``members`` for one node group (module docstring).

    ``member[p]`` is 1 where platform-order position ``p`` is in the group's blob order
    (None: every position is; the group has all the platform's images). A chain is ready
    once a node holds the group's blobs up to and including its highest-placed one.
    """
    ordered = platform.ordered(min_shared_by)
    last = platform.last
    if member is None:
        ready = [last[k] + 1 for k in ordered]
    else:
        wanted = bytearray(len(platform.shared))
        rows = map(platform.rows.__getitem__, map(platform.row.__getitem__, members))
        drain(map(wanted.__setitem__, itertools.chain.from_iterable(rows),
                  itertools.repeat(1)))
        if platform.mixed:
            _check_mixed(platform, wanted, member, ordered)
        ordered = list(itertools.compress(ordered, map(wanted.__getitem__, ordered)))
        held = list(itertools.accumulate(member))  # group blobs at positions <= p
        ready = list(map(held.__getitem__, map(last.__getitem__, ordered)))
    return ChainOrder(
        chains=_Chains(platform, ordered),
        ready=ready,
        cum_bytes=list(itertools.accumulate(map(platform.unpacked.__getitem__, ordered))),
    )


class _Chains(Sequence[Chain]):
    # A group's chains, each `Chain` made when first read: a plan of 10,000 images has
    # ~10^5 chains, and most plans are read for a few nodes, or for counts.
    __slots__ = ("_ks", "_platform")

    def __init__(self, platform: PlatformChains, ks: list[int]) -> None:
        self._platform, self._ks = platform, ks

    def __len__(self) -> int:
        return len(self._ks)

    @overload
    def __getitem__(self, index: int) -> Chain: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Chain, ...]: ...
    def __getitem__(self, index: int | slice) -> Chain | tuple[Chain, ...]:
        if isinstance(index, slice):
            return tuple(map(self._platform.chain, self._ks[index]))
        return self._platform.chain(self._ks[index])

    def __iter__(self) -> Iterator[Chain]:
        return map(self._platform.chain, self._ks)


def _check_mixed(platform: PlatformChains, wanted: bytearray, member: bytes,
                 ordered: Sequence[int]) -> None:
    # A chain whose blobs differ between images stays in a group only if its own blobs
    # are all in the group's order and its parent stays (``ordered`` lists parents first).
    for k in ordered:
        if k not in platform.mixed or not wanted[k]:
            continue
        image, depth = platform.image[k], platform.depth[k]
        parent = platform.index[platform.prefixes.rows[image][depth - 1]] if depth else -1
        blobs = platform.prefixes.images[image].layers[: depth + 1]
        wanted[k] = (parent < 0 or wanted[parent]) and all(
            member[platform.rank[layer.digest]] for layer in blobs)
