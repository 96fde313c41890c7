"""The cluster replan: every cache planned over the current nodes, node specs written.

`Replanner.replan` reads Nodes and NodeLayerCaches through the `KubePort`, plans each
cache (`layercache.plan.planner.plan`), distributes sources and peers across caches
(`layercache.plan.distribute`), writes each node's `NodeLayerCache` spec when it changed,
deletes those of nodes gone, and writes the agents' credentials Secret when it changed.
The controller (layercache.controller.controller) decides when to replan.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from layercache.api import NodeLayerCacheStatus
from layercache.backoff import Backoff
from layercache.controller.nodeindex import NodeCacheIndex, SpecRecord, held_layers
from layercache.controller.ports import ClusterNode, KubePort
from layercache.controller.settings import OperatorSettings
from layercache.controller.state import CacheState
from layercache.metrics import OperatorMetrics
from layercache.oci.digest import Digest
from layercache.oci.platform import Platform
from layercache.plan.distribute import CachePlan, NodeSpecs, distribute
from layercache.plan.planner import Node, Plan, PlanInputError, PlanOptions, plan

__all__ = ["CREDENTIALS_KEY", "REPLAN_BACKOFF", "SPEC_WRITE_CONCURRENCY", "Replanner"]

log = logging.getLogger(__name__)
#: Waits before retrying a failed replan: 2 s doubling to 10 s, started over by a success.
REPLAN_BACKOFF: Final = Backoff(2.0, 10.0)
#: NodeLayerCache spec writes in flight at once (each a blocking call in a thread).
SPEC_WRITE_CONCURRENCY: Final = 8
#: Data key of the agents' credentials Secret: JSON ``{"namespace/name": [config, ...]}``,
#: each config a Docker config object (``{"auths": ...}``) the cache may use, in the
#: order they are tried (layercache.agent.secrets reads it).
CREDENTIALS_KEY = "caches.json"


class Replanner:
    """Plans the cluster from every cache's state and writes what changed."""

    def __init__(self, kube: KubePort, settings: OperatorSettings,
                 metrics: OperatorMetrics, inventory: NodeCacheIndex | None = None) -> None:
        self.kube, self.settings, self.metrics = kube, settings, metrics
        self.inventory = inventory if inventory is not None else NodeCacheIndex(kube)
        self._credentials: str | None = None  # the last written CREDENTIALS_KEY value

    async def replan(self, caches: Mapping[str, CacheState]) -> dict[str, bool]:
        """Plan every cache in ``caches`` (by key) over the current nodes; write changes.

        Returns node name → whether its NodeLayerCache was written. Until every existing
        LayerCache has been resolved once (after a restart, kopf resumes them one by one),
        nothing is planned: a plan without a cache would strip its layers from every spec,
        and the agents would release them. Each resolution triggers a replan. A state
        whose LayerCache no longer exists is not planned (its DELETED event not handled
        yet, or never seen: a watch re-listed meanwhile), so its layers are released
        without waiting for an event that may not come.
        """
        keys = await asyncio.to_thread(self.kube.layer_cache_keys)
        pending = keys - set(caches)
        if pending:
            log.info("replan waits for %d LayerCache(s) not resolved yet: %s", len(pending),
                     ", ".join(sorted(pending)[:5]))
            return {}
        caches = {key: state for key, state in caches.items() if key in keys}
        nodes = await asyncio.to_thread(self.kube.nodes)
        existing = await self.inventory.current()
        present = {name: held_layers(obj) for name, obj in existing.items()}
        plans, planned = [], list(caches.values())
        outcomes: list[tuple[CacheState, PlanOutcome]] = []
        for state in sorted(planned, key=lambda s: s.key):
            outcome = _plan_cache(state, nodes, present)
            if outcome is not None:
                outcomes.append((state, outcome))
                if outcome.cache_plan is not None:
                    plans.append(outcome.cache_plan)
        previous = {name: obj["record"].assignments for name, obj in existing.items()}
        per_node = distribute(plans, present, previous)
        node_names = {n.name for n in nodes}
        self.metrics.planned({n: len(per_node.get(n, [])) for n in node_names})
        for name in sorted(set(existing) - node_names):
            await asyncio.to_thread(self.kube.delete_node_cache, name)
            self.inventory.deleted(name)
        # No object where no cache wants anything.
        names = [n for n in sorted(node_names) if n in per_node or n in existing]
        specs = NodeSpecs(plans)
        written = await self._write_specs(
            existing, names,
            lambda name: specs.spec_and_fingerprint(name, per_node.get(name, [])))
        await self._write_credentials(caches)
        # Only now, every spec written (and in the index), do the states take their new
        # plans: status aggregation runs beside the replan, and a plan read with node
        # objects from before its specs counts an agent's Ready for the old spec as Ready
        # for the new one (found in CI: a new cache Ready before any node had fetched).
        for state, outcome in outcomes:
            state.record_plan(outcome.desired, outcome.plan)
            if outcome.cache_plan is not None:
                # Counters as they stood before this cache's layers reached a node's spec
                # (`existing` was read before the writes): nothing fetched for it is in them.
                for name in outcome.desired:
                    state.baseline_at(name, _counters(existing.get(name)))
        for state in planned:
            state.mark_planned()
        self.metrics.spec_writes.inc(sum(written.values()))
        return written

    async def _write_specs(self, existing: Mapping[str, Mapping[str, Any]], names: list[str],
                           spec_of: Callable[[str], tuple[dict[str, Any], str]]
                           ) -> dict[str, bool]:
        """Write each node's spec (``spec_of(name)``: it and its fingerprint) that differs.

        `SPEC_WRITE_CONCURRENCY` at a time, each spec made only when its turn comes (1,000
        specs are not held at once); an equal spec is not sent. Returns name → written.
        Each written spec goes into the index at once, so the next replan compares with it
        even before the watch delivers it. Every write is tried; the first failure is raised
        after all have ended (the replan is retried and writes only what still differs).
        """
        limit = asyncio.Semaphore(SPEC_WRITE_CONCURRENCY)

        async def one(name: str) -> bool:
            async with limit:
                (spec, fingerprint), before = spec_of(name), existing.get(name)
                record = SpecRecord.of(name, spec, fingerprint)
                if before is not None and before["record"] == record:
                    return False
                generation = await asyncio.to_thread(self.kube.write_node_spec,
                                                     before is not None, name, spec)
            self.inventory.wrote(name, record, generation)
            return True
        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {name: bool(result) for name, result in zip(names, results, strict=True)}

    async def _write_credentials(self, caches: Mapping[str, CacheState]) -> None:
        """Write the agents' credentials Secret: each cache's configs under its own key.

        Never merged across caches: two caches with different credentials for one
        registry each keep theirs, and an agent fetches a layer only with the credentials
        of a cache that wants it (layercache.agent.secrets).
        """
        by_cache = {key: [json.loads(text) for text in state.docker_configs]
                    for key, state in sorted(caches.items()) if state.docker_configs}
        value = json.dumps(by_cache, sort_keys=True)
        if value != self._credentials:
            await asyncio.to_thread(
                self.kube.write_secret, self.settings.namespace,
                self.settings.credentials_secret, {CREDENTIALS_KEY: value}, "Opaque")
            self._credentials = value


