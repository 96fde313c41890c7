"""Planner chains: which prefixes each node unpacks, in what order, within what budget."""

from __future__ import annotations

from typing import Any

import pytest

from layercache.chains import COMPRESSION_RATIO, estimate_unpacked_bytes
from layercache.digest import Digest, chain_ids
from layercache.distribute import CachePlan, distribute, node_spec
from layercache.planner import Layer, Node, PlanOptions, ResolvedImage, plan
from layercache.platform import Platform

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
          unpackable: int | None = None) -> ResolvedImage:
    return ResolvedImage(ref, platform, d("m-" + ref), tuple(layers), {}, unpackable)


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
