"""Disk savings and the warm-node signal on the bed: real operator, agents, containerd, Nodes.

One operator and one agent per node run for the module (`testbed.e2e.LayerCacheCluster`,
the RBAC of `manifests/`). The agents re-read containerd every few seconds here, so the
disk figures follow an unpack within the test's time.

- Disk: a cache of two apps on one python base is warmed; the agents unpack every prefix
  of both (Images mode: the base and python chains, and each app's own) and pin them for
  the cache. Each agent's ``layercache_agent_disk_*`` metrics and
  NodeLayerCache ``status.disk`` must equal what containerd reports through its API: the
  content sizes of the wanted blobs, and ``Snapshots.Usage`` of the snapshots we pinned;
  ``separate`` is each image's blobs and chains counted per image; the LayerCache's
  ``status.disk`` and the operator's ``layercache_cache_disk_*`` sum the nodes.
- Warm: the nodes get ``layercache.dev/warm=true`` once they hold their set and lose it when
  the cache goes; the startup taint ``layercache.dev/warming:NoSchedule`` is lifted once a
  node is warm (other taints kept), and at the deadline on a node that can never be warm.
"""

from __future__ import annotations

import datetime
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from layercache.api.warm import WARM_LABEL, WARMING_TAINT
from layercache.oci.digest import Digest, chain_ids
from testbed.bed import BedState
from testbed.e2e import (
    LayerCacheCluster,
    apply_cache,
    blob_infos,
    clear_family,
    delete_caches,
    is_ready,
    node_caches,
    pinned_chain_usage,
    wait_cache,
    wait_released,
)
from testbed.images import Family
from testbed.kube import Kube, wait_for

pytestmark = pytest.mark.integration

APPS = ("app-py-a", "app-py-b")  # both on python on base
BASE_CHAIN_IMAGE = "python"  # its two layers: the chains we unpack
KEEP_TAINT = "test.layercache.dev/keep"


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _untaint(kube: Kube, node: str) -> None:
    """Take our taints and label off `node` (absent ones are fine)."""
    taints = [t for t in kube.core.read_node(node).spec.taints or []
              if t.key not in (WARMING_TAINT, KEEP_TAINT)]
    kube.core.patch_node(node, {"metadata": {"labels": {WARM_LABEL: None}},
                                "spec": {"taints": [kube.core.api_client.sanitize_for_serialization(
                                    t) for t in taints]}})


@pytest.fixture(scope="module")
def cluster(bed: BedState, kube: Kube, family: Family,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LayerCacheCluster]:
    """The operator and three agents on empty nodes; all stopped and cleaned afterwards."""
    digests = [layer.digest for layer in family.layers]
    for node in bed.nodes:  # every chain of ours goes, and what earlier tests built on it
        clear_family(node.socket, digests)
    product = LayerCacheCluster(bed, kube, tmp_path_factory.mktemp("warm"))
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("LAYERCACHE_RESYNC_SECONDS", "2")
            env.setenv("LAYERCACHE_WARMING_DEADLINE_SECONDS", "86400")
            product.start()
        yield product
    finally:
        try:
            for ns in kube.core.list_namespace().items:
                if ns.metadata.name.startswith("warm-"):
                    delete_caches(kube, ns.metadata.name)
            wait_released(kube, [n.name for n in bed.nodes])
        finally:
            product.stop()
            kube.kubectl("delete", "nodelayercaches", "--all", "--wait=false")
            for node in bed.nodes:
                _untaint(kube, node.name)
                clear_family(node.socket, digests)


@pytest.fixture
def namespace(cluster: LayerCacheCluster, kube: Kube) -> Iterator[str]:
    name = f"warm-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": name}})
    yield name
    delete_caches(kube, name)
    kube.core.delete_namespace(name)


def _via_proxy(bed: BedState, family: Family, *names: str) -> list[str]:
    host = (bed.proxy_url or "").removeprefix("http://")
    return [f"{host}/{family.images[n].reference}" for n in names]


