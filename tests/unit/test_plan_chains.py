"""Planner chains: which prefixes each node unpacks, in what order, within what budget."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layercache.oci.digest import Digest, chain_ids
from layercache.oci.platform import Platform
from layercache.plan.chains import COMPRESSION_RATIO, estimate_unpacked_bytes
from layercache.plan.distribute import CachePlan, distribute, node_spec
from layercache.plan.planner import Layer, Node, PlanImage, PlanOptions, plan

AMD = Platform("linux", "amd64")
ARM = Platform("linux", "arm64")
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"


def d(name: str) -> Digest:
    return Digest.from_bytes(name.encode())


def layer(name: str, size: int, media: str = GZIP) -> Layer:
    return Layer(d(name), size, media, d("diff-" + name))


BASE, PY, APP_A, APP_B, JAVA = (layer("base", 100), layer("py", 50), layer("a", 5),
                                layer("b", 6), layer("java", 70))


def image(ref: str, *layers: Layer, platform: Platform = AMD,
          unpackable: int | None = None) -> PlanImage:
    return PlanImage(ref, platform, d("m-" + ref), tuple(layers), {}, unpackable)


def chain_of(*layers: Layer) -> Digest:
    return chain_ids(layer.diff_id for layer in layers)[-1]


FAMILY = [image("a", BASE, PY, APP_A), image("b", BASE, PY, APP_B), image("j", BASE, JAVA)]


def chains(result: Any, node: str) -> list[Digest]:
    return [c.chain_id for c in result.nodes[node].chains]


def test_chain_ids_follow_the_oci_rule() -> None:
    # chainID(L0) = diffID(L0); chainID(L1) = sha256(chainID(L0) + " " + diffID(L1)).
    expected = Digest.from_bytes(f"{BASE.diff_id} {PY.diff_id}".encode())
    assert chain_of(BASE) == BASE.diff_id
    assert chain_of(BASE, PY) == expected


def test_min_shared_by_two_keeps_shared_prefixes_in_blob_order() -> None:
    result = plan(FAMILY, [Node("n1", AMD)], PlanOptions(min_shared_by=2))
    # base is shared by 3 images, base+py by 2; the apps' and java's prefixes by 1.
    assert chains(result, "n1") == [chain_of(BASE), chain_of(BASE, PY)]
    first, second = result.nodes["n1"].chains
    assert (first.shared_by, second.shared_by) == (3, 2)
    assert tuple(second.layers) == (BASE, PY) and second.diff_ids == (BASE.diff_id, PY.diff_id)
    assert result.nodes["n1"].unpacked_bytes == (100 + 50) * COMPRESSION_RATIO


def test_every_prefix_with_min_shared_by_one_each_after_its_parent() -> None:
    result = plan(FAMILY, [Node("n1", AMD)])
    got = chains(result, "n1")
    assert set(got) == {chain_of(BASE), chain_of(BASE, PY), chain_of(BASE, PY, APP_A),
                        chain_of(BASE, PY, APP_B), chain_of(BASE, JAVA)}
    for c in result.nodes["n1"].chains:  # the parent chain comes first
        if len(c.layers) > 1:
            assert got.index(chain_of(*c.layers[:-1])) < got.index(c.chain_id)


def test_chain_min_shared_by_apart_from_the_blobs() -> None:
    # Mode Images: blobs by minSharedBy, chains of every prefix whose blobs are held.
    result = plan(FAMILY, [Node("n1", AMD)], PlanOptions(min_shared_by=2, chain_min_shared_by=1))
    assert chains(result, "n1") == [chain_of(BASE), chain_of(BASE, PY)]  # apps' blobs not held
    result = plan(FAMILY, [Node("n1", AMD)], PlanOptions(min_shared_by=1, chain_min_shared_by=3))
    assert chains(result, "n1") == [chain_of(BASE)]


@pytest.mark.parametrize(("budget", "expected", "skipped"), [
    # blobs 100+50+70+5+6 = 231 first; then chains at 3x their top layer's blob.
    (231, [], 5),
    (231 + 300, [chain_of(BASE)], 4),
    (231 + 300 + 149, [chain_of(BASE)], 4),  # base+py needs 150
    (231 + 450, [chain_of(BASE), chain_of(BASE, PY)], 3),
    (None, None, 0),
])
def test_unpacked_estimate_counts_against_the_budget_after_the_blobs(
        budget: int | None, expected: list[Digest] | None, skipped: int) -> None:
    result = plan(FAMILY, [Node("n1", AMD, budget_bytes=budget)])
    node_plan = result.nodes["n1"]
    assert node_plan.held_bytes == 231
    if expected is not None:
        assert chains(result, "n1") == expected
    else:
        assert len(node_plan.chains) == 5
    assert node_plan.chains_skipped == skipped
    assert node_plan.held_bytes + node_plan.unpacked_bytes <= (budget or 10**9)


def test_a_chain_waits_for_its_blobs_within_the_budget() -> None:
    # Room for base and py only: java (70) and the apps are not held, nor their chains.
    result = plan(FAMILY, [Node("n1", AMD, budget_bytes=150)])
    assert [layer.digest for layer in result.nodes["n1"].layers] == [BASE.digest, PY.digest]
    assert chains(result, "n1") == []
    assert result.nodes["n1"].chains_skipped == 2  # base, base+py: blobs held, no room


def test_foreign_layer_ends_the_chains() -> None:
    # The image's layer 1 is foreign (left out of layers): only its base chain is valid.
    images = [image("f", BASE, APP_A, unpackable=1), image("g", BASE, APP_B)]
    result = plan(images, [Node("n1", AMD)])
    assert chain_of(BASE, APP_A) not in chains(result, "n1")
    assert chain_of(BASE) in chains(result, "n1")


def test_sharing_counts_per_platform() -> None:
    images = [image("a", BASE, PY), image("b", BASE, PY, platform=ARM), image("c", BASE)]
    result = plan(images, [Node("n1", AMD), Node("n2", ARM)], PlanOptions(min_shared_by=2))
    assert chains(result, "n1") == [chain_of(BASE)]  # base+py: 1 amd64 image only
    assert chains(result, "n2") == []


def test_estimate_of_uncompressed_layers_is_their_size() -> None:
    assert estimate_unpacked_bytes(layer("t", 10, TAR)) == 10
    assert estimate_unpacked_bytes(layer("z", 10, GZIP)) == 10 * COMPRESSION_RATIO


def test_node_spec_lists_chains_once_with_every_cache() -> None:
    one = plan(FAMILY, [Node("n1", AMD)], PlanOptions(min_shared_by=2))
    two = plan(FAMILY[:1], [Node("n1", AMD)], PlanOptions(min_shared_by=1))
    repos = {layer.digest: "r.example/x" for im in FAMILY for layer in im.layers}
    caches = [CachePlan("ns/one", one, repos), CachePlan("ns/two", two, repos)]
    spec = node_spec("n1", distribute(caches, {"n1": frozenset()})["n1"], caches)
    by_id = {c["chainID"]: c for c in spec["chains"]}
    base = by_id[str(chain_of(BASE))]
    assert base["caches"] == ["ns/one", "ns/two"]
    assert base["layers"] == [str(BASE.digest)] and base["diffIDs"] == [str(BASE.diff_id)]
    assert base["unpackedBytes"] == 300
    assert by_id[str(chain_of(BASE, PY, APP_A))]["caches"] == ["ns/two"]
    held = {entry["digest"] for entry in spec["layers"]}
    assert all(set(c["layers"]) <= held for c in spec["chains"])
    ids = [c["chainID"] for c in spec["chains"]]
    assert ids.index(str(chain_of(BASE))) < ids.index(str(chain_of(BASE, PY)))


# ---- the module docstring's rules, written plainly, against the planner -----------------

POOL = [layer(f"p{i}", size) for i, size in enumerate([1, 2, 3, 5, 8, 8, 34, 55])]
GPU = {"gpu": "true"}


def reference_chains(images: list[PlanImage], node: Node, held: list[Digest],
                     chain_min: int) -> list[Digest]:
    """A node's chains with no budget: every prefix of its images, plainly (quadratic)."""
    position = {digest: i for i, digest in enumerate(held)}
    platform = [im for im in images if im.platform == node.platform]
    shared: dict[Digest, set[Digest]] = {}
    for im in platform:
        for c in chain_ids(la.diff_id for la in im.layers):
            shared.setdefault(c, set()).add(im.manifest_digest)
    ready: dict[Digest, tuple[int, int]] = {}
    for im in platform:
        if not all(node.labels.get(k) == v for k, v in im.node_selector.items()):
            continue
        for depth, c in enumerate(chain_ids(la.diff_id for la in im.layers)):
            blobs = im.layers[: depth + 1]
            if len(shared[c]) < chain_min or any(la.digest not in position for la in blobs):
                break
            ready.setdefault(c, (max(position[la.digest] for la in blobs) + 1, depth))
    return sorted(ready, key=lambda c: (*ready[c], c))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(POOL), min_size=1, max_size=6),
                          st.sampled_from([AMD, AMD, ARM]), st.sampled_from([{}, {}, GPU])),
                max_size=8),
       st.integers(1, 3), st.integers(1, 3))
