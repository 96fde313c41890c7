"""The operator's view of every NodeLayerCache: one watch of its own feeding an index.

At 1,000 nodes, kopf's per-event machinery (a deep copy of every event body, a handler
task each) and a re-list of every NodeLayerCache each status interval were most of the
operator's time and memory. `NodeCacheIndex` instead lists once, then follows one watch
(``resourceVersion``, bookmarks, a re-list when the apiserver answers 410 Gone) through the
`KubePort` (`list_node_caches`, `watch_node_caches`), and keeps per node only what
planning, status aggregation and the warm signal read: ``metadata.name`` and
``generation``, ``status``, and of the spec only a `SpecRecord` (a fingerprint to compare
the next desired spec with, its layer digests, sources and peers, its chain count): a spec
is ~220 KB of JSON at 200 images, and 1,000 of them held as dicts were most of the
operator's memory. A record is made once per spec generation (a status event keeps it).
Readers (`current`) get that map; nothing re-lists.

The controller (layercache.controller.controller) runs `run` as one of its loops, only
while leading; until it has listed once, or when it does not run (a replan or aggregation
called directly, as in unit tests), `current` lists through the port as before.

A spec the replanner has just written (`wrote`) stands, with the generation the write gave
it, until the watch delivers that generation or a later one: an older event still in
flight (an agent's status patch made before the write) must not make the next replan see
the old spec and write the same change twice, nor make status aggregation read that
agent's Ready as Ready for the new spec.

Each entry also keeps ``held``: the layers its node holds (`held_layers`), as of the last
event whose status described its spec (observedGeneration = generation). Between a spec
write and the agent's next report, ``status.missing`` is about the previous spec; read
against the new one, a layer just added would count as held.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from kubernetes.client.exceptions import ApiException

from layercache.api.nodelayercache import spec_fingerprint
from layercache.backoff import Backoff
from layercache.controller.ports import KubePort
from layercache.oci.digest import Digest

__all__ = ["WATCH_BACKOFF", "NodeCacheIndex", "SpecRecord", "held_layers"]

log = logging.getLogger(__name__)
#: Waits before listing again after a failed list or watch: 1 s doubling to 30 s.
WATCH_BACKOFF: Final = Backoff(1.0, 30.0)
#: HTTP status of a watch whose resourceVersion is too old (the index lists again).
GONE: Final = 410
#: What the index keeps of a NodeLayerCache: name → {"metadata", "record" (`SpecRecord`),
#: "status"}, and "held" once its agent reported on a spec (`held_layers`).
Inventory = dict[str, dict[str, Any]]
OnChange = Callable[[str, Mapping[str, Any]], object]
Sleep = Callable[[float], Awaitable[None]]


def _daemon(run: Callable[[], None]) -> None:
    threading.Thread(target=run, name="NodeLayerCache watch", daemon=True).start()


@dataclass(frozen=True, slots=True)
class SpecRecord:
    """What the operator keeps of one NodeLayerCache spec (module docstring).

    Two specs are equal when their records are. ``fingerprint``:
    `layercache.api.nodelayercache.spec_fingerprint` (all but the node's name and each
    layer's source and peers); ``node_name``: its ``nodeName``; ``layers``: its
    ``layers[].digest`` in order; ``assignments``: digest → (``source``, ``peers``) of each
    layer, the planner's previous assignments (`layercache.plan.distribute.Previous`);
    ``chains``: how many chains it lists.
    """

    fingerprint: str
    node_name: str
    layers: tuple[str, ...]
    assignments: Mapping[str, tuple[str, tuple[str, ...]]]
    chains: int

    @classmethod
    def of(cls, name: str, spec: Mapping[str, Any], fingerprint: str | None = None
           ) -> SpecRecord:
        """The record of NodeLayerCache ``name``'s ``spec`` (a CRD camelCase dict).

        ``fingerprint``: its `spec_fingerprint` when known (the replanner's, hashed once for
        many nodes); else hashed here.

        A layer entry that does not read as the CRD's (no string ``digest``, ``source`` or
        ``peers`` of strings; an absent ``peers`` reads as ``[]``) gives the node no
        previous assignments (logged), so its record equals no desired spec's and the spec
        is rewritten whole. Strings are
        interned: every node's record names the same digests and nodes.
        """
        layers, assignments = [], {}
        listed = spec.get("layers") or []
        readable = isinstance(listed, list)
        for entry in listed if readable else ():
            digest = entry.get("digest") if isinstance(entry, Mapping) else None
            if not isinstance(digest, str):
                readable = False
                continue
            digest = sys.intern(digest)
            layers.append(digest)
            # An absent ``peers`` reads as none, as the agent reads it (the CRD's default);
            # any other value that is not a list of strings is unreadable.
            source, peers = entry.get("source"), entry.get("peers", [])
            if (source not in ("Upstream", "Peer") or not isinstance(peers, list)
                    or not all(isinstance(p, str) for p in peers)):
                readable = False
                continue
            assignments[digest] = (source, tuple(map(sys.intern, peers)))
        if not readable:
            log.warning("NodeLayerCache %s: spec.layers not as the CRD's; its previous "
                        "assignments are ignored", name)
            assignments = {}
        chains = spec.get("chains")
        return cls(spec_fingerprint(spec) if fingerprint is None else fingerprint,
                   str(spec.get("nodeName", "")), tuple(layers), assignments,
                   len(chains) if isinstance(chains, list) else 0)


def _slim(obj: Any, before: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(name, the fields kept) of a NodeLayerCache as the API returns it.

    ``before``: what the index kept of it; its record is reused while the object (uid) and
    its generation are the same (the spec did not change).

    Raises:
        ValueError: no ``metadata.name``, or a spec or status that is not an object.
    """
    metadata = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(metadata, Mapping):
        raise ValueError("NodeLayerCache without metadata")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("NodeLayerCache without metadata.name")
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if not isinstance(spec, Mapping) or not isinstance(status, Mapping):
        raise ValueError(f"NodeLayerCache {name}: spec and status must be objects")
    generation, uid = metadata.get("generation", 0), metadata.get("uid") or ""
    known = before["metadata"] if before is not None else {}
    # The same object (an entry the replanner made by writing has no uid yet) at the same
    # generation has the same spec: CRD generations count spec changes only.
    if (isinstance(generation, int) and generation > 0
            and known.get("generation") == generation and known.get("uid", "") in ("", uid)):
        record = before["record"]  # type: ignore[index]
    else:
        record = SpecRecord.of(name, spec)
    return name, {"metadata": {"name": name, "generation": generation, "uid": uid},
                  "record": record, "status": status}


