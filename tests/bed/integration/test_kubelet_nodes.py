"""The bed with real kubelets (`TestBed(kubelets=True)`): Nodes are the kubelets' own.

Each node's kubelet v1.37.2 registers its Node with its node certificate and its node IP,
runs hostNetwork pods through the node's containerd, is held to its own Node by
NodeRestriction, and teardown leaves no process, mount or cgroup directory behind. (Pod
network, Services and the nodes' namespaces: test_pod_network.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from testbed.bed import KUBERNETES_VERSION, BedState, TestBed
from testbed.cri import crictl
from testbed.kube import Kube, wait_for
from testbed.kubelet import cgroup_hierarchies, cgroup_root_for, kubeconfig_path
from testbed.nodes import BED_LABEL, SANDBOX_IMAGE, SOCKET_ANNOTATION
from testbed.procs import pid_alive, processes_naming

pytestmark = pytest.mark.integration

#: Where a kubelet links container logs (fixed in its code); in a node's mount namespace
#: that is the node's own directory, never the host's.
CONTAINER_LOG_LINKS = Path("/var/log/containers")


@pytest.fixture
def admin(kubelet_kube: Kube) -> Kube:
    """Admin access to the session's kubelet bed (`kubelet_bed`, tests/conftest.py)."""
    return kubelet_kube


def _pod(name: str, node: str) -> dict[str, Any]:
    """A hostNetwork pod running the pause image, placed on `node` by the scheduler."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"hostNetwork": True, "nodeSelector": {"kubernetes.io/hostname": node},
                     "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "pause", "image": SANDBOX_IMAGE,
                                     "imagePullPolicy": "Never"}]}}


def _sandboxes(socket: str, pod: str) -> list[dict[str, Any]]:
    """CRI pod sandboxes of the pod named `pod` on the containerd at `socket`."""
    items: list[dict[str, Any]] = json.loads(
        crictl(socket, "pods", "--name", pod, "-o", "json", timeout=30))["items"]
    return items


def test_every_node_is_registered_by_its_kubelet_and_ready(kubelet_bed: BedState,
                                                           admin: Kube) -> None:
    leases = client.CoordinationV1Api(admin.api)
    for record in kubelet_bed.nodes:
        node = admin.core.read_node(record.name)
        info = node.status.node_info
        # The version CRI's Version call answers on this node's containerd ("v2.3.4"), as
        # the kubelet reports it: parsed as a semantic version, so without the "v".
        runtime = dict(line.split(":", 1) for line in
                       crictl(record.socket, "version", timeout=30).splitlines())
        assert runtime["RuntimeVersion"].strip() == "v2.3.4"
        assert (info.kubelet_version, info.container_runtime_version) == (
            KUBERNETES_VERSION, "containerd://2.3.4")
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert (ready.status, ready.reason) == ("True", "KubeletReady")
        # The kubelet's own: it created the Node and keeps writing its status and lease.
        managers = {(f.manager, f.subresource or "") for f in node.metadata.managed_fields}
        assert ("kubelet", "") in managers and ("kubelet", "status") in managers
        holder = wait_for(lambda name=record.name: next(
            (lease.spec.holder_identity for lease in leases.list_namespaced_lease(
                "kube-node-lease").items if lease.metadata.name == name), None),
            timeout=30, what=f"node lease of {record.name}")
        assert holder == record.name
        assert node.metadata.labels[BED_LABEL] == "true"
        assert node.metadata.labels["kubernetes.io/hostname"] == record.name
        assert node.metadata.annotations[SOCKET_ANNOTATION] == record.socket
        # The kubelet's own --node-ip: the node's address on the bed bridge.
        assert [(a.type, a.address) for a in node.status.addresses] == [
            ("InternalIP", record.ip), ("Hostname", record.name)]
        assert not node.spec.taints
    assert kubelet_bed.kubelets


def test_host_network_pod_runs_on_each_node_and_is_deleted(kubelet_bed: BedState,
                                                          admin: Kube) -> None:
    names = {record.name: f"pause-{i}" for i, record in enumerate(kubelet_bed.nodes)}
    for node, pod in names.items():
        admin.core.create_namespaced_pod("default", _pod(pod, node))
    for record in kubelet_bed.nodes:
        pod = names[record.name]
        running = wait_for(lambda pod=pod: (p := admin.core.read_namespaced_pod(pod, "default"))
                           .status.phase == "Running" and p, timeout=90,
                           what=f"pod {pod} Running")
        assert running.spec.node_name == record.name
        assert (running.status.host_ip, running.status.pod_ip) == (record.ip, record.ip)
        # The node's own containerd runs it: a ready sandbox and a running pause container.
        assert [s["state"] for s in _sandboxes(record.socket, pod)] == ["SANDBOX_READY"]
        containers = json.loads(crictl(record.socket, "ps", "--label",
                                       f"io.kubernetes.pod.name={pod}", "-o", "json",
                                       timeout=30))["containers"]
        assert [(c["metadata"]["name"], c["state"]) for c in containers] == [
            ("pause", "CONTAINER_RUNNING")]
        # The apiserver reaches the kubelet (node IP, verified TLS): pause logs nothing.
        assert admin.kubectl("logs", pod) == ""
    for record in kubelet_bed.nodes:
        pod = names[record.name]
        admin.core.delete_namespaced_pod(pod, "default")

        def gone(pod: str = pod) -> bool:
            try:
                admin.core.read_namespaced_pod(pod, "default")
            except client.ApiException as e:
                return e.status == 404
            return False
        wait_for(gone, timeout=60, what=f"pod {pod} deleted")
        # The kubelet stopped the sandbox (it may keep the stopped one until its GC runs).
        assert all(s["state"] == "SANDBOX_NOTREADY" for s in _sandboxes(record.socket, pod))


def test_node_credentials_cannot_modify_another_node(kubelet_bed: BedState) -> None:
    first, second = kubelet_bed.nodes
    as_first = config.new_client_from_config(
        config_file=str(kubeconfig_path(Path(first.workdir))))
    try:
        core = client.CoreV1Api(as_first)
        with pytest.raises(client.ApiException) as denied:
            core.patch_node(second.name, {"metadata": {"labels": {"owned-by": first.name}}})
        assert denied.value.status == 403
        # NodeRestriction's answer, not an authorizer's: the patch itself was authorised.
        assert (f'node "{first.name}" is not allowed to modify node "{second.name}"'
                in json.loads(denied.value.body)["message"])
        # Its own Node it may label (outside the kubernetes.io namespaces).
        own = core.patch_node(first.name, {"metadata": {"labels": {"owned-by": first.name}}})
        assert own.metadata.labels["owned-by"] == first.name
    finally:
        as_first.close()


def _hold_pods(state: BedState) -> list[int]:
    """Run a pause pod on each node of `state`; returns the containers' host PIDs."""
    kube = Kube(Path(state.kubeconfig))
    try:
        # A running pod per node at teardown: sandbox, container, shims, volume mounts.
        for i, record in enumerate(state.nodes):
            kube.core.create_namespaced_pod("default", _pod(f"held-{i}", record.name))
        pids = []
        for i, record in enumerate(state.nodes):
            wait_for(lambda i=i: kube.core.read_namespaced_pod(f"held-{i}", "default")
                     .status.phase == "Running", timeout=90, what=f"pod held-{i} Running")
            listed = json.loads(crictl(record.socket, "ps", "--label",
                                       f"io.kubernetes.pod.name=held-{i}", "-o", "json",
                                       timeout=30))
            inspect = json.loads(crictl(record.socket, "inspect", "-o", "json",
                                        listed["containers"][0]["id"], timeout=30))
            pids.append(inspect["info"]["pid"])
        return pids
    finally:
        kube.close()


