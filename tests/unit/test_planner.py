"""Planner: tables for the rules, hypothesis for the invariants (pure, no I/O)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layercache.oci.digest import Digest
from layercache.oci.platform import Platform
from layercache.plan.planner import (
    Layer,
    LayerRun,
    Node,
    Plan,
    PlanImage,
    PlanInputError,
    PlanOptions,
    plan,
    saved_bytes,
)

AMD = Platform("linux", "amd64")
ARM = Platform("linux", "arm64")
MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"


def d(name: str) -> Digest:
    return Digest.from_bytes(name.encode())


def layer(name: str, size: int) -> Layer:
    return Layer(d(name), size, MEDIA, d("diff-" + name))


def image(
    ref: str,
    *layers: Layer,
    platform: Platform = AMD,
    selector: dict[str, str] | None = None,
    manifest: str | None = None,
) -> PlanImage:
    return PlanImage(
        ref, platform, d(manifest or "m-" + ref), tuple(layers), dict(selector or {})
    )


def node(
    name: str,
    budget: int | None = None,
    present: Iterable[str] = (),
    platform: Platform = AMD,
    labels: dict[str, str] | None = None,
) -> Node:
    return Node(name, platform, dict(labels or {}), frozenset(d(p) for p in present), budget)


def names(layers: Iterable[Layer]) -> list[str]:
    lookup = {item.digest: name for name, item in NAMED.items()}
    return [lookup.get(item.digest, str(item.digest)) for item in layers]


B, R, A, C = layer("base", 100), layer("runtime", 50), layer("app-a", 10), layer("app-c", 20)
P, E, Q, T = layer("p", 5), layer("empty", 1), layer("q", 7), layer("top", 3)
G1, G2 = layer("cuda-1", 1000), layer("cuda-2", 900)
NAMED = {
    "B": B, "R": R, "A": A, "C": C, "P": P, "E": E, "Q": Q, "T": T, "G1": G1, "G2": G2,
}  # fmt: skip


def held(result: Plan, name: str) -> list[str]:
    return names(result.nodes[name].layers)


def test_shared_first_then_largest() -> None:
    result = plan([image("a", B, R, A), image("c", B, R, C)], [node("n1")])
    assert held(result, "n1") == ["B", "R", "C", "A"]
    assert result.nodes["n1"].skipped is None
    assert result.shared_by[B.digest] == 2
    assert result.shared_by[A.digest] == 1


def test_savings_by_hand() -> None:
    images = [image("a", B, R, A), image("c", B, R, C)]
    result = plan(images, [node("n1", present=["base"]), node("n2", budget=150)])
    n1, n2 = result.nodes["n1"], result.nodes["n2"]
    assert (n1.held_bytes, n1.present_bytes, n1.fetch_bytes) == (180, 100, 80)
    assert held(result, "n2") == ["B", "R"]
    assert (n2.held_bytes, n2.present_bytes) == (150, 0)
    skip = n2.skipped
    assert skip is not None
    assert (skip.layer, skip.needed_bytes, skip.free_bytes, skip.bytes) == (C, 20, 0, 30)
    assert names(skip.layers) == ["C", "A"]
    assert "needs 20 bytes, 0 left" in skip.reason
    s = result.savings
    assert s.unique_bytes == 180
    # Naive counts only held layers, a digest once per node: n1 180, n2 150 (its budget
    # leaves C and A out, so they are neither naive nor saved).
    assert s.naive_bytes == 330
    assert s.planned_bytes == 330
    assert s.already_present_bytes == 100
    assert s.expected_upstream_bytes == 80  # R, C, A: nobody holds them yet
    assert s.expected_peer_bytes == 150
    assert result.servers(B.digest).holding == ("n1",)
    assert result.servers(B.digest).planned == ("n2",)
    assert result.servers(R.digest).planned == ("n1", "n2")
    assert result.servers(C.digest).planned == ("n1",)
    assert result.servers(d("unknown")).planned == ()


@pytest.mark.parametrize(
    ("budget", "expected", "skipped_first"),
    [
        (None, ["B", "R", "C", "A"], None),
        (180, ["B", "R", "C", "A"], None),  # exactly the budget fits
        (179, ["B", "R", "C"], "A"),
        (170, ["B", "R", "C"], "A"),
        (169, ["B", "R"], "C"),
        (99, [], "B"),
        (0, [], "B"),
    ],
)
def test_budget_prefix(budget: int | None, expected: list[str], skipped_first: str | None) -> None:
    result = plan([image("a", B, R, A), image("c", B, R, C)], [node("n", budget)])
    plan_ = result.nodes["n"]
    assert held(result, "n") == expected
    assert plan_.held_bytes <= (budget if budget is not None else plan_.held_bytes)
    if skipped_first is None:
        assert plan_.skipped is None
    else:
        assert plan_.skipped is not None
        assert plan_.skipped.layer == NAMED[skipped_first]


def test_strict_priority_leaves_smaller_later_layers() -> None:
    # The big shared CUDA layer does not fit; the smaller app layers after it are not held
    # either: a node holds a prefix of the order, so a bigger budget only ever adds layers.
    images = [image(f"g{i}", B, G1, layer(f"t{i}", 1)) for i in range(3)] + [image("a", B, A)]
    result = plan(images, [node("n", budget=500)])
    assert held(result, "n") == ["B"]
    skip = result.nodes["n"].skipped
    assert skip is not None
    assert skip.layer == G1
    assert (skip.needed_bytes, skip.free_bytes) == (1000, 400)


def test_min_shared_by() -> None:
    images = [image("a", B, R, A), image("c", B, R, C), image("x", P, E), image("y", Q, E)]
    result = plan(images, [node("n")], PlanOptions(min_shared_by=2))
    # E is used twice, but rests on P and Q, used once each: it goes with them.
    assert held(result, "n") == ["B", "R"]
    assert result.nodes["n"].below_min_shared == 5  # A, C, P, Q and E


MB = 1_000_000
BASE30, TOPS = layer("base-30mb", 30 * MB), [layer(f"top-{i}", 100 * MB) for i in range(3)]
THREE_ON_A_BASE = [image(f"app-{i}", BASE30, top) for i, top in enumerate(TOPS)]


def test_min_shared_by_on_one_node_saves_nothing() -> None:
    # Issue 10: one node, three images on a 30 MB base, minSharedBy 2 reported 300 MB
    # (91 %) saved: naive counted the 300 MB of top layers the cache never holds.
    s = plan(THREE_ON_A_BASE, [node("n1")], PlanOptions(min_shared_by=2)).savings
    assert (s.naive_bytes, s.planned_bytes, s.unique_bytes) == (30 * MB, 30 * MB, 30 * MB)
    assert s.expected_upstream_bytes == 30 * MB
    assert s.saved_bytes == 0


def test_min_shared_by_on_three_nodes_saves_two_copies_of_the_base() -> None:
    nodes = [node(f"n{i}") for i in range(3)]
    s = plan(THREE_ON_A_BASE, nodes, PlanOptions(min_shared_by=2)).savings
    assert s.naive_bytes == 3 * 30 * MB
    assert s.expected_upstream_bytes == 30 * MB
    assert s.saved_bytes == 2 * 30 * MB
    assert s.expected_peer_bytes == 2 * 30 * MB


def test_one_node_without_min_shared_by_saves_nothing_either() -> None:
    # containerd de-duplicates within a node: one node alone shares nothing.
    s = plan(THREE_ON_A_BASE, [node("n1")]).savings
    assert s.naive_bytes == s.expected_upstream_bytes == 330 * MB
    assert s.saved_bytes == 0


def test_layers_skipped_for_budget_are_neither_naive_nor_saved() -> None:
    nodes = [node("n1", budget=30 * MB), node("n2", budget=30 * MB)]
    result = plan(THREE_ON_A_BASE, nodes)
    assert all(p.skipped is not None for p in result.nodes.values())
    s = result.savings
    assert s.naive_bytes == 2 * 30 * MB
    assert s.saved_bytes == 30 * MB


def test_saved_bytes_counts_only_peer_transfers() -> None:
    assert saved_bytes(naive_bytes=100, upstream_bytes=40, peer_bytes=60) == 60
    # 30 bytes were already on the node: neither fetched nor saved.
    assert saved_bytes(naive_bytes=100, upstream_bytes=40, peer_bytes=30) == 30
    # A peer transfer broke off after 20 bytes and was fetched upstream again.
    assert saved_bytes(naive_bytes=100, upstream_bytes=60, peer_bytes=60) == 40
    assert saved_bytes(naive_bytes=100, upstream_bytes=250, peer_bytes=0) == 0


def test_layers_already_held_are_not_saved() -> None:
    # Every node already holds the base (another cache put it there): nothing moves, so
    # nothing is saved, although naive counts it on every node.
    nodes = [node(f"n{i}", present=["base-30mb"]) for i in range(3)]
    s = plan(THREE_ON_A_BASE, nodes, PlanOptions(min_shared_by=2)).savings
    assert (s.naive_bytes, s.expected_upstream_bytes, s.expected_peer_bytes) == (90 * MB, 0, 0)
    assert s.saved_bytes == 0


def test_platforms_and_untargeted() -> None:
    arm_b = layer("arm-base", 80)
    images = [image("a", B, A), image("arm", arm_b, platform=ARM), image("s390", T,
              platform=Platform("linux", "s390x"))]  # fmt: skip
    result = plan(images, [node("x86"), node("pi", platform=Platform("linux", "aarch64"))])
    assert held(result, "x86") == ["B", "A"]
    assert [la.digest for la in result.nodes["pi"].layers] == [arm_b.digest]
    assert result.untargeted == ("s390",)


def test_node_selector() -> None:
    images = [image("a", B, A), image("gpu", B, G1, selector={"gpu": "true"})]
    nodes = [node("cpu"), node("gpu", labels={"gpu": "true", "zone": "a"})]
    result = plan(images, nodes)
    assert held(result, "cpu") == ["B", "A"]
    assert held(result, "gpu") == ["B", "G1", "A"]
    assert result.savings.naive_bytes == 110 + 1110
    assert result.servers(G1.digest).planned == ("gpu",)


def test_selector_matching_no_node_is_untargeted() -> None:
    result = plan([image("gpu", G1, selector={"gpu": "true"})], [node("cpu")])
    assert result.untargeted == ("gpu",)
    assert len(result.nodes["cpu"].layers) == 0


def test_same_manifest_twice_counts_once() -> None:
    images = [image("a:v1", B, A, manifest="m"), image("a:stable", B, A, manifest="m"),
              image("c", B, C)]  # fmt: skip
    result = plan(images, [node("n")])
    assert result.shared_by[B.digest] == 2
    assert result.shared_by[A.digest] == 1


def test_cycle_is_held_together() -> None:
    # E twice in one image: Q rests on E and E (again) on Q, so E and Q are one unit.
    images = [image("x", P, E, Q, E, T)]
    full = plan(images, [node("n")])
    order = held(full, "n")
    assert order[0] == "P"
    assert set(order[1:3]) == {"E", "Q"}
    assert order[3] == "T"
    # A budget that would cut between E and Q holds neither.
    cut = plan(images, [node("n", budget=5 + 1)])
    assert held(cut, "n") == ["P"]
    skip = cut.nodes["n"].skipped
    assert skip is not None
    assert skip.needed_bytes == 8


def test_cycle_across_images() -> None:
    images = [image("x", P, Q, A), image("y", Q, P, C)]  # P under Q and Q under P
    result = plan(images, [node("n")])
    order = held(result, "n")
    assert set(order[:2]) == {"P", "Q"}
    assert order[2:] == ["C", "A"]


def test_consecutive_repeat_is_no_cycle() -> None:
    result = plan([image("x", P, E, E, T)], [node("n")])
    assert held(result, "n") == ["P", "E", "T"]


@pytest.mark.parametrize(
    ("images", "nodes", "options", "fragment"),
    [
        ([image("a", layer("x", 1)), image("b", layer("x", 2))], [node("n")], None, "size 1"),
        (
            [image("a", Layer(d("x"), 1, MEDIA, d("1"))),
             image("b", Layer(d("x"), 1, MEDIA, d("2")))],
            [node("n")],
            None,
            "diff ID",
        ),
        ([image("a", layer("x", -1))], [node("n")], None, "impossible size -1"),
        ([image("a", B, manifest="m"), image("b", A, manifest="m")], [node("n")], None,
         "two layer lists"),
        ([image("a", B)], [node("n"), node("n")], None, "listed twice"),
        ([image("a", B)], [node("n", budget=-1)], None, "negative budget"),
        ([image("a", B)], [node("n")], PlanOptions(min_shared_by=0), "min_shared_by"),
    ],
)  # fmt: skip
def test_input_errors(
    images: list[PlanImage], nodes: list[Node], options: PlanOptions | None, fragment: str
) -> None:
    with pytest.raises(PlanInputError, match=fragment):
        plan(images, nodes, options)


def test_media_type_may_differ_for_one_blob() -> None:
    docker = Layer(B.digest, B.size, "application/vnd.docker.image.rootfs.diff.tar.gzip", B.diff_id)
    result = plan([image("a", B, A), image("b", docker, C)], [node("n")])
    assert result.shared_by[B.digest] == 2


def test_ties_break_by_digest() -> None:
    same = [layer(f"same-{i}", 10) for i in range(20)]
    result = plan([image(f"i{i}", item) for i, item in enumerate(same)], [node("n", budget=55)])
    expected = sorted(item.digest for item in same)
    assert [la.digest for la in result.nodes["n"].layers] == expected[:5]
    skip = result.nodes["n"].skipped
    assert skip is not None
    assert [la.digest for la in skip.layers] == expected[5:]


def test_layer_run() -> None:
    items = (B, R, A, C)
    run = LayerRun(items, 1, 3)
    assert len(run) == 2
    assert list(run) == [R, A]
    assert run[0] == R
    assert run[-1] == A
    assert run[:1] == (R,)
    assert R in run
    assert C not in run
    with pytest.raises(IndexError):
        run[2]
    with pytest.raises(IndexError):
        run[-3]
    assert "2 layers" in repr(run)


def test_empty_inputs() -> None:
    result = plan([], [])
    assert result.nodes == {}
    assert result.savings.unique_bytes == 0
    assert plan([image("a", B)], []).untargeted == ("a",)
    lonely = plan([], [node("n", budget=10)])
    assert len(lonely.nodes["n"].layers) == 0
    assert lonely.nodes["n"].skipped is None


# ---- properties --------------------------------------------------------------------------

# Equal sizes on purpose: ties in (shared, size) must break by digest.
POOL = [layer(f"l{i}", size) for i, size in enumerate([1, 2, 3, 5, 8, 8, 8, 34, 55, 55, 144])]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[PlanImage], list[Node], PlanOptions]:
    images = []
    for number in range(draw(st.integers(0, 7))):
        layers = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=6))
        platform = draw(st.sampled_from([AMD, AMD, ARM]))
        selector = draw(st.sampled_from([{}, {}, {"gpu": "true"}]))
        images.append(image(f"i{number}", *layers, platform=platform, selector=selector))
    nodes = []
    for number in range(draw(st.integers(0, 5))):
        nodes.append(
            node(
                f"n{number}",
                budget=draw(st.one_of(st.none(), st.integers(0, 400))),
                present=draw(st.lists(st.sampled_from([f"l{i}" for i in range(11)] + ["cfg"]))),
                platform=draw(st.sampled_from([AMD, ARM])),
                labels=draw(st.sampled_from([{}, {"gpu": "true"}])),
            )
        )
    return images, nodes, PlanOptions(draw(st.integers(1, 3)))


def snapshot(result: Plan) -> Any:
    nodes = {}
    for name, item in result.nodes.items():
        skip = item.skipped
        nodes[name] = (
            [la.digest for la in item.layers],
            item.held_bytes,
            item.present_bytes,
            skip and (skip.layer, skip.needed_bytes, skip.free_bytes, list(skip.layers),
                      skip.bytes),
        )  # fmt: skip
    return nodes, result.savings, dict(result.shared_by), result.untargeted


def candidates(images: list[PlanImage], item: Node) -> list[PlanImage]:
    return [
        im for im in images
        if im.platform == item.platform
        and all(item.labels.get(k) == v for k, v in im.node_selector.items())
    ]  # fmt: skip


def requires(images: list[PlanImage]) -> dict[Digest, set[Digest]]:
    """Transitive 'rests on' relation over the images, to recognise cycle units."""
    direct: dict[Digest, set[Digest]] = {}
    for im in images:
        for lower, upper in zip(im.layers, im.layers[1:], strict=False):
            if lower.digest != upper.digest:
                direct.setdefault(upper.digest, set()).add(lower.digest)
    closure = {}
    for start in direct:
        seen: set[Digest] = set()
        stack = list(direct[start])
        while stack:
            item = stack.pop()
            if item not in seen:
                seen.add(item)
                stack.extend(direct.get(item, ()))
        closure[start] = seen
    return closure


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_invariants(scenario: tuple[list[PlanImage], list[Node], PlanOptions]) -> None:
    images, nodes, options = scenario
    result = plan(images, nodes, options)
    closure = requires(images)
    for item in nodes:
        planned = result.nodes[item.name]
        layers = list(planned.layers)
        position = {la.digest: i for i, la in enumerate(layers)}
        assert len(position) == len(layers)  # no digest twice
        assert planned.held_bytes == sum(la.size for la in layers)
        if item.budget_bytes is not None:
            assert planned.held_bytes <= item.budget_bytes
        assert planned.present_bytes == sum(la.size for la in layers if la.digest in item.present)
        # Chain completeness: every layer beneath a held layer, in every candidate image, is
        # held, and earlier, unless the two rest on each other (one cycle unit).
        for im in candidates(images, item):
            for index, upper in enumerate(im.layers):
                if upper.digest not in position:
                    continue
                for lower in im.layers[:index]:
                    assert lower.digest in position
                    if (
                        lower.digest != upper.digest
                        and position[lower.digest] > position[upper.digest]
                    ):
                        assert upper.digest in closure.get(lower.digest, set())
        if planned.skipped is not None:
            assert item.budget_bytes is not None
            assert planned.skipped.needed_bytes > planned.skipped.free_bytes
            assert planned.held_bytes + planned.skipped.free_bytes == item.budget_bytes
        for la in layers:
            servers = result.servers(la.digest)
            assert item.name in servers.holding + servers.planned
    s = result.savings
    assert 0 <= s.expected_upstream_bytes <= s.unique_bytes <= s.planned_bytes <= s.naive_bytes
    assert s.naive_bytes == sum(p.held_bytes for p in result.nodes.values())
    assert s.already_present_bytes <= s.planned_bytes
    assert s.expected_peer_bytes >= 0


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_deterministic_in_any_order(
    scenario: tuple[list[PlanImage], list[Node], PlanOptions], rng: random.Random
) -> None:
    images, nodes, options = scenario
    first = snapshot(plan(images, nodes, options))
    assert snapshot(plan(images, nodes, options)) == first
    rng.shuffle(images)
    rng.shuffle(nodes)
    assert snapshot(plan(images, nodes, options)) == first


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.integers(0, 400), st.integers(0, 400))
def test_larger_budget_only_adds(
    scenario: tuple[list[PlanImage], list[Node], PlanOptions], low: int, extra: int
) -> None:
    images, _, options = scenario
    nodes = [node("small", budget=low), node("large", budget=low + extra)]
    result = plan(images, nodes, options)
    small, large = list(result.nodes["small"].layers), list(result.nodes["large"].layers)
    assert large[: len(small)] == small


def reference_plan(images: list[PlanImage], item: Node, min_shared_by: int) -> list[Digest]:
    """The rules of the module docstring, written plainly (quadratic), for small inputs."""
    manifests = {im.manifest_digest: im for im in images}.values()
    shared = {la.digest: 0 for im in images for la in im.layers}
    for im in manifests:
        for digest in {la.digest for la in im.layers}:
            shared[digest] += 1
    size = {la.digest: la.size for im in images for la in im.layers}

    def key(digest: Digest) -> tuple[int, int, str]:
        return (-shared[digest], -size[digest], digest)

    same_platform = [im for im in images if im.platform == item.platform]
    closure = requires(same_platform)
    nodes = {la.digest for im in same_platform for la in im.layers}
    unit_of = {
        x: min((y for y in nodes
                if y == x or (y in closure.get(x, ()) and x in closure.get(y, ()))), key=key)
        for x in nodes
    }  # fmt: skip
    members: dict[Digest, list[Digest]] = {}
    for x in sorted(nodes, key=key):
        members.setdefault(unit_of[x], []).append(x)
    parents = {
        u: {unit_of[p] for m in ms for p in closure.get(m, ())} - {u} for u, ms in members.items()
    }
    order: list[Digest] = []
    done: set[Digest] = set()
    left_out: set[Digest] = set()
    while len(done) < len(members):
        unit = min((u for u in members if u not in done and parents[u] <= done), key=key)
        done.add(unit)
        if parents[unit] & left_out or min(shared[m] for m in members[unit]) < min_shared_by:
            left_out.add(unit)
        else:
            order.extend(members[unit])
    wanted = {la.digest for im in candidates(images, item) for la in im.layers}
    order = [x for x in order if x in wanted]
    held: list[Digest] = []
    for unit in dict.fromkeys(unit_of[x] for x in order):
        chunk = [x for x in order if unit_of[x] == unit]
        total = sum(size[x] for x in held + chunk)
        if item.budget_bytes is not None and total > item.budget_bytes:
            break
        held += chunk
    return held


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_matches_reference(scenario: tuple[list[PlanImage], list[Node], PlanOptions]) -> None:
    images, nodes, options = scenario
    result = plan(images, nodes, options)
    for item in nodes:
        expected = reference_plan(images, item, options.min_shared_by)
        assert [la.digest for la in result.nodes[item.name].layers] == expected


@pytest.mark.parametrize("seed", range(40))
def test_matches_reference_on_cyclic_families(seed: int) -> None:
    # Many repeats from a small pool: cycles, cycles resting on nothing, cycles on cycles.
    rng = random.Random(seed)  # noqa: S311  # test data, not secrets
    pool = POOL[:6]
    images = [
        image(f"i{n}", *rng.choices(pool, k=rng.randint(2, 6))) for n in range(rng.randint(1, 6))
    ]
    nodes = [node("all"), node("tight", budget=rng.randint(0, 120))]
    for min_shared_by in (1, 2):
        result = plan(images, nodes, PlanOptions(min_shared_by))
        for item in nodes:
            expected = reference_plan(images, item, min_shared_by)
            assert [la.digest for la in result.nodes[item.name].layers] == expected
