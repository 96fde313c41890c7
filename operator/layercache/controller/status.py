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
    from layercache.controller.state import CacheState

from layercache.api import Condition, LayerCacheStatus, NodeLayerCacheStatus, Reason
from layercache.api.conditions import condition, headline_reason, now_iso
from layercache.api.layercache import (
    CacheBytes,
    CacheChains,
    FailingNode,
    ForeignLayer,
    ImageStatus,
    LayerTotals,
    NodeCounts,
)
from layercache.api.nodelayercache import DiskFigures
from layercache.plan.planner import saved_bytes
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
    return [ForeignLayer(image=image, digest=digest, media_type=media_type).to_dict()
            for (image, digest), media_type in sorted(found.items())][:MAX_FOREIGN]


#: The figures of ``status.disk`` (NodeLayerCache and LayerCache), bytes each.
DISK_KEYS = ("blobs", "snapshots", "separate", "saved")


def cache_disk(cache: str, nodes: Iterable[str],
               node_caches: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """A cache's ``status.disk``: its figures on each of ``nodes``, summed (bytes).

    Each agent reports, per cache on its node, the bytes of the blobs and chain snapshots
    the cache wants there, what its images would take stored apart, and the difference
    (`layercache.agent.status.disksavings`); a node that has not measured yet adds 0.
    """
    total = dict.fromkeys(DISK_KEYS, 0)
    for name in nodes:
        disk = NodeLayerCacheStatus.of(node_caches.get(name)).disk
        for entry in disk.caches if disk is not None else ():
            if entry.cache == cache:
                for key in DISK_KEYS:
                    total[key] += getattr(entry, key)
    return total


def _node_state(obj: Mapping[str, Any] | None, status: NodeLayerCacheStatus
                ) -> tuple[bool, str, str]:
    """(ready, reason, message) of one node's NodeLayerCache ``obj`` with ``status``."""
    if obj is None:
        return False, Reason.NODE_CACHE_MISSING, "no NodeLayerCache yet"
    generation = obj["metadata"].get("generation")
    if status.observed_generation != generation:
        return False, Reason.AGENT_NOT_CAUGHT_UP, (
            f"agent observed generation {status.observed_generation}, spec is {generation}")
    ready = status.condition("Ready")
    if ready is not None and ready.status == "True":
        return True, Reason.READY, ""
    degraded = status.condition("Degraded")
    if degraded is not None and degraded.status == "True":
        return (False, degraded.reason if "reason" in degraded.model_fields_set
                else Reason.DEGRADED, degraded.message)
    if ready is None:
        return False, Reason.FETCHING, ""
    return (False, ready.reason if "reason" in ready.model_fields_set else Reason.FETCHING,
            ready.message)


def cache_status(state: CacheState, node_caches: Mapping[str, Mapping[str, Any]],
                 last: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `status` of `state`'s LayerCache, as the CRD's camelCase dict.

    Built as a `layercache.api.LayerCacheStatus`. `node_caches` are all NodeLayerCache
    objects by name; `last` the status written before (to keep condition transition times).
    """
    now = now_iso()
    previous = {c["type"]: c for c in (last or {}).get("conditions") or []}
    gen = state.generation
    if state.invalid is not None:
        invalid = [
            condition(previous, "Ready", False, Reason.INVALID_SPEC, state.invalid, gen, now),
            condition(previous, "Progressing", False, Reason.INVALID_SPEC, state.invalid, gen,
                      now),
            condition(previous, "Degraded", True, Reason.INVALID_SPEC, state.invalid, gen, now)]
        return LayerCacheStatus(observed_generation=gen, reason=headline_reason(invalid),
                                conditions=_conditions(invalid)).to_dict()
    planned = state.desired_nodes is not None
    nodes = state.desired_nodes or ()
    ready_nodes, failing = 0, []
    upstream, peer = state.carried
    chain_counts = dict.fromkeys(("wanted", "unpacked", "bytes_unpacked"), 0)
    for name in nodes:
        obj = node_caches.get(name)
        status = NodeLayerCacheStatus.of(obj)
        ok, reason, message = _node_state(obj, status)
        for key in chain_counts:
            chain_counts[key] += getattr(status.chains, key)
        # Node counters are cumulative over every cache; ours is what they grew by since
        # this cache was first planned there (an agent restart never lowers them). A node
        # with no baseline never had this cache's layers in its spec (e.g. none of its
        # images resolved): nothing it fetched was for us.
        if name in state.baseline:
            base_up, base_peer = state.baseline[name]
            upstream += max(status.bytes.upstream - base_up, 0)
            peer += max(status.bytes.peer - base_peer, 0)
        if ok:
            ready_nodes += 1
        else:
            failing.append(FailingNode(name=name, reason=reason, message=message[:512]))
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
                       Reason.NO_MATCHING_NODES if planned and not nodes else
                       Reason.BUDGET_EXCEEDED if skipped else Reason.AS_EXPECTED)
    all_ready = bool(nodes) and ready_nodes == len(nodes)
    failing_fetch = [f for f in failing if f.reason not in (
        Reason.FETCHING, Reason.AGENT_NOT_CAUGHT_UP, Reason.NODE_CACHE_MISSING)]
    if failing_fetch and degraded_reason == Reason.AS_EXPECTED:
        degraded_reason = Reason.NODE_ERRORS
        problems.append("; ".join(f"{f.name}: {f.reason}" for f in failing_fetch[:5]))
    conditions = [
        condition(previous, "Ready", all_ready and not state.errors,
                   Reason.ALL_NODES_READY if all_ready and not state.errors else
                   Reason.IMAGES_UNRESOLVED if state.errors else Reason.NODES_NOT_READY,
                   f"{ready_nodes}/{len(nodes)} nodes hold their layers", gen, now),
        condition(previous, "Progressing", not planned or (bool(nodes) and not all_ready),
                   Reason.PLANNING if not planned else
                   Reason.FETCHING if nodes and not all_ready else Reason.COMPLETE,
                   f"{len(nodes) - ready_nodes} node(s) still fetching", gen, now),
        condition(previous, "Degraded", degraded_reason != Reason.AS_EXPECTED, degraded_reason,
                   "; ".join(problems), gen, now),
    ]
    images = [ImageStatus(reference=str(r.reference), digest=str(r.digest),
                          platform=str(r.platform), layers=len(r.layers))
              for r in state.resolved][:500]
    images += [ImageStatus(reference=e.reference, platform=e.platform,
                           error=f"{e.reason}: {e.message}"[:512])
               for e in state.errors if e.reference]
    # Measured, once every node holds its layers (before that the counts are not final).
    saved = saved_bytes(naive, upstream, peer) if all_ready else 0
    return LayerCacheStatus(
        observed_generation=gen,
        reason=headline_reason(conditions),
        conditions=_conditions(conditions),
        images=images[:500],
        layers=LayerTotals(total=len(state.plan.shared_by) if state.plan else 0, shared=shared,
                           skipped_for_budget=sum(len(p.skipped.layers) for p in node_plans
                                                  if p.skipped)),
        chains=CacheChains(planned=sum(len(p.chains) for p in node_plans),
                           skipped_for_budget=sum(p.chains_skipped for p in node_plans),
                           **chain_counts),
        bytes=CacheBytes(unique=savings.unique_bytes if savings else 0, naive=naive,
                         expected_upstream=savings.expected_upstream_bytes if savings else 0,
                         upstream=upstream, peer=peer, saved=saved,
                         saved_human=human_bytes(saved)),
        nodes=NodeCounts(desired=len(nodes), ready=ready_nodes,
                         summary=f"{ready_nodes}/{len(nodes)}", failing=failing[:MAX_FAILING]),
        disk=DiskFigures(**cache_disk(state.key, nodes, node_caches)),
        last_resolved=state.resolved_time,
        non_distributable_layers=[ForeignLayer.model_validate(entry)
                                  for entry in foreign_layers(state)],
    ).to_dict()


def _conditions(built: Iterable[Mapping[str, Any]]) -> list[Condition]:
    return [Condition.model_validate(c) for c in built]
