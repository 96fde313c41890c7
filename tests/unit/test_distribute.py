"""Distribution: layers held once per node across caches; exactly one seeder per unheld layer."""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from layercache.api.nodelayercache import NodeLayerCacheSpec, spec_fingerprint
from layercache.controller.nodeindex import SpecRecord
from layercache.oci.digest import Digest
from layercache.oci.platform import Platform
from layercache.plan.distribute import (
    FANOUT,
    MAX_NODE_CHAINS,
    MAX_NODE_LAYERS,
    CachePlan,
    NodeSpecs,
    Previous,
    distribute,
    node_spec,
)
from layercache.plan.planner import Layer, Node, PlanImage, plan

AMD64 = Platform("linux", "amd64")


def _digest(text: str) -> Digest:
    return Digest("sha256:" + hashlib.sha256(text.encode()).hexdigest())


def _layer(name: str, size: int) -> Layer:
    return Layer(_digest(name), size, "application/vnd.oci.image.layer.v1.tar+gzip",
                 _digest("diff-" + name))


BASE, PY, APP_A, APP_B = (_layer("base", 100), _layer("py", 50), _layer("a", 5),
                          _layer("b", 7))


def _cache(key: str, images: dict[str, tuple[Layer, ...]], nodes: list[str],
           present: dict[str, frozenset[Digest]] | None = None, *, mode_images: bool = False,
           budgets: dict[str, int | None] | None = None) -> CachePlan:
    resolved = [PlanImage(ref, AMD64, _digest(ref), layers) for ref, layers in images.items()]
    result = plan(resolved, [Node(n, AMD64, present=(present or {}).get(n, frozenset()),
                                  budget_bytes=(budgets or {}).get(n)) for n in nodes])
    repos = {layer.digest: f"reg.example/{ref}" for ref, layers in images.items()
             for layer in layers}
    pinned = tuple((f"reg.example/{ref}@{_digest(ref)}", tuple(lay.digest for lay in layers))
                   for ref, layers in images.items()) if mode_images else ()
    return CachePlan(key, result, repos, pinned)


def test_one_seeder_per_layer_and_everyone_else_from_peers() -> None:
    nodes = ["n1", "n2", "n3"]
    cache = _cache("ns/c", {"app-a": (BASE, PY, APP_A), "app-b": (BASE, PY, APP_B)}, nodes)
    result = distribute([cache], {})
    assert sorted(result) == nodes
    for digest in (BASE.digest, PY.digest, APP_A.digest, APP_B.digest):
        entries = [e for n in nodes for e in result[n] if e.layer.digest == digest]
        assert len(entries) == 3
        seeders = [e for e in entries if e.source == "Upstream"]
        assert len(seeders) == 1
        seeder = next(n for n in nodes for e in result[n]
                      if e.layer.digest == digest and e.source == "Upstream")
        for n in nodes:
            entry = next(e for e in result[n] if e.layer.digest == digest)
            if n != seeder:
                assert entry.peers[0] == seeder
                assert n not in entry.peers
    # Largest first onto the least-loaded node: the three big layers land on three nodes.
    seeded_by = {e.layer.digest: n for n in nodes for e in result[n] if e.source == "Upstream"}
    assert len({seeded_by[BASE.digest], seeded_by[PY.digest], seeded_by[APP_B.digest]}) == 3


def test_a_held_layer_has_no_seeder_and_holders_come_first() -> None:
    present = {"n2": frozenset({BASE.digest})}
    cache = _cache("ns/c", {"py": (BASE, PY)}, ["n1", "n2", "n3"], present)
    result = distribute([cache], present)
    base_entries = {n: next(e for e in result[n] if e.layer.digest == BASE.digest)
                    for n in result}
    assert all(e.source == "Peer" for e in base_entries.values())
    assert base_entries["n1"].peers[0] == "n2"
    assert base_entries["n3"].peers[0] == "n2"


def _previous(specs: dict[str, dict[str, Any]]) -> Previous:
    """The previous assignments the operator keeps of these specs (its index's records)."""
    return {name: SpecRecord.of(name, spec).assignments for name, spec in specs.items()}


def test_assignments_are_sticky_when_inventories_change() -> None:
    nodes = ["n1", "n2", "n3"]
    cache = _cache("ns/c", {"app-a": (BASE, PY, APP_A)}, nodes)
    first = distribute([cache], {})
    specs = {n: node_spec(n, first[n], [cache]) for n in nodes}
    # Every node now reports holding everything: nothing it was told may change.
    held = {n: frozenset({BASE.digest, PY.digest, APP_A.digest}) for n in nodes}
    again = distribute([cache], held, _previous(specs))
    assert {n: node_spec(n, again[n], [cache]) for n in nodes} == specs
    # A new node is warmed from the holders, never from upstream.
    grown = _cache("ns/c", {"app-a": (BASE, PY, APP_A)}, [*nodes, "n4"], held)
    late = distribute([grown], held, _previous(specs))["n4"]
    assert all(e.source == "Peer" and e.peers[0] == "n1" for e in late)


