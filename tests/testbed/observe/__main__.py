"""`python -m testbed.observe lint | describe`: check, or picture, the dashboard and alerts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from testbed.observe import ALERTS, DASHBOARD, describe, model, rules
from testbed.observe.prometheus import PrometheusAPI

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console()


@app.command()
def lint(dashboard: Path = DASHBOARD, alerts: Path = ALERTS) -> None:
    """Validate the dashboard (Grafana model, panel structure) and the alert rules."""
    data = model.load(dashboard)
    problems = [f"{dashboard.name}: {p}" for p in model.validate(data) + model.structure(data)]
    problems += [f"{alerts.name}: {p}" for p in rules.annotation_problems(rules.load(alerts))]
    for problem in problems:
        console.print(f"[red]{problem}[/]", soft_wrap=True)
    console.print(rules.promtool_check(alerts), highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print(f"{dashboard.name}: {len(data['panels'])} panels, "
                  f"{len(model.targets(data))} queries: valid", highlight=False)


@app.command("describe")
def describe_cmd(
    prometheus: Annotated[str, typer.Option(help="Prometheus base URL.")],
    rate_interval: Annotated[str, typer.Option(help="Value for $__rate_interval.")] = "1m",
    out: Annotated[Path | None, typer.Option(help="Also write the picture here.")] = None,
) -> None:
    """Query every panel and alert against PROMETHEUS; print what the dashboard shows."""
    data = model.load(DASHBOARD)
    api = PrometheusAPI(prometheus)
    try:
        variables = describe.variable_values(api, data)
        values = {name: next(v["allValue"] for v in data["templating"]["list"]
                             if v["name"] == name) for name in variables}
        queries = describe.evaluate_dashboard(api, data, {**values,
                                                          "__rate_interval": rate_interval})
        text = describe.render(data, queries, variables,
                               describe.evaluate_rules(api, rules.load(ALERTS)))
    finally:
        api.close()
    console.print(text, highlight=False, soft_wrap=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


if __name__ == "__main__":
    app()
