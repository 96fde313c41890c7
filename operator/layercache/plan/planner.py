"""Pure planner: resolved images, layers and nodes → what each node holds, and what it saves.

No I/O. Inputs are frozen dataclasses, not pydantic models: the resolver builds them from
manifests it has already validated (`Digest`, `Platform`), and a plan has ~200,000 layers,
where per-object validation would cost more than the planning does.

How a plan is made:

1. Per platform, a requirement graph: layer B requires layer A when A is directly beneath B
   in some image. Layers required of one another (a digest repeated in an image, or two
   images stacking the same blobs in opposite orders) form a cycle; each cycle is condensed
   into one unit held all-or-nothing, ranked as its highest-priority member. Every other
   unit is one layer.
2. One priority order per platform (Kahn's algorithm, best key first among the units whose
   requirements are all listed): most-shared first (images using it, counting each manifest
   once), then largest, then digest. Every prefix of it is chain-complete. ``min_shared_by``
   drops units with a member used by fewer images, and every unit resting on them. Steps 1
   and 2 live in `layercache.plan.layerorder`.
3. A node's candidates are the layers of the images targeting it (same platform, node
   selector matching its labels), in that order. It holds the longest prefix that fits its
   budget; the rest is reported as skipped for budget. The budget counts layers already
   present too: holding a layer protects it from containerd's GC, so its bytes stay on disk
   because of us. Strict prefixes mean a larger budget only ever adds layers (no churn when
   a budget grows) and let 1,000 plans share one list; the price is at most one unit's worth
   of budget left unused when a large unit does not fit but smaller later ones would.
4. A node's chains (prefixes of its images to unpack ahead of the kubelet's pulls,
   `layercache.plan.chains`): those shared by at least ``chain_min_shared_by`` images of its
   platform whose blobs it holds, ordered as their blobs are, then the longest prefix of
   them whose estimated unpacked size fits the budget the blobs left. Blobs come first:
   they are what every chain is made from and what peers share; unpacking only saves time.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from layercache.oci.digest import Digest
from layercache.oci.image import Layer, PlanImage
from layercache.oci.platform import Platform
from layercache.plan.chains import (
    Chain,
    ChainOrder,
    PlatformChains,
    PrefixCatalogue,
    Run,
    chain_order,
)
from layercache.plan.layerorder import Catalogue, Order, PlanInputError, order

__all__ = [
    "BudgetSkip",
    "Chain",
    "Layer",
    "LayerRun",
    "LayerServers",
    "Node",
    "NodePlan",
    "Plan",
    "PlanImage",
    "PlanInputError",
    "PlanOptions",
    "Savings",
    "plan",
    "saved_bytes",
]


@dataclass(frozen=True, slots=True)
class Node:
    """A node: platform, labels, blob digests in its containerd, budget (bytes; None: none)."""

    name: str
    platform: Platform
    labels: Mapping[str, str] = field(default_factory=dict)
    present: frozenset[Digest] = frozenset()
    budget_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """``min_shared_by``: only layers used by at least this many images (1 = every layer).

    ``chain_min_shared_by``: only chains (prefixes) that many images start with; None: as
    ``min_shared_by`` (mode ``Images`` passes 1: every prefix of a listed image).
    """

    min_shared_by: int = 1
    chain_min_shared_by: int | None = None


class LayerRun(Run[Layer]):
    """A read-only slice of a platform-group's priority order, shared by many node plans."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"LayerRun(<{len(self)} layers>)"


@dataclass(frozen=True, slots=True)
class BudgetSkip:
    """Why a node holds less than all its candidates: the budget ran out.

    ``layer`` is the first layer in priority order that did not fit; ``needed_bytes`` what it
    (with any layers in the same cycle unit) would add; ``free_bytes`` the budget left then.
    ``layers``/``bytes``: every candidate left out, in priority order, ``layer`` first.
    """

    layer: Layer
    needed_bytes: int
    free_bytes: int
    layers: LayerRun
    bytes: int

    @property
    def reason(self) -> str:
        """One sentence for status and logs."""
        return (
            f"budget: {self.layer.digest.short} needs {self.needed_bytes} bytes, "
            f"{self.free_bytes} left; it and the {len(self.layers) - 1} lower-priority layers "
            f"({self.bytes} bytes) are not held"
        )


