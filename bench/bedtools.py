"""What the benchmark scenarios share on the test bed.

A throwaway bed, layercache on chosen nodes, warm-time probes, and the proxy's byte counts
split into layers, configs and manifests.

Everything runs against the real bed (`testbed.bed.TestBed`) and the real product processes
(`testbed.e2e.LayerCacheCluster`); nothing here simulates a component. A scenario opens
`bench_bed(...)`, which tears the bed and every product process down on the way out, also
when the scenario fails.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from testbed.bed import BedState, NodeRecord, TestBed
from testbed.e2e import (
    GROUP,
    VERSION,
    LayerCacheCluster,
    apply_cache,
    clear_family,
    delete_caches,
    node_caches,
    wait_released,
)
from testbed.faultproxy import FaultProxy, ProxyStats
from testbed.images import Family
from testbed.kube import Kube, wait_for
from testbed.procs import tcp_open
from testbed.product import NAMESPACE, install

#: Label the benchmarks put on the nodes a LayerCache should select (its nodeSelector).
SELECT_LABEL = "bench.layercache.dev/selected"
#: The namespace benchmark LayerCaches live in.
CACHE_NAMESPACE = "default"
#: A 20 MB/s uplink (10^6 bytes, as networks count), the throttled scenarios' cap.
RATE_20MB = 20_000_000


@dataclass
class Bench:
    """A running bed with its admin clients and the product's processes.

    `cluster.agents` holds the agents running now; `agent_env` are extra ``LAYERCACHE_*``
    settings every agent started through `start_agents` gets (recorded in the results).
    """

    bed: TestBed
    state: BedState
    kube: Kube
    family: Family
    proxy: FaultProxy
    cluster: LayerCacheCluster
    agent_env: dict[str, str] = field(default_factory=dict)

    @property
    def nodes(self) -> list[NodeRecord]:
        """The bed's nodes, in index order."""
        return self.state.nodes

    def image_refs(self, names: Iterable[str]) -> list[str]:
        """`proxy-host/family/<name>:v1` for each family image name: pulled through the proxy."""
        return [f"{self.proxy.host}/{self.family.images[n].reference}" for n in names]

    def start_product(self) -> None:
        """Install the manifests and start the operator (no agents yet)."""
        install(self.kube, "rbac-operator.yaml", "rbac-agent.yaml")
        self.cluster.start_operator()
        wait_for(lambda: self.kube.core.list_namespaced_secret(
            NAMESPACE, field_selector="metadata.name=layercache-peer-token").items,
            what="the peer token Secret")

    def start_agents(self, nodes: Sequence[NodeRecord], timeout: float = 60) -> None:
        """Start an agent on each of `nodes` and wait until every one serves its peer port.

        `agent_env` reaches them through the environment (product.start_agent passes the
        parent's environment on; its own fixed settings win over ours).
        """
        saved = {k: os.environ.get(k) for k in self.agent_env}
        os.environ.update(self.agent_env)
        try:
            ports = {}
            for node in nodes:
                self.cluster.start_agent(node)
                ports[node.name] = self._peer_port(node)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        wait_for(lambda: all(tcp_open(p) for p in ports.values()), timeout, 0.2,
                 "every agent's peer server listening")

    def _peer_port(self, node: NodeRecord) -> int:
        # product.start_agent returns the peer port, LayerCacheCluster keeps only the
        # process: read it back from the environment the process was started with.
        agent = self.cluster.agents[node.name]
        assert agent.env is not None
        return int(agent.env["LAYERCACHE_PEER_PORT"])

    def stop_agents(self) -> None:
        """Stop every running agent."""
        for name in list(self.cluster.agents):
            self.cluster.stop_agent(name)

    def select(self, nodes: Sequence[NodeRecord]) -> None:
        """Label exactly `nodes` with `SELECT_LABEL` (and unlabel the others)."""
        chosen = {n.name for n in nodes}
        for node in self.nodes:
            value = "true" if node.name in chosen else None
            self.kube.core.patch_node(node.name, {"metadata": {"labels": {SELECT_LABEL: value}}})

    def apply(self, name: str, images: Sequence[str]) -> None:
        """Apply LayerCache `name` (mode Layers) for `images` on the selected nodes."""
        apply_cache(self.kube, CACHE_NAMESPACE, name, {
            "images": list(images), "nodeSelector": {SELECT_LABEL: "true"}, "mode": "Layers"})

    def release(self) -> None:
        """Delete every benchmark LayerCache; wait until the nodes with agents let go of it.

        Nodes without a running agent cannot report and are not waited for.
        """
        delete_caches(self.kube, CACHE_NAMESPACE)
        wait_released(self.kube, list(self.cluster.agents))

    def clear(self, nodes: Sequence[NodeRecord] | None = None) -> None:
        """Forget the image family on `nodes` (default all): CRI images, blobs, our leases."""
        digests = [layer.digest for layer in self.family.layers]
        for node in nodes if nodes is not None else self.nodes:
            clear_family(node.socket, digests)


