"""Reporting: each LayerCache's status from its nodes, and the Events the operator posts.

`CacheReporter.aggregate` writes each cache's status (`layercache.controller.status.
cache_status` over the NodeLayerCaches) when it changed; the operator's metrics read the
statuses written (`layercache.metrics.OperatorMetrics`). The Events outside kopf handlers:
``NonDistributableLayers`` once per foreign layer, ``TagMoved`` when a refresh finds a tag
at a new digest. Posting never raises: a failure is logged and stops no other cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from layercache.controller.nodeindex import NodeCacheIndex
from layercache.controller.ports import KubePort
from layercache.controller.state import CacheState
from layercache.controller.status import cache_status, foreign_layers
from layercache.oci.digest import Digest

__all__ = ["CacheReporter"]

log = logging.getLogger(__name__)


class CacheReporter:
    """Writes LayerCache statuses and posts the operator's own Events through ``kube``."""

    def __init__(self, kube: KubePort, inventory: NodeCacheIndex | None = None) -> None:
        self.kube = kube
        self.inventory = inventory if inventory is not None else NodeCacheIndex(kube)

    async def aggregate(self, caches: Iterable[CacheState]) -> int:
        """Write each cache's status from its nodes' NodeLayerCache status; returns writes.

        The nodes' statuses come from the index (`NodeCacheIndex.current`): no list. Every
        status is made from one reading of the index and of the states, with no await
        between them (while the index runs, reading it does not wait): a replan gives its
        caches their new plans only after their specs are in the index
        (`layercache.controller.replanner.Replanner.replan`), so a status never pairs a
        plan with node objects from before it.
        """
        existing = await self.inventory.current()
        # Every status from this one reading, before the first write: a replan that ends
        # while a write is awaited gives its caches new plans, which must not be read
        # beside node objects from before its specs were written.
        changed = []
        for state in list(caches):
            if not state.planned and state.last_status is not None:
                # Resumed or changed, not planned yet: the status written before stands
                # until node specs reflect this resolution (no flapping, no early Ready).
                continue
            status = cache_status(state, existing, state.last_status)
            if status != state.last_status:
                changed.append((state, status))
        writes = 0
        for state, status in changed:
            try:
                await asyncio.to_thread(self.kube.patch_cache_status, state.namespace,
                                        state.name, status)
            except Exception:  # one cache's failure (e.g. just deleted) stops no other
                log.exception("status of LayerCache %s not written", state.key)
                continue
            state.record_status(status)
            writes += 1
        return writes

    async def report_foreign(self, state: CacheState) -> None:
        """One ``NonDistributableLayers`` Event for foreign layers not reported before.

        Such layers are never planned (`ResolvedImage.plan_input`) and never block Ready;
        status lists them (`layercache.controller.status.foreign_layers`), the Event says so once.
        """
        found = foreign_layers(state)
        new = [entry for entry in found if entry["digest"] not in state.reported_foreign]
        if not new:
            return
        listed = ", ".join(f"{e['image']}: {Digest(e['digest']).short} ({e['mediaType']})"
                           for e in new[:5])
        more = f" and {len(new) - 5} more" if len(new) > 5 else ""
        try:
            await asyncio.to_thread(
                self.kube.post_event, state.namespace, state.name, state.uid,
                "NonDistributableLayers",
                f"{len(new)} foreign / non-distributable layer(s) not cached (the runtime "
                f"fetches them from their URLs): {listed}{more}")
        except Exception:
            log.exception("NonDistributableLayers event for %s not posted", state.key)
            return
        state.note_reported(e["digest"] for e in new)

    async def report_moved(self, old: CacheState, new: CacheState) -> None:
        """A ``TagMoved`` Event when ``new`` resolved a reference to another digest."""
        before = old.digests()
        moved = sorted(f"{ref} ({platform})" for (ref, platform), digest
                       in new.digests().items() if before.get((ref, platform)) != digest)
        if not moved:
            return
        try:
            await asyncio.to_thread(
                self.kube.post_event, new.namespace, new.name, new.uid, "TagMoved",
                f"re-resolved: {', '.join(moved[:5])}")
        except Exception:
            log.exception("TagMoved event for %s not posted", new.key)