@dataclass(frozen=True, slots=True)
class NodePlan:
    """What one node holds: ``layers`` in priority order, every layer after those beneath it.

    Bytes: ``held_bytes`` total of ``layers``; ``present_bytes`` the part already in its
    containerd; `fetch_bytes` the rest. ``below_min_shared`` counts candidate layers left
    out by ``min_shared_by`` (not for budget).

    ``chains`` to unpack, in order, each after its parent; ``unpacked_bytes`` their
    estimated size (counted against the budget after ``held_bytes``); ``chains_skipped``
    chains whose blobs are held that the budget leaves out.
    """

    node: str
    platform: Platform
    budget_bytes: int | None
    layers: LayerRun
    held_bytes: int
    present_bytes: int
    skipped: BudgetSkip | None
    below_min_shared: int
    chains: Run[Chain] = field(default_factory=lambda: Run(()))
    unpacked_bytes: int = 0
    chains_skipped: int = 0

    @property
    def fetch_bytes(self) -> int:
        """Bytes this node must fetch (from a peer or upstream) to hold its plan."""
        return self.held_bytes - self.present_bytes


def saved_bytes(naive_bytes: int, upstream_bytes: int, peer_bytes: int) -> int:
    """Upstream bytes avoided: what nodes got from a peer instead of upstream.

    ``min(peer_bytes, naive_bytes - upstream_bytes)``, never below 0. A layer a node already
    held is neither fetched nor saved (the peer bytes leave it out), and no more can be
    saved than naive minus what did cross the upstream link (a peer transfer that broke
    off and was fetched again upstream counts once). ``naive_bytes`` is
    `Savings.naive_bytes`: only layers the cache holds, on the nodes that hold them, so a
    cache on one node saves nothing, and a layer left out by ``minSharedBy`` or the budget
    is neither naive nor saved. Compressed bytes.

    The one definition of "saved": for a plan with the expected upstream and peer bytes
    (`Savings.saved_bytes`, ``layercache plan``), and for a LayerCache's status with the
    measured ones (`layercache.controller.status`, hence ``kubectl get lc`` and the
    ``layercache_cache_saved_bytes`` metric). docs/observability.md, "Savings".
    """
    return max(min(peer_bytes, naive_bytes - upstream_bytes), 0)


@dataclass(frozen=True, slots=True)
class Savings:
    """The savings model, all in compressed bytes (docs/observability.md, "Savings").

    - ``unique_bytes``: distinct layers held anywhere under the plan, each counted once.
    - ``naive_bytes``: what the nodes would pull themselves, cold, for the layers the plan
      has them hold: per node, the bytes of the layers it holds, a digest once per node
      (containerd de-duplicates within a node; that is not our saving). Layers left out by
      ``min_shared_by`` or a budget are not held, so they are not counted. Equal to
      ``planned_bytes``; kept apart because it is the baseline the savings are measured
      against.
    - ``planned_bytes``: what all nodes hold under the plan, a digest once per node.
    - ``already_present_bytes``: the part of ``planned_bytes`` nodes already hold.
    - ``expected_upstream_bytes``: planned layers no node holds yet, each fetched once.
    Always ``expected_upstream <= unique <= planned == naive``.
    """

    unique_bytes: int
    naive_bytes: int
    planned_bytes: int
    already_present_bytes: int
    expected_upstream_bytes: int

    @property
    def expected_peer_bytes(self) -> int:
        """Bytes nodes will fetch from peers instead of upstream: the sharing saving."""
        return self.planned_bytes - self.already_present_bytes - self.expected_upstream_bytes

    @property
    def saved_bytes(self) -> int:
        """Expected upstream bytes avoided (`saved_bytes`): the expected peer bytes."""
        return saved_bytes(self.naive_bytes, self.expected_upstream_bytes,
                           self.expected_peer_bytes)


@dataclass(frozen=True, slots=True)
class LayerServers:
    """Nodes that can serve a layer: ``holding`` it now, and ``planned`` to hold it."""

    holding: tuple[str, ...]
    planned: tuple[str, ...]


@dataclass(slots=True)
class _Platform:
    # One platform's priority order, indexed by position in it.
    order: Order
    rank: dict[Digest, int]  # digest → position
    sizes: list[int]
    layers: list[Layer]


@dataclass(slots=True)
class _Group:
    # Nodes with the same candidate images share one filtered order and its prefix sums.
    platform: _Platform
    member: bytes  # by platform position: 1 if a candidate of this group
    positions: Sequence[int]  # group position → platform position
    layers: tuple[Layer, ...]
    cum_bytes: list[int]  # bytes of group positions [0, i]
    starts: list[int]  # cycle units spanning several positions, [start, stop), sorted;
    stops: list[int]  # a prefix never cuts through one
    below_min: int
    nodes: list[tuple[int, str]] = field(default_factory=list)  # (-layers held, name), sorted
    chains: ChainOrder | None = None


