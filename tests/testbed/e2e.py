"""layercache whole on the bed, for end-to-end tests: operator, agents, an extra node, probes.

`LayerCacheCluster` is the running product: the manifests installed, one operator and one
agent per node, each a real process under its own ServiceAccount (`testbed.product`).
`ChartCluster` is the same product installed by Helm on a kubelet bed, operator and agents
as the chart's Pods (tests/integration/test_e2e.py); `kubelet_paused` holds a node's
kubelet so a killed agent Pod is not restarted until a test has looked. `extra_node`
brings up one more simulated node (containerd, Node object, agent process) for the life of
a `with` block, as a node joining the cluster would (`joined_node`: the same without the
agent, on any containerd profile). The probes read what tests assert on: LayerCache
status and Events from the apiserver, blobs, labels and ingests from each node's
containerd through the content API.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from layercache.agent.limits import memory_limit
from layercache.containerd.content import BlobInfo, ContentStore
from layercache.containerd.cri import CRIImages
from layercache.containerd.errors import NotFound
from layercache.containerd.labels import GC_ROOT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, is_managed
from layercache.containerd.unpack import Snapshots
from testbed.bed import BedState, NodeRecord, register_nodes
from testbed.chart import Release, helm_install, load_image, wait_ready
from testbed.cri import crictl
from testbed.kube import Kube, wait_for
from testbed.nodes import RegistryHost, SimNode
from testbed.paths import containerd_tool
from testbed.procs import Process, run
from testbed.product import (
    NAMESPACE,
    insecure_registries,
    install,
    start_agent,
    start_operator,
)

GROUP, VERSION = "layercache.dev", "v1alpha1"
#: The pause image the bed's containerd daemons are configured with (never pulled here).
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"
T = TypeVar("T")
log = logging.getLogger(__name__)


# --- the product ------------------------------------------------------------------------


@dataclass
class LayerCacheCluster:
    """The operator and one agent per node, running on the bed; `stop` ends them."""

    bed: BedState
    kube: Kube
    workdir: Path
    operator: Process | None = None
    agents: dict[str, Process] = field(default_factory=dict)
    operator_starts: int = 0
    #: Metrics port of the running operator ("operator") and of each node's agent.
    metrics_ports: dict[str, int] = field(default_factory=dict)
    #: Every product process started, stopped ones too: their logs outlive them (`logs`).
    started: list[Process] = field(default_factory=list)

    def start(self) -> LayerCacheCluster:
        """Install the manifests, start the operator, then an agent on every bed node."""
        install(self.kube, "rbac-operator.yaml", "rbac-agent.yaml")
        self.start_operator()
        # The operator creates the agents' peer token on start-up; agents read it at theirs.
        wait_for(lambda: self.kube.core.list_namespaced_secret(
            NAMESPACE, field_selector="metadata.name=layercache-peer-token").items,
            what="the peer token Secret")
        for node in self.bed.nodes:
            self.start_agent(node)
        return self

    def start_operator(self) -> Process:
        """Start an operator (a new log per start); returns its process."""
        self.operator_starts += 1
        self.operator, self.metrics_ports["operator"] = start_operator(
            self.bed, self.kube, self.workdir, name=f"operator-{self.operator_starts}")
        self.started.append(self.operator)
        return self.operator

    def stop_operator(self) -> None:
        """SIGTERM the operator and wait for it to exit."""
        if self.operator is not None:
            self.operator.stop()

    def start_agent(self, node: NodeRecord) -> Process:
        """Start `node`'s agent (readiness: its NodeLayerCache status)."""
        self.agents[node.name], _, self.metrics_ports[node.name] = start_agent(
            self.bed, self.kube, node, self.workdir)
        self.started.append(self.agents[node.name])
        return self.agents[node.name]

    def stop_agent(self, name: str) -> None:
        """Stop node `name`'s agent, if it runs."""
        agent = self.agents.pop(name, None)
        if agent is not None:
            agent.stop(grace=15)

    def processes(self) -> list[Process]:
        """The product's processes: the operator (if started here) and each process agent."""
        return [p for p in (self.operator, *self.agents.values()) if p is not None]

    def logs(self) -> dict[str, str]:
        """The log of every product process started, stopped ones too, by process name."""
        return {f"process/{p.name}": p.log.read_text(errors="replace")
                for p in self.started if p.log.exists()}

    def alive(self) -> list[str]:
        """Names of the product processes that exited (empty while all run)."""
        return [p.name for p in self.processes()
                if p.popen is None or p.popen.poll() is not None]

    def stop(self) -> None:
        """Stop every agent, then the operator."""
        for name in list(self.agents):
            self.stop_agent(name)
        self.stop_operator()


