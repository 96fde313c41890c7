"""Kubelet nodes as kind nodes (`testbed.podnet`): own namespaces, a pod network, Services.

What the Helm chart needs of a cluster, checked on the bed: a pod (not hostNetwork) reaches
the apiserver through the `kubernetes` Service as an in-cluster client does; pods reach each
other across nodes, directly and through a Service; two hostNetwork pods on two nodes bind
the same port (the agent DaemonSet's fixed peer port); each node has its own containerd on
/run/containerd/containerd.sock and its kubelet config on /var/lib/kubelet/config.yaml; and
`testbed down`, from another process, leaves no process, mount, bridge, veth, route,
namespace, iptables rule or cgroup behind.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from testbed.bed import BedState, TestBed
from testbed.kube import Kube, wait_for
from testbed.kubelet import PROBE_IMAGE, cgroup_hierarchies, cgroup_root_for
from testbed.podnet import BRIDGE_PREFIX, node_argv
from testbed.procs import pid_alive, processes_naming, run

pytestmark = pytest.mark.integration

#: The chart's agent peer port (helm/layercache/values.yaml `agent.peerPort`).
PEER_PORT = 5780


def _probe_pod(name: str, node: str, args: list[str], *, host_network: bool = False,
               labels: dict[str, str] | None = None, once: bool = False) -> dict[str, Any]:
    """A pod running the bed's probe with `args` on `node`."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"hostNetwork": host_network,
                     "nodeSelector": {"kubernetes.io/hostname": node},
                     "restartPolicy": "Never" if once else "Always",
                     "terminationGracePeriodSeconds": 2,
                     "containers": [{"name": "probe", "image": PROBE_IMAGE,
                                     "imagePullPolicy": "Never", "args": args}]}}


def _finished(kube: Kube, name: str) -> tuple[str, str]:
    """Wait until pod `name` (restartPolicy Never) ended; returns (phase, its log)."""
    phase = wait_for(lambda: (p := kube.core.read_namespaced_pod(name, "default").status.phase)
                     in ("Succeeded", "Failed") and p, timeout=90, what=f"pod {name} finished")
    return phase, kube.kubectl("logs", name)


def _running(kube: Kube, name: str) -> Any:
    """Wait until pod `name` is Running; returns it."""
    return wait_for(lambda: (p := kube.core.read_namespaced_pod(name, "default"))
                    .status.phase == "Running" and p, timeout=90, what=f"pod {name} Running")


def _wait_endpoints(kube: Kube, service: str, count: int) -> None:
    """Wait until Service `service` (namespace default) has `count` endpoint addresses."""
    slices = client.DiscoveryV1Api(kube.api)
    wait_for(lambda: sum(len(e.addresses) for s in slices.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={service}").items
        for e in s.endpoints or []) == count, timeout=30, what=f"{service} endpoints")


def test_pod_reaches_the_apiserver_through_the_kubernetes_service(kubelet_bed: BedState,
                                                                   kubelet_kube: Kube) -> None:
    endpoints = client.DiscoveryV1Api(kubelet_kube.api).read_namespaced_endpoint_slice(
        "kubernetes", "default")
    # The apiserver advertises the bed bridge's address, which pods can reach.
    assert [a for e in endpoints.endpoints for a in e.addresses] == [kubelet_bed.gateway]
    service_ip = kubelet_kube.core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
    for i, record in enumerate(kubelet_bed.nodes):
        name = f"whoami-{i}"
        kubelet_kube.core.create_namespaced_pod("default", _probe_pod(name, record.name, ["whoami"],
                                                               once=True))
        phase, log = _finished(kubelet_kube, name)
        assert phase == "Succeeded", log
        review = json.loads(log)
        assert review["status"]["userInfo"]["username"] == \
            "system:serviceaccount:default:default"
        pod = kubelet_kube.core.read_namespaced_pod(name, "default")
        # A pod-network address from the node's podCIDR, not the node's.
        node = kubelet_kube.core.read_node(record.name)
        assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(
            node.spec.pod_cidr)
        assert ipaddress.ip_network(node.spec.pod_cidr).subnet_of(
            ipaddress.ip_network(kubelet_bed.cluster_cidr))
        assert (pod.status.host_ip, pod.spec.host_network) == (record.ip, None)
        assert service_ip == "10.96.0.1"