def test_chains_match_the_reference(
        drawn: list[tuple[list[Layer], Platform, dict[str, str]]], blob_min: int,
        chain_min: int) -> None:
    images = [PlanImage(f"i{n}", p, d(f"m{n}"), tuple(ls), sel)
              for n, (ls, p, sel) in enumerate(drawn)]
    nodes = [Node("amd", AMD), Node("gpu", AMD, {"gpu": "true"}), Node("arm", ARM)]
    result = plan(images, nodes, PlanOptions(blob_min, chain_min))
    for node in nodes:
        held = [la.digest for la in result.nodes[node.name].layers]
        assert chains(result, node.name) == reference_chains(images, node, held, chain_min)
        for c in result.nodes[node.name].chains:
            assert all(la.digest in held for la in c.layers)


def test_one_diff_id_in_two_blobs_takes_the_first_images_blobs() -> None:
    # The same uncompressed layer as gzip and as zstd: one chain ID, two blobs. The chain
    # lists the first image's blobs; a node that holds only the other blob does not get it.
    zstd = Layer(d("py-zstd"), 40, "application/vnd.oci.image.layer.v1.tar+zstd", PY.diff_id)
    zone = {"zone": "x"}
    images = [PlanImage("a", AMD, d("m-a"), (BASE, PY), zone), image("b", BASE, zstd)]
    inside, outside = Node("inside", AMD, zone), Node("outside", AMD)
    result = plan(images, [inside, outside])
    assert chains(result, "inside") == [chain_of(BASE), chain_of(BASE, PY)]
    assert tuple(result.nodes["inside"].chains[1].layers) == (BASE, PY)
    assert [la.digest for la in result.nodes["outside"].layers] == [BASE.digest, zstd.digest]
    assert chains(result, "outside") == [chain_of(BASE)]  # (base, py) is not held there


def test_an_image_with_no_unpackable_layer_has_no_chains() -> None:
    images = [image("f", BASE, unpackable=0), image("g", BASE, PY)]
    result = plan(images, [Node("n1", AMD)])
    assert chains(result, "n1") == [chain_of(BASE), chain_of(BASE, PY)]
    assert result.nodes["n1"].chains[0].shared_by == 1  # "f" starts no chain