#: The ConfigMap (release namespace) with the bed's CA, the chart's `registryCA.configMap`.
REGISTRY_CA_CONFIGMAP = "bed-registry-ca"


@dataclass
class ChartCluster(LayerCacheCluster):
    """The product as `helm install` runs it on a kubelet bed (`TestBed(kubelets=True)`).

    `start` loads the product image into every node and installs helm/layercache by
    docs/kind.md step 3 (`testbed.chart.helm_install`): the operator Deployment and one agent
    Pod per node, each agent reading its node's containerd socket through the chart's
    hostPath mounts, RBAC as the chart ships it. Values beyond the image: the bed's
    plain-HTTP registries (`insecureRegistries`), its CA (`registryCA`, a ConfigMap created
    with the namespace) and `operator_env` / `agent_env` (`operator.env`, `agent.env`).
    `agents` holds only process-mode agents of nodes without a kubelet (`extra_node`).
    """

    operator_env: dict[str, str] = field(default_factory=dict)
    agent_env: dict[str, str] = field(default_factory=dict)
    release: Release | None = None
    #: The operator Deployment's replicas before `stop_operator` scaled it to 0.
    operator_replicas: int = 0
    #: Container restarts the tests caused (`kill_agent`), by Pod name; `alive` allows them.
    restarts: dict[str, int] = field(default_factory=dict)

    def start(self) -> ChartCluster:
        """Load the image, create the CA ConfigMap with the namespace, `helm install`."""
        ca = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": REGISTRY_CA_CONFIGMAP},
              "data": {"ca.crt": Path(self.bed.ca_file).read_text()}}
        values = ["--set", f"registryCA.configMap={REGISTRY_CA_CONFIGMAP}",
                  "--set-json", f"operator.env={json.dumps(self.operator_env)}",
                  "--set-json", f"agent.env={json.dumps(self.agent_env)}"]
        self.release = helm_install(self.kube, load_image(self.bed),
                                    insecure_registries=insecure_registries(self.bed),
                                    values=values, objects=[ca])
        return self

    def _release(self) -> Release:
        assert self.release is not None, "ChartCluster.start first"
        return self.release

    def pods(self, component: str | None = None) -> list[Any]:
        """The release's Pods (V1Pod), of one `component` (operator, agent) if given."""
        release = self._release()
        return list(self.kube.core.list_namespaced_pod(
            release.namespace, label_selector=release.selector(component)).items)

    def agent_pod(self, node: str) -> Any:
        """The agent Pod (V1Pod) on `node`.

        Raises:
            LookupError: no agent Pod is scheduled there.
        """
        for pod in self.pods("agent"):
            if pod.spec.node_name == node:
                return pod
        raise LookupError(f"no agent Pod on node {node}")

    def agent_memory(self, node: NodeRecord) -> tuple[int, int | None]:
        """(peak, limit) in bytes of the agent container on `node`, as its cgroup counts.

        The peak since the container started: cgroup v2 ``memory.peak``, v1
        ``memory.max_usage_in_bytes`` (both count its anonymous and page-cache memory,
        as the OOM killer does). The limit as the agent itself reads it
        (`layercache.agent.limits.memory_limit`), seen from the container.
        """
        container = _container_id(self.agent_pod(node.name))
        pid = json.loads(crictl(node.socket, "inspect", container))["info"]["pid"]
        root = Path(f"/proc/{pid}/root/sys/fs/cgroup")
        peak = next(p for p in (root / "memory.peak", root / "memory" /
                                "memory.max_usage_in_bytes") if p.exists())
        return int(peak.read_text()), memory_limit(root)

    def start_operator(self) -> Process | None:  # type: ignore[override]
        """Scale the operator Deployment back to its replicas; wait until all are Ready."""
        release = self._release()
        self.operator_starts += 1
        if self.operator_replicas:
            self.kube.kubectl("-n", release.namespace, "scale",
                              f"deployment/{release.name}-operator",
                              f"--replicas={self.operator_replicas}")
        wait_ready(self.kube, release)
        return None

    def stop_operator(self) -> None:
        """Scale the operator Deployment to 0 and wait until its Pods are gone."""
        release = self._release()
        deployment = f"{release.name}-operator"
        replicas = self.kube.apps.read_namespaced_deployment(
            deployment, release.namespace).spec.replicas
        self.operator_replicas = replicas or self.operator_replicas
        self.kube.kubectl("-n", release.namespace, "scale", f"deployment/{deployment}",
                          "--replicas=0")
        wait_for(lambda: not self.pods("operator"), 120, 0.5, "the operator Pods gone")

    def kill_agent(self, node: NodeRecord) -> None:
        """SIGKILL the agent container's process on `node` (as the OOM killer would).

        The kubelet restarts the container (restartPolicy Always); `alive` allows that one
        restart. Returns once CRI reports the container exited.
        """
        pod = self.agent_pod(node.name)
        container = _container_id(pod)
        self.restarts[pod.metadata.name] = self.restarts.get(pod.metadata.name, 0) + 1
        run([containerd_tool("ctr", self.bed.containerd), "--address", node.socket,
             "--namespace", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", container])

        def exited() -> bool:
            inspected = json.loads(crictl(node.socket, "inspect", container))
            return bool(inspected["status"]["state"] == "CONTAINER_EXITED")
        wait_for(exited, 30, 0.1, f"agent container {container[:12]} on {node.name} exited")

    def logs(self) -> dict[str, str]:
        """Every product log: each release Pod's container (kubectl logs) and process agent."""
        release = self._release()
        found = {f"pod/{pod.metadata.name}": self.kube.core.read_namespaced_pod_log(
                     pod.metadata.name, release.namespace)
                 for pod in self.pods() if pod.status.container_statuses}
        return {**found, **super().logs()}  # and the process agents, stopped ones too

    def alive(self) -> list[str]:
        """Product Pods (or process agents) whose container exited unasked (empty: none).

        A Pod is named with how its container last ended, as the kubelet reports it
        (``OOMKilled, exit 137``): what a failed CI run has to go on.
        """
        exited = super().alive() if self.agents else []
        for pod in self.pods():
            allowed = self.restarts.get(pod.metadata.name)
            for status in pod.status.container_statuses or ():
                if status.restart_count > (allowed or 0) or (
                        allowed is None and status.state.terminated is not None):
                    ended = status.state.terminated or status.last_state.terminated
                    how = f" ({ended.reason}, exit {ended.exit_code})" if ended else ""
                    exited.append(f"pod/{pod.metadata.name}{how}")
        return exited

    def stop(self) -> None:
        """Stop the process agents; the release stays until the bed goes."""
        for name in list(self.agents):
            self.stop_agent(name)


def _container_id(pod: Any) -> str:
    """The containerd ID of the one container of `pod` (a V1Pod), as CRI names it."""
    (status,) = pod.status.container_statuses
    return str(status.container_id.removeprefix("containerd://"))


@contextlib.contextmanager
def kubelet_paused(bed: BedState, node: str) -> Iterator[None]:
    """Hold node `node`'s kubelet (SIGSTOP) for the block, then let it go on (SIGCONT).

    While held it restarts no container, so a test can look at what a killed agent left
    before the kubelet starts the next one.

    Raises:
        LookupError: the bed has no kubelet for `node`.
    """
    pid = next((p.pid for p in bed.processes if p.name == f"kubelet[{node}]"), None)
    if pid is None:
        raise LookupError(f"no kubelet of node {node} in the bed's processes")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def joined_node(kube: Kube, bed: BedState, name: str, workdir: Path,
                containerd: str | None = None) -> Iterator[NodeRecord]:
    """One more node on the bed for the life of a `with` block: containerd and a Ready Node.

    The node is configured as the bed's own are (`testbed.bed.TestBed`): registry host
    configs for the fault proxy and every registry, then registered with a kubelet-like
    status. `containerd` is its profile (default: the bed's). Afterwards containerd stops
    and the Node is deleted; the files under `workdir` stay.
    """
    node = SimNode(name, workdir, containerd=containerd or bed.containerd)
    node.start(SANDBOX_IMAGE)
    registered = False
    try:
        node.wait()
        hosts = [RegistryHost((bed.proxy_url or "").removeprefix("http://"),
                              bed.proxy_url or "")]
        hosts += [RegistryHost(r.host, r.url, Path(r.ca_file) if r.ca_file else None)
                  for r in bed.registries.values()]
        node.configure_registries(hosts)
        register_nodes(Path(bed.kubeconfig), [node])
        registered = True
        with node_lease(kube, name):
            yield NodeRecord(name, str(node.socket), str(workdir))
    finally:
        node.stop()
        if registered:
            with contextlib.suppress(ApiException):
                kube.core.delete_node(name)


#: A kubelet's node Lease: renewed every 10 s, lasting 40 s (its defaults).
NODE_LEASE_RENEW_SECONDS = 10.0
NODE_LEASE_SECONDS = 40


@contextlib.contextmanager
def node_lease(kube: Kube, name: str) -> Iterator[None]:
    """Renew Node `name`'s Lease in ``kube-node-lease`` for the block, as its kubelet would.

    On kubelet beds the node-lifecycle controller runs: a Node without heartbeats is marked
    unreachable after its grace period (50 s) and tainted, and the operator then plans
    nothing for it (the taint is not tolerated). A joined node has no kubelet, so this
    thread is its heartbeat. The Lease is deleted afterwards.
    """
    leases = client.CoordinationV1Api(kube.api)
    stop = threading.Event()

    def renew() -> None:
        while True:
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            spec = {"holderIdentity": name, "renewTime": now,
                    "leaseDurationSeconds": NODE_LEASE_SECONDS}
            try:
                try:
                    leases.patch_namespaced_lease(name, "kube-node-lease", {"spec": spec})
                except ApiException as error:
                    if error.status != 404:
                        raise
                    leases.create_namespaced_lease("kube-node-lease", {
                        "metadata": {"name": name, "namespace": "kube-node-lease"},
                        "spec": spec})
            except Exception as error:  # a loaded apiserver: the next renewal may land
                log.warning("node Lease %s not renewed: %s", name, error)
            if stop.wait(NODE_LEASE_RENEW_SECONDS):
                return

    thread = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(ApiException):
            leases.delete_namespaced_lease(name, "kube-node-lease")


@contextlib.contextmanager
def extra_node(bed: BedState, cluster: LayerCacheCluster, name: str, workdir: Path
               ) -> Iterator[NodeRecord]:
    """One more node for the block: `joined_node` plus its agent.

    Afterwards the agent and containerd stop, the Node is deleted and, once the operator
    dropped the node's NodeLayerCache, the node's files are removed.
    """
    try:
        with joined_node(cluster.kube, bed, name, workdir) as record:
            try:
                cluster.start_agent(record)
                yield record
            finally:
                cluster.stop_agent(name)
        # (A node that never registered has no NodeLayerCache: the wait ends at once.)
    finally:
        wait_for(lambda: name not in node_caches(cluster.kube), 60,
                 what=f"NodeLayerCache {name} deleted with its Node")
        shutil.rmtree(workdir, ignore_errors=True)


# --- LayerCache and NodeLayerCache objects ----------------------------------------------


def apply_cache(kube: Kube, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
    """Create or update LayerCache `namespace/name` with `spec` (kubectl apply)."""
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LayerCache",
         "metadata": {"name": name}, "spec": dict(spec)}))


