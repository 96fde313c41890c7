"""Pure: a LayerCache's status from the operator's state and its nodes' NodeLayerCaches.

Conditions follow the Kubernetes API conventions: `Ready`, `Progressing`, `Degraded`, each
with a CamelCase reason and a message that names the failing image, node or field;
`lastTransitionTime` changes only when a condition's status does. The per-node breakdown
is bounded (counts, plus at most `MAX_FAILING` failing nodes), so status stays small at
1,000 nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layercache.reconciler import CacheState

from layercache.conditions import condition, headline_reason, now_iso
from layercache.planner import saved_bytes
from layercache.units import human_bytes

__all__ = ["DISK_KEYS", "MAX_FAILING", "MAX_FOREIGN", "cache_disk", "cache_status",
           "foreign_layers"]

MAX_FAILING = 20
#: Foreign layers listed in status at most (the CRD's maxItems).
MAX_FOREIGN = 100


def foreign_layers(state: CacheState) -> list[dict[str, str]]:
    """The foreign / non-distributable layers of `state`'s images: never planned nor fetched.

    One ``{"image", "digest", "mediaType"}`` per image and layer, at most `MAX_FOREIGN`.
    """
    found = {(str(r.reference), str(layer.digest)): layer.media_type
             for r in state.resolved for layer in r.non_distributable}
    return [{"image": image, "digest": digest, "mediaType": media_type}
            for (image, digest), media_type in sorted(found.items())][:MAX_FOREIGN]


#: The figures of ``status.disk`` (NodeLayerCache and LayerCache), bytes each.
DISK_KEYS = ("blobs", "snapshots", "separate", "saved")


def cache_disk(cache: str, nodes: Iterable[str],
               node_caches: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """A cache's ``status.disk``: its figures on each of ``nodes``, summed (bytes).

    Each agent reports, per cache on its node, the bytes of the blobs and chain snapshots
    the cache wants there, what its images would take stored apart, and the difference
    (`layercache.agent.disksavings`); a node that has not measured yet adds 0.
    """
    total = dict.fromkeys(DISK_KEYS, 0)
    for name in nodes:
        disk = ((node_caches.get(name) or {}).get("status") or {}).get("disk") or {}
        for entry in disk.get("caches") or ():
            if entry.get("cache") == cache:
                for key in DISK_KEYS:
                    total[key] += int(entry.get(key, 0))
    return total


def _node_state(obj: Mapping[str, Any] | None) -> tuple[bool, str, str]:
    """(ready, reason, message) of one node's NodeLayerCache."""
    if obj is None:
        return False, "NodeCacheMissing", "no NodeLayerCache yet"
    status = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    if status.get("observedGeneration") != generation:
        return False, "AgentNotCaughtUp", (
            f"agent observed generation {status.get('observedGeneration')}, spec is {generation}")
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {})
    if ready.get("status") == "True":
        return True, "Ready", ""
    degraded = conditions.get("Degraded", {})
    if degraded.get("status") == "True":
        return False, degraded.get("reason", "Degraded"), degraded.get("message", "")
    return False, ready.get("reason", "Fetching"), ready.get("message", "")