def held_layers(obj: Mapping[str, Any]) -> frozenset[Digest]:
    """The layers an indexed NodeLayerCache's node holds: its spec's not in ``status.missing``.

    Right only while the status describes that spec (observedGeneration = generation): the
    index keeps the answer of the last object for which it did, as ``held``, and returns
    that when there is one; otherwise the object is read against its own spec. Nothing
    before the agent's first inventory (the rule of
    `layercache.api.NodeLayerCacheStatus.synced`: ``missing`` or held layers reported), and
    nothing for a status that does not read as the CRD's (logged). Plain dict reads, no
    model: the index calls it for every status event.
    """
    kept = obj.get("held")
    if isinstance(kept, frozenset):
        return kept
    try:
        status = obj.get("status") or {}
        if "missing" not in status and not (status.get("layers") or {}).get("held"):
            return frozenset()
        missing = set(status.get("missing") or ())
        return frozenset(Digest(digest) for digest in obj["record"].layers
                         if digest not in missing)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        name = (obj.get("metadata") or {}).get("name")
        log.warning("NodeLayerCache %s: status unreadable (%r); read as holding nothing",
                    name, error)
        return frozenset()


def _generation(kept: Mapping[str, Any]) -> int:
    generation = kept["metadata"].get("generation")
    return generation if isinstance(generation, int) else 0


