"""Every Prometheus metric of layercache, one section per component.

Conventions (client_python docs; STYLE.md habit 6): prefix ``layercache_``, base units in
the name (``_bytes``, ``_seconds``, ``_total``), bounded labels only — ``node``, ``source``
(``upstream`` | ``peer``), ``result``, ``reason`` — never a digest or an image name. Each
component registers its metrics on the `CollectorRegistry` it is given, so a test builds
its own registry and reads it with ``get_sample_value``. Gauges derived from state come
from a collector evaluated at scrape time, not from values pushed as things change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["AgentGauges", "AgentMetrics", "FetchSource"]

# --- agent ---------------------------------------------------------------------------------

#: Where a layer's bytes came from.
FetchSource = Literal["upstream", "peer"]

#: Ingest durations span a 50 kB layer from a peer to a multi-GB one from a slow registry.
INGEST_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                         600.0, 1800.0)


@dataclass(frozen=True)
class AgentGauges:
    """What the node holds right now, for the agent's scrape-time gauges.

    ``layers_wanted``/``layers_held``: counts; ``bytes_held``: bytes of held wanted layers;
    ``disk_pressure``: fetching stopped for lack of space.
    """

    layers_wanted: int
    layers_held: int
    bytes_held: int
    disk_pressure: bool


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
        ):
            family = GaugeMetricFamily(name, doc, labels=["node"])
            family.add_metric([self.node], value)
            yield family


class AgentMetrics:
    """The node agent's metrics on ``registry``, every series labelled with ``node``.

    Counters: ``layercache_agent_fetched_bytes_total{source}``,
    ``layercache_agent_served_bytes_total`` (to peers), ``layercache_agent_errors_total
    {reason}``; histogram ``layercache_agent_ingest_duration_seconds{source, result}``
    (one observation per layer write, ``result`` ``ok`` or ``error``); and, once
    `track` is called, the gauges of `AgentGauges`.
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
        for source in ("upstream", "peer"):  # zero series exist before the first byte
            self.fetched_bytes.labels(node, source)
        self.served_bytes.labels(node)

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

    def track(self, snapshot: Callable[[], AgentGauges]) -> None:
        """Export the gauges of `AgentGauges`, read from ``snapshot`` at each scrape."""
        self.registry.register(_AgentGaugeCollector(self.node, snapshot))
