"""Observability checks: the Grafana dashboard and Prometheus alert rules of the chart.

`model` validates the dashboard against Grafana's dashboard model (grafana-foundation-sdk)
and checks panel structure; `rules` reads the alert rule file and runs `promtool`; `promql`
substitutes dashboard variables and splits alert expressions into their operands;
`prometheus` runs a real Prometheus against the product's metrics endpoints; `describe`
turns its answers into a panel-by-panel text picture. `python -m testbed.observe lint` is
what `make lint` runs.
"""

from __future__ import annotations

from testbed.paths import REPO

#: The chart's files this package checks (the chart renders them into a ConfigMap and a
#: PrometheusRule; both are also usable by hand).
DASHBOARD = REPO / "helm" / "layercache" / "files" / "dashboard.json"
ALERTS = REPO / "helm" / "layercache" / "files" / "alerts.yaml"
