"""Pure: per-cache plans → each node's `NodeLayerCache.spec`, one upstream fetch per layer.

Several LayerCaches may want the same layer on the same node; the node holds it once, and
the spec lists every cache that wants it (`caches`), so the agent keeps it while any does.

Who fetches from upstream: a layer some node already holds is fetched by everyone else
from peers. A layer nobody holds gets exactly one *seeder*, the node wanting it with the
fewest upstream bytes assigned so far (largest layers first, so the links fill evenly);
all other nodes wanting it fetch from peers. That is what makes upstream bytes ≈ unique
bytes while every node is still warmed.

Who copies from whom: the nodes wanting a layer form a *relay tree* (`FANOUT`-ary, rooted at
its holders, else at its seeder; the others in name order), and each node's peers list its
parent in that tree first. Every node relays what it receives, cut-through
(`layercache.agent.peer.relay`), so the layer flows down the tree while the seeder still
receives it, and in a tree as planned no node uploads it more than `FANOUT` times (a star
would have the seeder upload it to every other node: its uplink, not the network, would
bound the fan-out). After the parent: the holders, the seeder, then other nodes that will
hold it — rotated per node — for an agent whose parent fails or is slow (it waits
`layercache.agent.fetch.fetcher.PARENT_GRACE` for its parent, then takes any of them).

Assignments are sticky: a (node, layer) entry keeps its source and peers from the previous
spec while they are still valid (the seeder still wants the layer, the peers still want or
hold it). Otherwise every agent report of what it holds would reshuffle sources, rewrite
specs and bump every node's generation. The price: a kept entry keeps its first peer while
new entries get parents from the current tree, so in a pool that grows replan by replan a
node may be the first peer of a few more than `FANOUT` nodes, and after a holder loses a
layer two kept entries can even list each other first (each then waits out the grace and
takes the seeder).

Chains to unpack (`layercache.plan.chains`) merge the same way: each chain once per node, in the
caches' order (a chain after its parent), listing every cache that wants it, and only if
every blob of it is in the node's (possibly cut) layer list.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, takewhile
from typing import Any

from layercache.api.nodelayercache import (
    ImageLayers,
    NodeLayerCacheSpec,
    SpecChain,
    SpecImage,
    SpecLayer,
    spec_fingerprint,
)
from layercache.oci.digest import Digest
from layercache.oci.platform import Platform
from layercache.plan.chains import Chain
from layercache.plan.planner import Layer, Plan

__all__ = ["MAX_IMAGE_LAYERS", "MAX_NODE_CHAINS", "MAX_NODE_LAYERS", "MAX_PEERS",
           "CachePlan", "NodeLayer", "NodeSpecs", "Previous", "distribute", "node_spec"]

log = logging.getLogger(__name__)

#: Candidate peers listed per layer (the CRD caps the list at 8).
MAX_PEERS = 8
#: Children per node (the seeder too) in a layer's relay tree: the most times one node
#: uploads the layer. With 2, 1,000 nodes are 10 levels deep, and a level adds the latency
#: of a node's first bytes, not a transfer time.
FANOUT = 2
#: Layers listed per node (the CRD's maxItems): a spec must fit etcd's object size limit,
#: and a larger one would fail the write and with it the whole replan.
MAX_NODE_LAYERS = 5000
#: Chains listed per node (the CRD's maxItems), for the same reason.
MAX_NODE_CHAINS = 1000
#: Images listed in ``spec.imageLayers`` per node (the CRD's maxItems).
MAX_IMAGE_LAYERS = 1000
#: Layers of one ``spec.images[]`` entry at most (the CRD's maxItems, as for a chain).
MAX_SPEC_IMAGE_LAYERS = 128


@dataclass(frozen=True)
class CachePlan:
    """One LayerCache's contribution: its plan and where upstream serves each layer.

    ``key`` is "namespace/name"; ``repositories`` maps each layer digest to the
    "registry/repository" of an image that has it; ``images`` lists, for mode Images, each
    image pinned by digest with the digests of its layers (base first) for one platform;
    ``paused`` stops fetching;
    ``image_layers`` maps each platform to the layer digests (base first) of each of the
    cache's images for it, for the agents' disk-savings figures (``spec.imageLayers``).
    """

    key: str
    plan: Plan
    repositories: Mapping[Digest, str]
    images: tuple[tuple[str, tuple[Digest, ...]], ...] = ()
    paused: bool = False
    image_layers: Mapping[Platform, tuple[tuple[Digest, ...], ...]] = field(
        default_factory=dict)


@dataclass(slots=True)
class NodeLayer:
    """One entry of `NodeLayerCache.spec.layers` (see the CRD for each field)."""

    layer: Layer
    repository: str
    caches: set[str] = field(default_factory=set)
    source: str = "Peer"
    peers: list[str] = field(default_factory=list)

    def to_spec(self) -> SpecLayer:
        """The ``spec.layers[]`` entry."""
        return SpecLayer(digest=str(self.layer.digest), size=self.layer.size,
                         media_type=self.layer.media_type, repository=self.repository,
                         **self.node_fields())

    def node_fields(self) -> dict[str, Any]:
        """The entry's fields that differ between nodes: ``source``, ``peers``, ``caches``.

        ``caches`` are sorted; the first is the cache whose image named `repository` (the
        first in key order to want the layer), so its credentials fit that repository.
        """
        return {"source": "Upstream" if self.source == "Upstream" else "Peer",
                "peers": list(self.peers),
                "caches": list(self.caches) if len(self.caches) == 1 else sorted(self.caches)}


#: A previous assignment: node → digest → (source, peers), from the stored specs
#: (`layercache.controller.nodeindex.SpecRecord.assignments`).
Previous = Mapping[str, Mapping[str, tuple[str, tuple[str, ...]]]]


def distribute(caches: Sequence[CachePlan], present: Mapping[str, frozenset[Digest]],
               previous: Previous | None = None) -> dict[str, list[NodeLayer]]:
    """Merge `caches` into per-node ordered layer lists with sources and peers assigned.

    Args:
        caches: every active cache's plan (any order; merged in `key` order, so the
            result is deterministic).
        present: node name → digests its containerd holds now.
        previous: the assignments of the specs written before (kept while valid).

    Returns:
        node name → its layers, each cache's order kept (a layer after those beneath it),
        duplicates across caches merged. Nodes no cache targets are absent.
    """
    per_node: dict[str, dict[Digest, NodeLayer]] = {}
    for cache in sorted(caches, key=lambda c: c.key):
        for name, node_plan in cache.plan.nodes.items():
            layers = per_node.setdefault(name, {})
            for layer in node_plan.layers:
                entry = layers.get(layer.digest)
                if entry is None:
                    entry = layers[layer.digest] = NodeLayer(
                        layer, cache.repositories[layer.digest])
                entry.caches.add(cache.key)
    wanting: dict[Digest, list[str]] = {}
    sizes: dict[Digest, int] = {}
    for name in sorted(per_node):
        for digest, entry in per_node[name].items():
            wanting.setdefault(digest, []).append(name)
            sizes[digest] = entry.layer.size
    holders = {d: [n for n in sorted(present) if d in present[n]] for d in wanting}
    before = previous or {}
    seeder = _seeders(wanting, holders, sizes, before)
    for digest, nodes in wanting.items():
        useful = set(nodes) | set(holders[digest])
        first = seeder.get(digest)
        parents = _relay_tree(nodes, holders[digest], first)
        for i, name in enumerate(nodes):
            entry = per_node[name][digest]
            if first == name:
                entry.source = "Upstream"
                continue
            kept = before.get(name, {}).get(digest)
            if kept and kept[0] == "Peer" and kept[1] and set(kept[1]) <= useful:
                entry.peers = list(kept[1])
                continue
            entry.peers = _peers(name, i, nodes, parents.get(name), holders[digest], first)
    return {name: list(layers.values()) for name, layers in per_node.items()}


def _relay_tree(nodes: Sequence[str], holders: Sequence[str], seeder: str | None
                ) -> dict[str, str]:
    """Each wanting node's parent in one layer's relay tree (node → parent; roots absent).

    The roots are the layer's holders, else its seeder; the other ``nodes`` follow in
    their (name) order, and the node at place ``p`` of that order hangs below the one at
    ``(p - roots) // FANOUT``: every node, root or not, has at most `FANOUT` children, and
    a parent always comes before its children, so each path leads to a root.
    """
    roots = list(holders) if holders else [seeder] if seeder else []
    if not roots:
        return {}
    rooted = set(roots)
    order = roots + [name for name in nodes if name not in rooted]
    count = len(roots)
    return {order[place]: order[(place - count) // FANOUT]
            for place in range(count, len(order))}


def _peers(name: str, index: int, nodes: Sequence[str], parent: str | None,
           holders: Sequence[str], seeder: str | None) -> list[str]:
    """Up to `MAX_PEERS` peers of `name` (= ``nodes[index]``), each once, never itself.

    Its ``parent`` in the layer's relay tree first, then the holders, then the seeder,
    then the other wanting nodes in rotation from this one. Lazy on purpose: at 1,000
    nodes, building the whole rotation for every (node, layer) pair costs O(nodes²) per
    layer — a minute of CPU for 200 layers.
    """
    count = len(nodes)
    rotation = (nodes[(index + k) % count] for k in range(1, count))
    chosen: list[str] = []
    seen = {name}
    for candidate in chain((parent,) if parent else (), holders,
                           (seeder,) if seeder else (), rotation):
        if candidate not in seen:
            seen.add(candidate)
            chosen.append(candidate)
            if len(chosen) == MAX_PEERS:
                break
    return chosen


def _seeders(wanting: Mapping[Digest, list[str]], holders: Mapping[Digest, list[str]],
             sizes: Mapping[Digest, int], previous: Previous) -> dict[Digest, str]:
    assigned: dict[str, int] = {}
    seeder = {}
    for digest in sorted(wanting, key=lambda d: (-sizes[d], d)):
        kept = [n for n in wanting[digest]
                if previous.get(n, {}).get(digest, ("",))[0] == "Upstream"]
        if kept:  # sticky: the node that was seeding it goes on (it may hold it by now)
            name = kept[0]
        elif holders[digest]:
            continue
        else:
            name = min(wanting[digest], key=lambda n: (assigned.get(n, 0), n))
        assigned[name] = assigned.get(name, 0) + sizes[digest]
        seeder[digest] = name
    return seeder


class NodeSpecs:
    """Builds the `NodeLayerCache.spec` of each node from one replan's ``caches``.

    `spec` gives what `node_spec` gives. Most of a spec is the same on every node holding
    the same layers for the same caches (chains, images, ``imageLayers``; at 1,000 nodes
    and 200 images 60 % of its bytes), and each layer entry differs between nodes only in
    ``source``, ``peers`` and ``caches``: those parts are built once per distinct key
    through the `layercache.api` models and shared (read-only) by every node's dict. One
    node's spec built model by model took ~14 ms at 200 images, most of a 1,000-node replan.
    """

    def __init__(self, caches: Sequence[CachePlan]) -> None:
        self.caches = sorted(caches, key=lambda c: c.key)
        self._by_key = {c.key: c for c in self.caches}
        #: Shared parts by (held digests, wanting caches, each cache's plan view).
        self._shared: dict[tuple[Any, ...], dict[str, Any]] = {}
        #: Layer entries without their per-node fields, by (digest, size, type, repository).
        self._layers: dict[tuple[Any, ...], dict[str, Any]] = {}
        #: Each chain's entry without ``caches``, by the planner's (shared) `Chain`.
        self._chains: dict[Any, SpecChain] = {}
        #: `spec_fingerprint` by what it covers (`spec_and_fingerprint`).
        self._fingerprints: dict[tuple[Any, ...], str] = {}

    def spec(self, name: str, layers: Sequence[NodeLayer]) -> dict[str, Any]:
        """The spec of node ``name`` holding ``layers`` (as `distribute` returned them).

        A CRD camelCase dict; its nested lists and dicts may be shared with other nodes'
        specs: read-only.
        """
        return self._assemble(name, layers)[0]

    def _assemble(self, name: str, layers: Sequence[NodeLayer]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the spec, its shared part: one object per distinct part while this lives)."""
        # Every cache wanting a layer here, also one whose layers are all past the cap.
        wanting = tuple(sorted({c for entry in layers for c in entry.caches}))
        layers = layers[:MAX_NODE_LAYERS]
        held = tuple(entry.layer.digest for entry in layers)
        views = tuple((c.key, n.platform, n.chains.key) for c in self.caches
                      if (n := c.plan.nodes.get(name)) is not None)
        key = (held, wanting, views)
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = self._shared_part(name, layers, wanting)
        return {"nodeName": name, "layers": [self._layer(entry) for entry in layers],
                **shared}, shared

    def spec_and_fingerprint(self, name: str, layers: Sequence[NodeLayer]
                             ) -> tuple[dict[str, Any], str]:
        """`spec` and its `layercache.api.nodelayercache.spec_fingerprint`.

        The fingerprint leaves out what differs between nodes (their names, each layer's
        source and peers), so it is hashed once per distinct rest: one JSON encoding of a
        220 KB spec per node was the largest part of a 1,000-node replan.
        """
        spec, shared = self._assemble(name, layers)
        key = (id(shared), tuple((entry.layer.digest, entry.layer.size, entry.layer.media_type,
                                  entry.repository, frozenset(entry.caches))
                                 for entry in layers[:MAX_NODE_LAYERS]))
        found = self._fingerprints.get(key)
        if found is None:
            found = self._fingerprints[key] = spec_fingerprint(spec)
        return spec, found

    def _layer(self, entry: NodeLayer) -> dict[str, Any]:
        layer = entry.layer
        key = (layer.digest, layer.size, layer.media_type, entry.repository)
        template = self._layers.get(key)
        if template is None:
            template = self._layers[key] = entry.to_spec().to_dict()
        return {**template, **entry.node_fields()}

    def _shared_part(self, name: str, layers: Sequence[NodeLayer], wanting: Sequence[str]
                     ) -> dict[str, Any]:
        """Every spec field but ``nodeName`` and ``layers``, for node ``name``."""
        index: dict[Digest, int] = {}
        for position, entry in enumerate(layers):
            index.setdefault(entry.layer.digest, position)
        images: dict[str, set[str]] = {}
        image_layers: dict[str, list[int]] = {}
        for key in wanting:
            for ref, digests in self._by_key[key].images:
                if all(d in index for d in digests):
                    images.setdefault(ref, set()).add(key)
                    image_layers.setdefault(ref, [index[d] for d in digests]
                                            if len(digests) <= MAX_SPEC_IMAGE_LAYERS else [])
        # Layers are in priority order, each after those beneath it: a prefix stays complete.
        spec = NodeLayerCacheSpec(
            node_name=name,
            chains=self._merged_chains(name, set(index)),
            images=[SpecImage(reference=ref, caches=sorted(images[ref]),
                              layers=image_layers[ref]) for ref in sorted(images)],
            caches=list(wanting),
            paused=bool(wanting) and all(self._by_key[k].paused for k in wanting),
            image_layers=_image_layers(name, layers, [self._by_key[key] for key in wanting]),
        ).to_dict()
        del spec["nodeName"]
        return spec

    def _merged_chains(self, name: str, held: set[Digest]) -> list[SpecChain]:
        """``spec.chains`` of node ``name``: the caches' chains merged (module docstring)."""
        merged: dict[Digest, SpecChain] = {}
        for cache in self.caches:
            node_plan = cache.plan.nodes.get(name)
            for wanted in node_plan.chains if node_plan is not None else ():
                entry = merged.get(wanted.chain_id)
                if entry is None:
                    # Past the cap nothing new is listed (and a deep image's every prefix
                    # would cost its whole layer list again: quadratic in its depth).
                    if len(merged) >= MAX_NODE_CHAINS or not all(
                            layer.digest in held for layer in wanted.layers):
                        continue
                    entry = merged[wanted.chain_id] = self._chain(wanted).model_copy(
                        update={"caches": []})
                entry.caches.append(cache.key)
        return list(merged.values())[:MAX_NODE_CHAINS]

    def _chain(self, wanted: Chain) -> SpecChain:
        made = self._chains.get(wanted)
        if made is None:
            made = self._chains[wanted] = SpecChain(
                chain_id=str(wanted.chain_id),
                layers=[str(layer.digest) for layer in wanted.layers],
                diff_ids=[str(diff_id) for diff_id in wanted.diff_ids],
                unpacked_bytes=wanted.unpacked_bytes, caches=[])
        return made


