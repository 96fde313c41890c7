"""The operator's core: `Controller` owns every cache's state, its parts and its loops.

Parts, one concern each: `CacheResolver` (layercache.controller.resolver) makes a cache's
`CacheState` from its spec; `Replanner` (replanner) plans the cluster and writes node specs
and the agents' credentials; `CacheReporter` (reporter) writes LayerCache statuses and
posts Events; `WarmSignal` (warmsignal) labels warm Nodes. All reach Kubernetes through one
`KubePort` (layercache.controller.ports) and registries through one `ImageRegistry`.

The kopf handlers (layercache.controller.handlers) only call it: a LayerCache created,
changed or resumed → `resolve`; deleted → `forget`; a Node changed → `node_event`. The
NodeLayerCaches are not kopf's: the controller's own watch keeps them in an index
(`NodeCacheIndex`, layercache.controller.nodeindex), which calls `inventory_event`; the
replan, status and warm loops read the index. `start` starts its loops: that watch,
replan (at most one per debounce window, so a burst of events costs one plan and only
changed specs are written), status, tag refresh and warm nodes. Only the replica holding
the operator's Lease runs kopf and the controller (layercache.controller.leadership); its
loops stop when the Lease is lost (``start(lost=...)``) or at kopf's cleanup (`stop`), so a
second replica never writes.

Time is injectable (``clock``: monotonic seconds; ``sleep``), so the loops run in tests
without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from layercache.api import NodeLayerCacheStatus
from layercache.controller.nodeindex import NodeCacheIndex
from layercache.controller.ports import ImageRegistry, KubePort
from layercache.controller.replanner import REPLAN_BACKOFF, Replanner
from layercache.controller.reporter import CacheReporter
from layercache.controller.resolver import CacheResolver, RegistryImages
from layercache.controller.settings import OperatorSettings
from layercache.controller.state import CacheState
from layercache.controller.warmsignal import WarmSignal
from layercache.metrics import OperatorMetrics

__all__ = ["REFRESH_INTERVAL_SECONDS", "Controller"]

log = logging.getLogger(__name__)
#: How often (seconds) the refresh loop looks for caches whose refreshInterval passed.
REFRESH_INTERVAL_SECONDS = 15.0
#: How many deleted caches' uids are remembered: far more than can have a resolution
#: running at once (a resolution ends within minutes).
DELETED_UIDS_KEPT = 10_000
Sleep = Callable[[float], Awaitable[None]]


class Controller:
    """Every cache's `CacheState` by "namespace/name", its parts and its loops.

    ``registry`` receives the operator's metrics (a private one when None); ``images`` is
    where images resolve (`RegistryImages` when None).
    """

    def __init__(self, kube: KubePort, settings: OperatorSettings,
                 registry: CollectorRegistry | None = None, *,
                 images: ImageRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.kube = kube
        self.settings = settings
        self.caches: dict[str, CacheState] = {}
        # Registration already collects once, so the state it reads must exist first.
        self.metrics = OperatorMetrics(registry or CollectorRegistry(), lambda: [
            (s.key, s.last_status) for s in list(self.caches.values()) if s.last_status])
        self.images = images if images is not None else RegistryImages(settings, self.metrics)
        self.resolver = CacheResolver(kube, self.images, settings, self.metrics, clock)
        self.clock, self._sleep = clock, sleep
        #: Every NodeLayerCache, kept by the controller's own watch (`NodeCacheIndex.run`).
        self.index = NodeCacheIndex(kube, self.inventory_event, sleep)
        self.replanner = Replanner(kube, settings, self.metrics, self.index)
        self.reporter = CacheReporter(kube, self.index)
        self.warm = WarmSignal(kube, settings, inventory=self.index)
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # What planning last read of each Node and each node's inventory (see *_event).
        self._nodes_seen: dict[str, Any] = {}
        self._held_seen: dict[str, Any] = {}
        # kopf orders the handlers of one object (uid), not the tag refresh beside them nor
        # two objects of one name (a cache deleted and created again: a kopf worker each),
        # so a resolution may end after its object was deleted, re-created or changed.
        # `_deleted`: the uids of deleted caches (the latest `DELETED_UIDS_KEPT`), whose
        # resolutions are not stored. `_objects`: per name, each object not yet deleted,
        # its latest state by uid, in the order first stored; `caches` holds the last one
        # (the newest object, once the DELETED events of the others are handled).
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self._objects: dict[str, dict[str, CacheState]] = {}

    # -- what the handlers call ---------------------------------------------------------
    async def resolve(self, namespace: str, name: str, generation: int,
                      raw_spec: Mapping[str, Any], uid: str = "",
                      stored_status: Mapping[str, Any] | None = None) -> CacheState:
        """Parse the spec and resolve every image for every platform; store and return it.

        Never raises for bad input: an invalid spec sets `invalid`, an image that fails
        adds an `ImageError` (the other images still resolve). What the previous state knew
        (status written, nodes, byte baselines) carries over; after an operator restart,
        `stored_status` (the object's status) seeds it, so nothing flaps or restarts at 0.
        Foreign layers not reported before get one ``NonDistributableLayers`` Event.

        Not stored (returned only) if object ``uid`` was deleted while it resolved, or a
        newer generation of it was stored meanwhile: either would be planned — a deleted
        cache's layers kept on every node until the operator restarts, or an old spec.
        """
        key = f"{namespace}/{name}"
        current = self.caches.get(key)
        slot = uid or (current.uid if current is not None else "")
        before = self._objects.get(key, {}).get(slot)
        state = CacheState.begin(namespace, name, generation, raw_spec, uid, before,
                                 stored_status)
        state = await self.resolver.resolve(state, before)
        newest = self._objects.get(key, {}).get(slot)
        if (uid and uid in self._deleted) or (
                newest is not None and newest.generation > state.generation):
            log.info("LayerCache %s: a resolution of generation %d is not kept (the object "
                     "was deleted or changed meanwhile)", key, generation)
            return state
        self._objects.setdefault(key, {})[slot] = state
        self._publish(key)
        await self.reporter.report_foreign(state)
        return state

    def forget(self, namespace: str, name: str, uid: str) -> None:
        """Drop deleted cache object ``uid``; another object of that name stays.

        The next replan releases what only it wanted; a resolution of ``uid`` still
        running is not stored when it ends.
        """
        key = f"{namespace}/{name}"
        self._deleted[uid] = None
        while len(self._deleted) > DELETED_UIDS_KEPT:
            self._deleted.popitem(last=False)
        self._objects.get(key, {}).pop(uid, None)
        self._publish(key)

    def _publish(self, key: str) -> None:
        """``caches[key]``: the newest living object's state of that name, or none."""
        objects = self._objects.get(key)
        if objects:
            self.caches[key] = next(reversed(objects.values()))
        else:
            self._objects.pop(key, None)
            self.caches.pop(key, None)

    def trigger(self) -> None:
        """Ask for a replan (cheap; many triggers in one debounce window make one plan)."""
        self._dirty.set()

    def node_event(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """A Node event: replan if it changed what planning reads; returns whether it did.

        Added, deleted, relabelled, (un)tainted or cordoned: a replan; heartbeats and other
        status churn: none. The warm signal reads its Nodes from these events too.
        """
        name = (body.get("metadata") or {}).get("name")
        self.warm.note_node(event_type, body)
        return self._changed(self._nodes_seen, name,
                             None if event_type == "DELETED" else _node_key(body))

    def inventory_event(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """A NodeLayerCache event (from `index`): replan if what the node holds changed.

        Returns whether it did.

        New holders change sources and peers; status churn that keeps the held layers and
        the missing ones does not.
        """
        name = (body.get("metadata") or {}).get("name")
        status = NodeLayerCacheStatus.of(body)
        key = None if event_type == "DELETED" else (tuple(status.missing), status.layers.held)
        return self._changed(self._held_seen, name, key)

    def _changed(self, seen: dict[Any, Any], name: Any, key: Any) -> bool:
        if seen.get(name) == key:
            return False
        seen[name] = key
        self.trigger()
        return True

    # -- one step of each loop -----------------------------------------------------------
    async def replan(self) -> dict[str, bool]:
        """Plan every cache and write changed node specs; node name → written (`Replanner`)."""
        return await self.replanner.replan(self.caches)

    async def aggregate(self) -> int:
        """Write each cache's status from its nodes' (`CacheReporter`); returns writes."""
        return await self.reporter.aggregate(self.caches.values())

    def due_for_refresh(self, key: str) -> bool:
        """Whether cache `key`'s tags should be resolved again (refreshInterval passed)."""
        state = self.caches.get(key)
        return state is not None and state.due_for_refresh(self.clock())

    async def refresh(self) -> int:
        """Re-resolve the caches whose refreshInterval has passed; returns how many.

        References that now resolve to new digests get a `TagMoved` Event; each refresh
        triggers a replan. A failure is logged; the cache is tried again later.
        """
        refreshed = 0
        for key in [k for k in list(self.caches) if self.due_for_refresh(k)]:
            old = self.caches.get(key)
            if old is None:  # deleted while an earlier one resolved
                continue
            try:
                new = await self.resolve(old.namespace, old.name, old.generation,
                                         old.raw_spec, old.uid)
            except Exception:
                log.exception("refresh of LayerCache %s failed; retrying later", key)
                continue
            if self.caches.get(key) is not new:  # deleted or changed meanwhile
                continue
            new.record_status(old.last_status)
            await self.reporter.report_moved(old, new)
            self.trigger()
            refreshed += 1
        return refreshed

    # -- the loops -------------------------------------------------------------------
    def start(self, lost: asyncio.Event | None = None) -> list[asyncio.Task[None]]:
        """Start the loops (in the running event loop); returns their tasks.

        ``lost``: set when this replica lost its leadership; the loops stop then.
        """
        interval = self.settings.status_interval_seconds
        self._tasks = [
            asyncio.create_task(self.index.run(), name="node caches watch"),
            asyncio.create_task(self.run(), name="replan"),
            asyncio.create_task(self._every(interval, self.aggregate), name="status"),
            asyncio.create_task(self.refresh_forever(), name="refresh"),
            asyncio.create_task(self._every(interval, self.warm.run_once), name="warm nodes")]
        if lost is not None:
            self._tasks.append(asyncio.create_task(self._stop_when(lost), name="leadership"))
        return list(self._tasks)

    def stop(self) -> None:
        """Cancel the loops (they end at their next await)."""
        for task in self._tasks:
            task.cancel()

    async def _stop_when(self, lost: asyncio.Event) -> None:
        await lost.wait()
        log.warning("leadership lost: the controller's loops stop")
        self.stop()

    async def run(self) -> None:
        """Replan whenever triggered, forever.

        A failed replan is logged and retried after `REPLAN_BACKOFF` (2 s doubling to 10 s,
        never later than the fixed 10 s it used to be); it never ends the loop.
        """
        delays = REPLAN_BACKOFF.delays()
        while True:
            await self._dirty.wait()
            await self._sleep(self.settings.replan_debounce_seconds)
            self._dirty.clear()
            try:
                with self.metrics.replan_duration.time():
                    await self.replan()
                self.metrics.replans.labels("ok").inc()
                delays = REPLAN_BACKOFF.delays()
            except Exception:
                self.metrics.replans.labels("error").inc()
                delay = next(delays)
                log.exception("replan failed; retrying in %.0f s", delay)
                await self._sleep(delay)
                self._dirty.set()

    async def refresh_forever(self, interval: float = REFRESH_INTERVAL_SECONDS) -> None:
        """Every `interval` seconds, `refresh` the caches whose refreshInterval has passed.

        A loop of our own rather than a kopf timer: kopf guards timers with a finalizer,
        and a finalizer would block deleting a LayerCache while the operator is down.
        """
        while True:
            await self._sleep(interval)
            await self.refresh()

    async def _every(self, seconds: float, step: Callable[[], Awaitable[object]]) -> None:
        """``step()`` every ``seconds``; a failed step is logged and retried, never fatal."""
        while True:
            await self._sleep(seconds)
            try:
                await step()
            except Exception:
                log.exception("%s failed; retrying", getattr(step, "__qualname__", step))


def _node_key(body: Mapping[str, Any]) -> tuple[Any, ...]:
    # What planning reads of a Node; heartbeats and other status churn must not replan.
    labels = tuple(sorted(((body.get("metadata") or {}).get("labels") or {}).items()))
    spec = body.get("spec") or {}
    taints = tuple(sorted((t.get("key"), t.get("value"), t.get("effect"))
                          for t in spec.get("taints") or []))
    return labels, taints, bool(spec.get("unschedulable"))