def test_pods_reach_each_other_across_nodes_directly_and_through_a_service(
        kubelet_bed: BedState, kubelet_kube: Kube) -> None:
    first, second = kubelet_bed.nodes
    kubelet_kube.core.create_namespaced_pod("default", _probe_pod(
        "listener", first.name, ["listen", "8080"], labels={"app": "listener"}))
    listener = _running(kubelet_kube, "listener")
    kubelet_kube.core.create_namespaced_service("default", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "listener"},
        "spec": {"selector": {"app": "listener"},
                 "ports": [{"port": 80, "targetPort": 8080}]}})
    cluster_ip = kubelet_kube.core.read_namespaced_service("listener", "default").spec.cluster_ip
    _wait_endpoints(kubelet_kube, "listener", 1)
    # The pod's host name is its name: the listener answers with it.
    for name, url in (("direct", f"http://{listener.status.pod_ip}:8080/"),
                      ("service", f"http://{cluster_ip}/"),
                      ("dns", "http://listener.default.svc/")):
        kubelet_kube.core.create_namespaced_pod("default", _probe_pod(
            name, second.name, ["get", url], once=True))
        phase, log = _finished(kubelet_kube, name)
        assert (phase, log.strip()) == ("Succeeded", "listener"), url
    # The host routes each podCIDR to its node (the apiserver reaches webhooks so).
    reply = httpx.get(f"http://{listener.status.pod_ip}:8080/", timeout=10)
    assert reply.text.strip() == "listener"


def test_cluster_dns_resolves_services_and_headless_services_as_on_kind(
        kubelet_bed: BedState, kubelet_kube: Kube) -> None:
    first, second = kubelet_bed.nodes
    # A headless Service of hostNetwork pods, as the chart's agent Service: node IPs.
    for i, record in enumerate(kubelet_bed.nodes):
        kubelet_kube.core.create_namespaced_pod("default", _probe_pod(
            f"dns-peer-{i}", record.name, ["listen", "5790"], host_network=True,
            labels={"app": "dns-peer"}))
        _running(kubelet_kube, f"dns-peer-{i}")
    kubelet_kube.core.create_namespaced_service("default", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns-peers"},
        "spec": {"clusterIP": "None", "selector": {"app": "dns-peer"},
                 "ports": [{"port": 5790}]}})
    _wait_endpoints(kubelet_kube, "dns-peers", len(kubelet_bed.nodes))
    dns = kubelet_kube.core.read_namespaced_service("kube-dns", "kube-system")
    assert dns.spec.cluster_ip == "10.96.0.10"
    expected = {"kubernetes.default.svc.cluster.local": ["10.96.0.1"],
                "kubernetes.default": ["10.96.0.1"],
                "kube-dns.kube-system.svc": ["10.96.0.10"],
                "dns-peers.default.svc": sorted([first.ip, second.ip])}
    for i, (name, addresses) in enumerate(expected.items()):
        pod = f"lookup-{i}"
        kubelet_kube.core.create_namespaced_pod("default", _probe_pod(
            pod, second.name, ["lookup", name], once=True))
        phase, log = _finished(kubelet_kube, pod)
        assert (phase, log.split()) == ("Succeeded", addresses), name


def test_host_network_pods_on_two_nodes_bind_the_same_port(kubelet_bed: BedState,
                                                            kubelet_kube: Kube) -> None:
    for i, record in enumerate(kubelet_bed.nodes):
        kubelet_kube.core.create_namespaced_pod("default", _probe_pod(
            f"peer-{i}", record.name, ["listen", str(PEER_PORT)], host_network=True))
    for i, record in enumerate(kubelet_bed.nodes):
        pod = _running(kubelet_kube, f"peer-{i}")
        assert (pod.status.pod_ip, pod.status.host_ip) == (record.ip, record.ip)
        # Each answers on its own node IP with its node's host name (the node's UTS).
        reply = httpx.get(f"http://{record.ip}:{PEER_PORT}/", timeout=10)
        assert reply.text.strip() == record.name
        assert pod.status.container_statuses[0].restart_count == 0


def test_each_node_has_its_own_containerd_and_kubelet_on_the_standard_paths(
        kubelet_bed: BedState) -> None:
    for record in kubelet_bed.nodes:
        assert record.ns_pid is not None
        inside = run(node_argv(record.ns_pid, [
            "stat", "-c", "%d:%i", "/run/containerd/containerd.sock",
            "/var/lib/kubelet/config.yaml", "/var/lib/containerd"]), timeout=30).split()
        workdir = Path(record.workdir)
        outside = [f"{s.st_dev}:{s.st_ino}" for s in (
            Path(record.socket).stat(), (workdir / "var/lib/kubelet/config.yaml").stat(),
            (workdir / "var/lib/containerd").stat())]
        assert inside == outside
        assert record.socket == str(workdir / "run/containerd/containerd.sock")
        assert run(node_argv(record.ns_pid, ["hostname"]), timeout=30).strip() == record.name


