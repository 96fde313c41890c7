"""What the agent tests share: RBAC and Secrets, NodeLayerCache objects, agent processes.

No tests here (pytest collects none); `test_agent.py` and `test_agent_faults.py` import it.
Agents run as real processes (``python -m layercache.agent``), one per simulated node,
each under the agent's own ServiceAccount with the least-privilege rules below — the
same rules ``manifests/`` must give the DaemonSet. Containerd is inspected through the
content API, the upstream through the fault proxy's byte counts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes.client.exceptions import ApiException

from layercache.containerd.content import ContentStore
from layercache.containerd.labels import MANAGED_BY, MANAGED_BY_LABEL
from testbed.bed import BedState, NodeRecord
from testbed.e2e import clear_family
from testbed.images import Family, Layer
from testbed.kube import Kube, service_account_kubeconfig, wait_for
from testbed.nodes import write_kubelet_disk_policy
from testbed.paths import REPO
from testbed.procs import Process, free_port, log_tail

GROUP, VERSION, PLURAL = "layercache.dev", "v1alpha1", "nodelayercaches"
NAMESPACE = "layercache-agent-test"
SERVICE_ACCOUNT = "layercache-agent"
PEER_TOKEN = "peer-token-" + "7" * 32
PEER_SECRET = "layercache-peer-token"
REGISTRY_SECRET = "layercache-registry-credentials"
CACHE = "agent-test/warm"

#: The agent's cluster-wide rules: its NodeLayerCache (watched by name), the peers'
#: (read by name for their endpoints), its status, its Node (DiskPressure, InternalIP).
CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": ["nodelayercaches"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": [GROUP], "resources": ["nodelayercaches/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
]
#: The agent's rules in its own namespace: the two Secrets, by name only.
NAMESPACE_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
     "resourceNames": [PEER_SECRET, REGISTRY_SECRET]},
]


def install(kube: Kube, bed: BedState) -> None:
    """CRDs, the namespace, the agent's ServiceAccount, RBAC and both Secrets (idempotent)."""
    kube.kubectl("apply", "-f", str(REPO / "manifests" / "crds"))
    kube.wait_established(f"{PLURAL}.{GROUP}")
    basic = bed.registries["basic"]
    auth = base64.b64encode(f"{basic.username}:{basic.password}".encode()).decode()
    docker_config = json.dumps({"auths": {basic.host: {"auth": auth}}})
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "layercache-agent-test"}, "rules": CLUSTER_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "layercache-agent-test"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "layercache-agent-test"},
         "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                       "namespace": NAMESPACE}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "layercache-agent", "namespace": NAMESPACE},
         "rules": NAMESPACE_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "layercache-agent", "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "layercache-agent"},
         "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                       "namespace": NAMESPACE}]},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {"name": PEER_SECRET, "namespace": NAMESPACE},
         "stringData": {"token": PEER_TOKEN}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
         "metadata": {"name": REGISTRY_SECRET, "namespace": NAMESPACE},
         "stringData": {".dockerconfigjson": docker_config}},
    ]
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                       "items": objects}))


@pytest.fixture(scope="module", autouse=True)
def installed(bed: BedState, kube: Kube) -> None:
    """`install`, once per module that imports this fixture (it is autouse there)."""
    install(kube, bed)


def runnable_layers(family: Family) -> list[Layer]:
    """Every layer a runtime would pull (attestation blobs left out), largest first."""
    layers = [layer for layer in family.layers if not layer.media_type.endswith("+json")]
    return sorted(layers, key=lambda layer: -layer.size)


def repository_of(family: Family, registry: str, digest: str) -> str:
    """``registry/repository`` of the first image using layer ``digest``."""
    image = family.layer_users()[digest][0]
    return f"{registry}/{family.images[image].repository}"


def blob_path(family: Family, digest: str) -> str:
    """The registry path the agent fetches layer ``digest`` from (proxy byte-count key)."""
    image = family.layer_users()[digest][0]
    return f"/v2/{family.images[image].repository}/blobs/{digest}"


