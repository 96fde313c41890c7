"""Cluster watches that change the plan: nodes and agents' inventories.

Nodes joining, leaving or relabelled change who wants what; a NodeLayerCache status
changing what a node holds changes who can serve what.
"""

from __future__ import annotations

from typing import Any

import kopf

from layercache.api import GROUP, NLC_PLURAL, VERSION, NodeLayerCacheStatus
from layercache.reconciler import Reconciler


def _node_key(body: kopf.Body) -> tuple[Any, ...]:
    # What planning reads of a Node; heartbeats and other status churn must not replan.
    labels = tuple(sorted((body.get("metadata", {}).get("labels") or {}).items()))
    spec = body.get("spec") or {}
    taints = tuple(sorted((t.get("key"), t.get("value"), t.get("effect"))
                          for t in spec.get("taints") or []))
    return labels, taints, bool(spec.get("unschedulable"))


@kopf.on.event("", "v1", "nodes")
async def node_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Replan when a node is added, deleted, relabelled, (un)tainted or cordoned."""
    reconciler: Reconciler | None = getattr(memo, "reconciler", None)
    if reconciler is None:
        return
    seen: dict[str, Any] = memo.setdefault("node_keys", {})
    name = body.get("metadata", {}).get("name")
    key = None if event.get("type") == "DELETED" else _node_key(body)
    if seen.get(name) != key:
        seen[name] = key
        reconciler.trigger()


@kopf.on.event(GROUP, VERSION, NLC_PLURAL)
async def inventory_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo,
                      **_: Any) -> None:
    """Replan when what a node holds changes (new holders change sources and peers)."""
    reconciler: Reconciler | None = getattr(memo, "reconciler", None)
    if reconciler is None:
        return
    seen: dict[str, Any] = memo.setdefault("held", {})
    name = body.get("metadata", {}).get("name")
    status = NodeLayerCacheStatus.of(body)
    key = None if event.get("type") == "DELETED" else (tuple(status.missing), status.layers.held)
    if seen.get(name) != key:
        seen[name] = key
        reconciler.trigger()