def _ns_inodes(pid: int) -> tuple[int, int]:
    return (Path(f"/proc/{pid}/ns/net").stat().st_ino, Path(f"/proc/{pid}/ns/mnt").stat().st_ino)


def _in_namespaces(inodes: set[int]) -> list[int]:
    """PIDs of processes in any of the namespaces (net or mnt) `inodes`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if inodes & set(_ns_inodes(int(entry.name))):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _iptables() -> set[str]:
    """The host's iptables rules and chains (`iptables-save`, no comments or counters)."""
    return {line for line in run(["iptables-save"]).splitlines()
            if not line.startswith("#")}


def _bed_links(slot: str) -> list[str]:
    links = json.loads(run(["ip", "-j", "link", "show"]))
    return [link["ifname"] for link in links
            if link["ifname"] in (f"{BRIDGE_PREFIX}{slot}",)
            or link["ifname"].startswith(f"lcb{slot}")]


def test_teardown_from_another_process_leaves_nothing(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    rules_before = _iptables()
    netns_before = run(["ip", "netns", "list"])
    testbed = TestBed(tmp_path_factory.mktemp("podnet-down"), nodes=2, seed_images=False,
                      kubelets=True)
    state = testbed.up()
    workdir = Path(state.workdir)
    assert state.bridge is not None and state.cluster_cidr is not None
    slot = state.bridge.removeprefix(BRIDGE_PREFIX)
    roots = [cgroup_root_for(workdir, n.name) for n in state.nodes]
    namespaces = {ino for n in state.nodes if n.ns_pid for ino in _ns_inodes(n.ns_pid)}
    try:
        kube = Kube(Path(state.kubeconfig))
        try:
            # Pods on both networks on each node at teardown: sandboxes, shims, mounts.
            for i, record in enumerate(state.nodes):
                kube.core.create_namespaced_pod("default", _probe_pod(
                    f"held-{i}", record.name, ["listen", "8080"]))
                kube.core.create_namespaced_pod("default", _probe_pod(
                    f"held-host-{i}", record.name, ["listen", str(PEER_PORT)],
                    host_network=True))
            for i in range(len(state.nodes)):
                _running(kube, f"held-{i}")
                _running(kube, f"held-host-{i}")
        finally:
            kube.close()
        # What teardown has to undo is there.
        assert len(namespaces) == 2 * len(state.nodes)
        assert any("containerd-shim" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                   for p in _in_namespaces(namespaces) if pid_alive(p))
        node_mounts = Path(f"/proc/{state.nodes[0].ns_pid}/mounts").read_text()
        assert " /var/lib/kubelet/pods/" in node_mounts
        assert " /run/containerd " in node_mounts
        host_mounts = Path("/proc/self/mounts").read_text()
        # The node's mounts stay in the node: the host sees none of them.
        assert str(workdir) not in host_mounts and "/var/lib/kubelet/pods/" not in host_mounts
        assert sorted(_bed_links(slot)) == sorted(
            [state.bridge, *(f"lcb{slot}n{i}" for i in range(len(state.nodes)))])
        assert f"-i {state.bridge} -o {state.bridge}" in "\n".join(_iptables() - rules_before)
        assert all((h / root.lstrip("/")).is_dir() for h in cgroup_hierarchies()
                   for root in roots)
    except BaseException:
        testbed.down()  # a failure here must not leak a running bed
        raise

    # `testbed down` runs in another process than the one that brought the bed up.
    subprocess.run([sys.executable, "-m", "testbed.cli", "down", "--dir", str(workdir)],
                   check=True, timeout=300)
    testbed.down()  # reaps this process's children (already stopped)

    assert processes_naming(workdir) == {}
    assert _in_namespaces(namespaces) == []
    assert str(workdir) not in Path("/proc/self/mounts").read_text()
    assert _bed_links(slot) == []
    routes = run(["ip", "route", "show"])
    assert state.bridge not in routes and state.gateway not in routes
    # Other beds on the host may add their own rules meanwhile: none may name this one's.
    ours = (state.bridge, str(workdir), state.cluster_cidr, state.gateway)
    assert [r for r in _iptables() - rules_before if any(o in r for o in ours)] == []
    assert run(["ip", "netns", "list"]) == netns_before  # the nodes' never were named ones
    assert [h / root.lstrip("/") for h in cgroup_hierarchies() for root in roots
            if (h / root.lstrip("/")).exists()] == []
    assert not workdir.exists()
