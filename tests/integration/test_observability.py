"""The dashboard and alert rules against a real Prometheus that scraped a real run.

The operator and one agent per node run on the bed (`testbed.e2e.LayerCacheCluster`);
Debian's `prometheus` scrapes them every second with the chart's alert rules loaded. The
module applies a cache that gets Ready (one of its layers corrupted twice by the fault
proxy, so the agents record errors and failed ingests) and a cache naming an image that
does not exist (a resolve error: not Ready, Degraded). Then every query of the dashboard
and every alert expression is evaluated, and — last — one agent is stopped so the
agent-down rule has something to find, and a node joins on which no agent is ever started
so the agent-missing rule has something to find. The panel-by-panel picture of what the dashboard
shows goes to out/observe/dashboard-snapshot.txt.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from layercache.oci.digest import Digest, chain_ids
from testbed.bed import BedState
from testbed.e2e import (
    LayerCacheCluster,
    apply_cache,
    clear_family,
    condition,
    delete_caches,
    get_cache,
    is_ready,
    joined_node,
    node_caches,
    pinned_chain_usage,
    wait_cache,
    wait_released,
)
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube, wait_for
from testbed.observe import ALERTS, DASHBOARD, describe, model, rules
from testbed.observe.prometheus import PrometheusServer
from testbed.paths import REPO

pytestmark = pytest.mark.integration

SNAPSHOT = REPO / "out" / "observe" / "dashboard-snapshot.txt"
OPERATOR_JOB, AGENT_JOB = "layercache-operator", "layercache-agent"
#: Rules whose condition the provoked situation makes true (the rest must stay quiet).
FIRING = {"LayerCacheNotReady", "LayerCacheDegraded"}


@dataclass
class Observed:
    """The running product, its Prometheus, and what the module provoked."""

    cluster: LayerCacheCluster
    prometheus: PrometheusServer
    namespace: str
    good: dict[str, Any]
    started: float

    def rate_interval(self) -> str:
        """A `$__rate_interval` covering the whole run (every sample since the start)."""
        return f"{math.ceil(time.monotonic() - self.started) + 5}s"


@pytest.fixture(scope="module")
def observed(bed: BedState, kube: Kube, family: Family,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """Operator, agents and Prometheus up; a Ready cache (after errors) and a broken one."""
    _empty_nodes(bed, family)  # what earlier modules left must not count as already held
    workdir = tmp_path_factory.mktemp("observe")
    cluster = LayerCacheCluster(bed, kube, workdir / "product")
    namespace = f"observe-{uuid.uuid4().hex[:6]}"
    proxy = FaultProxy(bed.proxy_url or "")
    prometheus: PrometheusServer | None = None
    begun = time.monotonic()
    try:
        with pytest.MonkeyPatch.context() as env:  # a corrupted layer is retried within 1 s
            env.setenv("LAYERCACHE_RETRY_INITIAL_SECONDS", "1")
            env.setenv("LAYERCACHE_RETRY_MAX_SECONDS", "2")
            cluster.start()
        ports = cluster.metrics_ports
        prometheus = PrometheusServer(workdir / "prometheus", {
            OPERATOR_JOB: [f"127.0.0.1:{ports['operator']}"],
            AGENT_JOB: [f"127.0.0.1:{ports[n.name]}" for n in bed.nodes],
        }, [ALERTS]).start()
        started = time.monotonic()
        prometheus.wait_targets_up()
        kube.core.create_namespace({"metadata": {"name": namespace}})
        good = _provoke(bed, kube, family, proxy, cluster, namespace)
        print(f"observe: product and Prometheus up in {started - begun:.1f} s, caches "
              f"Ready/Degraded {time.monotonic() - started:.1f} s later")
        yield Observed(cluster, prometheus, namespace, good, started)
    finally:
        ending = time.monotonic()
        try:
            if prometheus is not None:
                prometheus.stop()
            proxy.reset()
            proxy.close()
            if namespace in {n.metadata.name for n in kube.core.list_namespace().items}:
                delete_caches(kube, namespace)
                kube.core.delete_namespace(namespace)
                wait_released(kube, [n.name for n in bed.nodes])
        finally:
            cluster.stop()
            kube.kubectl("delete", "nodelayercaches", "--all", "--wait=false")
            _empty_nodes(bed, family)
            print(f"observe: teardown {time.monotonic() - ending:.1f} s")


def _empty_nodes(bed: BedState, family: Family) -> None:
    """Remove the image family's blobs, images and our leases from every bed node."""
    for node in bed.nodes:
        clear_family(node.socket, [layer.digest for layer in family.layers])


