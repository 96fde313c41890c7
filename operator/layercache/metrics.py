"""Every Prometheus metric of layercache, one section per component.

Conventions (client_python docs; STYLE.md habit 6): prefix ``layercache_``, base units in
the name (``_bytes``, ``_seconds``, ``_total``), bounded labels only — ``node``, ``source``
(``upstream`` | ``peer``), ``result``, ``reason``, ``registry`` (a registry host, as in
image references) and ``code`` (an HTTP status code) — never a digest, an image name, a
path or a query. Each
component registers its metrics on the `CollectorRegistry` it is given, so a test builds
its own registry and reads it with ``get_sample_value``. Gauges derived from state come
from a collector evaluated at scrape time, not from values pushed as things change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from layercache.api import LC_KIND, InvalidObjectError, LayerCacheStatus

log = logging.getLogger(__name__)

__all__ = ["DISK_HELP", "AgentGauges", "AgentMetrics", "CacheStatuses", "FetchSource",
           "OperatorMetrics", "RegistryMetrics"]

# --- operator leadership ---------------------------------------------------------------------

def leader_gauge(registry: CollectorRegistry) -> Gauge:
    """``layercache_operator_leader`` on ``registry``: 1 while this replica leads, else 0.

    The leader holds the Lease and runs kopf (`layercache.controller.main`); a standby exports
    only this gauge of the operator's own metrics, so every replica answers a scrape (or
    `helm test` through the metrics Service) with ``layercache_operator_*``, and
    ``max(layercache_operator_leader) == 1`` says one replica leads.
    """
    return Gauge("layercache_operator_leader",
                 "1 while this operator replica holds the leader Lease (runs the control "
                 "loops), 0 while it stands by", registry=registry)


# --- registry client (operator and agent) ---------------------------------------------------


class RegistryMetrics:
    """``layercache_registry_requests_total{registry, code}`` on ``registry``.

    One count per HTTP request the registry client sends (token requests excluded), by
    registry host (``Reference.registry``, e.g. ``docker.io`` or ``127.0.0.1:5000``; a
    blob redirected to a storage host counts for its registry) and status ``code``
    (``"200"``, ``"429"`` …, or ``"error"`` when no answer came). Pass `request` as
    `layercache.registry.hosts.RegistryHosts`'s ``on_response``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "layercache_registry_requests",
            "HTTP requests sent to registries, by registry host and status code "
            "('error': no answer).",
            ["registry", "code"], registry=registry)

    def request(self, host: str, code: str) -> None:
        """Count one request to registry ``host`` answered ``code``."""
        self.requests.labels(host, code).inc()


# --- agent ---------------------------------------------------------------------------------

#: Where a layer's bytes came from.
FetchSource = Literal["upstream", "peer"]

#: Ingest durations span a 50 kB layer from a peer to a multi-GB one from a slow registry.
INGEST_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                         600.0, 1800.0)


#: Help of the disk-savings gauges (agent per node, operator per cache): what sharing saves
#: is containerd's content addressing at work; layercache plans it and measures it.
DISK_HELP: Final = {
    "disk": "Bytes on disk of the wanted layer blobs (kind=blobs, content sizes) and unpacked "
            "chain snapshots (kind=snapshots, Snapshots.Usage) layercache holds; each stored "
            "once however many images share it (containerd's content addressing).",
    "separate": "Bytes the planned images' layers and unpacked chains would take stored "
                "separately per image (no sharing).",
    "saved": "Disk bytes saved by sharing read-only layers and chains: separate minus blobs "
             "and snapshots. containerd's content addressing shares them; layercache plans "
             "which are held and measures this.",
}


