"""A real Prometheus (Debian package) scraping the product, and its HTTP API.

`PrometheusServer` writes a config that scrapes the given jobs every second from loopback
targets and loads the alert rule files, runs `prometheus` with its TSDB under the work
directory, and stops it as a process group. `PrometheusAPI` is a small typed client of
the HTTP API (https://prometheus.io/docs/prometheus/latest/querying/api/) over httpx.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from testbed.kube import wait_for
from testbed.paths import tool
from testbed.procs import Process, free_port

#: Scrape and rule evaluation interval (s): short, so a test sees changes within seconds.
INTERVAL_SECONDS = 1


class QueryError(RuntimeError):
    """Prometheus refused a query (bad PromQL, unknown function …); carries its error."""


@dataclass(frozen=True)
class Sample:
    """One series of an instant vector: its labels and value (NaN and ±Inf possible)."""

    labels: dict[str, str]
    value: float

    def label_text(self) -> str:
        """The labels as `{a="x", b="y"}` (`{}` for none), for reports."""
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(self.labels.items())) + "}"

    @property
    def finite(self) -> bool:
        """Whether the value is a real number (not NaN, not ±Inf)."""
        return math.isfinite(self.value)


class PrometheusAPI:
    """Client of a Prometheus server's HTTP API at `url` (`http://host:port`)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        """Close the client's connections."""
        self._http.close()

    def _get(self, path: str, params: Mapping[str, str | list[str]]) -> Any:
        reply = self._http.get(path, params=params)
        body = reply.json()
        if body.get("status") != "success":
            raise QueryError(f"{path} {dict(params)}: {body.get('errorType')}: "
                             f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluate `expr` as an instant query now; its series (one, unlabelled, for a scalar).

        Raises:
            QueryError: Prometheus rejected the expression.

        """
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        return [Sample(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of `label` on series matching selector `match` (Grafana's label_values)."""
        values: list[str] = self._get(f"/api/v1/label/{label}/values", {"match[]": [match]})
        return values

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their `health` and `lastError`."""
        active: list[dict[str, Any]] = self._get("/api/v1/targets", {"state": "active"})[
            "activeTargets"]
        return active

    def alerting_rules(self) -> list[dict[str, Any]]:
        """Every alerting rule as the server evaluates it (`health`, `lastError`, `state`)."""
        groups = self._get("/api/v1/rules", {"type": "alert"})["groups"]
        return [rule for group in groups for rule in group["rules"]]


class PrometheusServer:
    """`prometheus` on 127.0.0.1 scraping `jobs` (job name → `host:port` targets).

    Use as `with PrometheusServer(...) as prom:`; `prom.api` queries it. `rule_files` are
    loaded as they are (a bad file stops Prometheus from starting).
    """

    def __init__(self, workdir: Path, jobs: Mapping[str, Sequence[str]],
                 rule_files: Sequence[Path] = ()) -> None:
        self.workdir = workdir
        self.jobs = {job: list(targets) for job, targets in jobs.items()}
        self.rule_files = list(rule_files)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Process | None = None
        self.api = PrometheusAPI(self.url)

    def config(self) -> dict[str, Any]:
        """The prometheus.yml this server runs with."""
        interval = f"{INTERVAL_SECONDS}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval,
                       "scrape_timeout": interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in self.jobs.items()],
        }

    def start(self) -> PrometheusServer:
        """Write the config, start Prometheus and wait until it answers `/-/ready`.

        Raises:
            ComponentError: it exited or was not ready within 30 s (log tail attached).

        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config()))
        self.process = Process("prometheus", [
            tool("prometheus"), f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ], self.workdir / "prometheus.log").start()
        try:
            self.process.wait_ready(
                lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, 30)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_targets_up(self, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until every configured target was scraped and is up; returns the targets.

        Raises:
            TimeoutError: some target is not up in time (the last answer is in the message).

        """
        expected = sum(len(t) for t in self.jobs.values())

        def up() -> list[dict[str, Any]] | None:
            found = self.api.targets()
            healthy = [t for t in found if t["health"] == "up"]
            return found if len(healthy) == expected else None
        return wait_for(up, timeout, 0.5, f"{expected} Prometheus targets up")

    def stop(self) -> None:
        """Stop Prometheus (idempotent) and close the API client."""
        if self.process is not None:
            self.process.stop()
        self.api.close()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
