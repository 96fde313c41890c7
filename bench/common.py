"""What every benchmark scenario shares: the summary row, machine facts, the JSON writer.

Each scenario module (``bench/<name>.py``) runs on its own with ``python -m bench.<name>
--out out/bench`` and writes ``out/bench/<name>.json`` = ``{"scenario", "machine",
"versions", "rows": [Row...], ...scenario-specific figures}``; ``bench.run`` runs them in
order and collects the rows into ``summary.json``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from testbed.paths import MissingToolError, tool


@dataclass(frozen=True)
class Row:
    """One line of the summary table: a layercache figure against its baseline.

    ``value`` and ``baseline`` are in the metric's unit (named in ``metric``, e.g.
    ``warm_seconds_n6``, ``upstream_bytes_ratio``); ``ratio`` = value / baseline (None
    when there is no baseline); ``target`` is the human-readable goal (e.g. ``"<= 1.02"``)
    and ``met`` whether this run reached it.
    """

    scenario: str
    metric: str
    value: float
    baseline: float | None
    ratio: float | None
    target: str
    met: bool


def ratio(value: float, baseline: float | None) -> float | None:
    """``value / baseline``, or None when the baseline is missing or zero."""
    if not baseline:
        return None
    return value / baseline


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _tool_version(name: str) -> str:
    """The first line of `name --version`, for the bed's build of `name` (testbed.paths)."""
    try:
        return _first_line([str(tool(name)), "--version"])
    except MissingToolError:
        return "unavailable"


def machine() -> dict[str, Any]:
    """Facts about this machine, so a figure can be read against where it was measured."""
    cpu_model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        mem_kib = int(meminfo.read_text().split()[1])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": mem_kib * 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def versions(tools_bin: Path = Path(".tools/bin")) -> dict[str, str]:
    """Versions of the real components the benchmarks run against."""
    return {
        "containerd": _tool_version("containerd"),
        "runc": _tool_version("runc"),
        "docker-registry": _first_line(["docker-registry", "--version"]),
        "kube-apiserver": _first_line([str(tools_bin / "kube-apiserver"), "--version"]),
        "crictl": _first_line([str(tools_bin / "crictl"), "--version"]),
    }


def write_result(out: Path, name: str, rows: list[Row], **figures: Any) -> Path:
    """Write ``out/<name>.json`` with the machine, versions, rows and ``figures``.

    Returns:
        The path written.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {
        "scenario": name,
        "machine": machine(),
        "versions": versions(),
        "rows": [asdict(row) for row in rows],
        **figures,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def read_rows(path: Path) -> list[Row]:
    """The rows of a scenario's JSON file."""
    return [Row(**row) for row in json.loads(path.read_text())["rows"]]
