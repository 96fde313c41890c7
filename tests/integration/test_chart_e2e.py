"""layercache installed by Helm on kubelet nodes, end to end, and docs/kind.md's steps.

The chart runs as a user installs it on kind (docs/kind.md step 3, `testbed.chart`): the
product image loaded into every node's containerd, the operator Deployment and one agent
Pod per node started by the kubelets, agents reading the node's containerd socket through
the chart's hostPath mounts, RBAC exactly as the chart ships it. Needs the bed's pod
network (per-node namespaces, CNI bridge, kube-proxy): the operator reaches the apiserver
through the `kubernetes` Service, agents fetch from each other on pod IPs.

The tests run in file order on one release: the Pods, a cache warmed through them, the
doc's sample and kubectl commands, and last the doc's uninstall order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import pytest

from testbed.bed import BedState
from testbed.chart import (
    NAMESPACE,
    RELEASE,
    Release,
    helm_install,
    load_image,
    pod_rows,
    uninstall,
)
from testbed.e2e import apply_cache, blob_infos, is_ready, node_caches, wait_cache
from testbed.faultproxy import BLOB_PATH, FaultProxy
from testbed.images import Family
from testbed.install import helm, render_chart
from testbed.kube import Kube, wait_for
from testbed.walkthrough import commands, run_command

# Bed start, image load and install take minutes on a busy 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def admin(chart_kube: Kube) -> Kube:
    """Admin access to the bed."""
    return chart_kube


@pytest.fixture(scope="module")
def proxy(chart_bed: BedState) -> Iterator[FaultProxy]:
    """The byte-counting proxy in front of the plain registry."""
    client = FaultProxy(chart_bed.proxy_url or "")
    yield client
    client.close()


@pytest.fixture(scope="module")
def release(chart_bed: BedState, admin: Kube, proxy: FaultProxy) -> Release:
    """The product image on every node and the chart installed by docs/kind.md step 3."""
    return helm_install(admin, load_image(chart_bed), insecure_registries=[proxy.host])


def _layer_bytes(proxy: FaultProxy, digests: Iterable[str]) -> dict[str, int]:
    wanted = set(digests)
    found = dict.fromkeys(wanted, 0)
    for path, count in proxy.stats().bytes_by_path.items():
        digest = path.rsplit("/", 1)[-1]
        if BLOB_PATH.match(path) and digest in wanted:
            found[digest] += count
    return found


def test_operator_and_an_agent_per_node_run_as_pods_of_the_chart(
        chart_bed: BedState, admin: Kube, release: Release) -> None:
    nodes = sorted(n.name for n in chart_bed.nodes)
    rows = pod_rows(admin, NAMESPACE, release.selector())
    agents = [r for r in rows if "-agent-" in r[1]]
    operators = [r for r in rows if "-operator-" in r[1]]
    assert sorted(r[6] for r in agents) == nodes  # one on each node
    assert len(operators) == 2
    assert all(r[2] == "1/1" and r[3] == "Running" for r in [*agents, *operators]), rows
    # On the pod network, not the node's address (the chart's agents are not hostNetwork).
    node_ips = {a.address for n in admin.core.list_node().items for a in n.status.addresses}
    assert not {r[5] for r in rows} & node_ips, rows
    # RBAC exactly as shipped: the release's roles are the chart's rendering, unchanged.
    # Hook objects (the pre-delete cleanup's role) exist only while their hook runs.
    rendered = {(o["kind"], o["metadata"]["name"]): o for o in render_chart(RELEASE, NAMESPACE)
                if o["kind"] in ("ClusterRole", "Role")
                and "helm.sh/hook" not in (o["metadata"].get("annotations") or {})}
    for (kind, name), obj in rendered.items():
        live = json.loads(admin.kubectl("get", kind.lower(), name, "-n", NAMESPACE,
                                        "-o", "json"))
        assert live["rules"] == obj["rules"], (kind, name)
    for pod in admin.core.list_namespaced_pod(
            NAMESPACE, label_selector=release.selector("agent")).items:
        assert pod.spec.service_account_name == f"{RELEASE}-agent"
        socket = next(v for v in pod.spec.volumes if v.name == "containerd-socket")
        assert socket.host_path.path == "/run/containerd"


def test_a_cache_warms_every_node_through_the_agent_pods(
        chart_bed: BedState, admin: Kube, release: Release, proxy: FaultProxy,
        chart_family: Family) -> None:
    names = ("app-py-a", "app-py-b")
    planned = {d for n in names for d in chart_family.images[n].resolve().layers}
    proxy.reset()
    apply_cache(admin, "default", "warm", {"images": [
        f"{proxy.host}/{chart_family.images[n].reference}" for n in names]})
    obj = wait_cache(admin, "default", "warm", is_ready, "Ready", timeout=300)
    # Agents in Pods wrote every layer into their node's containerd (read here through
    # the node's socket from outside), pinned, and each layer crossed upstream once.
    for node in chart_bed.nodes:
        for digest, info in blob_infos(node.socket, planned).items():
            assert info is not None, f"{node.name} lacks {digest}"
            assert info.size == chart_family.layer(digest).size
            assert info.pinned and info.managed
    assert _layer_bytes(proxy, planned) == {d: chart_family.layer(d).size for d in planned}
    status = obj["status"]
    unique = chart_family.unique_layer_bytes(names)
    assert status["bytes"]["upstream"] == unique
    assert status["bytes"]["peer"] == (len(chart_bed.nodes) - 1) * unique  # pod to pod
    # Each agent advertises its Pod's IP (POD_IP) as where peers fetch from.
    endpoints = {name: (o.get("status") or {}).get("peerEndpoint")
                 for name, o in node_caches(admin).items()}
    pod_ips = {r[6]: r[5] for r in pod_rows(admin, NAMESPACE, release.selector("agent"))}
    assert {name: url.removeprefix("http://").rsplit(":", 1)[0]
            for name, url in endpoints.items() if url} == pod_ips


def test_the_walkthrough_sample_and_its_kubectl_commands(admin: Kube,
                                                        release: Release) -> None:
    # Step 4: the sample names Docker Hub images, which the bed cannot reach; applying it
    # and the listings run here, its warming only on kind (docs/kind.md says so).
    outputs = []
    for line in commands("4. Apply the sample cache"):
        watch = ["--request-timeout=5s"] if line.endswith(" -w") else []
        outputs.append(run_command(line, admin.kubeconfig, watch))
    assert outputs[0].strip() == "layercache.layercache.dev/runtimes created"
    assert outputs[1].splitlines()[1].split()[0] == "runtimes"
    assert outputs[2].splitlines()[0].split()[0] == "NAME"
    # Step 3's checks: `helm status` (the NOTES) and the listing.
    status = helm("status", RELEASE, "-n", NAMESPACE, kubeconfig=admin.kubeconfig)
    assert "STATUS: deployed" in status
    listing = {line.split()[0]: line.split()[1:] for line in admin.kubectl(
        "-n", NAMESPACE, "get", "deploy,ds").splitlines() if line and not line.startswith("NAME")}
    assert listing[f"deployment.apps/{RELEASE}-operator"][0] == "2/2"  # READY
    assert listing[f"daemonset.apps/{RELEASE}-agent"][:4] == ["3"] * 4  # DESIRED … READY


def test_the_documented_uninstall_order_leaves_no_pinned_layer(
        chart_bed: BedState, admin: Kube, release: Release, chart_family: Family) -> None:
    digests = [layer.digest for layer in chart_family.layers]
    outputs = uninstall(admin)
    assert len(outputs) == len(commands("Uninstall", block=0))
    # The agents released every layer before they went: nothing is pinned any more.
    for node in chart_bed.nodes:
        held = {d: i for d, i in blob_infos(node.socket, digests).items()
                if i is not None and (i.pinned or i.managed)}
        assert held == {}, node.name
    assert helm("list", "-n", NAMESPACE, "--short", kubeconfig=admin.kubeconfig).strip() == ""
    assert "layercache.dev" not in admin.kubectl("get", "crds", "-o", "name")
    wait_for(lambda: not admin.core.list_namespaced_pod(
        NAMESPACE, label_selector=release.selector()).items, timeout=120,
        what="the release's Pods gone")