def get_cache(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    """LayerCache `namespace/name`, or None when it does not exist."""
    try:
        obj: dict[str, Any] = kube.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "layercaches", name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return obj


def condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    """Condition `kind` of an object's status ({} when absent)."""
    found: dict[str, Any] = next((c for c in ((obj or {}).get("status") or {}).get(
        "conditions") or () if c["type"] == kind), {})
    return found


def is_ready(obj: Mapping[str, Any] | None) -> bool:
    """Ready=True for the object's current generation, every desired node ready."""
    if obj is None:
        return False
    status = obj.get("status") or {}
    nodes = status.get("nodes") or {}
    return (condition(obj, "Ready").get("status") == "True"
            and status.get("observedGeneration") == obj["metadata"]["generation"]
            and nodes.get("desired", 0) > 0 and nodes.get("ready") == nodes.get("desired"))


def wait_cache(kube: Kube, namespace: str, name: str, probe: Callable[[dict[str, Any]], bool],
               what: str, cluster: LayerCacheCluster | None = None, timeout: float = 120
               ) -> dict[str, Any]:
    """Poll LayerCache `namespace/name` until `probe(obj)`; returns the object.

    With `cluster`, fails at once (AssertionError) when a product process exited.

    Raises:
        TimeoutError: after `timeout` seconds; the message ends with the last status seen
            (conditions, nodes, chains), which is what a failed CI run has to go on.

    """
    seen: list[dict[str, Any] | None] = [None]

    def check() -> dict[str, Any] | None:
        if cluster is not None:
            assert not cluster.alive(), f"exited: {cluster.alive()}"
        seen[0] = obj = get_cache(kube, namespace, name)
        return obj if obj is not None and probe(obj) else None
    try:
        return wait_for(check, timeout, 0.5, f"LayerCache {namespace}/{name}: {what}")
    except TimeoutError as exc:
        status = (seen[0] or {}).get("status") or {}
        last = {k: status.get(k) for k in ("conditions", "nodes", "chains", "images")}
        raise TimeoutError(f"{exc}; last status: {json.dumps(last)[:4000]}") from None


def node_caches(kube: Kube) -> dict[str, dict[str, Any]]:
    """Every NodeLayerCache by name."""
    items = kube.custom.list_cluster_custom_object(GROUP, VERSION, "nodelayercaches")["items"]
    return {i["metadata"]["name"]: i for i in items}


def events(kube: Kube, namespace: str, name: str, reason: str) -> list[Any]:
    """Events about object `name` in `namespace` with `reason` (core/v1)."""
    found = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},reason={reason}").items
    return list(found)