@dataclass(frozen=True)
class AgentGauges:
    """What the node holds right now, for the agent's scrape-time gauges.

    ``layers_wanted``/``layers_held``: counts; ``bytes_held``: bytes of held wanted layers;
    ``disk_pressure``: fetching stopped for lack of space; ``chains_wanted``/
    ``chains_unpacked``: chains to unpack and those committed; ``unpacked_bytes``:
    uncompressed bytes the agent extracted into them; ``disk_blobs``/``disk_snapshots``/
    ``disk_separate``/``disk_saved``: the node's disk-savings figures in bytes
    (`layercache.agent.status.disksavings`; 0 until measured).
    """

    layers_wanted: int
    layers_held: int
    bytes_held: int
    disk_pressure: bool
    chains_wanted: int = 0
    chains_unpacked: int = 0
    unpacked_bytes: int = 0
    disk_blobs: int = 0
    disk_snapshots: int = 0
    disk_separate: int = 0
    disk_saved: int = 0


class _AgentGaugeCollector(Collector):
    def __init__(self, node: str, snapshot: Callable[[], AgentGauges]) -> None:
        self.node = node
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        now = self.snapshot()
        for name, doc, value in (
            ("layercache_agent_layers_wanted", "Layers this node should hold.",
             now.layers_wanted),
            ("layercache_agent_layers_held", "Wanted layers the node's containerd holds.",
             now.layers_held),
            ("layercache_agent_held_bytes", "Bytes of the wanted layers the node holds.",
             now.bytes_held),
            ("layercache_agent_disk_pressure",
             "1 while fetching is stopped because the image filesystem is nearly full.",
             int(now.disk_pressure)),
            ("layercache_agent_chains_wanted",
             "Layer chains this node should have unpacked in its snapshotter.",
             now.chains_wanted),
            ("layercache_agent_chains_unpacked",
             "Wanted chains committed in the node's snapshotter.", now.chains_unpacked),
            ("layercache_agent_unpacked_bytes",
             "Uncompressed bytes the agent extracted into the wanted chains' snapshots.",
             now.unpacked_bytes),
        ):
            family = GaugeMetricFamily(name, doc, labels=["node"])
            family.add_metric([self.node], value)
            yield family
        disk = GaugeMetricFamily("layercache_agent_disk_bytes", DISK_HELP["disk"],
                                 labels=["node", "kind"])
        disk.add_metric([self.node, "blobs"], now.disk_blobs)
        disk.add_metric([self.node, "snapshots"], now.disk_snapshots)
        yield disk
        for name, value in (("separate", now.disk_separate), ("saved", now.disk_saved)):
            family = GaugeMetricFamily(f"layercache_agent_disk_{name}_bytes", DISK_HELP[name],
                                       labels=["node"])
            family.add_metric([self.node], value)
            yield family


