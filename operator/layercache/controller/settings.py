"""The operator's settings: one frozen object from `LAYERCACHE_*` environment variables.

Logged once at start-up (`summary()`), never with a secret in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from layercache.registryconfig import RegistryHostList, RegistryOptions, registry_options

__all__ = ["OperatorSettings"]

class OperatorSettings(BaseSettings):
    """Operator settings; each field's env var is `LAYERCACHE_<FIELD>` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="LAYERCACHE_", frozen=True)

    namespace: str = Field("layercache-system",
                           description="Namespace of the operator, agents and their Secrets.")
    credentials_secret: str = Field(
        "layercache-registry-credentials",
        description="Secret (in `namespace`) the operator fills with each cache's pull "
                    "secrets under its own name (key `caches.json`); agents read it by name "
                    "and fetch a layer only with the credentials of a cache that wants it.")
    peer_token_secret: str = Field(
        "layercache-peer-token", description="Secret (in `namespace`) with the agents' token.")
    metrics_port: int = Field(8080, description="Prometheus metrics port (0: off).")
    health_port: int = Field(8081, description="Liveness endpoint port (kopf's /healthz).")
    insecure_registries: RegistryHostList = Field(
        "", description="Comma-separated registry hosts (host:port) spoken to over plain "
                        "HTTP, e.g. a local registry; the same variable the agent reads.")
    registry_ca_file: Path | None = Field(
        None, description="Extra CA certificates (PEM) trusted for every registry.")
    resolve_concurrency: int = Field(8, ge=1, description="Concurrent image resolutions.")
    replan_debounce_seconds: float = Field(
        0.5, ge=0, description="Seconds to gather changes before one replan.")
    status_interval_seconds: float = Field(
        5.0, gt=0, description="Seconds between LayerCache status aggregations.")
    warming_deadline_seconds: float = Field(
        900.0, ge=0,
        description="Seconds after a Node's creation when the operator removes its startup "
                    "taint layercache.dev/warming:NoSchedule even if the node is not warm "
                    "yet, so pods are never blocked on layercache for ever (docs/warm-nodes.md).")
    lease_name: str = Field(
        "layercache-operator",
        description="Lease (coordination.k8s.io, in `namespace`) the replicas elect their "
                    "leader with; only the leader runs.")
    standalone: bool = Field(
        False, description="Run without leader election (a single replica, tests).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level (`layercache operator --verbose`: DEBUG).")
    log_format: Literal["json", "plain", "full"] = Field(
        "json", description="Log format: one JSON object a line, or kopf's plain or full "
                            "text lines.")

    def registry_options(self) -> tuple[dict[str, RegistryOptions], RegistryOptions]:
        """Per-registry options for insecure hosts, and the default for all others."""
        return registry_options(self.insecure_registries, ca_file=self.registry_ca_file)

    def summary(self) -> str:
        """One line for the start-up log (no secrets: there are none in settings)."""
        return " ".join(f"{k}={v}" for k, v in self.model_dump().items())