def _provoke(bed: BedState, kube: Kube, family: Family, proxy: FaultProxy,
             cluster: LayerCacheCluster, namespace: str) -> dict[str, Any]:
    """Apply the good cache (a layer corrupted twice) and the broken one; wait for both."""
    host = proxy.host
    images = [f"{host}/{family.images[n].reference}" for n in ("python", "curl")]
    victim = min((family.layer(d) for d in family.images["curl"].resolve().layers),
                 key=lambda layer: layer.size)
    proxy.reset()
    proxy.add_fault(f"/blobs/{re.escape(victim.digest)}$", "corrupt", method="GET", times=2)
    apply_cache(kube, namespace, "runtimes", {"images": images})
    apply_cache(kube, namespace, "missing", {"images": [f"{host}/family/missing:v1"]})
    good = wait_cache(kube, namespace, "runtimes", is_ready, "Ready", cluster, timeout=90)
    wait_cache(kube, namespace, "missing",
               lambda o: condition(o, "Degraded").get("status") == "True", "Degraded", cluster)
    assert proxy.stats().faults_fired.get("corrupt") == 2
    return good


def _query_values(observed: Observed) -> dict[str, str]:
    dashboard = model.load(DASHBOARD)
    return {v["name"]: v["allValue"] for v in dashboard["templating"]["list"]
            if v["type"] == "query"} | {"__rate_interval": observed.rate_interval()}


def _settled(observed: Observed, expr: str, probe: object) -> None:
    """Wait until Prometheus's answer for `expr` satisfies `probe` (scrapes lag ≤ 1 s)."""
    assert callable(probe)
    seen: list[object] = []

    def check() -> object:
        seen[:] = [observed.prometheus.api.query(expr)]
        return probe(seen[0])
    try:
        wait_for(check, 15, 0.5, f"Prometheus to show {expr}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; the answer: {seen}") from None


