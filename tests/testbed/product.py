"""Run layercache itself on the bed: install manifests, start the operator as a process.

The operator runs as a process (no kubelet runs Pods here) but with everything else a Pod
would have: its own ServiceAccount token, the RBAC from `manifests/`, settings from env.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from testbed.bed import BedState, NodeRecord
from testbed.kube import Kube, service_account_kubeconfig
from testbed.nodes import write_kubelet_disk_policy
from testbed.paths import REPO
from testbed.procs import Process, free_port

NAMESPACE = "layercache-system"
MANIFESTS = REPO / "manifests"


def install(kube: Kube, *files: str) -> None:
    """Apply the CRDs and the given manifest files (server-side, idempotent)."""
    # --force-conflicts: a test's Helm release may have taken the CRDs over (they are chart
    # templates); the bed's CRDs are the manifests' again afterwards.
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(MANIFESTS / "crds"))
    kube.wait_established("layercaches.layercache.dev", "nodelayercaches.layercache.dev")
    kube.kubectl("apply", "--server-side", "-f", str(MANIFESTS / "namespace.yaml"))
    for name in files:
        kube.kubectl("apply", "--server-side", "-f", str(MANIFESTS / name))


def insecure_registries(bed: BedState) -> list[str]:
    """The bed's plain-HTTP registries (`host:port`): plain, basic and the fault proxy."""
    hosts = [bed.registries["plain"].host, bed.registries["basic"].host]
    return [*hosts, bed.proxy_url.removeprefix("http://")] if bed.proxy_url else hosts


def start_operator(bed: BedState, kube: Kube, workdir: Path, *, standalone: bool = True,
                   name: str = "operator", lease: str | None = None) -> tuple[Process, int]:
    """Start the operator as ServiceAccount layercache-operator; returns (process, metrics port).

    The bed's proxy host (plain HTTP) is an insecure registry; the token registry's CA is
    trusted. Readiness: the liveness endpoint answers (a standby candidate for the Lease
    answers it too). `lease`: the Lease the replicas elect their leader with (not standalone).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = service_account_kubeconfig(kube, NAMESPACE, "layercache-operator",
                                            workdir / f"{name}.kubeconfig")
    metrics, health = free_port(), free_port()
    env = {
        "KUBECONFIG": str(kubeconfig), "LAYERCACHE_NAMESPACE": NAMESPACE,
        "LAYERCACHE_METRICS_PORT": str(metrics), "LAYERCACHE_HEALTH_PORT": str(health),
        "LAYERCACHE_INSECURE_REGISTRIES": ",".join(insecure_registries(bed)),
        "LAYERCACHE_REGISTRY_CA_FILE": bed.ca_file,
        "LAYERCACHE_STANDALONE": "true" if standalone else "false",
        "LAYERCACHE_STATUS_INTERVAL_SECONDS": "1",
        **({"LAYERCACHE_LEASE_NAME": lease} if lease is not None else {}),
    }
    proc = Process(name, [sys.executable, "-m", "layercache.controller.main"],
                   workdir / f"{name}.log", env=env).start()

    def alive() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as r:
            return r.status == 200
    try:
        proc.wait_ready(alive, 60)
    except BaseException:
        proc.stop()  # the caller gets no handle to stop it with: never leave it running
        raise
    return proc, metrics


def start_agent(bed: BedState, kube: Kube, node: NodeRecord, workdir: Path,
                ) -> tuple[Process, int, int]:
    """Start node `node`'s agent as ServiceAccount layercache-agent.

    Returns (process, peer port, metrics port). Readiness is its NodeLayerCache status;
    the caller polls that.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = service_account_kubeconfig(kube, NAMESPACE, "layercache-agent",
                                            workdir / f"agent-{node.name}.kubeconfig")
    peer, metrics = free_port(), free_port()
    env = {
        "LAYERCACHE_NODE_NAME": node.name, "LAYERCACHE_NAMESPACE": NAMESPACE,
        "LAYERCACHE_KUBECONFIG": str(kubeconfig), "LAYERCACHE_CONTAINERD_SOCKET": node.socket,
        "LAYERCACHE_PEER_BIND": "127.0.0.1", "LAYERCACHE_PEER_PORT": str(peer),
        "LAYERCACHE_METRICS_BIND": "127.0.0.1", "LAYERCACHE_METRICS_PORT": str(metrics),
        "LAYERCACHE_INSECURE_REGISTRIES": ",".join(insecure_registries(bed)),
        "LAYERCACHE_REGISTRY_CA_FILE": bed.ca_file,
        "LAYERCACHE_STATUS_INTERVAL_SECONDS": "1",
        # The node's own containerd config: the agent reads the CRI's snapshotter there.
        "LAYERCACHE_CONTAINERD_CONFIG": str(Path(node.workdir) / "containerd.toml"),
        # Its kubelet's disk thresholds, as the bed's kubelet nodes have them.
        "LAYERCACHE_KUBELET_CONFIG": str(write_kubelet_disk_policy(
            workdir / f"kubelet-{node.name}.yaml")),
    }
    proc = Process(f"agent[{node.name}]", [sys.executable, "-m", "layercache.agent"],
                   workdir / f"agent-{node.name}.log", env=env).start()
    return proc, peer, metrics
