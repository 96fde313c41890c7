"""The operator's warm-node round: label warm Nodes, lift the startup taint (`layercache.warm`).

Run every few seconds (``LAYERCACHE_STATUS_INTERVAL_SECONDS``, the status loop's pace), it lists
the Nodes and NodeLayerCaches and merge-patches each Node whose label or startup taint is
out of date (`layercache.warm.warm_patch`). An unchanged cluster costs two lists and no
writes. One Node that cannot be read or patched (deleted meanwhile, a 409 Conflict because
it changed, a malformed object) is logged and retried on the next round; it never stops
the others, nor the operator. Needs ``patch`` on Nodes (manifests/rbac-operator.yaml).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

from kubernetes.client.exceptions import ApiException

from layercache.kube import KubeApi
from layercache.settings import OperatorSettings
from layercache.warm import WARM_LABEL, WARMING_TAINT, NodeWarmth, is_warm, warm_patch

__all__ = ["WarmSignal"]

log = logging.getLogger(__name__)


class WarmSignal:
    """Keeps every Node's `WARM_LABEL` and `WARMING_TAINT` in line with its NodeLayerCache."""

    def __init__(self, kube: KubeApi, settings: OperatorSettings,
                 clock: Callable[[], datetime.datetime] | None = None) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        #: Names of the Nodes found warm in the last round (for metrics and tests).
        self.warm: frozenset[str] = frozenset()

    async def run_once(self) -> int:
        """One round: patch the Nodes that need it; returns how many were patched."""
        nodes = await asyncio.to_thread(self.kube.node_warmth)
        caches = await asyncio.to_thread(self.kube.node_layer_caches)
        now, patched, warm = self.clock(), 0, set()
        for node in nodes:
            if not isinstance(node, NodeWarmth):
                log.warning("Node %s not readable for the warm signal; skipped", node)
                continue
            is_it = is_warm(caches.get(node.name))
            if is_it:
                warm.add(node.name)
            patch = warm_patch(node, is_it, now, self.settings.warming_deadline_seconds)
            if patch is None:
                continue
            try:
                await asyncio.to_thread(self.kube.patch_node, node.name, patch)
            except ApiException as error:
                # 404: gone; 409: changed since listed (next round sees the new version).
                log.warning("Node %s not patched (HTTP %s %s); retrying next round",
                            node.name, error.status, error.reason)
                continue
            except Exception:
                log.exception("Node %s not patched; retrying next round", node.name)
                continue
            patched += 1
            _log_change(node, patch, is_it)
        self.warm = frozenset(warm)
        return patched


def _log_change(node: NodeWarmth, patch: dict[str, object], warm: bool) -> None:
    metadata = patch.get("metadata")
    if isinstance(metadata, dict) and WARM_LABEL in (metadata.get("labels") or {}):
        log.info("Node %s %s", node.name, "is warm: labelled" if warm else
                 "is no longer warm: label removed")
    if "spec" in patch:
        log.info("Node %s: startup taint %s removed (%s)", node.name, WARMING_TAINT,
                 "warm" if warm else "deadline passed")
