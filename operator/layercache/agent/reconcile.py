"""The agent's control loop: make containerd hold what this node's NodeLayerCache wants.

Each pass works from containerd's inventory (``Content.List``), re-read at start, after a
spec change and every `AgentSettings.resync_seconds` — never from memory alone:

1. wanted layers already present are pinned if something else (the kubelet) put them
   there; pinned blobs of ours that are no longer wanted are released to containerd's GC;
2. missing layers start in spec order, at most a window of ``8 * concurrency`` at once
   (waiting for a peer costs no transfer slot; the transfer itself takes one of
   ``concurrency``): the window keeps the earliest layers — which every node orders the
   same way — moving, so seeders and waiters cannot block each other for good;
3. a failed layer is retried after a backoff that doubles per failure, and never before
   the registry's ``Retry-After``; a disk refusal stops new fetches until the filesystem
   is checked again;
4. in ``Images`` mode, an image whose layers are all held is pulled through CRI, which
   then only resolves its manifest and config (`layercache.agent.store.images`);
5. a chain whose blobs are all held is unpacked into the snapshotter, one at a time in
   spec order; chains of ours no longer wanted are released (`layercache.agent.store.unpacking`).

The status book is updated as facts change; `StatusReporter` patches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Final

from layercache.agent.fetch.fetcher import LayerFetcher, failure_reason
from layercache.agent.nodespec import InvalidNodeSpecError, NodeSpec, WantedLayer, parse_node_spec
from layercache.agent.status.disk import DiskGuard, DiskPressureError
from layercache.agent.status.disksavings import DiskMeter, Sharing
from layercache.agent.status.report import StatusBook
from layercache.agent.store.images import ImagePuller
from layercache.agent.store.unpacking import ChainUnpacker
from layercache.api import Reason
from layercache.backoff import RetryTimes
from layercache.containerd.errors import ContainerdError
from layercache.containerd.ports import ContentStorePort
from layercache.oci.digest import Digest
from layercache.registry.errors import retry_after

__all__ = ["NodeReconciler"]

log = logging.getLogger(__name__)

#: Seconds between space checks while fetching is stopped by disk pressure.
PRESSURE_RECHECK: Final = 10.0
#: Seconds between two measurements of the disk-savings figures of an unchanged node.
DISK_MEASURE_SECONDS: Final = 15.0
#: Least seconds between two measurements while what the node holds keeps changing.
DISK_MEASURE_MIN_SECONDS: Final = 2.0
#: Missing layers in progress at once, per transfer slot.
WINDOW_PER_SLOT: Final = 8


class NodeReconciler:
    """Drives fetches, pins, pulls and unpacks for one node; feed it objects with `set_object`."""

    def __init__(self, *, store: ContentStorePort, fetcher: LayerFetcher, images: ImagePuller,
                 book: StatusBook, disk: DiskGuard, retry: RetryTimes,
                 resync_seconds: float, chains: ChainUnpacker | None = None,
                 meter: DiskMeter | None = None) -> None:
        self.store = store
        self.fetcher = fetcher
        self.images = images
        self.book = book
        self.disk = disk
        self.retry = retry
        self.resync_seconds = resync_seconds
        self.chains = chains
        self.meter = meter
        self._measured: tuple[frozenset[Digest], frozenset[Digest], Sharing] | None = None
        self._measure_due = 0.0
        self._measured_at = float("-inf")
        self.spec: NodeSpec | None = None
        self.held: dict[Digest, int] = {}
        self.inflight: dict[Digest, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self._stale = True
        self._next_resync = 0.0
        self._pressure_until = 0.0
        self._pressure_reason: str | None = None
        self._pulling: asyncio.Task[None] | None = None

    @property
    def loop_time(self) -> float:
        """The event loop's clock (seconds)."""
        return asyncio.get_running_loop().time()

    def set_object(self, obj: Mapping[str, Any] | None) -> None:
        """Take a new version of this node's NodeLayerCache (None: it is gone)."""
        try:
            spec = parse_node_spec(obj) if obj is not None else None
        except InvalidNodeSpecError as error:
            self.book.problems[Reason.INVALID_SPEC] = self.book.error(Reason.INVALID_SPEC,
                                                                      str(error))
            return
        self.book.problems.pop(Reason.INVALID_SPEC, None)
        changed = (spec is None or self.spec is None or spec.layers != self.spec.layers
                   or spec.chains != self.spec.chains)
        self.spec = spec
        if spec is not None:
            # observedGeneration (and paused) follow in `_report`, with the counts of the
            # pass that acted on this spec: a status patched in between must not say
            # "Ready at generation N" with generation N-1's layers (api.warm would call
            # the node warm for a spec it has not fetched).
            self.book.previous.update({c["type"]: c for c in spec.conditions
                                       if c.get("type") and c["type"] not in self.book.previous})
        self._stale = self._stale or changed
        self.wake.set()

    async def run(self) -> None:
        """Reconcile until cancelled; cancelling stops every fetch (ingests kept to resume)."""
        try:
            while True:
                await self._pass()
                await self._sleep()
        finally:
            tasks = [*self.inflight.values(), *([self._pulling] if self._pulling else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.chains is not None:
                await self.chains.stop()

    async def _sleep(self) -> None:
        now = self.loop_time
        wakes = [self._next_resync, *([self._pressure_until] if self._refused() else []),
                 *([self._measure_due] if self.meter is not None else [])]
        if (at := self.retry.earliest()) is not None:
            wakes.append(at)
        timeout = max(0.05, min(wakes) - now)
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wake.wait()

    async def _pass(self) -> None:
        spec = self.spec
        if self._stale or self.loop_time >= self._next_resync:
            try:
                await self._inventory(spec)
            except ContainerdError as error:
                self.book.error(failure_reason(error), str(error))
                self._next_resync = self.loop_time + min(self.resync_seconds, 10.0)
                return
        if spec is not None and not spec.paused:
            self._start_missing(spec)
            self._start_pulls(spec)
            if self.chains is not None:
                self.chains.start(spec, self.held, lambda _task: self.wake.set())
        else:
            self._cancel(lambda _digest: True)
        self._report(spec)
        await self._measure_disk(spec)

    async def _inventory(self, spec: NodeSpec | None) -> None:
        """Read what containerd holds; pin wanted blobs, release unwanted ones of ours."""
        self._stale = False
        self._next_resync = self.loop_time + self.resync_seconds
        blobs = {info.digest: info for info in await self.store.list()}
        wanted = spec.wanted if spec is not None else frozenset()
        self.held = {d: blobs[d].size for d in wanted if d in blobs}
        self.images.forget()
        if spec is None:
            return  # no object: keep what we hold until the operator says otherwise
        wanting = frozenset(spec.caches)
        for digest in self.held:
            info = blobs[digest]
            if not (info.pinned and info.managed) or info.caches != wanting:
                await self.store.pin(digest, spec.caches)
                stale = info.caches - wanting
                if stale:  # caches that no longer want anything here let go of it
                    await self.store.release(digest, stale)
        for digest, info in blobs.items():
            if info.managed and info.pinned and digest not in wanted:
                await self.store.release(digest)
                log.info("released %s: no longer wanted", digest.short,
                         extra={"digest": digest})
        if self.chains is not None and not self._unpacking():
            await self.chains.inventory(spec)
        self._measured = None  # re-read: measure again soon

    def _unpacking(self) -> bool:
        # An unpack in flight changes the snapshots under the inventory's feet; its own
        # result is recorded when it ends, and the next resync reads the rest.
        task = self.chains.task if self.chains is not None else None
        return task is not None and not task.done()

    async def _measure_disk(self, spec: NodeSpec | None) -> None:
        """Refresh the disk-savings figures (`layercache.agent.status.disksavings`) when due.

        Due every `DISK_MEASURE_SECONDS` (chains are unpacked, and images pulled, outside
        this loop), and sooner — but at most every `DISK_MEASURE_MIN_SECONDS`, as a node
        warming thousands of layers changes with each — after an inventory or when the held
        blobs, the unpacked chains or the spec changed (so the figures follow an unpack
        within seconds, not at the next full measurement). A failure keeps the figures
        measured before: they are a report, not a reason to stop reconciling.
        """
        now = self.loop_time
        if self.meter is None or spec is None:
            self._measure_due = now + DISK_MEASURE_SECONDS  # no busy wake-ups
            return
        unpacked = frozenset(self.chains.unpacked) if self.chains is not None else frozenset()
        key = (frozenset(self.held), unpacked, spec.sharing)
        if key != self._measured:
            self._measure_due = min(self._measure_due,
                                    self._measured_at + DISK_MEASURE_MIN_SECONDS)
        if now < self._measure_due:
            return
        self._measured_at, self._measure_due = now, now + DISK_MEASURE_SECONDS
        try:
            disk = await self.meter.measure(spec.sharing)
        except ContainerdError as error:
            log.warning("disk usage not measured: %s", error)
            return
        self._measured = key
        if disk != self.book.disk:
            self.book.disk = disk
            self.book.touch()

    def _cancel(self, which: Any) -> None:
        for digest, task in list(self.inflight.items()):
            if which(digest):
                task.cancel()

    def _start_missing(self, spec: NodeSpec) -> None:
        self._cancel(lambda digest: digest not in spec.wanted)
        now = self.loop_time
        if self._refused() and now < self._pressure_until:
            return  # no new fetch until the space is checked again
        window = WINDOW_PER_SLOT * self.fetcher.config.concurrency
        for layer in spec.layers:
            if len(self.inflight) >= window:
                break
            digest = layer.digest
            if digest in self.held or digest in self.inflight or not self.retry.ready(digest, now):
                continue
            self.inflight[digest] = asyncio.create_task(self._fetch(layer, spec.caches),
                                                        name=f"fetch {digest.short}")

    def _refused(self) -> bool:
        return self.disk.refusal is not None or self.disk.node_pressure

    async def _fetch(self, layer: WantedLayer, caches: tuple[str, ...]) -> None:
        digest = layer.digest
        try:
            await self.fetcher.fetch(layer, caches)
        except asyncio.CancelledError:
            if self.spec is None or digest not in self.spec.wanted:
                # Unwanted now: its ingest would only hold disk until the lease expires.
                await asyncio.shield(self.fetcher.drop_ingest(digest))
            raise
        except DiskPressureError as error:
            if self._pressure_reason != error.reason:  # once per episode, not per layer
                self._pressure_reason = error.reason
                self.book.error(error.reason, str(error))
            self._pressure_until = self.loop_time + PRESSURE_RECHECK
        except Exception as error:
            entry = self.book.error(failure_reason(error), str(error), digest)
            self.book.failing[digest] = entry
            self.retry.failed(digest, self.loop_time, retry_after(error))
        else:
            self.held[digest] = layer.size
            self.retry.succeeded(digest)
            self.book.failing.pop(digest, None)
        finally:
            self.inflight.pop(digest, None)
            self.wake.set()

    def _start_pulls(self, spec: NodeSpec) -> None:
        if not spec.images or (self._pulling is not None and not self._pulling.done()):
            return
        held = frozenset(self.held)
        pulls = self.images.pull_ready(spec.images, held, spec.image_caches, spec.caches,
                                       spec.image_layers)
        self._pulling = asyncio.create_task(pulls, name="pull images")
        self._pulling.add_done_callback(lambda _task: self.wake.set())

    def _report(self, spec: NodeSpec | None) -> None:
        book = self.book
        if spec is not None:
            book.generation = spec.generation
            book.paused = spec.paused
        layers = spec.layers if spec is not None else ()
        book.wanted = len(layers)
        book.held = sum(1 for layer in layers if layer.digest in self.held)
        book.bytes_held = sum(self.held.values())
        book.missing = [layer.digest for layer in layers if layer.digest not in self.held]
        book.images_pending = self.images.pending(spec.images if spec is not None else ())
        book.busy = bool(self.inflight) or self._unpacking()
        if self.chains is not None:
            self.chains.report(spec)
        book.synced = True
        refusal = self.disk.refusal
        if not book.missing:
            book.pressure = None
        elif self.disk.node_pressure:
            book.pressure = (Reason.NODE_DISK_PRESSURE, "the Node reports DiskPressure")
        elif refusal is not None:
            book.pressure = (refusal.reason, str(refusal))
        else:
            book.pressure = None
        if book.pressure is None:
            self._pressure_reason = None
        book.touch()
