"""The node agent's settings: one frozen object, read once from ``LAYERCACHE_*`` variables.

Every field names its unit; the environment variable is ``LAYERCACHE_`` + the field name in
upper case (``LAYERCACHE_CONCURRENCY``), except where a Kubernetes convention gives a second
name that the DaemonSet's downward API fills in (``NODE_NAME``, ``POD_NAMESPACE``,
``POD_IP``). Settings hold no secrets: the peer token and registry credentials are read from
Secrets named here, so `AgentSettings.describe` may be logged whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from layercache.oci.reference import parse_registry_hosts
from layercache.registryconfig import RegistryHostList

__all__ = ["AgentSettings"]


class AgentSettings(BaseSettings):
    """What one node agent needs to know; see each field for its unit and default."""

    model_config = SettingsConfigDict(env_prefix="LAYERCACHE_", frozen=True, extra="ignore",
                                      populate_by_name=True)

    node_name: str = Field(
        min_length=1, validation_alias=AliasChoices("LAYERCACHE_NODE_NAME", "NODE_NAME"),
        description="This node's name; also the name of the NodeLayerCache the agent serves.")
    namespace: str = Field(
        "layercache-system", min_length=1,
        validation_alias=AliasChoices("LAYERCACHE_NAMESPACE", "POD_NAMESPACE"),
        description="The agent's namespace: where its Secrets are read.")
    kubeconfig: Path | None = Field(
        None, validation_alias=AliasChoices("LAYERCACHE_KUBECONFIG", "KUBECONFIG"),
        description="Kubeconfig file; unset: the in-cluster ServiceAccount.")
    containerd_socket: Path = Field(
        Path("/run/containerd/containerd.sock"),
        description="The node's containerd socket (serves the content API and CRI).")
    containerd_namespace: str = Field(
        "k8s.io", description="containerd namespace to write into (the CRI's is k8s.io).")
    snapshotter: str | None = Field(
        None, description="Snapshotter to unpack chains into (only overlayfs is supported); "
                          "unset: the CRI's, read from containerd_config, else overlayfs.")
    containerd_config: Path | None = Field(
        Path("/etc/containerd/config.toml"),
        description="The node containerd's config file, read for the CRI's snapshotter; "
                    "missing or unset: overlayfs (containerd's default).")
    peer_bind: str = Field("0.0.0.0", description="Address the peer server listens on.")  # noqa: S104 - agents must reach it
    peer_port: int = Field(5780, ge=1, le=65535, description="Peer server TCP port.")
    peer_advertise_address: str | None = Field(
        None, validation_alias=AliasChoices("LAYERCACHE_PEER_ADVERTISE_ADDRESS", "POD_IP"),
        description="Address other agents reach this one at; unset: the Node's InternalIP.")
    metrics_bind: str = Field("0.0.0.0", description="Address the metrics server listens on.")  # noqa: S104 - Prometheus scrapes it
    metrics_port: int = Field(9780, ge=1, le=65535, description="Metrics server TCP port.")
    concurrency: int = Field(4, ge=1, le=64, description="Blob transfers at once.")
    max_bytes_per_second: int | None = Field(
        None, gt=0, description="Cap on the total fetch rate (bytes/s, all sources); unset: none.")
    relay_budget_bytes: int | None = Field(
        None, gt=0, description=(
            "Bytes of layers still being received that this agent keeps in memory to "
            "relay to peers (cut-through), and as much again for the layers it seeds; a "
            "layer that does not fit is served to peers once committed. Unset: 1/8 of the "
            "container's memory limit (cgroup), at most 128 MiB."))
    peer_wait_seconds: float = Field(
        120.0, ge=0, description="How long a Peer layer waits for a peer (s) before upstream.")
    peer_poll_seconds: float = Field(
        2.0, gt=0, description=(
            "Peers are asked with long-poll HEADs (answered when a peer holds the layer "
            "or its first bytes arrive there); this is the first wait before asking again "
            "when they answer at once without it (s); grows to 5x, jittered. A listed peer "
            "that has no endpoint yet is looked up again this often."))
    min_free_percent: float | None = Field(
        None, ge=0, le=100,
        description="Fetch only while the image filesystem keeps this much free after it (%); "
                    "never below the kubelet's own disk thresholds + 5 points, which are "
                    "the floor when unset (kubelet defaults: 20 %).")
    kubelet_config: Path | None = Field(
        Path("/var/lib/kubelet/config.yaml"),
        description="The kubelet's KubeletConfiguration file (evictionHard/evictionSoft "
                    "imagefs.available, nodefs.available, imageGCHighThresholdPercent); "
                    "missing or unset: the kubelet's defaults.")
    image_fs_path: Path | None = Field(
        None, description="Path on the image filesystem to check; unset: CRI ImageFsInfo's.")
    registry_secret: str = Field(
        "layercache-registry-credentials",
        description="Secret with upstream credentials per cache (key `caches.json`, written "
                    "by the operator) or for all (a dockerconfigjson); missing: anonymous.")
    peer_token_secret: str = Field(
        "layercache-peer-token", description="Secret whose key 'token' authenticates agents.")
    secret_refresh_seconds: float = Field(
        60.0, gt=0, description="Interval between re-reads of both Secrets (s).")
    insecure_registries: RegistryHostList = Field(
        "", description="Registry hosts (host:port) spoken to in plain HTTP; comma-separated.")
    registry_ca_file: Path | None = Field(
        None, description="Extra CA certificates (PEM) trusted for registries.")
    registry_config_path: str = Field(
        "/etc/containerd/certs.d",
        description="The node containerd's registry config_path (':'-separated): upstream "
                    "fetches follow its hosts.toml mirrors, CAs and skip_verify as "
                    "containerd does; empty: straight to each registry.")
    status_interval_seconds: float = Field(
        2.0, gt=0, description="Least time between two status patches while busy (s).")
    resync_seconds: float = Field(
        60.0, gt=0, description="Interval between full re-reads of containerd's inventory (s).")
    node_check_seconds: float = Field(
        15.0, gt=0, description="Interval between reads of the Node's conditions (s).")
    retry_initial_seconds: float = Field(
        2.0, gt=0, description="Wait before retrying a failed layer (s); doubles per failure.")
    retry_max_seconds: float = Field(
        60.0, gt=0, description="Longest wait before retrying a failed layer (s).")
    log_level: str = Field("INFO", description="Python log level name.")

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @property
    def insecure_hosts(self) -> tuple[str, ...]:
        """`insecure_registries` as a tuple of canonical ``host:port`` keys."""
        return parse_registry_hosts(self.insecure_registries)

    def describe(self) -> dict[str, Any]:
        """Every setting as plain JSON values, for the single start-up log line."""
        described: dict[str, Any] = self.model_dump(mode="json")
        return described