class Plan:
    """The result of `plan`: per-node plans, per-layer sharing counts and servers, savings.

    ``nodes`` maps node name → `NodePlan`; ``shared_by`` maps every input layer digest → how
    many images (distinct manifests) use it; ``untargeted`` lists image references that
    target no node; ``savings`` is the `Savings` model.
    """

    def __init__(
        self,
        nodes: dict[str, NodePlan],
        shared_by: dict[Digest, int],
        savings: Savings,
        untargeted: tuple[str, ...],
        internals: tuple[dict[str, frozenset[Digest]], list[_Group]],
    ) -> None:
        """Built by `plan`; not meant to be constructed directly."""
        self.nodes: Mapping[str, NodePlan] = nodes
        self.shared_by: Mapping[Digest, int] = shared_by
        self.savings = savings
        self.untargeted = untargeted
        self._present, self._groups = internals

    def servers(self, digest: Digest) -> LayerServers:
        """Nodes that hold ``digest`` now, and nodes planned to hold it that do not yet.

        Both sorted by name. O(nodes) per call: meant for one layer at a time.
        """
        holding = tuple(name for name, present in self._present.items() if digest in present)
        planned: set[str] = set()
        for group in self._groups:
            at = group.platform.rank.get(digest)
            if at is not None and group.member[at]:
                position = bisect.bisect_left(group.positions, at)
                held = bisect.bisect_left(group.nodes, (-position, ""))
                planned.update(name for _, name in group.nodes[:held])
        return LayerServers(holding, tuple(sorted(planned.difference(holding))))


def plan(
    images: Iterable[PlanImage], nodes: Iterable[Node], options: PlanOptions | None = None
) -> Plan:
    """Plan which layers each node holds (see the module docstring for how).

    Deterministic: the same images and nodes, in any order, give the same plan; ties break
    by digest. Time O(L log L) in distinct layers L, plus O(log L + present) per node.

    Raises:
        PlanInputError: a digest with two sizes or diff IDs, one manifest with two layer
            lists, two nodes of one name, a negative size or budget, ``min_shared_by`` < 1.

    """
    with _gc_paused():
        return _plan(images, nodes, options or PlanOptions())


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # A plan allocates ~10^6 small lists and tuples while its input keeps ~10^6 objects
    # alive; every generation-2 collection would walk them all, and a plan makes no cycles.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan(images: Iterable[PlanImage], nodes: Iterable[Node], options: PlanOptions) -> Plan:
    min_shared_by = options.min_shared_by
    chain_min = options.chain_min_shared_by
    chain_min = min_shared_by if chain_min is None else chain_min
    if min(min_shared_by, chain_min) < 1:
        raise PlanInputError(
            f"min_shared_by must be at least 1, not {min(min_shared_by, chain_min)}")
    images = sorted(
        images,
        key=lambda i: (i.reference, i.platform.architecture, i.platform.variant, i.manifest_digest),
    )
    nodes = sorted(nodes, key=lambda n: n.name)
    for before, after in itertools.pairwise(nodes):
        if before.name == after.name:
            raise PlanInputError(f"node {after.name!r} is listed twice")
    for node in nodes:
        if node.budget_bytes is not None and node.budget_bytes < 0:
            raise PlanInputError(f"node {node.name!r}: negative budget {node.budget_bytes}")
    cat = Catalogue(images)
    by_platform: dict[Platform, list[int]] = {}
    for i, im in enumerate(images):
        by_platform.setdefault(im.platform, []).append(i)
    platforms = {
        p: _platform(cat, order(cat, by_platform.get(p, []), min_shared_by))
        for p in {node.platform for node in nodes}
    }
    prefixes = PrefixCatalogue(images)
    chain_shares = {p: PlatformChains(prefixes, by_platform.get(p, []), platforms[p].rank)
                    for p in platforms}
    wanted_labels = [frozenset(im.node_selector.items()) for im in images]
    selectors = sorted(set(wanted_labels), key=sorted)
    selector_of = list(map({s: i for i, s in enumerate(selectors)}.__getitem__, wanted_labels))
    groups: dict[tuple[Platform, frozenset[int]], _Group] = {}
    node_plans: dict[str, NodePlan] = {}
    for node in nodes:
        # The node selectors a node satisfies decide its candidate images, hence its group.
        matched = frozenset(s for s, sel in enumerate(selectors) if sel <= node.labels.items())
        key = (node.platform, matched)
        if key not in groups:
            every = by_platform.get(node.platform, [])
            members = [i for i in every if selector_of[i] in matched]
            everything = len(members) == len(every)
            group = groups[key] = _group(cat, members, platforms[node.platform], everything)
            group.chains = chain_order(chain_shares[node.platform], members,
                                       None if everything else group.member, chain_min)
        node_plans[node.name] = _node_plan(groups[key], node)

    planned: set[int] = set()
    for group in groups.values():
        most = group.positions[: -group.nodes[0][0]]
        planned.update(map(group.platform.order.ids.__getitem__, most))
    present_any: set[Digest] = set().union(*(node.present for node in nodes))
    fetched = set(map(cat.digests.__getitem__, planned)).difference(present_any)
    held = sum(p.held_bytes for p in node_plans.values())
    savings = Savings(
        unique_bytes=sum(map(cat.sizes.__getitem__, planned)),
        naive_bytes=held,  # only what the plan holds, where it holds it (Savings)
        planned_bytes=held,
        already_present_bytes=sum(p.present_bytes for p in node_plans.values()),
        expected_upstream_bytes=sum(map(cat.sizes.__getitem__, map(cat.ids.__getitem__, fetched))),
    )
    targeted = {(platform, s) for platform, matched in groups for s in matched}
    untargeted = {
        im.reference for i, im in enumerate(images) if (im.platform, selector_of[i]) not in targeted
    }
    return Plan(
        node_plans,
        dict(zip(cat.digests, cat.shared_by, strict=True)),
        savings,
        tuple(sorted(untargeted)),
        ({node.name: node.present for node in nodes}, list(groups.values())),
    )


