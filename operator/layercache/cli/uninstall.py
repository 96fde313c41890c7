"""`layercache cleanup`: release every layer on every node before layercache is uninstalled.

Each agent pins the layers it holds (`containerd.io/gc.root`, layercache.containerd.labels)
and unpins them only when its NodeLayerCache stops wanting them; once the agents are gone
nothing would ever unpin them. So before an uninstall, while the operator and the agents
still run: delete every LayerCache (the operator plans empty node specs and releases their
finalizers), then wait until every agent has acted on its empty spec. The Helm chart runs
this as its pre-delete hook (templates/hook-cleanup.yaml); docs/kind.md has the same with
kubectl for the plain manifests.

A node has released when its NodeLayerCache wants no layer (`spec.layers` empty), its agent
reported on that very generation (`status.observedGeneration`) and holds none
(`status.layers.held` 0): the agent releases unwanted blobs of ours before it reports
(layercache.agent.reconcile). A NodeLayerCache whose agent never reports (no agent runs on
that node) keeps the wait going until the deadline, which fails naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from layercache.controller.kube import KubeApi

__all__ = ["CleanupTimeout", "cleanup", "not_released"]


class CleanupTimeout(RuntimeError):
    """The deadline passed with layers still held; the message names what is left."""


def not_released(caches: Iterable[Mapping[str, Any]],
                 node_caches: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What still holds layers, one line each (empty once everything is released).

    Args:
        caches: the LayerCaches still present (raw objects).
        node_caches: NodeLayerCache name → raw object.
    """
    left = []
    for cache in caches:
        meta = cache["metadata"]
        state = ("deleting, finalizers " + ", ".join(meta.get("finalizers") or [])
                 if meta.get("deletionTimestamp") else "not deleted")
        left.append(f"LayerCache {meta['namespace']}/{meta['name']} ({state})")
    for name, obj in sorted(node_caches.items()):
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        wanted = len(spec.get("layers") or [])
        held = (status.get("layers") or {}).get("held", 0)
        generation = obj["metadata"].get("generation")
        if wanted:
            left.append(f"node {name}: its NodeLayerCache still wants {wanted} layers")
        elif status.get("observedGeneration") != generation:
            left.append(f"node {name}: no agent report on generation {generation} yet "
                        f"(observed {status.get('observedGeneration')}): is its agent running?")
        elif held:
            left.append(f"node {name}: the agent still holds {held} layers")
    return left


def cleanup(kube: KubeApi, timeout: float, *, poll: float = 2.0,
            log: Callable[[str], None] = print,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> None:
    """Delete every LayerCache, then wait until every node released its layers.

    Args:
        kube: API access (list/delete LayerCaches, list NodeLayerCaches).
        timeout: seconds to wait at most.
        poll: seconds between checks.
        log: where progress lines go.
        clock: monotonic seconds (for tests).
        sleep: waits `poll` seconds (for tests).

    Raises:
        CleanupTimeout: `timeout` passed first; the message lists what still holds layers.
        kubernetes.client.ApiException: an API call failed (e.g. RBAC).
    """
    deadline = clock() + timeout
    caches = kube.layer_caches()
    for cache in caches:
        meta = cache["metadata"]
        kube.delete_layer_cache(meta["namespace"], meta["name"])
    log(f"deleted {len(caches)} LayerCaches; waiting up to {timeout:.0f} s for every agent "
        "to release its layers")
    while True:
        left = not_released(kube.layer_caches(), kube.node_layer_caches())
        if not left:
            log("every node released its layers")
            return
        if clock() >= deadline:
            raise CleanupTimeout(
                f"layers still held after {timeout:.0f} s; uninstalling now would leave them "
                "pinned on these nodes for good (the operator and the agents must run until "
                "this succeeds):\n  " + "\n  ".join(left))
        sleep(poll)