def node_spec(name: str, layers: Sequence[NodeLayer], caches: Sequence[CachePlan]
              ) -> dict[str, Any]:
    """The `NodeLayerCache.spec` of node `name`, as the CRD's camelCase dict.

    Built as a `layercache.api.NodeLayerCacheSpec`; the dict is what the replanner
    compares with the stored spec and writes. For many nodes of one replan use one
    `NodeSpecs` (this builds one per call).

    ``images`` lists the mode-Images images all of whose layers the node holds, each with
    those layers as indexes into ``layers`` (none past `MAX_SPEC_IMAGE_LAYERS`: the agent
    resolves such an image itself); ``paused`` is set when every cache wanting something
    here is paused.
    """
    return NodeSpecs(caches).spec(name, layers)


def _image_layers(name: str, layers: Sequence[NodeLayer], caches: Sequence[CachePlan]
                  ) -> list[ImageLayers]:
    """``spec.imageLayers``: per cache and image planned on `name`, its held layers' indexes.

    Each image's layers base first, as indexes into ``spec.layers``, up to the first layer
    the node does not hold (a budget or ``minSharedBy`` cut; nothing above it is a held
    chain). Images with no held layer and repeats within a cache are left out. The agent
    counts what the images would take stored apart from this (`MAX_IMAGE_LAYERS` at most).
    """
    position = {entry.layer.digest: index for index, entry in enumerate(layers)}
    found: list[ImageLayers] = []
    for cache in caches:
        node_plan = cache.plan.nodes.get(name)
        if node_plan is None:
            continue
        seen: set[tuple[int, ...]] = set()
        for digests in cache.image_layers.get(node_plan.platform, ()):
            indexes = tuple(takewhile(lambda i: i >= 0,
                                                (position.get(d, -1) for d in digests)))
            if indexes and indexes not in seen:
                seen.add(indexes)
                found.append(ImageLayers(cache=cache.key, layers=list(indexes)))
    return found[:MAX_IMAGE_LAYERS]
