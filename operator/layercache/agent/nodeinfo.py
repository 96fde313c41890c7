"""What the agent reads from its own Node: DiskPressure, platform and InternalIP.

The kubelet's eviction manager sets the Node condition ``DiskPressure`` when the node's
filesystems run low; the agent stops fetching while it is ``True``. The platform
(``kubernetes.io/os`` / ``kubernetes.io/arch`` labels, else ``status.nodeInfo``) is what
images are resolved for; the ``InternalIP`` address is the default peer endpoint host.
"""

from __future__ import annotations

import platform as host_platform
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["NodeInfo", "host_arch"]

_ARCHES: Final = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm/v7", "ppc64le": "ppc64le",
                  "s390x": "s390x"}


def host_arch() -> str:
    """This machine's architecture in OCI terms (``amd64``, ``arm64`` …)."""
    machine = host_platform.machine()
    return _ARCHES.get(machine, machine)


class NodeInfo:
    """The last-read facts of this node; `update` with each Node object read."""

    def __init__(self) -> None:
        self.disk_pressure = False
        self.platform = f"linux/{host_arch()}"
        self.internal_ip: str | None = None

    def update(self, node: Mapping[str, Any] | None) -> None:
        """Take the facts from ``node`` (a Node as a dict; None: it is gone, keep them)."""
        if node is None:
            return
        labels = (node.get("metadata") or {}).get("labels") or {}
        status = node.get("status") or {}
        info = status.get("nodeInfo") or {}
        os_name = labels.get("kubernetes.io/os") or info.get("operatingSystem")
        arch = labels.get("kubernetes.io/arch") or info.get("architecture")
        if os_name and arch:
            self.platform = f"{os_name}/{arch}"
        self.disk_pressure = any(
            c.get("type") == "DiskPressure" and c.get("status") == "True"
            for c in status.get("conditions") or ())
        self.internal_ip = next((a.get("address") for a in status.get("addresses") or ()
                                 if a.get("type") == "InternalIP" and a.get("address")), None)