def delete_caches(kube: Kube, namespace: str, timeout: float = 60) -> None:
    """Delete every LayerCache in `namespace` and wait until the operator let them go."""
    kube.kubectl("-n", namespace, "delete", "layercaches", "--all", "--wait=false")

    def gone() -> bool:
        listed = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                           "layercaches")
        return not listed["items"]
    wait_for(gone, timeout, 0.5, f"LayerCaches in {namespace} deleted (finalizer released)")


def wait_released(kube: Kube, names: Iterable[str], timeout: float = 60) -> None:
    """Wait until nodes `names` want no layers and their agents have acted on that."""
    def released() -> bool:
        caches = node_caches(kube)
        for name in names:
            obj = caches.get(name)
            if obj is None:
                continue
            status = obj.get("status") or {}
            if (obj.get("spec") or {}).get("layers") or status.get(
                    "observedGeneration") != obj["metadata"]["generation"] or (
                    status.get("layers") or {}).get("wanted"):
                return False
        return True
    wait_for(released, timeout, 0.5, "every node releases its layers")


# --- containerd, through the content API ------------------------------------------------


def _run(socket: str, work: Callable[[ContentStore], Coroutine[Any, Any, T]]) -> T:
    async def main() -> T:
        async with ContentStore(socket) as store:
            return await work(store)
    return asyncio.run(main())


