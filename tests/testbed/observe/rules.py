"""The Prometheus alert rule file: typed view, annotation checks, and `promtool`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from testbed.paths import REPO, tool
from testbed.procs import run

#: Severities an alert may carry (what Alertmanager routes on).
SEVERITIES = frozenset({"info", "warning", "critical"})
#: Where runbook_url anchors must exist.
RUNBOOK = REPO / "docs" / "observability.md"


@dataclass(frozen=True)
class Rule:
    """One alerting rule: name, PromQL `expr`, `for` duration text, labels, annotations."""

    alert: str
    expr: str
    duration: str
    labels: dict[str, str]
    annotations: dict[str, str]


def load(path: Path) -> list[Rule]:
    """Every alerting rule of the rule file at `path`, in file order.

    Raises:
        KeyError, TypeError: the file is not a rule file (promtool says more).

    """
    document = yaml.safe_load(path.read_text())
    return [Rule(r["alert"], r["expr"], r.get("for", "0s"), dict(r.get("labels") or {}),
                 dict(r.get("annotations") or {}))
            for group in document["groups"] for r in group["rules"] if "alert" in r]


def promtool_check(path: Path) -> str:
    """Run `promtool check rules` on `path`; returns its output.

    Raises:
        ComponentError: promtool found a problem (the message has its output).
        MissingToolError: promtool is not installed (Debian package prometheus).

    """
    return run([tool("promtool"), "check", "rules", str(path)]).strip()


def anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the headings in `markdown` (lower case, dashes)."""
    found = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return found


def annotation_problems(rules: list[Rule], runbook: Path = RUNBOOK) -> list[str]:
    """What each rule lacks: a known severity, summary, description, a runbook anchor."""
    known = anchors(runbook.read_text()) if runbook.exists() else set()
    problems = []
    for rule in rules:
        if rule.labels.get("severity") not in SEVERITIES:
            problems.append(f"{rule.alert}: severity label must be one of {sorted(SEVERITIES)}")
        for key in ("summary", "description", "runbook_url"):
            if not rule.annotations.get(key):
                problems.append(f"{rule.alert}: annotation {key} missing")
        url = rule.annotations.get("runbook_url", "")
        page, _, anchor = url.partition("#")
        if page != str(runbook.relative_to(REPO)) or anchor not in known:
            problems.append(f"{rule.alert}: runbook_url {url!r} is not a heading of {runbook}")
    if len({r.alert for r in rules}) != len(rules):
        problems.append("alert names must be unique")
    return problems
