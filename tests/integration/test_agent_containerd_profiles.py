"""The agent's basic ingest on each containerd profile it supports (the contract tests).

For each profile of ``testbed.paths.CONTRACT_CONTAINERD`` (kind's 2.x and 1.7), one more
node joins the session bed with that containerd; a real agent process under the agent
ServiceAccount takes a few layers from the upstream (through the fault proxy, whose byte
counts are the ground truth) and writes them into that node's containerd, where they
must be held whole, pinned and labelled, with no lease left over.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_agent_harness import (
    CACHE,
    blob_labels,
    blob_path,
    held,
    install,
    layer_entry,
    one_agent,
    our_leases,
    runnable_layers,
    stored_sha256,
    wait_ready,
)

from layercache.containerd.labels import GC_ROOT_LABEL, MANAGED_BY_LABEL, cache_label
from testbed.bed import BedState
from testbed.e2e import joined_node
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube
from testbed.nodes import containerd_version
from testbed.paths import CONTRACT_CONTAINERD

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("profile", CONTRACT_CONTAINERD)
def test_agent_writes_upstream_layers_into_the_profiles_containerd(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path, profile: str
) -> None:
    install(kube, bed)
    layers = runnable_layers(family)[-3:]  # the three smallest: the contract, not the speed
    entries = [layer_entry(family, proxy.host, layer, "Upstream") for layer in layers]
    name = "lc-containerd-" + profile.replace(".", "-")
    env = {"LAYERCACHE_INSECURE_REGISTRIES": proxy.host}
    (tmp_path / "agent").mkdir()
    with joined_node(kube, bed, name, tmp_path / "node", containerd=profile) as node, \
            one_agent(kube, node, entries, tmp_path / "agent", env) as agent:
        runtime = kube.core.read_node(name).status.node_info.container_runtime_version
        assert runtime == containerd_version(profile)
        found = wait_ready(kube, agent)
        stored = held(node.socket)
        for layer in layers:
            assert stored.get(layer.digest) == layer.size, layer.digest
            assert stored_sha256(node.socket, layer.digest) == layer.digest
            labels = blob_labels(node.socket, layer.digest)
            assert GC_ROOT_LABEL in labels and labels[MANAGED_BY_LABEL] == "layercache"
            assert cache_label(CACHE) in labels
        assert our_leases(node.socket) == {}
        total = sum(layer.size for layer in layers)
        assert found["bytes"]["upstream"] == total
        assert found["layers"] == {"wanted": len(layers), "held": len(layers),
                                   "bytesHeld": total}
        stats = proxy.stats()
        for layer in layers:
            assert stats.count(blob_path(family, layer.digest), "GET", 200) == 1
        assert stats.blob_bytes == total
