"""The chart's lifecycle and operations values, each rendered with the pinned `helm template`.

CRDs as templates (crds.install, crds.keep), the pre-delete cleanup hook (cleanup.*), the
operator's logging, the GKE priority-class quota, NetworkPolicies, ServiceMonitors and the
per-alert overrides of the PrometheusRule. Every ci/ values file is linted and rendered by
tests/integration/test_install.py and `make lint`; ci/extras-values.yaml sets these values.
No cluster: helm renders only (integration because it runs the pinned helm).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from testbed.install import CHART, MANIFESTS, is_hook, render_chart
from testbed.procs import ComponentError

pytestmark = pytest.mark.integration

Obj = dict[str, Any]


def _only(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def test_crds_render_as_the_manifests_crds_behind_their_toggles() -> None:
    crds = {o["metadata"]["name"]: o for o in _only(render_chart(), "CustomResourceDefinition")}
    sources = {yaml.safe_load(p.read_text())["metadata"]["name"]: yaml.safe_load(p.read_text())
               for p in (MANIFESTS / "crds").glob("*.yaml")}
    assert sorted(crds) == sorted(sources) == [
        "layercaches.layercache.dev", "nodelayercaches.layercache.dev"]
    for name, crd in crds.items():
        assert crd["spec"] == sources[name]["spec"]  # the same schema, printer columns, ...
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    unkept = _only(render_chart(sets=["crds.keep=false"]), "CustomResourceDefinition")
    assert len(unkept) == 2 and all("annotations" not in o["metadata"] for o in unkept)
    assert _only(render_chart(sets=["crds.install=false"]), "CustomResourceDefinition") == []


def test_the_cleanup_hook_runs_layercache_cleanup_before_delete() -> None:
    hooks = [o for o in render_chart("lc", "infra") if is_hook(o)
             and o["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"]
    by_kind = {o["kind"]: o for o in hooks}
    assert sorted(by_kind) == ["ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"]
    # Its ServiceAccount and RBAC exist before the Job (lower weight) and all go on success.
    for obj in hooks:
        weight = obj["metadata"]["annotations"]["helm.sh/hook-weight"]
        assert weight == ("0" if obj["kind"] == "Job" else "-10")
        assert obj["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == (
            "before-hook-creation,hook-succeeded")
    job = by_kind["Job"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["layercache"]
    assert container["args"] == ["cleanup", "--timeout", "240"]
    assert job["spec"]["activeDeadlineSeconds"] == 360
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "lc-layercache-cleanup"
    assert by_kind["ClusterRole"]["rules"] == [
        {"apiGroups": ["layercache.dev"], "resources": ["layercaches"],
         "verbs": ["list", "delete"]},
        {"apiGroups": ["layercache.dev"], "resources": ["nodelayercaches"], "verbs": ["list"]}]
    longer = _only(render_chart(sets=["cleanup.timeoutSeconds=600"]), "Job")
    assert longer[0]["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "600"
    assert not [o for o in render_chart(sets=["cleanup.enabled=false"]) if is_hook(o)
                and o["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"]


def _operator_env(objects: list[Obj]) -> dict[str, str]:
    [deployment] = _only(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_operator_log_level_and_format() -> None:
    env = _operator_env(render_chart())
    assert (env["LAYERCACHE_LOG_LEVEL"], env["LAYERCACHE_LOG_FORMAT"]) == ("INFO", "json")
    env = _operator_env(render_chart(sets=["operator.logLevel=DEBUG",
                                           "operator.logFormat=plain"]))
    assert (env["LAYERCACHE_LOG_LEVEL"], env["LAYERCACHE_LOG_FORMAT"]) == ("DEBUG", "plain")
    with pytest.raises(ComponentError, match="logLevel"):
        render_chart(sets=["operator.logLevel=LOUD"])  # the schema's enum
    with pytest.raises(ComponentError, match="LAYERCACHE_LOG_LEVEL is set by the chart"):
        render_chart(sets=["operator.env.LAYERCACHE_LOG_LEVEL=DEBUG"])


def test_the_gke_priority_class_quota() -> None:
    assert _only(render_chart(), "ResourceQuota") == []
    [quota] = _only(render_chart(sets=["agent.priorityClassQuota.create=true"]), "ResourceQuota")
    assert quota["spec"] == {"hard": {"pods": "10k"}, "scopeSelector": {"matchExpressions": [
        {"scopeName": "PriorityClass", "operator": "In", "values": ["system-node-critical"]}]}}
    [quota] = _only(render_chart(sets=["agent.priorityClassQuota.create=true",
                                       "agent.priorityClassName=lc-critical"]), "ResourceQuota")
    assert quota["spec"]["scopeSelector"]["matchExpressions"][0]["values"] == ["lc-critical"]


def test_network_policies_admit_peers_and_scrapes_on_the_documented_ports() -> None:
    assert _only(render_chart(), "NetworkPolicy") == []
    policies = {o["metadata"]["name"]: o["spec"] for o in _only(
        render_chart("lc", "infra", [CHART / "ci" / "extras-values.yaml"]), "NetworkPolicy")}
    scrapers = [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    agent_pods = {"app.kubernetes.io/name": "layercache", "app.kubernetes.io/instance": "lc",
                  "app.kubernetes.io/component": "agent"}
    assert policies["lc-layercache-agent"] == {
        "podSelector": {"matchLabels": agent_pods}, "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": agent_pods}}],
             "ports": [{"port": 5780, "protocol": "TCP"}]},
            {"ports": [{"port": 9780, "protocol": "TCP"}], "from": scrapers}]}
    operator = policies["lc-layercache-operator"]
    assert operator["ingress"] == [
        {"ports": [{"port": 8080, "protocol": "TCP"}], "from": scrapers},
        {"ports": [{"port": 8081, "protocol": "TCP"}]}]
    # metricsFrom empty: anyone may scrape (no `from`).
    anyone = _only(render_chart(sets=["networkPolicy.enabled=true"]), "NetworkPolicy")
    assert all("from" not in rule for p in anyone for rule in p["spec"]["ingress"][-1:])


def test_service_monitors_instead_of_pod_monitors() -> None:
    objects = render_chart("lc", "infra", [CHART / "ci" / "extras-values.yaml"])
    assert _only(objects, "PodMonitor") == []
    monitors = {o["metadata"]["name"]: o for o in _only(objects, "ServiceMonitor")}
    assert sorted(monitors) == ["lc-layercache-agent", "lc-layercache-operator"]
    services = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o
                for o in _only(objects, "Service")}
    for name, monitor in monitors.items():
        component = name.rsplit("-", 1)[1]
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        # It selects its component's Service, by labels that Service has, on a port it names.
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= services[component]["metadata"]["labels"].items()
        assert "metrics" in {p["name"] for p in services[component]["spec"]["ports"]}
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "metrics"
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "10s")
        assert endpoint["relabelings"] == [
            {"action": "replace", "targetLabel": "job", "replacement": f"layercache-{component}"},
            {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"],
             "targetLabel": "instance_node"}]
        assert endpoint["metricRelabelings"] == [
            {"action": "drop", "sourceLabels": ["__name__"], "regex": "python_gc_.*"}]
    with pytest.raises(ComponentError, match="enable one"):
        render_chart(sets=["monitoring.serviceMonitor.enabled=true",
                           "monitoring.podMonitor.enabled=true"])


def _alerts(objects: list[Obj]) -> dict[str, Obj]:
    [rule] = _only(objects, "PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_alerts_can_be_dropped_and_their_thresholds_changed_one_by_one() -> None:
    shipped = _alerts(render_chart(sets=["monitoring.prometheusRule.enabled=true"]))
    changed = _alerts(render_chart(values=[CHART / "ci" / "extras-values.yaml"]))
    assert set(shipped) - set(changed) == {"LayerCacheReplansFailing"}
    assert changed["LayerCacheNotReady"]["for"] == "1h"
    assert changed["LayerCacheAgentDown"]["labels"]["severity"] == "critical"
    # Everything else as shipped.
    for name in set(changed) - {"LayerCacheNotReady", "LayerCacheAgentDown"}:
        assert changed[name] == shipped[name], name
    assert {k: v for k, v in changed["LayerCacheNotReady"].items() if k != "for"} == {
        k: v for k, v in shipped["LayerCacheNotReady"].items() if k != "for"}
    with pytest.raises(ComponentError, match=r"alerts\.LayerCacheNotReddy: no such alert"):
        render_chart(sets=["monitoring.prometheusRule.enabled=true",
                           "monitoring.prometheusRule.alerts.LayerCacheNotReddy.for=1h"])