def cache_status(state: CacheState, node_caches: Mapping[str, Mapping[str, Any]],
                 last: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `status` of `state`'s LayerCache (the CRD's camelCase dict).

    `node_caches` are all NodeLayerCache objects by name; `last` the status written before
    (to keep condition transition times).
    """
    now = now_iso()
    previous = {c["type"]: c for c in (last or {}).get("conditions") or []}
    gen = state.generation
    if state.invalid is not None:
        invalid = [
            condition(previous, "Ready", False, "InvalidSpec", state.invalid, gen, now),
            condition(previous, "Progressing", False, "InvalidSpec", state.invalid, gen, now),
            condition(previous, "Degraded", True, "InvalidSpec", state.invalid, gen, now)]
        return {"observedGeneration": gen, "reason": headline_reason(invalid),
                "conditions": invalid}
    planned = state.desired_nodes is not None
    nodes = state.desired_nodes or ()
    ready_nodes, failing = 0, []
    upstream, peer = state.carried
    chain_counts = dict.fromkeys(("wanted", "unpacked", "bytesUnpacked"), 0)
    for name in nodes:
        obj = node_caches.get(name)
        ok, reason, message = _node_state(obj)
        counted = ((obj or {}).get("status") or {}).get("chains") or {}
        for key in chain_counts:
            chain_counts[key] += int(counted.get(key, 0))
        bytes_ = ((obj or {}).get("status") or {}).get("bytes") or {}
        # Node counters are cumulative over every cache; ours is what they grew by since
        # this cache was first planned there (an agent restart never lowers them). A node
        # with no baseline never had this cache's layers in its spec (e.g. none of its
        # images resolved): nothing it fetched was for us.
        if name in state.baseline:
            base_up, base_peer = state.baseline[name]
            upstream += max(int(bytes_.get("upstream", 0)) - base_up, 0)
            peer += max(int(bytes_.get("peer", 0)) - base_peer, 0)
        if ok:
            ready_nodes += 1
        else:
            failing.append({"name": name, "reason": reason, "message": message[:512]})
    savings = state.plan.savings if state.plan else None
    node_plans = list(state.plan.nodes.values()) if state.plan else []
    naive = savings.naive_bytes if savings else 0
    skipped = sum(1 for p in (state.plan.nodes.values() if state.plan else ()) if p.skipped)
    shared = sum(1 for n in (state.plan.shared_by.values() if state.plan else ()) if n > 1)
    problems = [f"{e.reference or 'pull secret'}"
                f"{' (' + e.platform + ')' if e.platform else ''}: {e.reason}: {e.message}"
                for e in state.errors]
    if planned and not nodes:
        problems.append("no node matches nodeSelector and tolerations")
    if skipped:
        problems.append(f"{skipped} node(s) skip layers for maxBytesPerNode")
    degraded_reason = (state.errors[0].reason if state.errors else
                       "NoMatchingNodes" if planned and not nodes else
                       "BudgetExceeded" if skipped else "AsExpected")
    all_ready = bool(nodes) and ready_nodes == len(nodes)
    failing_fetch = [f for f in failing if f["reason"] not in ("Fetching", "AgentNotCaughtUp",
                                                               "NodeCacheMissing")]
    if failing_fetch and degraded_reason == "AsExpected":
        degraded_reason = "NodeErrors"
        problems.append("; ".join(f"{f['name']}: {f['reason']}" for f in failing_fetch[:5]))
    conditions = [
        condition(previous, "Ready", all_ready and not state.errors,
                   "AllNodesReady" if all_ready and not state.errors else
                   "ImagesUnresolved" if state.errors else "NodesNotReady",
                   f"{ready_nodes}/{len(nodes)} nodes hold their layers", gen, now),
        condition(previous, "Progressing", not planned or (bool(nodes) and not all_ready),
                   "Planning" if not planned else
                   "Fetching" if nodes and not all_ready else "Complete",
                   f"{len(nodes) - ready_nodes} node(s) still fetching", gen, now),
        condition(previous, "Degraded", degraded_reason != "AsExpected", degraded_reason,
                   "; ".join(problems), gen, now),
    ]
    images = [{"reference": str(r.reference), "digest": str(r.digest),
               "platform": str(r.platform), "layers": len(r.layers)}
              for r in state.resolved][:500]
    images += [{"reference": e.reference, "platform": e.platform,
                "error": f"{e.reason}: {e.message}"[:512]} for e in state.errors if e.reference]
    # Measured, once every node holds its layers (before that the counts are not final).
    saved = saved_bytes(naive, upstream, peer) if all_ready else 0
    return {
        "observedGeneration": gen,
        "reason": headline_reason(conditions),
        "conditions": conditions,
        "images": images[:500],
        "layers": {"total": len(state.plan.shared_by) if state.plan else 0, "shared": shared,
                   "skippedForBudget": sum(len(p.skipped.layers) for p in
                                           (state.plan.nodes.values() if state.plan else ())
                                           if p.skipped)},
        "chains": {"planned": sum(len(p.chains) for p in node_plans),
                   "skippedForBudget": sum(p.chains_skipped for p in node_plans),
                   **chain_counts},
        "bytes": {"unique": savings.unique_bytes if savings else 0, "naive": naive,
                  "expectedUpstream": savings.expected_upstream_bytes if savings else 0,
                  "upstream": upstream, "peer": peer, "saved": saved,
                  "savedHuman": human_bytes(saved)},
        "nodes": {"desired": len(nodes), "ready": ready_nodes,
                  "summary": f"{ready_nodes}/{len(nodes)}", "failing": failing[:MAX_FAILING]},
        "disk": cache_disk(state.key, nodes, node_caches),
        "lastResolved": state.resolved_time,
        "nonDistributableLayers": foreign_layers(state),
    }