class AgentMetrics:
    """The node agent's metrics on ``registry``, every series labelled with ``node``.

    Counters: ``layercache_agent_fetched_bytes_total{source}``,
    ``layercache_agent_served_bytes_total`` (to peers), ``layercache_agent_errors_total
    {reason}``; histogram ``layercache_agent_ingest_duration_seconds{source, result}``
    (one observation per layer write, ``result`` ``ok`` or ``error``);
    ``layercache_agent_unpack_duration_seconds{result}`` (one per chain unpacked); once `track` is
    called, the gauges of `AgentGauges`; and `registry_requests` (`RegistryMetrics`, the
    one series family without ``node``: the same family as the operator's).
    """

    def __init__(self, node: str, registry: CollectorRegistry) -> None:
        self.node = node
        self.registry = registry
        self.fetched_bytes = Counter(
            "layercache_agent_fetched_bytes", "Layer bytes received, by source.",
            ["node", "source"], registry=registry)
        self.served_bytes = Counter(
            "layercache_agent_served_bytes", "Layer bytes served to peer agents.",
            ["node"], registry=registry)
        self.errors = Counter(
            "layercache_agent_errors", "Failures, by reason (CamelCase, as in status).",
            ["node", "reason"], registry=registry)
        self.ingest_duration = Histogram(
            "layercache_agent_ingest_duration_seconds",
            "Time to write one layer into containerd, transfer included.",
            ["node", "source", "result"], buckets=INGEST_BUCKETS, registry=registry)
        self.unpack_duration = Histogram(
            "layercache_agent_unpack_duration_seconds",
            "Time to unpack one layer chain into the snapshotter (its missing layers).",
            ["node", "result"], buckets=INGEST_BUCKETS, registry=registry)
        # Zero series exist before the first byte or ingest: rate() and histogram_quantile()
        # only see increases after a series' first scrape, so a series born at its first
        # observation would hide that observation from the dashboard.
        for source in ("upstream", "peer"):
            self.fetched_bytes.labels(node, source)
            for result in ("ok", "error"):
                self.ingest_duration.labels(node, source, result)
        self.served_bytes.labels(node)
        for result in ("ok", "error"):
            self.unpack_duration.labels(node, result)
        self.registry_requests = RegistryMetrics(registry)

    def fetched(self, source: FetchSource, size: int) -> None:
        """Count ``size`` bytes received from ``source``."""
        self.fetched_bytes.labels(self.node, source).inc(size)

    def served(self, size: int) -> None:
        """Count ``size`` bytes sent to a peer."""
        self.served_bytes.labels(self.node).inc(size)

    def error(self, reason: str) -> None:
        """Count one failure of ``reason``."""
        self.errors.labels(self.node, reason).inc()

    def ingested(self, source: FetchSource, ok: bool, seconds: float) -> None:
        """Record one layer write from ``source`` that took ``seconds``."""
        self.ingest_duration.labels(self.node, source, "ok" if ok else "error").observe(seconds)

    def unpacked(self, ok: bool, seconds: float) -> None:
        """Record one chain unpack that took ``seconds``."""
        self.unpack_duration.labels(self.node, "ok" if ok else "error").observe(seconds)

    def track(self, snapshot: Callable[[], AgentGauges]) -> None:
        """Export the gauges of `AgentGauges`, read from ``snapshot`` at each scrape."""
        self.registry.register(_AgentGaugeCollector(self.node, snapshot))


# --- operator ------------------------------------------------------------------------------

#: A cache's status figures at scrape time: ("namespace/name", its status dict).
CacheStatuses = Callable[[], list[tuple[str, dict[str, Any]]]]

#: Status byte counts exported per cache, status key → metric name suffix.
_CACHE_BYTES: Final = {"unique": "unique", "naive": "naive", "expectedUpstream":
                       "expected_upstream", "upstream": "upstream", "peer": "peer",
                       "saved": "saved"}


class _CacheCollector(Collector):
    """Per-cache gauges read from the operator's last written statuses at scrape time."""

    def __init__(self, statuses: CacheStatuses) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        byte_families = {
            key: GaugeMetricFamily(f"layercache_cache_{name}_bytes",
                                   f"Compressed layer bytes: {key} (LayerCache status.bytes; "
                                   "definitions: docs/observability.md, Savings).",
                                   labels=["cache"])
            for key, name in _CACHE_BYTES.items()}
        nodes = GaugeMetricFamily("layercache_cache_nodes", "Nodes of a cache, by state.",
                                  labels=["cache", "state"])
        shared = GaugeMetricFamily("layercache_cache_shared_layers",
                                   "Layers used by two or more of a cache's images.",
                                   labels=["cache"])
        ready = GaugeMetricFamily("layercache_cache_ready",
                                  "1 when the cache's Ready condition is True.",
                                  labels=["cache"])
        degraded = GaugeMetricFamily("layercache_cache_degraded",
                                     "1 when the cache's Degraded condition is True.",
                                     labels=["cache"])
        statuses = [(cache, _read(cache, status)) for cache, status in self._statuses()]
        for cache, status in statuses:
            for key, family in byte_families.items():
                family.add_metric([cache], float(getattr(status.bytes, _CACHE_BYTES[key])))
            nodes.add_metric([cache, "desired"], float(status.nodes.desired))
            nodes.add_metric([cache, "ready"], float(status.nodes.ready))
            shared.add_metric([cache], float(status.layers.shared))
            conditions = {c.type: c.status for c in status.conditions}
            ready.add_metric([cache], 1.0 if conditions.get("Ready") == "True" else 0.0)
            degraded.add_metric([cache], 1.0 if conditions.get("Degraded") == "True" else 0.0)
        yield from byte_families.values()
        yield from (nodes, shared, ready, degraded)
        yield from _cache_disk(statuses)