def test_every_dashboard_query_returns_data(observed: Observed, bed: BedState,
                                            kube: Kube, family: Family) -> None:
    api = observed.prometheus.api
    status = observed.good["status"]
    saved = status["bytes"]["saved"]
    assert saved > 0
    _settled(observed, 'layercache_cache_saved_bytes{cache=~".*/runtimes"}',
             lambda s: s and s[0].value == saved)
    # Disk: python and curl share their base blob and its unpacked chain (chain ID = the
    # base layer's diff ID), each held once per node: what sharing saves is one more copy
    # of both, as containerd reports the chain's usage.
    runtimes = [family.image_layers(n) for n in ("python", "curl")]
    base = runtimes[0][0]
    blobs = sum({ly.digest: ly.size for layers in runtimes for ly in layers}.values())
    chains = {node.name: pinned_chain_usage(node.socket) for node in bed.nodes}
    wanted = {str(c) for layers in runtimes for c in chain_ids(Digest(ly.diff_id) for ly in layers)}
    assert all(set(usage) == wanted for usage in chains.values()), chains  # base, python, curl
    saved_on = {name: base.size + usage[base.diff_id] for name, usage in chains.items()}
    disk_saved = sum(saved_on.values())
    _settled(observed, 'layercache_cache_disk_saved_bytes{cache=~".*/runtimes"}',
             lambda s: s and s[0].value == disk_saved)
    # Every chain is counted once its unpack ended (the agents measure again within seconds).
    snapshots = {name: sum(usage.values()) for name, usage in chains.items()}
    _settled(observed, 'layercache_agent_disk_bytes{kind="snapshots"}',
             lambda s: {x.labels["node"]: x.value for x in s} == snapshots)
    dashboard = model.load(DASHBOARD)
    variables = describe.variable_values(api, dashboard)
    assert set(variables["node"]) == {n.name for n in bed.nodes}
    assert set(variables["cache"]) == {f"{observed.namespace}/runtimes",
                                       f"{observed.namespace}/missing"}
    queries = describe.evaluate_dashboard(api, dashboard, _query_values(observed))
    rule_results = describe.evaluate_rules(api, rules.load(ALERTS))
    text = describe.render(dashboard, queries, variables, rule_results)
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(text)
    print(text)

    assert len(queries) == len(model.targets(dashboard)) > 0
    for query in queries:
        where = f"panel {query.target.panel!r} {query.target.ref_id}: {query.result.expr}"
        assert query.result.error is None, f"{where}: {query.result.error}"
        assert query.result.samples, f"{where}: no data"
        assert any(s.finite for s in query.result.samples), f"{where}: only NaN/Inf"

    def values(panel: str, ref: str = "A") -> dict[str, float]:
        found = next(q for q in queries if q.target.panel == panel and q.target.ref_id == ref)
        return {s.label_text(): s.value for s in found.result.samples}
    # Figures the panels show, checked against the objects the product wrote.
    assert values("Upstream bytes avoided") == {"{}": saved}
    assert values("Saving ratio")["{}"] == pytest.approx(saved / status["bytes"]["naive"])
    assert values("Caches Ready / Degraded", "A") == {"{}": 1}
    assert values("Caches Ready / Degraded", "B") == {"{}": 1}
    caches = [get_cache(kube, observed.namespace, n) or {} for n in ("runtimes", "missing")]
    for ref, key in (("A", "ready"), ("B", "desired")):  # the missing image's nodes count too
        assert values("Nodes ready / desired", ref) == {
            "{}": sum(c["status"]["nodes"][key] for c in caches)}
    by_source = values("Layer bytes received, by source")
    assert by_source['{source="upstream"}'] > 0 and by_source['{source="peer"}'] > 0
    held = {name: (obj.get("status") or {}).get("layers", {}).get("bytesHeld")
            for name, obj in node_caches(kube).items()}
    assert values("Bytes held per node") == {
        f'{{node="{n.name}"}}': held[n.name] for n in bed.nodes}
    assert all(held[n.name] > 0 for n in bed.nodes)
    assert values("Per-node progress (layers held / wanted)") == {
        f'{{node="{n.name}"}}': 1.0 for n in bed.nodes}
    # Chains: Ready waits for them, so every node has unpacked all it wants.
    assert values("Per-node chains unpacked / wanted") == {
        f'{{node="{n.name}"}}': 1.0 for n in bed.nodes}
    unpacked = {name: (obj.get("status") or {}).get("chains", {}).get("bytesUnpacked")
                for name, obj in node_caches(kube).items()}
    assert values("Bytes unpacked per node") == {
        f'{{node="{n.name}"}}': unpacked[n.name] for n in bed.nodes}
    assert all(unpacked[n.name] > 0 for n in bed.nodes)
    assert values("Chain unpack time (p50, p95) and failures", "A")["{}"] > 0
    errors = values("Agent errors since start, by node and reason")
    assert any('reason="DigestMismatch"' in k and v >= 1 for k, v in errors.items()), errors
    assert values("Image resolve errors, by reason"), "the missing image's reason"
    assert values("Operator replans, by result")['{result="ok"}'] > 0
    disk_panel = "Disk per node: on disk, stored separately, saved by sharing"
    assert values(disk_panel, "A") == {
        f'{{kind="{kind}", node="{n.name}"}}': value for n in bed.nodes
        for kind, value in (("blobs", blobs), ("snapshots", snapshots[n.name]))}
    # Stored separately: each image its blobs and its chains, so the base's twice.
    assert values(disk_panel, "B") == {
        f'{{node="{n.name}"}}': blobs + snapshots[n.name] + saved_on[n.name] for n in bed.nodes}
    assert values(disk_panel, "C") == {f'{{node="{n.name}"}}': saved_on[n.name]
                                       for n in bed.nodes}
    per_cache = values("Disk saved by sharing, per cache")
    assert per_cache == {f'{{cache="{observed.namespace}/runtimes"}}': disk_saved,
                         f'{{cache="{observed.namespace}/missing"}}': 0}