def layer_entry(family: Family, registry: str, layer: Layer, source: str,
                peers: Sequence[str] = ()) -> dict[str, Any]:
    """One ``spec.layers[]`` item."""
    entry: dict[str, Any] = {"digest": layer.digest, "size": layer.size,
                             "mediaType": layer.media_type,
                             "repository": repository_of(family, registry, layer.digest),
                             "source": source}
    if peers:
        entry["peers"] = list(peers)
    return entry


def write_cache(kube: Kube, node: str, layers: list[dict[str, Any]],
                images: Sequence[str | dict[str, Any]] = ()) -> None:
    """Create this node's NodeLayerCache afresh with ``layers`` (and ``images``).

    An image is a reference, or a whole ``spec.images[]`` item (with its ``layers``).
    """
    delete_cache(kube, node)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NodeLayerCache",
            "metadata": {"name": node},
            "spec": {"nodeName": node, "layers": layers, "caches": [CACHE],
                     "images": [image if isinstance(image, dict) else {"reference": image}
                                for image in images]}}
    kube.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)


def delete_cache(kube: Kube, node: str) -> None:
    """Delete the node's NodeLayerCache and wait until it is gone."""
    with contextlib.suppress(ApiException):
        kube.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, node)
    wait_for(lambda: get_cache(kube, node) is None, 30, what=f"{node} deleted")


def get_cache(kube: Kube, node: str) -> dict[str, Any] | None:
    """The node's NodeLayerCache, or None."""
    try:
        found: dict[str, Any] = kube.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL,
                                                                      node)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return found


def status(kube: Kube, node: str) -> dict[str, Any]:
    """The node's NodeLayerCache status ({} when none)."""
    return (get_cache(kube, node) or {}).get("status") or {}


def condition(kube: Kube, node: str, kind: str) -> dict[str, Any]:
    """Condition ``kind`` of the node's status ({} when absent)."""
    return next((c for c in status(kube, node).get("conditions") or () if c["type"] == kind),
                {})


@dataclass
class Agent:
    """One agent process for ``node``; `start` it, `terminate` or `kill9` it."""

    node: NodeRecord
    kubeconfig: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    peer_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def peer_url(self) -> str:
        """The peer server's base URL."""
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def log(self) -> Path:
        """The agent's log file (JSON lines)."""
        return self.workdir / f"agent-{self.node.name}.log"

    def start(self) -> Agent:
        """Start the process (no wait: poll the status for readiness)."""
        env = {
            "LAYERCACHE_NODE_NAME": self.node.name,
            "LAYERCACHE_NAMESPACE": NAMESPACE,
            "LAYERCACHE_KUBECONFIG": str(self.kubeconfig),
            "LAYERCACHE_CONTAINERD_SOCKET": self.node.socket,
            "LAYERCACHE_PEER_BIND": "127.0.0.1",
            "LAYERCACHE_PEER_PORT": str(self.peer_port),
            "LAYERCACHE_METRICS_BIND": "127.0.0.1",
            "LAYERCACHE_METRICS_PORT": str(self.metrics_port),
            "LAYERCACHE_STATUS_INTERVAL_SECONDS": "1",
            # Its kubelet's disk thresholds, as the bed's kubelet nodes have them.
            "LAYERCACHE_KUBELET_CONFIG": str(write_kubelet_disk_policy(
                self.workdir / f"kubelet-{self.node.name}.yaml")),
            **self.env,
        }
        self.process = Process(f"agent[{self.node.name}]",
                               [sys.executable, "-m", "layercache.agent"], self.log,
                               env=env).start()
        return self

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process is not None and self.process.popen is not None \
            and self.process.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL the agent: no cleanup of any kind runs."""
        assert self.process is not None and self.process.popen is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.popen.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL after a grace period (idempotent)."""
        if self.process is not None:
            self.process.stop(grace=15)

    def tail(self) -> str:
        """The end of the agent's log, for failure messages."""
        return log_tail(self.log, 30)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from the agent's metrics port (None when absent)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric_name, _, rest = series.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric_name == name and got == wanted:
                return float(value)
        return None