def _read(cache: str, status: Mapping[str, Any]) -> LayerCacheStatus:
    """A written LayerCache status as the model; one that does not read counts as empty."""
    try:
        return LayerCacheStatus.from_dict(status, LC_KIND, cache, "status")
    except InvalidObjectError as error:
        log.warning("%s; metrics read it as empty", error)
        return LayerCacheStatus()


def _cache_disk(statuses: list[tuple[str, LayerCacheStatus]]) -> Iterator[Metric]:
    """``layercache_cache_disk_*`` from each cache's ``status.disk`` (absent: 0)."""
    disk = GaugeMetricFamily("layercache_cache_disk_bytes", DISK_HELP["disk"] + " Summed "
                             "over the cache's nodes (LayerCache status.disk).",
                             labels=["cache", "kind"])
    separate = GaugeMetricFamily("layercache_cache_disk_separate_bytes", DISK_HELP["separate"],
                                 labels=["cache"])
    saved = GaugeMetricFamily("layercache_cache_disk_saved_bytes", DISK_HELP["saved"],
                              labels=["cache"])
    for cache, status in statuses:
        figures = status.disk
        for kind in ("blobs", "snapshots"):
            disk.add_metric([cache, kind], float(getattr(figures, kind)))
        separate.add_metric([cache], float(figures.separate))
        saved.add_metric([cache], float(figures.saved))
    yield from (disk, separate, saved)


class OperatorMetrics:
    """The operator's metrics on ``registry``.

    Counters ``layercache_operator_replans_total{result}`` (``ok``/``error``),
    ``layercache_operator_node_spec_writes_total``,
    ``layercache_operator_resolve_errors_total{reason}``,
    ``layercache_registry_requests_total{registry, code}`` (`registry_requests`); histogram
    ``layercache_operator_replan_duration_seconds``; gauge
    ``layercache_operator_node_layers_planned{node}`` (`planned`); and per-cache gauges
    (``layercache_cache_*``, label ``cache`` = "namespace/name") from `statuses` at scrape
    time.
    """

    def __init__(self, registry: CollectorRegistry, statuses: CacheStatuses) -> None:
        self.replans = Counter("layercache_operator_replans",
                               "Cluster replans, by result.", ["result"], registry=registry)
        self.spec_writes = Counter("layercache_operator_node_spec_writes",
                                   "NodeLayerCache specs created or changed.", registry=registry)
        self.resolve_errors = Counter("layercache_operator_resolve_errors",
                                      "Images that failed to resolve, by reason.", ["reason"],
                                      registry=registry)
        self.replan_duration = Histogram("layercache_operator_replan_duration_seconds",
                                         "Time of one replan (plan, distribute, writes).",
                                         registry=registry)
        # What the agents are compared with: a node planned layers but with no agent
        # reporting is an agent that never started (alert LayerCacheAgentMissing).
        self.node_layers_planned = Gauge(
            "layercache_operator_node_layers_planned",
            "Layers the last plan gives a node (nodes with none: no series).", ["node"],
            registry=registry)
        self.registry_requests = RegistryMetrics(registry)
        for result in ("ok", "error"):
            self.replans.labels(result)
        registry.register(_CacheCollector(statuses))

    def planned(self, layers: Mapping[str, int]) -> None:
        """Set the planned layers per node (node name → count); nodes with 0 get no series."""
        self.node_layers_planned.clear()
        for node, count in layers.items():
            if count:
                self.node_layers_planned.labels(node).set(count)