def _platform(cat: Catalogue, platform_order: Order) -> _Platform:
    ids = platform_order.ids
    digests = map(cat.digests.__getitem__, ids)
    return _Platform(
        order=platform_order,
        rank=dict(zip(digests, range(len(ids)), strict=True)),
        sizes=list(map(cat.sizes.__getitem__, ids)),
        layers=list(map(cat.layers.__getitem__, ids)),
    )


def _group(cat: Catalogue, members: list[int], platform: _Platform, everything: bool) -> _Group:
    """Filter a platform order down to the layers of one node group's images.

    ``everything``: the group's images are all of the platform's, so nothing is filtered
    out (the common case: caches without node selectors).
    """
    spans, ids = platform.order.spans, platform.order.ids
    if everything:
        count = len(ids)
        return _Group(
            platform=platform,
            member=b"\x01" * count,
            positions=range(count),
            layers=tuple(platform.layers),
            cum_bytes=list(itertools.accumulate(platform.sizes)),
            starts=[start for start, _ in spans],
            stops=[stop for _, stop in spans],
            below_min=platform.order.candidates - count,
        )
    wanted: set[int] = set().union(*(cat.image_ids[i] for i in members))
    member = bytes(map(wanted.__contains__, ids))
    positions = list(itertools.compress(range(len(member)), member))
    starts, stops = [], []
    for start, stop in spans:
        first, last = bisect.bisect_left(positions, start), bisect.bisect_left(positions, stop)
        if last - first > 1:
            starts.append(first)
            stops.append(last)
    return _Group(
        platform=platform,
        member=member,
        positions=positions,
        layers=tuple(itertools.compress(platform.layers, member)),
        cum_bytes=list(itertools.accumulate(itertools.compress(platform.sizes, member))),
        starts=starts,
        stops=stops,
        below_min=len(wanted) - len(positions),
    )


def _node_plan(group: _Group, node: Node) -> NodePlan:
    """Longest prefix of the group order within the node's budget, never cutting a unit."""
    cum, budget = group.cum_bytes, node.budget_bytes
    count = len(cum) if budget is None else bisect.bisect_right(cum, budget)
    unit = bisect.bisect_right(group.starts, count) - 1
    if unit >= 0 and group.starts[unit] < count < group.stops[unit]:
        count = group.starts[unit]
    held = cum[count - 1] if count else 0
    # Present blobs at platform positions before this node's cut that are in its group.
    limit = group.positions[count] if count < len(cum) else len(group.member)
    rank, sizes = group.platform.rank, group.platform.sizes
    at = list(filter(limit.__gt__, map(rank.get, node.present, itertools.repeat(limit))))
    present = sum(itertools.compress(map(sizes.__getitem__, at), map(group.member.__getitem__, at)))
    skipped = None
    if count < len(cum):
        assert budget is not None  # only a budget leaves layers out
        unit = bisect.bisect_left(group.starts, count)
        in_unit = unit < len(group.starts) and group.starts[unit] == count
        last = group.stops[unit] if in_unit else count + 1
        skipped = BudgetSkip(
            layer=group.layers[count],
            needed_bytes=cum[last - 1] - held,
            free_bytes=budget - held,
            layers=LayerRun(group.layers, count),
            bytes=cum[-1] - held,
        )
    bisect.insort(group.nodes, (-count, node.name))
    chains = group.chains or ChainOrder((), [], [])
    taken, chains_skipped = chains.cut(count, None if budget is None else budget - held)
    return NodePlan(
        node=node.name,
        platform=node.platform,
        budget_bytes=budget,
        layers=LayerRun(group.layers, 0, count),
        held_bytes=held,
        present_bytes=present,
        skipped=skipped,
        below_min_shared=group.below_min,
        chains=Run(chains.chains, 0, taken),
        unpacked_bytes=chains.cum_bytes[taken - 1] if taken else 0,
        chains_skipped=chains_skipped,
    )
