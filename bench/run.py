"""`make bench`: every scenario against its baseline, one table, the summary and the plot.

Runs the scenarios in order, each as its own process on its own bed (``python -m
bench.<module> --out OUT [--quick]``): A fan-out, B ingest, C pull after warm, D scale. A
scenario that fails (non-zero exit, or no fresh ``OUT/<module>.json``) becomes one failed row
and the others still run. Then it writes ``OUT/summary.json`` (a list of row dicts, see
`bench.common.Row`) and ``OUT/run.json`` (each scenario's exit code and wall seconds), prints
one table and draws ``OUT/fanout.png`` (`bench.plot`).

``python -m bench.run --out out/bench [--only A,C] [--quick]``. Exit status 1 when a scenario
failed to run; a missed target is a ✗ in the table, not a failure of the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import Row, machine, read_rows

#: Letter → module, in the order they run.
SCENARIOS = {"A": "fanout", "B": "ingest", "C": "pull", "D": "scale"}
#: A target that is not one (a figure shown for context): the table shows no ✓ or ✗.
INFO = "info"


def run_scenario(letter: str, module: str, out: Path, quick: bool) -> tuple[list[Row], int,
                                                                           float]:
    """Run one scenario as a subprocess; returns (its rows, exit code, wall seconds).

    A crash or a missing/stale result file gives one row with ``met=False``.
    """
    result = out / f"{module}.json"
    started = time.time()
    argv = [sys.executable, "-m", f"bench.{module}", "--out", str(out),
            *(["--quick"] if quick else [])]
    code = subprocess.run(argv, check=False).returncode
    seconds = time.time() - started
    fresh = result.exists() and result.stat().st_mtime >= started
    if code == 0 and fresh:
        try:
            return read_rows(result), code, seconds
        except (KeyError, TypeError, ValueError) as error:
            print(f"{result}: unreadable rows: {error}", file=sys.stderr)
            code = code or 1
    why = f"exit {code}" if code else f"no fresh {result.name}"
    return [Row(f"{letter} {module}", f"run failed ({why})", float(code), None, None,
                "runs to the end", False)], code or 1, seconds


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4f}"


def table(rows: list[Row], title: str) -> Table:
    """The summary table: scenario, metric, layercache, baseline, ratio, target, met."""
    out = Table("scenario", "metric", "layercache", "baseline", "ratio", "target", "met",
                title=title)
    for row in rows:
        met = "" if row.target == INFO else ("[green]✓[/]" if row.met else "[red]✗[/]")
        out.add_row(row.scenario, row.metric, _number(row.value), _number(row.baseline),
                    _number(row.ratio), row.target, met)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="comma-separated letters or names, e.g. A,C or fanout,pull")
    parser.add_argument("--quick", action="store_true", help="passed on to every scenario")
    args = parser.parse_args(argv)
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    chosen = {k: m for k, m in SCENARIOS.items() if k in wanted or m in wanted}
    unknown = wanted - set(chosen) - set(chosen.values())
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console()
    if console.width < 132:  # not a terminal (make's pipe, a log): room for the table
        console = Console(width=132)
    rows: list[Row] = []
    runs = {}
    for letter, module in chosen.items():
        console.rule(f"{letter}: bench.{module}")
        found, code, seconds = run_scenario(letter, module, args.out, args.quick)
        rows += found
        runs[module] = {"exit": code, "seconds": round(seconds, 1)}
    (args.out / "summary.json").write_text(json.dumps([asdict(r) for r in rows], indent=2)
                                           + "\n")
    (args.out / "run.json").write_text(json.dumps(
        {"machine": machine(), "quick": args.quick, "scenarios": runs}, indent=2) + "\n")
    facts = machine()
    console.print(table(rows, f"layercache benchmarks — {facts['date']}, {facts['cpus']} "
                              f"CPUs{' (quick)' if args.quick else ''}"))
    console.print("wall time: " + ", ".join(f"{m} {r['seconds']} s" for m, r in runs.items()))
    if (args.out / "fanout.json").exists():
        from bench.plot import plot  # matplotlib only when there is something to draw
        try:
            console.print(f"plot: {plot(args.out)}")
        except (KeyError, ValueError, OSError) as error:
            console.print(f"[red]plot failed: {error}[/]")
    return 1 if any(r["exit"] for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
