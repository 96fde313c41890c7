"""The warm-node round with an in-memory stand-in for the API: one bad Node stops no other."""

from __future__ import annotations

import datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from layercache.api.warm import WARM_LABEL, WARMING_TAINT, NodeWarmth
from layercache.controller.settings import OperatorSettings
from layercache.controller.warmsignal import WarmSignal

NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
WARM_NLC = {"metadata": {"generation": 1}, "spec": {"layers": [{"digest": "d"}]},
            "status": {"observedGeneration": 1, "layers": {"held": 1}, "missing": [],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


class FakeKube:
    """Nodes and NodeLayerCaches in memory; patching `conflicted` raises 409."""

    def __init__(self, nodes: list[NodeWarmth | str], conflicted: set[str]) -> None:
        self.listed = nodes
        self.conflicted = conflicted
        self.patches: dict[str, dict[str, Any]] = {}

    def node_warmth(self) -> list[NodeWarmth | str]:
        return self.listed

    def node_layer_caches(self) -> dict[str, dict[str, Any]]:
        return {name: {**WARM_NLC, "metadata": {"name": name, "generation": 1}}
                for name in ("a", "b", "c")}

    def patch_node(self, name: str, patch: dict[str, Any]) -> None:
        if name in self.conflicted:
            raise ApiException(status=409, reason="Conflict")
        if name == "boom":
            raise RuntimeError("connection reset")
        self.patches[name] = patch


async def test_one_bad_node_stops_no_other() -> None:
    taint = [{"key": WARMING_TAINT, "effect": "NoSchedule"}]
    nodes: list[NodeWarmth | str] = [
        "?",  # unreadable
        NodeWarmth("a", {}, taint, NOW, "1"),
        NodeWarmth("b", {}, taint, NOW, "1"),  # 409
        NodeWarmth("boom", {WARM_LABEL: "true"}, [], NOW),  # not warm, patch fails
        NodeWarmth("c", {}, [], NOW)]
    kube = FakeKube(nodes, {"b"})
    signal = WarmSignal(kube, OperatorSettings(), clock=lambda: NOW)  # type: ignore[arg-type]
    assert await signal.run_once() == 2
    assert kube.patches == {
        "a": {"metadata": {"labels": {WARM_LABEL: "true"}, "resourceVersion": "1"},
              "spec": {"taints": []}},
        "c": {"metadata": {"labels": {WARM_LABEL: "true"}}}}
    assert signal.warm == {"a", "b", "c"}
