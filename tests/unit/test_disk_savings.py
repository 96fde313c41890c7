"""Disk-savings figures: from a NodeLayerCache spec and containerd's sizes (pure parts)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from layercache.agent.nodespec import parse_node_spec
from layercache.agent.status.disksavings import DiskUse, Held, Sharing, measure
from layercache.controller.status import cache_disk
from layercache.metrics import AgentGauges, AgentMetrics, OperatorMetrics
from layercache.oci.digest import Digest, chain_ids
from layercache.oci.platform import Platform
from layercache.plan.distribute import CachePlan, distribute, node_spec
from layercache.plan.planner import Layer, Node, PlanImage, plan


def _d(name: str) -> Digest:
    return Digest.from_bytes(name.encode())


BASE, PY, APP_A, APP_B, OTHER = (_d(n) for n in ("base", "py", "app-a", "app-b", "other"))
DIFF = {d: _d(f"diff {d}") for d in (BASE, PY, APP_A, APP_B, OTHER)}
SIZE = {BASE: 1000, PY: 500, APP_A: 30, APP_B: 20, OTHER: 7}


def _layer(digest: Digest, caches: list[str]) -> dict[str, Any]:
    return {"digest": digest, "size": SIZE[digest], "repository": "r.example/x",
            "source": "Upstream", "caches": caches}


def _chain(layers: list[Digest], caches: list[str]) -> dict[str, Any]:
    return {"chainID": chain_ids(DIFF[d] for d in layers)[-1], "layers": layers,
            "diffIDs": [DIFF[d] for d in layers], "caches": caches}


#: Two caches on one node: ns/a has app-a and app-b on python on base; ns/b has app-a
#: (the same image as ns/a's) and an image of its own on base. Chains: base, base+py.
SPEC: dict[str, Any] = {
    "nodeName": "n1",
    "layers": [_layer(BASE, ["ns/a", "ns/b"]), _layer(PY, ["ns/a", "ns/b"]),
               _layer(APP_A, ["ns/a", "ns/b"]), _layer(APP_B, ["ns/a"]),
               _layer(OTHER, ["ns/b"])],
    "imageLayers": [{"cache": "ns/a", "layers": [0, 1, 2]},
                    {"cache": "ns/a", "layers": [0, 1, 3]},
                    {"cache": "ns/b", "layers": [0, 1, 2]},
                    {"cache": "ns/b", "layers": [0, 4]}],
    "chains": [_chain([BASE], ["ns/a", "ns/b"]), _chain([BASE, PY], ["ns/a", "ns/b"])],
}
BASE_CHAIN, PY_CHAIN = chain_ids([DIFF[BASE], DIFF[PY]])
USAGE = {BASE_CHAIN: 4000, PY_CHAIN: 2000}
BOTH = frozenset({"ns/a", "ns/b"})
#: What containerd holds: every blob, both chains pinned for both caches.
HELD = Held(dict(SIZE), {}, {chain: (size, BOTH) for chain, size in USAGE.items()})


def test_sharing_saves_every_copy_but_one_of_each_blob_and_chain() -> None:
    disk = measure(Sharing.parse(SPEC), HELD)
    blobs = sum(SIZE.values())
    # Node: three distinct images (ns/b's app-a is ns/a's): base in 3, py in 3 (chains too).
    separate = (3 * (SIZE[BASE] + USAGE[BASE_CHAIN]) + 2 * (SIZE[PY] + USAGE[PY_CHAIN])
                + SIZE[APP_A] + SIZE[APP_B] + SIZE[OTHER])
    assert disk.node == DiskUse(blobs, 6000, separate)
    assert disk.node.saved == separate - blobs - 6000
    assert disk.node.saved == 2 * SIZE[BASE] + SIZE[PY] + 2 * 4000 + 2000
    a = disk.caches["ns/a"]
    assert a.blobs == SIZE[BASE] + SIZE[PY] + SIZE[APP_A] + SIZE[APP_B]
    assert a.snapshots == 6000
    assert a.separate == 2 * (SIZE[BASE] + SIZE[PY] + 6000) + SIZE[APP_A] + SIZE[APP_B]
    assert a.saved == SIZE[BASE] + SIZE[PY] + 6000
    b = disk.caches["ns/b"]
    assert b.separate == 2 * (SIZE[BASE] + 4000) + SIZE[PY] + 2000 + SIZE[APP_A] + SIZE[OTHER]
    assert b.saved == SIZE[BASE] + 4000


def test_only_what_containerd_holds_counts() -> None:
    held = {BASE: SIZE[BASE], APP_A: SIZE[APP_A]}  # python not fetched yet, nothing unpacked
    disk = measure(Sharing.parse(SPEC), Held(held))
    assert disk.node == DiskUse(SIZE[BASE] + SIZE[APP_A], 0,
                                    3 * SIZE[BASE] + SIZE[APP_A])


def test_without_image_layers_nothing_is_claimed() -> None:
    bare = {k: v for k, v in SPEC.items() if k not in ("chains", "imageLayers")}
    disk = measure(Sharing.parse(bare), HELD)
    assert disk.node == DiskUse(sum(SIZE.values()), 6000, 0)
    assert disk.node.saved == 0


def test_without_spec_chains_the_blobs_labels_name_the_chains() -> None:
    # An older operator (no spec.chains); the diff IDs come from the blobs' uncompressed
    # labels, the snapshots are what we pinned: the same figures.
    no_chains = {k: v for k, v in SPEC.items() if k != "chains"}
    labelled = Held(dict(SIZE), {BASE: DIFF[BASE], PY: DIFF[PY]}, HELD.snapshots)
    assert measure(Sharing.parse(no_chains), labelled) == measure(Sharing.parse(SPEC), HELD)
    # Nothing unpacked and no diff IDs known: snapshots count 0, blobs are still shared.
    assert measure(Sharing.parse(no_chains), Held(dict(SIZE))).node.snapshots == 0


def test_unusable_entries_are_left_out_not_raised() -> None:
    odd = {**SPEC, "imageLayers": [{"cache": "ns/a", "layers": [0, 99, 1]},
                                   {"cache": "ns/a", "layers": ["x"]}],
           "chains": [{"chainID": "nonsense"}, {**SPEC["chains"][0], "diffIDs": []}]}
    sharing = Sharing.parse(odd)
    assert sharing.images == (("ns/a", (BASE,)),)
    assert [c.chain_id for c in sharing.chains] == [BASE_CHAIN]
    assert sharing.diff_ids == {}


def test_the_agent_parses_sharing_with_its_spec() -> None:
    spec = parse_node_spec({"metadata": {"name": "n1", "generation": 1}, "spec": SPEC})
    assert spec.sharing == Sharing.parse(SPEC)
    assert spec.sharing.image_chains([BASE, PY, APP_A]) == (BASE_CHAIN, PY_CHAIN)


def _status(disk: dict[str, Any]) -> dict[str, Any]:
    return {"status": {"disk": disk}}


def test_a_cache_sums_its_figures_over_its_nodes() -> None:
    one = measure(Sharing.parse(SPEC), HELD).to_status()
    nodes = {"n1": _status(one), "n2": _status(one), "n3": {"status": {}}}
    total = cache_disk("ns/a", ["n1", "n2", "n3", "gone"], nodes)
    a = next(c for c in one["caches"] if c["cache"] == "ns/a")
    assert total == {k: 2 * a[k] for k in ("blobs", "snapshots", "separate", "saved")}
    assert cache_disk("ns/zzz", ["n1"], nodes) == dict.fromkeys(total, 0)


def test_operator_writes_each_planned_images_layers_as_indexes() -> None:
    amd64 = Platform("linux", "amd64")
    layer = {d: Layer(d, SIZE[d], "application/vnd.oci.image.layer.v1.tar+gzip", DIFF[d])
             for d in SIZE}
    images = [PlanImage("r.example/a", amd64, _d("ma"), (layer[BASE], layer[PY], layer[APP_A])),
              PlanImage("r.example/b", amd64, _d("mb"), (layer[BASE], layer[PY], layer[APP_B]))]
    # Budget for base and python only: the apps' own layers are cut.
    nodes = [Node("n1", amd64, budget_bytes=SIZE[BASE] + SIZE[PY])]
    cache = CachePlan("ns/a", plan(images, nodes), dict.fromkeys(SIZE, "r.example/a"),
                      image_layers={amd64: tuple(tuple(ly.digest for ly in im.layers)
                                                 for im in images)})
    spec = node_spec("n1", distribute([cache], {})["n1"], [cache])
    assert [e["digest"] for e in spec["layers"]] == [BASE, PY]
    # Both images hold base and python; their layer lists are the same: listed once.
    assert spec["imageLayers"] == [{"cache": "ns/a", "layers": [0, 1]}]


def test_metrics_export_the_figures_per_node_and_per_cache() -> None:
    registry = CollectorRegistry()
    agent = AgentMetrics("n1", registry)
    agent.track(lambda: AgentGauges(1, 1, 10, False, disk_blobs=100, disk_snapshots=50,
                                         disk_separate=400, disk_saved=250))
    get = registry.get_sample_value
    assert get("layercache_agent_disk_bytes", {"node": "n1", "kind": "blobs"}) == 100
    assert get("layercache_agent_disk_bytes", {"node": "n1", "kind": "snapshots"}) == 50
    assert get("layercache_agent_disk_separate_bytes", {"node": "n1"}) == 400
    assert get("layercache_agent_disk_saved_bytes", {"node": "n1"}) == 250
    operator = CollectorRegistry()
    OperatorMetrics(operator, lambda: [("ns/a", {"disk": {"blobs": 7, "snapshots": 3,
                                                          "separate": 30, "saved": 20}}),
                                       ("ns/b", {})])
    get = operator.get_sample_value
    assert get("layercache_cache_disk_bytes", {"cache": "ns/a", "kind": "blobs"}) == 7
    assert get("layercache_cache_disk_bytes", {"cache": "ns/a", "kind": "snapshots"}) == 3
    assert get("layercache_cache_disk_separate_bytes", {"cache": "ns/a"}) == 30
    assert get("layercache_cache_disk_saved_bytes", {"cache": "ns/a"}) == 20
    assert get("layercache_cache_disk_saved_bytes", {"cache": "ns/b"}) == 0
