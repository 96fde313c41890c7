"""Per-cache byte accounting in LayerCache status (layercache.controller.status.cache_status)."""

from __future__ import annotations

from typing import Any

from layercache.controller.state import CacheState
from layercache.controller.status import cache_status
from layercache.oci.digest import Digest
from layercache.oci.platform import Platform
from layercache.plan.planner import Layer, Node, PlanImage, PlanOptions, plan


def _node(upstream: int, peer: int) -> dict[str, Any]:
    return {"metadata": {"generation": 1},
            "status": {"bytes": {"upstream": upstream, "peer": peer}, "observedGeneration": 1,
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def test_bytes_are_growth_since_the_baseline() -> None:
    state = CacheState(namespace="ns", name="c", generation=1,
                       desired_nodes=("a", "b"), planned=True,
                       baseline={"a": (100, 10), "b": (0, 0)})
    status = cache_status(state, {"a": _node(150, 40), "b": _node(7, 3)})
    assert status["bytes"]["upstream"] == 50 + 7
    assert status["bytes"]["peer"] == 30 + 3


def test_nodes_never_planned_for_the_cache_count_nothing() -> None:
    # A cache none of whose images resolved has nodes but no baselines: the bytes other
    # caches fetched on those nodes are not its own.
    state = CacheState(namespace="ns", name="missing", generation=1,
                       desired_nodes=("a", "b"), planned=True)
    status = cache_status(state, {"a": _node(150, 40), "b": _node(7, 3)})
    assert status["bytes"]["upstream"] == 0
    assert status["bytes"]["peer"] == 0


def test_carried_bytes_survive_a_restart() -> None:
    state = CacheState(namespace="ns", name="c", generation=1, desired_nodes=("a",),
                       planned=True, carried=(1_000, 2_000), baseline={"a": (5, 5)})
    status = cache_status(state, {"a": _node(6, 8)})
    assert (status["bytes"]["upstream"], status["bytes"]["peer"]) == (1_001, 2_003)


MB = 1_000_000


def _three_images_on_a_base(nodes: tuple[str, ...]) -> CacheState:
    """A cache of three images on one 30 MB base, minSharedBy 2, planned on ``nodes``."""
    media = "application/vnd.oci.image.layer.v1.tar+gzip"

    def layer(name: str, size: int) -> Layer:
        return Layer(Digest.from_bytes(name.encode()), size, media,
                     Digest.from_bytes(b"diff-" + name.encode()))

    amd64 = Platform("linux", "amd64")
    base = layer("base", 30 * MB)
    images = [PlanImage(f"app-{i}", amd64, Digest.from_bytes(f"m{i}".encode()),
                            (base, layer(f"top-{i}", 100 * MB))) for i in range(3)]
    result = plan(images, [Node(name, amd64) for name in nodes], PlanOptions(min_shared_by=2))
    return CacheState(namespace="ns", name="c", generation=1, plan=result,
                      desired_nodes=nodes, planned=True,
                      baseline=dict.fromkeys(nodes, (0, 0)))


def test_one_node_saves_nothing() -> None:
    # Issue 10: this reported naive 330 MB, saved 300 MB (91 %) with one node that
    # fetched the 30 MB base it holds; the 300 MB of top layers were never cached.
    state = _three_images_on_a_base(("a",))
    status = cache_status(state, {"a": _node(30 * MB, 0)})
    assert status["bytes"]["naive"] == 30 * MB
    assert status["bytes"]["saved"] == 0
    assert status["bytes"]["savedHuman"] == "0 B"


def test_three_nodes_save_two_copies_of_what_they_hold() -> None:
    state = _three_images_on_a_base(("a", "b", "c"))
    status = cache_status(state, {"a": _node(30 * MB, 0), "b": _node(0, 30 * MB),
                                  "c": _node(0, 30 * MB)})
    assert status["bytes"]["naive"] == 90 * MB
    assert status["bytes"]["saved"] == 60 * MB
    assert status["bytes"]["savedHuman"] == "60.0 MB"


def test_a_node_that_already_held_the_layers_saved_nothing() -> None:
    # Another cache had put the base on the node: this cache fetched nothing, from
    # upstream or a peer. The old naive - upstream called all of naive saved.
    state = _three_images_on_a_base(("a",))
    status = cache_status(state, {"a": _node(0, 0)})
    assert status["bytes"]["naive"] == 30 * MB
    assert status["bytes"]["saved"] == 0


def test_reason_is_degraded_first_then_ready() -> None:
    # `kubectl get lc` had no Reason column; its column reads status.reason.
    ready = cache_status(_three_images_on_a_base(("a",)), {"a": _node(30 * MB, 0)})
    assert ready["reason"] == "AllNodesReady"
    waiting = cache_status(_three_images_on_a_base(("a",)), {})
    assert waiting["reason"] == "NodesNotReady"
    invalid = CacheState(namespace="ns", name="c", generation=1, invalid="spec.images: bad")
    assert cache_status(invalid, {})["reason"] == "InvalidSpec"
