"""The operator's warm-node round: label warm Nodes, lift the startup taint (`layercache.api.warm`).

Run every few seconds (``LAYERCACHE_STATUS_INTERVAL_SECONDS``, the status loop's pace), it
reads the Nodes (as their kopf events told, `note_node`; a list until the first event) and
the NodeLayerCaches (the controller's index, layercache.controller.nodeindex) and
merge-patches each Node whose label or startup taint is out of date
(`layercache.api.warm.warm_patch`). An unchanged cluster costs no list and no write. One
Node that cannot be read or patched (deleted meanwhile, a 409 Conflict because it changed,
a malformed object) is logged and retried on the next round; it never stops
the others, nor the operator. Needs ``patch`` on Nodes (manifests/rbac-operator.yaml).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from layercache.api.warm import WARM_LABEL, WARMING_TAINT, NodeWarmth, warm_patch, warm_status
from layercache.controller.nodeindex import NodeCacheIndex
from layercache.controller.ports import KubePort
from layercache.controller.settings import OperatorSettings

__all__ = ["WarmSignal"]

log = logging.getLogger(__name__)


class WarmSignal:
    """Keeps every Node's `WARM_LABEL` and `WARMING_TAINT` in line with its NodeLayerCache."""

    def __init__(self, kube: KubePort, settings: OperatorSettings,
                 clock: Callable[[], datetime.datetime] | None = None, *,
                 inventory: NodeCacheIndex | None = None) -> None:
        self.kube = kube
        self.inventory = inventory if inventory is not None else NodeCacheIndex(kube)
        self.settings = settings
        self.clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        #: Names of the Nodes found warm in the last round (for metrics and tests).
        self.warm: frozenset[str] = frozenset()
        #: Every Node as its events told (`note_node`); None until the first one, and then
        #: a round lists no Nodes (at 1,000 Nodes a list each round was seconds of CPU).
        self._nodes: dict[str, NodeWarmth | str] | None = None

    def note_node(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A Node event (the operator's kopf Node watch): what the next round reads of it."""
        name = str((body.get("metadata") or {}).get("name") or "?")
        nodes = self._nodes = {} if self._nodes is None else self._nodes
        if event_type == "DELETED":
            nodes.pop(name, None)
            return
        try:
            nodes[name] = NodeWarmth.from_node(body)
        except (ValueError, TypeError, AttributeError):
            nodes[name] = name

    async def run_once(self) -> int:
        """One round: patch the Nodes that need it; returns how many were patched."""
        nodes = (list(self._nodes.values()) if self._nodes is not None
                 else await asyncio.to_thread(self.kube.node_warmth))
        caches = await self.inventory.current()
        now, patched, warm = self.clock(), 0, set()
        for node in nodes:
            if not isinstance(node, NodeWarmth):
                log.warning("Node %s not readable for the warm signal; skipped", node)
                continue
            is_it = _warm(caches.get(node.name))
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


def _warm(kept: Mapping[str, Any] | None) -> bool:
    """`layercache.api.warm.is_warm` of an indexed NodeLayerCache (its spec as a record)."""
    if not kept:
        return False
    record = kept["record"]
    return warm_status(kept["metadata"], kept["status"], len(record.layers), record.chains)