@dataclass(frozen=True)
class PlanOutcome:
    """One cache's replan: its target nodes, its plan, and that plan as `distribute` takes it.

    ``plan`` and ``cache_plan`` are None when its images do not plan (the state says why).
    Recorded in the cache's state (`CacheState.record_plan`) once the specs are written.
    """

    desired: tuple[str, ...]
    plan: Plan | None = None
    cache_plan: CachePlan | None = None


def _plan_cache(state: CacheState, nodes: list[ClusterNode],
                present: Mapping[str, frozenset[Digest]]) -> PlanOutcome | None:
    """``state``'s plan over ``nodes``; None for a cache with no valid spec.

    Not recorded in ``state`` here (see `Replanner.replan`); a plan that fails rejects the
    state at once (its status says why).
    """
    if state.spec is None:
        return None
    spec = state.spec
    targets = [n for n in nodes if spec.targets(n.labels, n.taints) and not n.unschedulable]
    desired = tuple(sorted(n.name for n in targets))
    plan_nodes = [Node(n.name, n.os_arch, n.labels, present.get(n.name, frozenset()),
                       spec.max_bytes_per_node)
                  for n in targets]
    images = [r.plan_input() for r in state.resolved]
    try:
        # Mode Images pulls whole images, which unpacks every prefix of them anyway.
        chain_min = 1 if spec.mode == "Images" else None
        planned = plan(images, plan_nodes, PlanOptions(spec.min_shared_by, chain_min))
    except PlanInputError as e:
        state.reject(f"LayerCache {state.key}: plan: {e}")
        return PlanOutcome(desired)
    repositories = {layer.digest: f"{r.reference.registry}/{r.reference.repository}"
                    for r in state.resolved for layer in r.layers}
    images_mode = tuple(
        (str(r.pinned), tuple(layer.digest for layer in r.distributable))
        for r in state.resolved) if spec.mode == "Images" else ()
    image_layers: dict[Platform, set[tuple[Digest, ...]]] = {}
    for image in images:  # per platform, each distinct layer list once
        image_layers.setdefault(image.platform, set()).add(
            tuple(layer.digest for layer in image.layers))
    # Sorted: the order images resolve in must not rewrite node specs.
    return PlanOutcome(desired, planned, CachePlan(
        state.key, planned, repositories, images_mode, spec.paused,
        {p: tuple(sorted(lists)) for p, lists in image_layers.items()}))


def _counters(obj: Mapping[str, Any] | None) -> tuple[int, int]:
    """A NodeLayerCache's (upstream, peer) byte counters, (0, 0) when it has none."""
    counted = NodeLayerCacheStatus.of(obj).bytes
    return counted.upstream, counted.peer