def blob_infos(socket: str, digests: Iterable[str]) -> dict[str, BlobInfo | None]:
    """Digest → its blob in the node's `k8s.io` content store (None when absent)."""
    wanted = list(digests)

    async def work(store: ContentStore) -> dict[str, BlobInfo | None]:
        return {d: await store.info(d) for d in wanted}
    return _run(socket, work)


def ingest_refs(socket: str) -> list[str]:
    """Refs of every ingest in progress in the node's `k8s.io` namespace."""
    async def work(store: ContentStore) -> list[str]:
        return [s.ref for s in await store.list_statuses()]
    return _run(socket, work)


def pinned_chain_usage(socket: str) -> dict[str, int]:
    """Chain ID → bytes on disk (containerd's Snapshots.Usage) of each chain a cache pins.

    The chains are the committed snapshots layercache manages that carry containerd's
    ``gc.root`` label (what the agent's unpacking sets while a cache wants a chain),
    read through containerd's API: the figure the agents' disk metrics must equal.
    """
    async def work(store: ContentStore) -> dict[str, int]:
        snapshots = Snapshots(socket, channel=store.channel)
        return {s.name: (await snapshots.usage(s.name)).size for s in await snapshots.list()
                if s.committed and is_managed(s.labels) and GC_ROOT_LABEL in s.labels}
    return _run(socket, work)


