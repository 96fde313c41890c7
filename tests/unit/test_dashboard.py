"""The chart's dashboard and alert rules, without a Prometheus: model, structure, text.

The same checks `make lint` runs (`python -m testbed.observe lint`), plus tables for the
small PromQL text helpers the integration test relies on. Evaluating the queries is
tests/integration/test_observability.py's job.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from testbed.observe import ALERTS, DASHBOARD, model, promql, rules


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return model.load(DASHBOARD)


def test_dashboard_conforms_to_grafanas_dashboard_model(dashboard: dict[str, Any]) -> None:
    assert model.validate(dashboard) == []


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["panels"][0]["gridPos"].update(w="wide"), "grid_pos.w: 'wide' is not int"),
    (lambda d: d["panels"][4]["options"]["legend"].update(displayMode="huge"),
     "legend.display_mode: 'huge'"),
    (lambda d: d["templating"]["list"][1].update(type="guess"), "type_val: 'guess'"),
    (lambda d: d["panels"][2].update(colour="red"), "$.panels[2].colour: not a field"),
    (lambda d: d.update(schemaVersion="39"), "schema_version: '39' is not int"),
])
def test_model_validation_catches_what_grafana_would_not_load(
        dashboard: dict[str, Any], change: Any, expected: str) -> None:
    broken = copy.deepcopy(dashboard)
    change(broken)
    problems = model.validate(broken)
    assert any(expected in p for p in problems), problems


def test_every_panel_has_datasource_targets_unique_id_and_fits_the_grid(
        dashboard: dict[str, Any]) -> None:
    assert model.structure(dashboard) == []
    assert dashboard["uid"] == "layercache" and dashboard["title"] == "layercache"
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "cache", "node"]


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["panels"][1].update(id=1), "id missing or not unique"),
    (lambda d: d["panels"][1].update(datasource={"type": "prometheus", "uid": "prom"}),
     "datasource must be"),
    (lambda d: d["panels"][1].update(targets=[]), "needs targets"),
    (lambda d: d["panels"][1]["gridPos"].update(x=20), "outside the 24-column grid"),
    (lambda d: d["panels"][1]["gridPos"].update(x=0), "overlaps"),
    (lambda d: d["panels"][1].update(type="graph"), "type 'graph'"),
])
def test_structure_problems_are_reported(dashboard: dict[str, Any], change: Any,
                                         expected: str) -> None:
    broken = copy.deepcopy(dashboard)
    change(broken)
    assert any(expected in p for p in model.structure(broken))


def test_panels_cover_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t.expr for t in model.targets(dashboard))
    units = {p["fieldConfig"]["defaults"].get("unit") for p in dashboard["panels"]}
    for metric in ("layercache_cache_saved_bytes", "layercache_cache_naive_bytes",
                   "layercache_agent_fetched_bytes_total", "layercache_agent_layers_held",
                   "layercache_agent_held_bytes", "layercache_agent_ingest_duration_seconds",
                   "layercache_agent_errors_total", "layercache_operator_replans_total",
                   "layercache_operator_replan_duration_seconds",
                   "layercache_operator_node_spec_writes_total",
                   "layercache_operator_resolve_errors_total", "layercache_cache_ready",
                   "layercache_cache_degraded"):
        assert metric in exprs, metric
    assert {"bytes", "percentunit", "s", "Bps"} <= units
    assert {p["type"] for p in dashboard["panels"]} == model.PANEL_TYPES


def test_alert_rules_carry_severity_annotations_and_runbook_anchors() -> None:
    loaded = rules.load(ALERTS)
    assert rules.annotation_problems(loaded) == []
    assert {r.alert for r in loaded} == {
        "LayerCacheNotReady", "LayerCacheDegraded", "LayerCacheNodeCannotIngest",
        "LayerCacheNodeDiskPressure", "LayerCacheAgentDown", "LayerCacheAgentMissing",
        "LayerCacheOperatorDown", "LayerCacheReplansFailing"}
    assert next(r for r in loaded if r.alert == "LayerCacheNotReady").duration == "15m"


def test_anchors_follow_github_headings() -> None:
    assert rules.anchors("# Top\n## Alert runbook\n### LayerCacheAgentDown\ntext # no") == {
        "top", "alert-runbook", "layercacheagentdown"}


@pytest.mark.parametrize(("expr", "expected"), [
    ("max by (cache) (layercache_cache_ready) == 0", ["max by (cache) (layercache_cache_ready)"]),
    ('up{job=~".*agent.*"} == 0', ['up{job=~".*agent.*"}']),
    ("(sum by (node) (increase(e[10m])) > 0) and on (node) (max by (node) (h) < max by (node)"
     " (w)) and on (node) (max by (node) (delta(h[10m])) <= 0)",
     ["sum by (node) (increase(e[10m]))", "max by (node) (h)", "max by (node) (w)",
      "max by (node) (delta(h[10m]))"]),
    ("a > bool 3", ["a"]),
    ("a unless ignoring (x) b", ["a", "b"]),
    ("sum(rate(x[5m])) / sum(rate(y[5m]))", ["sum(rate(x[5m])) / sum(rate(y[5m]))"]),
    ('x{reason!="a>b"} != 1', ['x{reason!="a>b"}']),
    ("(a) + (b) >= 1e3", ["(a) + (b)"]),
    ("sort_desc(band)", ["sort_desc(band)"]),
    ('absent(up{job="op"} == 1)', ['up{job="op"}']),
    ("absent(a) or absent(b)", ["a", "b"]),
    ("absent_over_time(a[5m])", ["absent_over_time(a[5m])"]),
])
def test_operands_drop_thresholds_and_split_set_operators(expr: str,
                                                          expected: list[str]) -> None:
    assert promql.operands(expr) == expected


def test_substitute_replaces_grafana_variables() -> None:
    values = {"cache": ".*", "node": "(a|b)", "__rate_interval": "1m"}
    assert promql.substitute('rate(x{cache=~"$cache", node=~"${node}"}[$__rate_interval])',
                             values) == 'rate(x{cache=~".*", node=~"(a|b)"}[1m])'
    assert promql.substitute("y{node=~\"[[node]]\"}", values) == 'y{node=~"(a|b)"}'
    with pytest.raises(KeyError, match="interval"):
        promql.substitute("rate(x[$interval])", values)


def test_every_dashboard_variable_is_defined(dashboard: dict[str, Any]) -> None:
    values = dict.fromkeys(("cache", "node", "__rate_interval"), "x")
    for target in model.targets(dashboard):
        assert "$" not in promql.substitute(target.expr, values)
