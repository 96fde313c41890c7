"""Evaluate the dashboard and alert rules against a Prometheus, and say what they show.

`evaluate_dashboard` runs every panel query with the template variables substituted;
`evaluate_rules` runs every alert expression and each of its operands (the expression
with its thresholds taken out, `promql.operands`); `render` writes the panel-by-panel text
picture that stands in for a screenshot of the dashboard.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from testbed.observe import model, promql
from testbed.observe.prometheus import PrometheusAPI, QueryError, Sample
from testbed.observe.rules import Rule

_LABEL_VALUES = re.compile(r"label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)")


@dataclass(frozen=True)
class Evaluated:
    """One expression as sent (variables substituted), and its series or its error."""

    expr: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class PanelQuery:
    """A dashboard target and what Prometheus answered for it."""

    target: model.Target
    result: Evaluated


@dataclass(frozen=True)
class RuleResult:
    """An alert rule: its expression's answer, and each operand's (thresholds removed)."""

    rule: Rule
    result: Evaluated
    operands: list[Evaluated]


def evaluate(api: PrometheusAPI, expr: str) -> Evaluated:
    """Instant-query `expr`; a rejected query is kept as the result's `error`."""
    try:
        return Evaluated(expr, api.query(expr))
    except QueryError as error:
        return Evaluated(expr, error=str(error))


def variable_values(api: PrometheusAPI, dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Each query variable's options, as Grafana would list them (`label_values`).

    Raises:
        ValueError: a variable query is not `label_values([selector,] label)`.

    """
    found = {}
    for name, query in model.variable_queries(dashboard).items():
        match = _LABEL_VALUES.fullmatch(query.strip())
        if match is None:
            raise ValueError(f"variable {name}: {query!r} is not label_values(...)")
        selector = match["match"] or f'{{{match["label"]}!=""}}'
        found[name] = api.label_values(match["label"], selector)
    return found


def evaluate_dashboard(api: PrometheusAPI, dashboard: dict[str, Any],
                       values: Mapping[str, str]) -> list[PanelQuery]:
    """Every target of `dashboard`, with template variables replaced from `values`.

    `values` maps each variable (e.g. `cache`, `node`, `__rate_interval`) to its text.
    """
    return [PanelQuery(t, evaluate(api, promql.substitute(t.expr, values)))
            for t in model.targets(dashboard)]


def evaluate_rules(api: PrometheusAPI, rules: list[Rule]) -> list[RuleResult]:
    """Every rule's expression, and each of its operands, as instant queries now."""
    return [RuleResult(r, evaluate(api, r.expr),
                       [evaluate(api, o) for o in promql.operands(r.expr)]) for r in rules]


def human(value: float, unit: str | None) -> str:
    """`value` in `unit` (Grafana unit ids: bytes, Bps, percentunit, s, ops) for reading."""
    if not math.isfinite(value):
        return str(value)
    if unit == "bytes":
        return f"{value / 1e6:,.2f} MB"
    if unit == "Bps":
        return f"{value / 1e6:,.3f} MB/s"
    if unit == "percentunit":
        return f"{value:.1%}"
    if unit == "s":
        return f"{value * 1000:,.0f} ms" if value < 1 else f"{value:,.2f} s"
    if unit == "ops":
        return f"{value:,.3f}/s"
    return f"{value:,.4g}"


def _series_name(sample: Sample, legend: str, table: bool) -> str:
    """How the panel names a series: its legend, or for a table row its labels + column."""
    if table:
        return f"{sample.label_text()} {legend}".strip()
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: sample.labels.get(m[1], ""), legend)
    return text.strip() or sample.label_text()


def _unit(panel: dict[str, Any], target: model.Target) -> str | None:
    """The unit a target's values show in: a table column's override, else the panel's."""
    config = panel.get("fieldConfig", {})
    for override in config.get("overrides", []):
        if target.table and override["matcher"].get("options") == target.legend:
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    return str(prop["value"])
    unit = config.get("defaults", {}).get("unit")
    return str(unit) if unit else None


def render(dashboard: dict[str, Any], queries: list[PanelQuery],
           variables: Mapping[str, list[str]], rules: list[RuleResult]) -> str:
    """The text picture: each panel (title, type, what it means) and the values it shows."""
    lines = [f"Dashboard {dashboard['title']!r} (uid {dashboard['uid']}), "
             f"{len(dashboard['panels'])} panels"]
    lines += [f"  variable ${name}: {', '.join(v) or '(none)'}" for name, v in variables.items()]
    by_panel: dict[int, list[PanelQuery]] = {}
    for query in queries:
        by_panel.setdefault(query.target.panel_id, []).append(query)
    for panel in dashboard["panels"]:
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        grid = panel["gridPos"]
        lines.append(f"\n[{panel['id']}] {panel['title']} — {panel['type']}, "
                     f"unit {unit or 'none'}, at x={grid['x']} y={grid['y']} "
                     f"{grid['w']}x{grid['h']}")
        lines.append(f"    {panel.get('description', '')}")
        for query in by_panel.get(panel["id"], []):
            if query.result.error:
                lines.append(f"    {query.target.ref_id}: ERROR {query.result.error}")
                continue
            shown_unit = _unit(panel, query.target)
            shown = [f"{_series_name(s, query.target.legend, query.target.table)} = "
                     f"{human(s.value, shown_unit)}"
                     for s in sorted(query.result.samples, key=lambda s: s.label_text())]
            lines.append(f"    {query.target.ref_id}: " + ("; ".join(shown) or "(no data)"))
    lines.append("\nAlert rules (expression now; operands with thresholds removed):")
    for result in rules:
        state = (f"ERROR {result.result.error}" if result.result.error else
                 f"condition holds for {len(result.result.samples)} series: "
                 + ", ".join(s.label_text() for s in result.result.samples)
                 if result.result.samples else "condition does not hold (no series)")
        lines.append(f"  {result.rule.alert} [{result.rule.labels.get('severity')}, "
                     f"for {result.rule.duration}]: {state}")
        for operand in result.operands:
            values = ", ".join(f"{s.label_text()}={s.value:g}" for s in operand.samples[:6])
            more = f" (+{len(operand.samples) - 6} more)" if len(operand.samples) > 6 else ""
            shown = operand.error or values or "(no data)"
            lines.append(f"      {operand.expr}\n        -> {shown}{more}")
    return "\n".join(lines) + "\n"