class NodeCacheIndex:
    """Every NodeLayerCache by node name, kept by one watch (module docstring).

    ``on_change(event_type, object)`` is called for each object the watch adds, changes
    or deletes (and for each listed one), on the event loop; ``sleep`` is the controller's.
    """

    def __init__(self, kube: KubePort, on_change: OnChange | None = None,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.kube, self._on_change, self._sleep = kube, on_change, sleep
        self._objects: Inventory = {}
        #: Specs written and not yet seen by the watch: name → (record, its generation).
        self._written: dict[str, tuple[SpecRecord, int]] = {}
        self._synced = asyncio.Event()
        self._running = False
        #: The resourceVersion the watch resumes from ("" before the first list).
        self.resource_version = ""
        #: How often the index listed (the first list and each re-list after 410 or error).
        self.lists = 0
        #: Runs the blocking watch: a daemon thread, which a stopping operator does not
        #: wait for (an executor's thread would hold its exit until the watch times out).
        self.spawn: Callable[[Callable[[], None]], None] = _daemon

    # -- readers -------------------------------------------------------------------------
    async def current(self) -> Inventory:
        """Every NodeLayerCache by name (the kept fields); read-only for the caller.

        From the index while its watch runs (after its first list); otherwise one list
        through the port.
        """
        if self._running:
            await self._synced.wait()
            return dict(self._objects)
        listed = await asyncio.to_thread(self.kube.node_layer_caches)
        found: Inventory = {}
        for obj in listed.values():
            try:
                name, kept = _slim(obj)
            except (ValueError, AttributeError) as error:
                log.warning("NodeLayerCache skipped: %s", error)
                continue
            found[name] = kept
        return found

    def wrote(self, name: str, record: SpecRecord, generation: int) -> None:
        """The replanner wrote the spec of ``record`` (now at ``generation``) to ``name``.

        Read so until the watch shows that generation. The generation goes with the spec:
        beside the old one, an agent's status for the old spec (its observedGeneration
        equal to it) would read as Ready for the new one.
        """
        if not self._running:
            return
        self._written[name] = (record, generation)
        entry = self._objects.setdefault(name, {"metadata": {"name": name}, "status": {}})
        entry["record"] = record
        entry["metadata"] = {**entry["metadata"], "generation": generation}

    def deleted(self, name: str) -> None:
        """The replanner deleted NodeLayerCache ``name``."""
        self._objects.pop(name, None)
        self._written.pop(name, None)

    # -- the watch -------------------------------------------------------------------------
    def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
        """The index from a list: ``items`` at ``resource_version`` (a malformed one skipped)."""
        before = self._objects
        self._objects = {}
        for item in items:
            self._apply("ADDED", item, before)
        for name in set(before) - set(self._objects):
            self._written.pop(name, None)
            self._notify("DELETED", before[name])
        self.resource_version = resource_version
        self.lists += 1
        self._synced.set()

    def apply(self, event_type: str, obj: Any) -> None:
        """One watch event (ADDED, MODIFIED, DELETED, BOOKMARK); a malformed one is skipped.

        Every event moves the resourceVersion the watch resumes from.
        """
        version = ((obj or {}).get("metadata") or {}).get("resourceVersion") \
            if isinstance(obj, Mapping) else None
        if isinstance(version, str) and version:
            self.resource_version = version
        if event_type != "BOOKMARK":
            self._apply(event_type, obj)

    def _apply(self, event_type: str, obj: Any, previous: Inventory | None = None) -> None:
        """Index one object; ``previous``: the index before a re-list (else the current)."""
        known = previous if previous is not None else self._objects
        metadata = obj.get("metadata") if isinstance(obj, Mapping) else None
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        try:
            name, kept = _slim(obj, known.get(name) if isinstance(name, str) else None)
        except (ValueError, AttributeError) as error:
            log.warning("NodeLayerCache %s event skipped: %s", event_type, error)
            return
        if event_type == "DELETED":
            self._objects.pop(name, None)
            self._written.pop(name, None)
        else:
            if kept["status"].get("observedGeneration") == kept["metadata"]["generation"]:
                kept["held"] = held_layers(kept)
            elif "held" in (before := known.get(name) or {}):
                kept["held"] = before["held"]  # the status is about an older spec
            written = self._written.get(name)
            if written is not None:
                record, generation = written
                if _generation(kept) >= generation:
                    del self._written[name]
                else:  # an event from before our write: its status, our spec and generation
                    kept["record"] = record
                    kept["metadata"] = {**kept["metadata"], "generation": generation}
            self._objects[name] = kept
        self._notify(event_type, kept)

    def _notify(self, event_type: str, kept: Mapping[str, Any]) -> None:
        if self._on_change is not None:
            self._on_change(event_type, kept)

    async def run(self) -> None:
        """List, then follow the watch, forever; list again on 410 Gone or any failure.

        A failure is logged and retried after `WATCH_BACKOFF`; it never ends the loop.
        Cancelling the task stops it; the watch's daemon thread ends with its current request
        and hands nothing more on.
        """
        self._running = True
        delays = WATCH_BACKOFF.delays()
        try:
            while True:
                try:
                    items, version = await asyncio.to_thread(self.kube.list_node_caches)
                    self.replace(items, version)
                    delays = WATCH_BACKOFF.delays()
                    await self._follow()
                except ApiException as error:
                    if error.status == GONE:
                        log.info("NodeLayerCache watch expired (410): listing again")
                        continue
                    log.warning("NodeLayerCache watch failed (HTTP %s %s); listing again",
                                error.status, error.reason)
                    await self._sleep(next(delays))
                except Exception:
                    log.exception("NodeLayerCache watch failed; listing again")
                    await self._sleep(next(delays))
        finally:
            self._running = False
            self._synced.clear()
            self._written.clear()

    async def _follow(self) -> None:
        """Watch from the index's resourceVersion, one server-ended watch after another."""
        while True:
            await self._watch_once()
            await self._sleep(0)

    async def _watch_once(self) -> None:
        """One watch from the index's resourceVersion until the server ends it.

        Raises what the watch raised (`ApiException` 410 when the version is too old).
        """
        events: asyncio.Queue[tuple[str, Any] | BaseException | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def put(item: tuple[str, Any] | BaseException | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)
        stopped = threading.Event()
        self.spawn(functools.partial(self._pump, self.resource_version, put, stopped))
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                self.apply(*event)
        finally:
            stopped.set()

    def _pump(self, version: str, put: Callable[[tuple[str, Any] | BaseException | None],
                                                object],
              stopped: threading.Event) -> None:
        """In the watch's own thread: the blocking stream, each event handed to the loop."""
        try:
            for event in self.kube.watch_node_caches(version):
                if stopped.is_set():
                    return
                put(event)
            put(None)
        except BaseException as error:  # handed to the loop, raised there
            if not stopped.is_set():
                put(error)
