"""Cut-through fan-out between two real agents, and a seeder killed mid-relay.

A peer copies a layer while its seeder still receives it. The seeder's uplink is slowed by
the fault proxy so that the layer (the family's 63 MB base) takes long enough to watch:
the peer's own ingest must grow while the seeder has committed nothing yet (before issue
15 a peer could copy only after the seeder's COMMIT).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_agent_harness import (
    blob_path,
    held,
    ingests,
    installed,  # noqa: F401 - autouse fixture: CRDs, RBAC and Secrets for the module
    layer_entry,
    one_agent,
    runnable_layers,
    stored_sha256,
    wait_ready,
)

from layercache.containerd.content import ingest_ref
from testbed.bed import BedState
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube, wait_for

pytestmark = pytest.mark.integration

#: The seeder's uplink (bytes/s): the 63 MB base takes ~16 s.
SLOW = 4_000_000


def _env(proxy: FaultProxy) -> dict[str, str]:
    return {"LAYERCACHE_INSECURE_REGISTRIES": proxy.host,
            "LAYERCACHE_PEER_POLL_SECONDS": "0.5"}


def test_seeder_killed_mid_relay_its_peer_finishes_from_upstream_uncorrupted(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    seeder_node, peer_node = bed.nodes[0], bed.nodes[1]
    layer = runnable_layers(family)[0]
    ref = ingest_ref(layer.digest)
    path = blob_path(family, layer.digest)
    for part in ("seeder", "peer"):
        (tmp_path / part).mkdir()
    proxy.set_rate(SLOW)
    seeded = layer_entry(family, proxy.host, layer, "Upstream")
    copied = layer_entry(family, proxy.host, layer, "Peer", [seeder_node.name])
    with one_agent(kube, seeder_node, [seeded], tmp_path / "seeder", _env(proxy)) as seeder, \
            one_agent(kube, peer_node, [copied], tmp_path / "peer", _env(proxy)) as peer:
        # Cut-through: the peer's ingest grows while the seeder has committed nothing.
        wait_for(lambda: ingests(peer_node.socket).get(ref, 0) >= 16_000_000, 120, 0.2,
                 "the peer copying from the seeder's relay")
        assert held(seeder_node.socket).get(layer.digest) is None
        assert proxy.stats().bytes_by_path[path] < layer.size  # one upstream transfer so far
        seeder.kill9()
        relayed = ingests(peer_node.socket).get(ref, 0)
        assert relayed >= 16_000_000
        proxy.set_rate(None)
        found = wait_ready(kube, peer, 180)
        # Finished from upstream, resuming after what the relay had given: nothing twice.
        assert found["bytes"]["peer"] >= relayed
        assert found["bytes"]["upstream"] <= layer.size - relayed
        assert proxy.stats().count(path, "GET", 206) >= 1
        # Nothing corrupt committed: containerd's bytes hash to the digest.
        assert stored_sha256(peer_node.socket, layer.digest) == layer.digest
        assert held(peer_node.socket)[layer.digest] == layer.size
        assert ref not in ingests(peer_node.socket)


def test_a_layer_flows_down_a_relay_chain_while_the_seeder_still_receives_it(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    # A relay tree two levels deep: the seeder receives upstream, `middle` copies from
    # the seeder, `leaf` lists `middle` first (its parent) and the seeder second. The leaf
    # copies from the middle while neither has committed anything, and the seeder uploads
    # the layer once, not once per node.
    seeder_node, middle_node, leaf_node = bed.nodes[0], bed.nodes[1], bed.nodes[2]
    layer = runnable_layers(family)[0]
    ref = ingest_ref(layer.digest)
    path = blob_path(family, layer.digest)
    for part in ("seeder", "middle", "leaf"):
        (tmp_path / part).mkdir()
    proxy.set_rate(SLOW)
    seeded = layer_entry(family, proxy.host, layer, "Upstream")
    middle_entry = layer_entry(family, proxy.host, layer, "Peer", [seeder_node.name])
    leaf_entry = layer_entry(family, proxy.host, layer, "Peer",
                             [middle_node.name, seeder_node.name])
    env = _env(proxy)
    with one_agent(kube, seeder_node, [seeded], tmp_path / "seeder", env) as seeder, \
            one_agent(kube, middle_node, [middle_entry], tmp_path / "middle", env) as middle, \
            one_agent(kube, leaf_node, [leaf_entry], tmp_path / "leaf", env) as leaf:
        wait_for(lambda: ingests(leaf_node.socket).get(ref, 0) >= 16_000_000, 120, 0.2,
                 "the leaf copying from the middle node's relay")
        assert held(seeder_node.socket).get(layer.digest) is None
        assert held(middle_node.socket).get(layer.digest) is None
        proxy.set_rate(None)
        found = {agent.node.name: wait_ready(kube, agent, 180)
                 for agent in (seeder, middle, leaf)}
        for node in (middle_node, leaf_node):
            counted = found[node.name]["bytes"]
            assert (counted["upstream"], counted["peer"]) == (0, layer.size), node.name
        served = {agent.node.name: agent.metric("layercache_agent_served_bytes_total",
                                                node=agent.node.name)
                  for agent in (seeder, middle, leaf)}
        assert served == {seeder_node.name: layer.size, middle_node.name: layer.size,
                          leaf_node.name: 0}
        assert proxy.stats().bytes_by_path[path] == layer.size  # upstream once
        for node in (middle_node, leaf_node):
            assert stored_sha256(node.socket, layer.digest) == layer.digest