def _chains(family: Family, image: str) -> list[str]:
    """The chain IDs of every prefix of ``image`` (OCI image-spec config.md)."""
    return [str(c) for c in chain_ids(Digest(ly.diff_id) for ly in family.image_layers(image))]


def _blob_sizes(socket: str, wanted: set[str]) -> dict[str, int]:
    """Content sizes of the wanted blobs, as containerd's content store reports them."""
    return {d: info.size for d, info in blob_infos(socket, wanted).items() if info is not None}


def _node(kube: Kube, name: str) -> Any:
    return kube.core.read_node(name)


def _taint_keys(kube: Kube, name: str) -> list[str]:
    return [t.key for t in _node(kube, name).spec.taints or []]


def _labelled_warm(kube: Kube, name: str) -> bool:
    return (_node(kube, name).metadata.labels or {}).get(WARM_LABEL) == "true"


def test_disk_figures_equal_containerd_and_warm_nodes_are_signalled(
        cluster: LayerCacheCluster, bed: BedState, kube: Kube, family: Family,
        namespace: str) -> None:
    tainted = bed.nodes[0].name
    kube.kubectl("taint", "nodes", tainted, f"{WARMING_TAINT}=true:NoSchedule",
                 f"{KEEP_TAINT}=x:PreferNoSchedule")
    apply_cache(kube, namespace, "apps", {"images": _via_proxy(bed, family, *APPS)})
    wait_cache(kube, namespace, "apps", is_ready, "Ready", cluster)
    names = [n.name for n in bed.nodes]
    # Warm: every node labelled; the startup taint lifted, the other taint kept.
    wait_for(lambda: all(_labelled_warm(kube, n) for n in names), 30, 0.5,
             "every node labelled warm")
    assert _taint_keys(kube, tainted) == [KEEP_TAINT]

    key = f"{namespace}/apps"
    layers = {n: [ly.digest for ly in family.image_layers(n)] for n in APPS}
    wanted = {d for ds in layers.values() for d in ds}
    chains = {n: _chains(family, n) for n in APPS}
    shared = _chains(family, BASE_CHAIN_IMAGE)  # base and python: both apps start with them
    assert set(shared) == set(chains[APPS[0]]) & set(chains[APPS[1]])
    report: list[str] = []
    for node in bed.nodes:
        blobs, usage = _blob_sizes(node.socket, wanted), pinned_chain_usage(node.socket)
        assert set(usage) == {c for cs in chains.values() for c in cs}, (node.name, usage)
        unpacked = sum(usage.values())
        separate = sum(blobs[d] for ds in layers.values() for d in ds) + sum(
            usage[c] for cs in chains.values() for c in cs)
        expected = {"blobs": sum(blobs.values()), "snapshots": unpacked,
                    "separate": separate, "saved": separate - sum(blobs.values()) - unpacked}
        port = cluster.metrics_ports[node.name]

        seen: list[dict[str, float | None]] = []

        def measured(name: str = node.name, port: int = port,
                     seen: list[dict[str, float | None]] = seen,
                     expected: dict[str, int] = expected) -> bool:
            got = _scrape(port)
            seen[:] = [{
                "blobs": got.get(("layercache_agent_disk_bytes",
                                  (("kind", "blobs"), ("node", name)))),
                "snapshots": got.get(("layercache_agent_disk_bytes",
                                      (("kind", "snapshots"), ("node", name)))),
                "separate": got.get(("layercache_agent_disk_separate_bytes",
                                     (("node", name),))),
                "saved": got.get(("layercache_agent_disk_saved_bytes", (("node", name),)))}]
            return seen[0] == expected
        try:
            wait_for(measured, 45, 0.5, f"{node.name}: disk metrics as containerd reports")
        except TimeoutError:
            pytest.fail(f"{node.name}: metrics {seen} != containerd's {expected}")
        # The agent patches its status at most every status interval: it follows.
        wait_for(lambda name=node.name, expected=expected: node_caches(kube)[name]["status"]
                 .get("disk") == {**expected, "caches": [{"cache": key, **expected}]},
                 30, 0.5, f"{node.name}: status.disk as containerd reports")
        report.append(f"{node.name}: blobs {expected['blobs']} B, snapshots "
                      f"{expected['snapshots']} B, separate {separate} B, saved "
                      f"{expected['saved']} B")
    print("\n".join(report))
    # Sharing saves a copy of the base and python blobs and chains per node.
    assert expected["saved"] == blobs[layers[APPS[0]][0]] + blobs[layers[APPS[0]][1]] + sum(
        usage[c] for c in shared)

    totals = dict.fromkeys(("blobs", "snapshots", "separate", "saved"), 0)
    for nlc in node_caches(kube).values():
        for entry in nlc["status"]["disk"]["caches"]:
            for k in totals:
                totals[k] += entry[k]
    obj = wait_cache(kube, namespace, "apps", lambda o: (o.get("status") or {}).get(
        "disk") == totals, "status.disk sums the nodes", cluster, timeout=30)
    assert obj["status"]["disk"]["saved"] > 0
    operator = _scrape(cluster.metrics_ports["operator"])
    assert operator[("layercache_cache_disk_bytes", (("cache", key), ("kind", "blobs")))] == \
        totals["blobs"]
    assert operator[("layercache_cache_disk_bytes", (("cache", key), ("kind", "snapshots")))] \
        == totals["snapshots"]
    assert operator[("layercache_cache_disk_saved_bytes", (("cache", key),))] == totals["saved"]

    # The cache goes: nothing is wanted, no node is warm any more.
    delete_caches(kube, namespace)
    wait_for(lambda: not any(_labelled_warm(kube, n) for n in names), 30, 0.5,
             "the warm label removed from every node")
    assert _taint_keys(kube, tainted) == [KEEP_TAINT]