def test_every_alert_expression_evaluates(observed: Observed) -> None:
    api = observed.prometheus.api
    results = {r.rule.alert: r for r in describe.evaluate_rules(api, rules.load(ALERTS))}
    assert set(results) >= FIRING | {"LayerCacheAgentDown", "LayerCacheNodeCannotIngest"}
    for name, result in results.items():
        assert result.result.error is None, f"{name}: {result.result.error}"
        assert result.operands, f"{name}: no operand found in {result.rule.expr}"
        for operand in result.operands:
            assert operand.error is None, f"{name}: {operand.expr}: {operand.error}"
            assert operand.samples, f"{name}: no series for {operand.expr}"
        if name in FIRING:
            assert result.result.samples, f"{name} should hold now"
        else:
            assert not result.result.samples, f"{name} holds: {result.result.samples}"
    missing = f'{{cache="{observed.namespace}/missing"}}'
    assert [s.label_text() for s in results["LayerCacheNotReady"].result.samples] == [missing]
    assert [s.label_text() for s in results["LayerCacheDegraded"].result.samples] == [missing]
    # The server evaluates the same rules itself: all healthy, the firing ones pending.
    def evaluated() -> list[dict[str, Any]] | None:
        found = api.alerting_rules()
        never = "0001-01-01"  # Go's zero time: not evaluated yet
        return found if len(found) == len(results) and not any(
            r.get("lastEvaluation", never).startswith(never) for r in found) else None
    server = {r["name"]: r for r in wait_for(evaluated, 10, 0.5, "every rule evaluated")}
    for name, rule in server.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        assert rule["state"] == ("pending" if name in FIRING else "inactive"), (name, rule)


def test_agent_missing_alert_finds_a_node_whose_agent_never_started(
        observed: Observed, bed: BedState, kube: Kube,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Fewer agents than nodes: a fourth node joins (containerd, a Ready Node) and no agent
    # is ever started there, as when its DaemonSet Pod is never created. It has no `up`
    # series, so LayerCacheAgentDown cannot see it; LayerCacheAgentMissing must, and only it.
    api = observed.prometheus.api
    rule = next(r for r in rules.load(ALERTS) if r.alert == "LayerCacheAgentMissing")
    # Every node that runs an agent reports (the agent-down test, next, restarts one on a
    # port Prometheus does not scrape: this test runs before it).
    assert not api.query(rule.expr)
    name = f"noagent-{uuid.uuid4().hex[:4]}"
    with joined_node(kube, bed, name, tmp_path_factory.mktemp("noagent")):
        # The operator plans the Ready cache (no node selector) onto the new node too.
        found = wait_for(lambda: api.query(rule.expr), 60, 0.5,
                         "the agent-missing alert for the node without an agent")
        assert [s.labels for s in found] == [{"node": name}]
        assert found[0].value > 0  # the layers planned for it
        up = api.query(f'up{{job="{AGENT_JOB}"}}')
        assert len(up) == len(bed.nodes)  # no `up` series for the agent never started
        down = next(r for r in rules.load(ALERTS) if r.alert == "LayerCacheAgentDown")
        assert not api.query(down.expr)
        if SNAPSHOT.exists():
            with SNAPSHOT.open("a") as out:
                out.write(f"\nA node {name} without an agent: LayerCacheAgentMissing holds "
                          f"for {found[0].label_text()} (pending for its 10m `for`)\n")
    # The node gone, the operator plans nothing for it: the alert clears.
    wait_for(lambda: not api.query(rule.expr), 60, 0.5, "the agent-missing alert clearing")


def test_agent_down_alert_finds_a_stopped_agent(observed: Observed, bed: BedState) -> None:
    api, cluster = observed.prometheus.api, observed.cluster
    victim = bed.nodes[-1]
    port = cluster.metrics_ports[victim.name]
    cluster.stop_agent(victim.name)
    try:
        rule = next(r for r in rules.load(ALERTS) if r.alert == "LayerCacheAgentDown")
        found = wait_for(lambda: api.query(rule.expr), 15, 0.5, "the agent-down alert")
        assert [s.labels["instance"] for s in found] == [f"127.0.0.1:{port}"]
        assert found[0].labels["job"] == AGENT_JOB
        if SNAPSHOT.exists():  # complete the picture written by the dashboard test
            with SNAPSHOT.open("a") as out:
                out.write(f"\nAfter stopping the agent of {victim.name}: LayerCacheAgentDown "
                          f"holds for {found[0].label_text()} (pending for its 5m `for`)\n")
    finally:  # back for the teardown: the node must release what it holds
        cluster.start_agent(victim)

