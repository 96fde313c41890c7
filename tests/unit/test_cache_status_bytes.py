"""Per-cache byte accounting in LayerCache status (layercache.status.cache_status)."""

from __future__ import annotations

from typing import Any

from layercache.reconciler import CacheState
from layercache.status import cache_status


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