@contextlib.contextmanager
def agents(kube: Kube, nodes: Sequence[NodeRecord], workdir: Path,
           env: dict[str, str] | None = None) -> Iterator[list[Agent]]:
    """Start one agent per node under the agent ServiceAccount; stop them all at the end."""
    kubeconfig = service_account_kubeconfig(kube, NAMESPACE, SERVICE_ACCOUNT,
                                            workdir / "agent.kubeconfig")
    started = [Agent(node, kubeconfig, workdir, dict(env or {})).start() for node in nodes]
    try:
        yield started
    finally:
        for agent in started:
            agent.terminate()


@contextlib.contextmanager
def one_agent(kube: Kube, node: NodeRecord, layers: list[dict[str, Any]], workdir: Path,
              env: dict[str, str], images: Sequence[str | dict[str, Any]] = ()
              ) -> Iterator[Agent]:
    """A fresh NodeLayerCache for ``node`` and one agent for it; all gone afterwards."""
    digests = [entry["digest"] for entry in layers]
    clear_node(node.socket, digests)
    write_cache(kube, node.name, layers, images)
    try:
        with agents(kube, [node], workdir, env) as started:
            yield started[0]
    finally:
        delete_cache(kube, node.name)
        clear_node(node.socket, digests)


def wait_ready(kube: Kube, agent: Agent, timeout: float = 300) -> dict[str, Any]:
    """Poll until the node's Ready condition is True; returns the status."""
    def ready() -> dict[str, Any] | None:
        assert agent.alive(), f"agent {agent.node.name} exited:\n{agent.tail()}"
        found = status(kube, agent.node.name)
        conditions = {c["type"]: c for c in found.get("conditions") or ()}
        return found if conditions.get("Ready", {}).get("status") == "True" else None

    try:
        return wait_for(ready, timeout, 0.5, f"{agent.node.name} Ready")
    except TimeoutError as error:
        raise AssertionError(f"{error}\nagent log:\n{agent.tail()}") from None


# --- containerd, through the content API ------------------------------------------------


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_store(socket: str, work: Any) -> Any:
    async with ContentStore(socket) as store:
        return await work(store)


def held(socket: str) -> dict[str, int]:
    """Digest → size of every committed blob in the node's ``k8s.io`` content store."""
    async def work(store: ContentStore) -> dict[str, int]:
        return {info.digest: info.size for info in await store.list()}
    result: dict[str, int] = _run(_with_store(socket, work))
    return result


def blob_labels(socket: str, digest: str) -> dict[str, str]:
    """The labels of blob ``digest`` ({} when absent)."""
    async def work(store: ContentStore) -> dict[str, str]:
        info = await store.info(digest)
        return dict(info.labels) if info else {}
    result: dict[str, str] = _run(_with_store(socket, work))
    return result


def stored_sha256(socket: str, digest: str) -> str:
    """``sha256:<hex>`` of blob ``digest`` as containerd serves it (Content.Read)."""
    async def work(store: ContentStore) -> str:
        hasher = hashlib.sha256()
        async for chunk in store.read(digest):
            hasher.update(chunk)
        return f"sha256:{hasher.hexdigest()}"
    result: str = _run(_with_store(socket, work))
    return result


def ingests(socket: str) -> dict[str, int]:
    """Ingest ref → offset (bytes written) of every ingest in progress."""
    async def work(store: ContentStore) -> dict[str, int]:
        return {s.ref: s.offset for s in await store.list_statuses()}
    result: dict[str, int] = _run(_with_store(socket, work))
    return result


def our_leases(socket: str) -> dict[str, dict[str, str]]:
    """Id → labels of the leases labelled managed-by layercache."""
    async def work(store: ContentStore) -> dict[str, dict[str, str]]:
        found = await store.leases.list([f'labels."{MANAGED_BY_LABEL}"=={MANAGED_BY}'])
        return {lease.id: dict(lease.labels) for lease in found}
    result: dict[str, dict[str, str]] = _run(_with_store(socket, work))
    return result


def add_stale_lease(socket: str, lease_id: str) -> None:
    """A lease labelled as ours, as a killed agent of an older plan would leave behind."""
    async def work(store: ContentStore) -> None:
        await store.leases.create(lease_id, {MANAGED_BY_LABEL: MANAGED_BY})
    _run(_with_store(socket, work))


def clear_node(socket: str, digests: Sequence[str]) -> None:
    """Forget the family on a node: its CRI images, these blobs, our ingests and leases."""
    clear_family(socket, digests)