def test_teardown_leaves_no_process_mount_or_cgroup(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    bed = TestBed(tmp_path_factory.mktemp("kubelet-down"), nodes=2, seed_images=False,
                  kubelets=True)
    state = bed.up()
    workdir = Path(state.workdir)
    roots = [cgroup_root_for(workdir, n.name) for n in state.nodes]
    hierarchies = cgroup_hierarchies()
    try:
        pause_pids = _hold_pods(state)
        # The node's mounts, in its own mount namespace (testbed.podnet).
        mounts = [line.split()[1] for line in
                  Path(f"/proc/{state.nodes[0].ns_pid}/mounts").read_text().splitlines()]
        # What teardown has to undo is there: the kubelets' and containers' processes, their
        # mounts, the nodes' cgroups in every hierarchy.
        assert any("kubelet" in c for c in processes_naming(workdir).values())
        assert all(pid_alive(pid) for pid in pause_pids)
        assert any(m.startswith("/var/lib/kubelet/pods/") for m in mounts)
        assert all((h / root.lstrip("/")).is_dir() for h in hierarchies for root in roots)
    except BaseException:
        bed.down()  # a failure here must not leak a running bed
        raise

    bed.down()

    assert processes_naming(workdir) == {}
    assert [pid for pid in pause_pids if pid_alive(pid)] == []
    assert [n.ns_pid for n in state.nodes if n.ns_pid and pid_alive(n.ns_pid)] == []
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert [m for m in mounts if m.startswith(str(workdir))] == []
    assert [h / root.lstrip("/") for h in hierarchies for root in roots
            if (h / root.lstrip("/")).exists()] == []
    links = [p for p in CONTAINER_LOG_LINKS.glob("*") if p.is_symlink()
             and str(p.readlink()).startswith(str(workdir))] if CONTAINER_LOG_LINKS.exists() else []
    assert links == []
    assert not workdir.exists()