def test_two_caches_share_a_layer_once_and_both_are_named() -> None:
    first = _cache("ns/a", {"py": (BASE, PY)}, ["n1"])
    second = _cache("ns/b", {"app": (BASE, APP_A)}, ["n1"], mode_images=True)
    result = distribute([second, first], {})
    assert [e.layer.digest for e in result["n1"]] == [BASE.digest, PY.digest, APP_A.digest]
    assert result["n1"][0].caches == {"ns/a", "ns/b"}
    spec = node_spec("n1", result["n1"], [first, second])
    assert spec["caches"] == ["ns/a", "ns/b"]
    # The image's layers as indexes into spec.layers, base first: BASE (0), APP_A (2).
    assert spec["images"] == [{"reference": f"reg.example/app@{_digest('app')}",
                               "caches": ["ns/b"], "layers": [0, 2]}]
    assert spec["layers"][0]["source"] == "Upstream"
    # Each layer names the caches wanting it (their credentials fetch it); the first is
    # the one whose image named the repository.
    assert [e["caches"] for e in spec["layers"]] == [["ns/a", "ns/b"], ["ns/a"], ["ns/b"]]
    assert spec["paused"] is False


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True),
                min_size=1, max_size=6),
       st.integers(1, 5), st.sets(st.tuples(st.integers(0, 4), st.integers(0, 7))))
def test_properties(image_layers: list[list[int]], node_count: int,
                    held: set[tuple[int, int]]) -> None:
    layers = [_layer(f"l{i}", 10 + i) for i in range(8)]
    nodes = [f"n{i}" for i in range(node_count)]
    present = {f"n{n}": frozenset(layers[i].digest for m, i in held if m == n)
               for n in range(node_count)}
    cache = _cache("ns/c", {f"img{i}": tuple(layers[j] for j in ls)
                            for i, ls in enumerate(image_layers)}, nodes, present)
    result = distribute([cache], present)
    for digest in {e.layer.digest for entries in result.values() for e in entries}:
        entries = [(n, e) for n, es in result.items() for e in es if e.layer.digest == digest]
        seeders = [n for n, e in entries if e.source == "Upstream"]
        anyone_holds = any(digest in p for p in present.values())
        # Exactly one upstream fetch for a layer nobody holds, none for a held one.
        assert len(seeders) == (0 if anyone_holds else 1)
        for n, e in entries:
            assert n not in e.peers
            assert len(e.peers) <= 8
            if e.source == "Peer" and len(entries) > 1:
                assert e.peers


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True),
                min_size=1, max_size=6),
       st.lists(st.integers(0, 5), min_size=1, max_size=6),
       st.sets(st.tuples(st.integers(0, 5), st.integers(0, 7))), st.booleans(),
       st.lists(st.one_of(st.none(), st.integers(0, 200)), min_size=6, max_size=6))
def test_one_builder_for_many_nodes_gives_each_its_own_spec(
        image_layers: list[list[int]], second_images: list[int],
        held: set[tuple[int, int]], paused: bool, budgets: list[int | None]) -> None:
    """`NodeSpecs` shares what nodes have in common; no node gets another's fields.

    Two caches over overlapping nodes (so nodes holding the same layers may want them for
    different caches), some layers held already, budgets that may cut a node's chains but
    not its layers: each node's spec from one builder for
    all equals the one built for that node alone, and reads as the CRD's.
    """
    layers = [_layer(f"l{i}", 10 + i) for i in range(8)]
    nodes = [f"n{i}" for i in range(6)]
    present = {f"n{n}": frozenset(layers[i].digest for m, i in held if m == n)
               for n in range(6)}
    images = {f"img{i}": tuple(layers[j] for j in ls) for i, ls in enumerate(image_layers)}
    first = _cache("ns/a", images, nodes[:4], present,
                   budgets=dict(zip(nodes, budgets, strict=True)))
    second = _cache("ns/b", {name: images[name] for name in sorted(images)[:2]},
                    [nodes[i] for i in sorted(set(second_images))], present,
                    mode_images=paused)
    caches = [first, second]
    result = distribute(caches, present)
    shared = NodeSpecs(caches)
    for name in nodes:
        spec, fingerprint = shared.spec_and_fingerprint(name, result.get(name, []))
        assert spec == node_spec(name, result.get(name, []), caches)
        assert NodeLayerCacheSpec.read(name, spec).to_dict() == spec
        assert fingerprint == spec_fingerprint(spec)  # hashed once per distinct rest


