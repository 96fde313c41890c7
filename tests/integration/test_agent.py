"""Three node agents share the family's layers: each crosses the upstream link once.

NodeLayerCache objects are written by hand (as the operator would): every node wants
every runnable layer of the family; each layer has one seeder (``source: Upstream``),
spread round-robin over the nodes, and the other two take it from a peer. Three real agent
processes, each under the agent ServiceAccount, then fill three real containerd daemons
through the fault proxy, whose byte counts are the ground truth for upstream traffic.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_agent_harness import (
    NAMESPACE,
    PEER_TOKEN,
    SERVICE_ACCOUNT,
    Agent,
    agents,
    blob_labels,
    blob_path,
    clear_node,
    delete_cache,
    held,
    install,
    layer_entry,
    our_leases,
    runnable_layers,
    status,
    wait_ready,
    write_cache,
)

from layercache.containerd.labels import GC_ROOT_LABEL, MANAGED_BY_LABEL, cache_label
from testbed.bed import BedState
from testbed.faultproxy import FaultProxy
from testbed.images import Family, Layer
from testbed.kube import Kube, wait_for
from testbed.procs import ComponentError

pytestmark = pytest.mark.integration


class Plan:
    """The hand-written plan: ``layers`` largest first, ``seeder`` per digest."""

    def __init__(self, family: Family, nodes: list[str]) -> None:
        self.layers = runnable_layers(family)
        self.nodes = nodes
        self.seeder = {layer.digest: nodes[i % len(nodes)] for i, layer in enumerate(self.layers)}
        self.total = sum(layer.size for layer in self.layers)

    def seeded_bytes(self, node: str) -> int:
        return sum(layer.size for layer in self.layers if self.seeder[layer.digest] == node)

    def spec(self, family: Family, registry: str, node: str) -> list[dict[str, Any]]:
        entries = []
        for layer in self.layers:
            seeder = self.seeder[layer.digest]
            if seeder == node:
                entries.append(layer_entry(family, registry, layer, "Upstream"))
            else:
                others = [n for n in self.nodes if n not in (node, seeder)]
                entries.append(layer_entry(family, registry, layer, "Peer", [seeder, *others]))
        return entries


@pytest.fixture(scope="module")
def shared(bed: BedState, kube: Kube, family: Family,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Plan, list[Agent]]]:
    """Three agents that have filled their nodes, and the plan they followed."""
    install(kube, bed)
    names = [node.name for node in bed.nodes]
    plan = Plan(family, names)
    assert bed.proxy_url is not None
    proxy = FaultProxy(bed.proxy_url)
    proxy.reset()
    proxy.set_rate(None)
    for node in bed.nodes:
        clear_node(node.socket, [layer.digest for layer in plan.layers])
        write_cache(kube, node.name, plan.spec(family, proxy.host, node.name))
    env = {"LAYERCACHE_INSECURE_REGISTRIES": proxy.host}
    try:
        with agents(kube, bed.nodes, tmp_path_factory.mktemp("agents"), env) as started:
            for agent in started:
                wait_ready(kube, agent)
            yield plan, started
    finally:
        proxy.close()
        for node in bed.nodes:
            delete_cache(kube, node.name)
            clear_node(node.socket, [layer.digest for layer in plan.layers])


def _served_total(kube: Kube, nodes: list[str]) -> int:
    return sum((status(kube, n).get("bytes") or {}).get("servedToPeers", 0) for n in nodes)


def test_each_layer_crosses_the_upstream_link_once_and_every_node_holds_all(
    bed: BedState, kube: Kube, family: Family, shared: tuple[Plan, list[Agent]]
) -> None:
    plan, started = shared
    for node in bed.nodes:
        stored = held(node.socket)
        for layer in plan.layers:
            assert stored.get(layer.digest) == layer.size, (node.name, layer.digest)
            labels = blob_labels(node.socket, layer.digest)
            assert GC_ROOT_LABEL in labels and labels[MANAGED_BY_LABEL] == "layercache"
            assert cache_label("agent-test/warm") in labels
        assert our_leases(node.socket) == {}  # nothing in flight: no lease left behind
    # Ground truth: the proxy relayed each layer's bytes exactly once.
    # Not the `proxy` fixture: it would zero the counters before this test.
    client = FaultProxy(bed.proxy_url or "")
    try:
        stats = client.stats()
    finally:
        client.close()
    for layer in plan.layers:
        assert stats.bytes_by_path.get(blob_path(family, layer.digest)) == layer.size
        assert stats.count(blob_path(family, layer.digest), "GET") == 1
    assert stats.blob_bytes == plan.total
    # Each node counted what it seeded as upstream and the rest as peer bytes.
    for node in plan.nodes:
        found = status(kube, node)
        seeded = plan.seeded_bytes(node)
        assert found["bytes"]["upstream"] == seeded, node
        assert found["bytes"]["peer"] == plan.total - seeded, node
        assert found["layers"] == {"wanted": len(plan.layers), "held": len(plan.layers),
                                   "bytesHeld": plan.total}
        assert found["missing"] == [] and found["diskPressure"] is False
        assert found["peerEndpoint"].startswith("http://127.0.0.1:")
        kinds = {c["type"]: c for c in found["conditions"]}
        assert kinds["Ready"]["status"] == "True"
        assert kinds["Progressing"]["status"] == "False"
        assert kinds["Degraded"]["status"] == "False"
    # Every layer went to two non-seeders: the seeders served twice the total between them.
    wait_for(lambda: _served_total(kube, plan.nodes) == 2 * plan.total, 30,
             what="servedToPeers to add up")
    # Metrics agree with status (fresh objects: both started at zero).
    for agent in started:
        found = status(kube, agent.node.name)["bytes"]
        assert agent.metric("layercache_agent_fetched_bytes_total", node=agent.node.name,
                            source="peer") == found["peer"]
        assert agent.metric("layercache_agent_layers_held", node=agent.node.name) == len(
            plan.layers)


def _layer(plan: Plan, smallest: bool = False) -> Layer:
    return plan.layers[-1] if smallest else plan.layers[len(plan.layers) // 2]


def test_peer_server_needs_the_token_and_serves_ranges(
    family: Family, shared: tuple[Plan, list[Agent]]
) -> None:
    plan, started = shared
    agent = started[0]
    layer = _layer(plan)
    url = f"{agent.peer_url}/v1/blobs/{layer.digest}"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.head(url, headers={"Authorization": f"Basic {PEER_TOKEN}"}).status_code == 401
    auth = {"Authorization": f"Bearer {PEER_TOKEN}"}
    head = httpx.head(url, headers=auth)
    assert head.status_code == 200 and int(head.headers["content-length"]) == layer.size
    body = family.blob_path(layer.digest).read_bytes()
    part = httpx.get(url, headers={**auth, "Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-1099/{layer.size}"
    assert part.content == body[100:1100]
    tail = httpx.get(url, headers={**auth, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == body[-10:]
    assert httpx.get(url, headers={**auth, "Range": f"bytes={layer.size}-"}).status_code == 416
    whole = httpx.get(url, headers=auth)
    assert whole.status_code == 200 and whole.content == body
    absent = f"{agent.peer_url}/v1/blobs/sha256:{'0' * 64}"
    assert httpx.get(absent, headers=auth).status_code == 404
    assert httpx.get(f"{agent.peer_url}/healthz").status_code == 200
    # Metrics live on their own port, not on the peer port.
    assert httpx.get(f"{agent.peer_url}/metrics", headers=auth).status_code == 404


def test_agent_service_account_has_least_privilege(kube: Kube,
                                                   shared: tuple[Plan, list[Agent]]) -> None:
    who = f"--as=system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"

    def can(*args: str) -> bool:
        try:
            return kube.kubectl("auth", "can-i", who, *args).strip() == "yes"
        except ComponentError:  # kubectl exits 1 for "no"
            return False

    assert can("patch", "nodelayercaches.layercache.dev", "--subresource=status")
    assert can("get", "secret/layercache-peer-token", "-n", NAMESPACE)
    assert not can("list", "secrets", "-n", NAMESPACE)
    assert not can("get", "secret/other", "-n", NAMESPACE)
    assert not can("patch", "nodelayercaches.layercache.dev")  # spec is the operator's
    assert not can("delete", "nodelayercaches.layercache.dev")
    assert not can("patch", "nodes")


def test_spec_change_releases_unwanted_layers(
    bed: BedState, kube: Kube, family: Family, shared: tuple[Plan, list[Agent]], tmp_path: Path
) -> None:
    plan, _ = shared
    node = bed.nodes[0]
    dropped = _layer(plan, smallest=True)
    obj = kube.custom.get_cluster_custom_object("layercache.dev", "v1alpha1",
                                                "nodelayercaches", node.name)
    kept = [e for e in obj["spec"]["layers"] if e["digest"] != dropped.digest]
    kube.custom.patch_cluster_custom_object("layercache.dev", "v1alpha1", "nodelayercaches",
                                            node.name, {"spec": {"layers": kept}})

    def released() -> bool:
        found = status(kube, node.name)
        return (found.get("layers", {}).get("wanted") == len(kept)
                and GC_ROOT_LABEL not in blob_labels(node.socket, dropped.digest))

    wait_for(released, 60, 0.5, "the dropped layer to be unpinned")
    assert status(kube, node.name)["observedGeneration"] == obj["metadata"]["generation"] + 1