def test_the_deadline_lifts_the_taint_of_a_node_that_can_never_be_warm(
        cluster: LayerCacheCluster, bed: BedState, kube: Kube, namespace: str) -> None:
    node = bed.nodes[1].name
    created = _node(kube, node).metadata.creation_timestamp
    age = (datetime.datetime.now(datetime.UTC) - created).total_seconds()
    # Seconds after the node's creation: 90 s from now (an operator restart on a busy bed
    # took 40 s; it must be up well before the deadline for the test to tell anything).
    deadline = age + 90
    cluster.stop_operator()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("LAYERCACHE_WARMING_DEADLINE_SECONDS", f"{deadline:.0f}")
            cluster.start_operator()
        kube.kubectl("taint", "nodes", node, f"{WARMING_TAINT}=true:NoSchedule")
        host = (bed.proxy_url or "").removeprefix("http://")
        # An image that does not resolve: the node is given nothing to hold, never warm.
        apply_cache(kube, namespace, "broken", {"images": [f"{host}/family/none:missing"]})
        time.sleep(4)  # several operator rounds (1 s each) before the deadline
        checked = (datetime.datetime.now(datetime.UTC) - created).total_seconds()
        assert checked < deadline - 2, "the bed was too slow to check before the deadline"
        assert WARMING_TAINT in _taint_keys(kube, node), "lifted before the deadline"
        wait_for(lambda: WARMING_TAINT not in _taint_keys(kube, node), 150, 0.5,
                 "the startup taint lifted at the deadline")
        lifted = (datetime.datetime.now(datetime.UTC) - created).total_seconds()
        assert lifted >= deadline - 1, (lifted, deadline)
        assert not _labelled_warm(kube, node)
    finally:
        cluster.stop_operator()
        with pytest.MonkeyPatch.context() as env:  # the module's settings again
            env.setenv("LAYERCACHE_WARMING_DEADLINE_SECONDS", "86400")
            cluster.start_operator()