def test_a_cache_whose_layers_are_all_past_the_cap_is_still_named() -> None:
    """The cap cuts ``layers``, not who wants something here.

    ``caches`` and ``paused`` count every cache wanting a layer on the node.
    """
    many = tuple(_layer(f"m{i}", 1) for i in range(MAX_NODE_LAYERS))
    first = _cache("ns/a", {"huge": many}, ["n1"])
    second = _cache("ns/b", {"late": (_layer("late", 1),)}, ["n1"])
    layers = distribute([first, second], {})["n1"]
    spec = node_spec("n1", layers, [first, second])
    assert len(spec["layers"]) == MAX_NODE_LAYERS and spec["caches"] == ["ns/a", "ns/b"]


def test_node_spec_is_capped_at_the_crd_limit() -> None:
    many = tuple(_layer(f"m{i}", 1) for i in range(MAX_NODE_LAYERS + 10))
    cache = _cache("ns/c", {"huge": many}, ["n1"], mode_images=True)
    spec = node_spec("n1", distribute([cache], {})["n1"], [cache])
    assert len(spec["layers"]) == MAX_NODE_LAYERS
    assert [e["digest"] for e in spec["layers"]] == [str(x.digest) for x in many[:MAX_NODE_LAYERS]]
    # An image not wholly held is not materialised.
    assert spec["images"] == []
    # Chains too: the first MAX_NODE_CHAINS prefixes, base first, each listing its layers.
    assert [len(c["layers"]) for c in spec["chains"]] == list(range(1, MAX_NODE_CHAINS + 1))


def test_peers_are_parent_then_holders_then_seeder_then_the_next_nodes_each_once() -> None:
    # 1,000 nodes, as in the scale benchmark: the list must stay cheap and exact.
    nodes = [f"n{i:04d}" for i in range(1000)]
    present = {"n0500": frozenset({BASE.digest}), "n0007": frozenset({BASE.digest})}
    cache = _cache("ns/c", {"app-a": (BASE, APP_A)}, nodes, present)
    result = distribute([cache], present)
    seeder = next(n for n in nodes for e in result[n]
                  if e.layer.digest == APP_A.digest and e.source == "Upstream")
    for index, name in enumerate(nodes):
        for entry in result[name]:
            held = entry.layer.digest == BASE.digest  # held by two nodes: no seeder
            if entry.source == "Upstream" or (held and name in present):
                continue
            assert name not in entry.peers
            assert len(entry.peers) == len(set(entry.peers)) == 8
            parent = entry.peers[0]
            roots = [r for r in (["n0007", "n0500"] if held else [seeder]) if r != parent]
            assert entry.peers[1:1 + len(roots)] == roots
            rest = entry.peers[1 + len(roots):]
            skip = {name, parent, *roots}
            following = [n for n in nodes[index + 1:] + nodes[:index] if n not in skip]
            assert rest == following[:len(rest)]


@given(count=st.integers(1, 300), held=st.sets(st.integers(0, 299), max_size=4))
@settings(max_examples=60, deadline=None)
def test_each_layer_flows_down_a_relay_tree_no_node_uploads_it_more_than_fanout_times(
        count: int, held: set[int]) -> None:
    nodes = [f"n{i:03d}" for i in range(count)]
    present = {nodes[i]: frozenset({BASE.digest}) for i in held if i < count}
    cache = _cache("ns/c", {"app-a": (BASE, APP_A)}, nodes, present)
    result = distribute([cache], present)
    for layer in (BASE, APP_A):
        entries = {n: e for n in nodes for e in result[n] if e.layer.digest == layer.digest}
        holders = {n for n in present if layer.digest in present[n]}
        roots = holders or {n for n, e in entries.items() if e.source == "Upstream"}
        assert len(roots) == 1 or holders  # one seeder, or the holders
        parent = {n: e.peers[0] for n, e in entries.items() if n not in roots}
        uploads: dict[str, int] = {}
        for up in parent.values():
            uploads[up] = uploads.get(up, 0) + 1
        assert max(uploads.values(), default=0) <= FANOUT
        for node in parent:  # every path leads to a root, within log2(count) + 1 steps
            at, steps = node, 0
            while at not in roots:
                at, steps = parent[at], steps + 1
                assert steps <= count.bit_length() + 1