async def remove_managed_snapshots(snapshots: Snapshots) -> None:
    """Remove layercache's snapshots (chains) and every snapshot above them, children first.

    Earlier tests leave snapshots on top of our chains (a CRI pull of an app image whose
    image record went, its snapshots not yet collected by containerd's GC): containerd
    refuses to remove a parent before its children, so the leaves go first, round by round.

    Raises:
        TimeoutError: snapshots still stand after 128 rounds (something keeps adding them).

    """
    for _ in range(128):
        infos = await snapshots.list()
        parent = {info.name: info.parent for info in infos}
        ours = {info.name for info in infos if is_managed(info.labels)}

        def doomed(name: str, ours: set[str] = ours, parent: dict[str, str] = parent) -> bool:
            while name:
                if name in ours:
                    return True
                name = parent.get(name, "")
            return False

        parents = set(parent.values())
        leaves = [name for name in parent if doomed(name) and name not in parents]
        if not leaves:
            return
        for name in leaves:
            await snapshots.remove(name)  # absent (containerd's GC was first): fine
    raise TimeoutError("layercache's snapshots still stand after 128 rounds of removal")


def clear_family(socket: str, digests: Iterable[str]) -> None:
    """Forget the image family on a node: images, blobs, our ingests, leases and chains.

    Chains (the snapshots layercache unpacked) go with every snapshot above them
    (`remove_managed_snapshots`). For use between
    product runs: a test that measures upstream bytes needs nodes that do not hold the
    layers already, and one that times a pull needs them not unpacked.
    """
    doomed = list(digests)

    async def work(store: ContentStore) -> None:
        cri = CRIImages(socket, channel=store.channel)
        for image in await cri.list():
            if any("/family/" in n for n in (*image.repo_tags, *image.repo_digests)):
                await cri.remove(image.id)
        for ingest in await store.list_statuses():
            if ingest.ref.startswith("layercache-"):
                await store.abort(ingest.ref)
        for lease in await store.leases.list([f'labels."{MANAGED_BY_LABEL}"=={MANAGED_BY}']):
            await store.leases.delete(lease.id, missing_ok=True, sync=True)
        for digest in doomed:
            with contextlib.suppress(NotFound):  # absent, or collected by containerd's GC
                await store.delete(digest)
        await remove_managed_snapshots(Snapshots(socket, channel=store.channel))
    _run(socket, work)