@contextlib.contextmanager
def bench_bed(name: str, nodes: int) -> Iterator[Bench]:
    """A fresh bed of `nodes` nodes in its own temporary directory, for one scenario.

    On exit (also on error) the product processes stop, then the bed, and its directory is
    removed. Raises what `TestBed.up` raises when the bed cannot start.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"layercache-bench-{name}-"))
    bed = TestBed(workdir, nodes=nodes)
    with contextlib.ExitStack() as stack:
        stack.callback(bed.down)
        state = bed.up()
        kube = Kube(Path(state.kubeconfig))
        stack.callback(kube.close)
        proxy = FaultProxy(state.proxy_url or "")
        stack.callback(proxy.close)
        family = Family.load(Path(state.family or "").parent)
        cluster = LayerCacheCluster(state, kube, workdir / "layercache")
        stack.callback(cluster.stop)
        yield Bench(bed, state, kube, family, proxy, cluster)


def wait_warm(kube: Kube, nodes: Sequence[str], layers: int, timeout: float = 600,
              interval: float = 0.2) -> float:
    """Poll NodeLayerCache status until each of `nodes` holds its `layers` planned layers.

    A node counts once its spec lists `layers` layers and its agent reported, for that
    spec's generation, that it holds all of them. Returns `time.monotonic()` when the last
    node got there (as seen by this poll: at most `interval` late).

    Raises:
        TimeoutError: not all warm after `timeout` seconds.
    """
    def warm() -> float | None:
        caches = node_caches(kube)
        for name in nodes:
            obj = caches.get(name) or {}
            status = obj.get("status") or {}
            held = (status.get("layers") or {}).get("held")
            if (len((obj.get("spec") or {}).get("layers") or []) != layers
                    or status.get("observedGeneration") != obj["metadata"]["generation"]
                    or held != layers):
                return None
        return time.monotonic()
    return wait_for(warm, timeout, interval, f"{list(nodes)} hold {layers} layers each")


def node_status(kube: Kube, name: str) -> dict[str, Any]:
    """NodeLayerCache `name`'s status ({} when it has none, or does not exist yet)."""
    try:
        obj: dict[str, Any] = kube.custom.get_cluster_custom_object(
            GROUP, VERSION, "nodelayercaches", name)
    except ApiException as error:
        if error.status == 404:
            return {}
        raise
    return obj.get("status") or {}


@dataclass(frozen=True)
class ByteSplit:
    """The proxy's response body bytes by kind (bytes): what upstream served.

    `layers`: blobs that are family layers; `configs`: blobs that are image configs;
    `manifests`: manifest (and index) bodies; `other`: anything else (e.g. error bodies).
    """

    layers: int
    configs: int
    manifests: int
    other: int

    @property
    def total(self) -> int:
        """Every body byte relayed."""
        return self.layers + self.configs + self.manifests + self.other


def split_bytes(stats: ProxyStats, family: Family) -> ByteSplit:
    """Split the proxy's per-path byte counts by what each path served (`ByteSplit`)."""
    layers = {layer.digest for layer in family.layers}
    configs = {m.config_digest for image in family.images.values()
               for m in image.runnable_manifests()}
    kinds = dict.fromkeys(("layers", "configs", "manifests", "other"), 0)
    for path, count in stats.bytes_by_path.items():
        tail = path.rsplit("/", 1)[-1]
        if "/blobs/" in path and tail in layers:
            kinds["layers"] += count
        elif "/blobs/" in path and tail in configs:
            kinds["configs"] += count
        elif "/manifests/" in path:
            kinds["manifests"] += count
        else:
            kinds["other"] += count
    return ByteSplit(**kinds)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # proc(5): utime and stime are fields 14 and 15; [0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_component(bench: Bench) -> dict[str, float]:
    """CPU seconds used so far, by component: agents, operator, containerd, the rest.

    The difference of two calls is where a run's CPU time went (the profile of a run on a
    machine whose few cores every component shares).
    """
    pids = {f"agent[{name}]": p.pid for name, p in bench.cluster.agents.items()}
    if bench.cluster.operator is not None:
        pids["operator"] = bench.cluster.operator.pid
    pids |= {rec.name: rec.pid for rec in bench.state.processes}
    out: dict[str, float] = {}
    for name, pid in pids.items():
        # agent[node] and containerd[node] → one figure per kind; faultproxy-PORT too.
        group = name.split("[", 1)[0]
        group = next((g for g in ("faultproxy", "docker-registry") if group.startswith(g)),
                     group)
        out[group] = out.get(group, 0.0) + _cpu_seconds(pid)
    return out


def median(values: Sequence[float]) -> float:
    """The median of `values` (seconds or bytes)."""
    return float(statistics.median(values))


def rounded(figures: Mapping[str, float], digits: int = 3) -> dict[str, float]:
    """`figures` with every value rounded to `digits` decimals, for readable JSON."""
    return {k: round(v, digits) for k, v in figures.items()}
