"""The warm-node signal's decisions (pure): when a node is warm, and the Node patch for it."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from layercache.api.spec import parse_spec
from layercache.api.warm import WARM_LABEL, WARMING_TAINT, NodeWarmth, is_warm, warm_patch

NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
DIGEST = "sha256:" + "a" * 64
TAINT = {"key": WARMING_TAINT, "effect": "NoSchedule"}
OTHER_TAINT = {"key": "gpu", "value": "true", "effect": "NoSchedule"}


def _nlc(*, generation: int = 2, observed: int = 2, layers: int = 2, held: int = 2,
         ready: str = "True", chains: int | None = None, unpacked: int | None = None,
         missing: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"layers": [{"digest": DIGEST}] * layers}
    status: dict[str, Any] = {
        "observedGeneration": observed, "layers": {"wanted": layers, "held": held},
        "missing": missing or [], "conditions": [{"type": "Ready", "status": ready}]}
    if chains is not None:
        spec["chains"] = [{"chainID": DIGEST}] * chains
    if unpacked is not None:
        status["chains"] = {"wanted": chains or 0, "unpacked": unpacked}
    return {"metadata": {"name": "n1", "generation": generation}, "spec": spec,
            "status": status}


@pytest.mark.parametrize(("obj", "warm"), [
    (_nlc(), True),
    (_nlc(chains=3, unpacked=3), True),
    (None, False),
    ({}, False),
    (_nlc(observed=1), False),  # the agent has not seen the current spec
    (_nlc(held=1, missing=[DIGEST]), False),
    (_nlc(ready="False"), False),
    (_nlc(layers=0, held=0), False),  # nothing to hold (budget 0, nothing resolved)
    (_nlc(chains=3), False),  # chains wanted, none reported unpacked
    (_nlc(chains=3, unpacked=2), False),
    ({"metadata": {"generation": 1}, "spec": {"layers": "x"}, "status": {
        "observedGeneration": 1, "layers": {"held": "lots"},
        "conditions": [{"type": "Ready", "status": "True"}]}}, False),  # malformed
])
def test_warm_means_every_blob_and_chain_held(obj: dict[str, Any] | None, warm: bool) -> None:
    assert is_warm(obj) is warm


def _node(labels: dict[str, str] | None = None, taints: list[dict[str, str]] | None = None,
          age: float = 60.0) -> NodeWarmth:
    created = (NOW - datetime.timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return NodeWarmth.from_node({
        "metadata": {"name": "n1", "labels": labels or {}, "creationTimestamp": created,
                     "resourceVersion": "42"},
        "spec": {"taints": taints or []}})


def test_a_warm_node_is_labelled_and_loses_only_the_startup_taint() -> None:
    patch = warm_patch(_node(taints=[OTHER_TAINT, TAINT]), True, NOW, 900)
    assert patch == {"metadata": {"labels": {WARM_LABEL: "true"}, "resourceVersion": "42"},
                     "spec": {"taints": [OTHER_TAINT]}}


def test_a_node_no_longer_warm_loses_the_label() -> None:
    assert warm_patch(_node({WARM_LABEL: "true"}), False, NOW, 900) == {
        "metadata": {"labels": {WARM_LABEL: None}}}


def test_nothing_to_change_is_no_patch() -> None:
    assert warm_patch(_node({WARM_LABEL: "true"}), True, NOW, 900) is None
    assert warm_patch(_node(taints=[OTHER_TAINT]), False, NOW, 900) is None
    # Cold and young: the startup taint stays until warm or the deadline.
    assert warm_patch(_node(taints=[TAINT]), False, NOW, 900) is None


def test_the_deadline_lifts_the_taint_of_a_node_that_never_warms() -> None:
    patch = warm_patch(_node(taints=[TAINT], age=900), False, NOW, 900)
    assert patch == {"metadata": {"resourceVersion": "42"}, "spec": {"taints": []}}
    unknown_age = NodeWarmth("n1", {}, [TAINT], None)
    assert warm_patch(unknown_age, False, NOW, 900) == {"spec": {"taints": []}}


def test_a_node_without_a_name_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"metadata\.name"):
        NodeWarmth.from_node({"metadata": {}})


def test_planning_ignores_the_startup_taint_but_not_others() -> None:
    spec = parse_spec("ns/c", {"images": ["r.example/a:1"]})
    assert spec.targets({}, [TAINT])
    assert not spec.targets({}, [TAINT, OTHER_TAINT])
