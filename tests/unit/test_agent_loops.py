"""The agent's loops through their histories, against in-memory twins, in milliseconds.

`NodeReconciler` runs with the real `LayerFetcher`, `StatusBook`, `DiskGuard` and
`RegistryClient`; containerd's content store, the registry, the peers and the Kubernetes API
are the twins of ``tests/twins``. `Agent` runs whole (start-up, watch, status reporter) on
the same twins. Nothing sleeps for a fixed time: each step waits for the state it needs
(`until`), and the loops' own timers are set to milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from layercache.agent import reconcile
from layercache.agent.app import Agent, NodeContainerd
from layercache.agent.fetch import fetcher as fetcher_module
from layercache.agent.fetch.fetcher import SOURCE_LABEL, FetchConfig, LayerFetcher
from layercache.agent.fetch.transfer import ByteRate
from layercache.agent.nodespec import Counters
from layercache.agent.peer.client import PeerDirectory
from layercache.agent.reconcile import NodeReconciler
from layercache.agent.settings import AgentSettings
from layercache.agent.status.disk import DiskGuard
from layercache.agent.status.report import StatusBook
from layercache.agent.store.images import ImagePuller
from layercache.agent.store.unpacking import ChainUnpacker
from layercache.backoff import RetryTimes
from layercache.containerd.content import ingest_ref
from layercache.containerd.ingest import ingest_lease_id
from layercache.containerd.labels import (
    GC_ROOT_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    cache_label,
)
from layercache.containerd.leases import GC_EXPIRE_LABEL
from layercache.metrics import AgentMetrics
from layercache.oci.digest import Digest
from layercache.registry.client import RegistryClient
from layercache.registry.retry import RetryPolicy
from twins.agent_kube import AgentKubeTwin
from twins.content_store import ContentStoreTwin, CRIImagesTwin
from twins.sources import PeersTwin, RegistryTwin

REGISTRY = "registry.test"
REPOSITORY = f"{REGISTRY}/family/base"
CACHE = "team/warm"
OTHER_CACHE = "team/cold"


def blob(number: int, size: int = 3000) -> bytes:
    """Layer ``number``'s bytes (distinct per number)."""
    return (f"layer {number} ".encode() * size)[:size]


def entry(digest: Digest, size: int, source: str = "Upstream",
          peers: Sequence[str] = (), caches: Sequence[str] = (CACHE,)) -> dict[str, Any]:
    """One ``spec.layers[]`` item as the operator writes it (the caches wanting it)."""
    item: dict[str, Any] = {"digest": digest, "size": size, "repository": REPOSITORY,
                            "source": source, "caches": sorted(caches), "mediaType":
                                "application/vnd.oci.image.layer.v1.tar+gzip"}
    if peers:
        item["peers"] = list(peers)
    return item


def nlc(node: str, layers: Sequence[dict[str, Any]], *, caches: Sequence[str] = (CACHE,),
        generation: int = 1, status: dict[str, Any] | None = None,
        paused: bool = False) -> dict[str, Any]:
    """A NodeLayerCache object as the API returns it."""
    obj: dict[str, Any] = {
        "apiVersion": "layercache.dev/v1alpha1", "kind": "NodeLayerCache",
        "metadata": {"name": node, "generation": generation, "resourceVersion": "1"},
        "spec": {"nodeName": node, "layers": list(layers), "caches": list(caches),
                 "paused": paused}}
    if status is not None:
        obj["status"] = status
    return obj


async def until(what: str, ready: Callable[[], bool], seconds: float = 30.0) -> None:
    """Let the loops run until ``ready()`` (a generous bound only for a broken loop)."""
    async with asyncio.timeout(seconds):
        while not ready():  # noqa: ASYNC110 - the state of several parts: no one event says it
            await asyncio.sleep(0.001)
    assert ready(), what


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions") or ()}


@dataclass
class Node:
    """One node's reconciler on twins; `run` it in a task."""

    name: str
    kube: AgentKubeTwin
    store: ContentStoreTwin
    book: StatusBook
    disk: DiskGuard
    fetcher: LayerFetcher
    reconciler: NodeReconciler
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self.reconciler.run()))

    def apply(self, obj: dict[str, Any]) -> None:
        """A new version of the node's NodeLayerCache, as the watch hands it over."""
        self.reconciler.set_object(obj)

    def status(self) -> dict[str, Any]:
        return self.book.body()

    def ready(self) -> bool:
        return conditions(self.status()).get("Ready", ("", ""))[0] == "True"

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def registry_client(registry: RegistryTwin) -> RegistryClient:
    # One attempt per fetch: the reconciler's own retry (RetryTimes) is what is under test.
    return RegistryClient(transport=registry.transport, retry=RetryPolicy(attempts=1))


def make_node(name: str, tmp_path: Path, registry: RegistryTwin, *,
              kube: AgentKubeTwin | None = None, peers: PeersTwin | None = None,
              store: ContentStoreTwin | None = None, concurrency: int = 2,
              min_free_percent: float = 0.0, peer_wait: float = 5.0,
              counters: Counters | None = None) -> Node:
    """A `NodeReconciler` for ``name`` with the real fetcher on twins."""
    kube = kube or AgentKubeTwin(name)
    store = store or ContentStoreTwin()
    metrics = AgentMetrics(name, CollectorRegistry())
    book = StatusBook(counters or Counters(), metrics, lambda: ())

    async def image_fs() -> Path:
        return tmp_path

    disk = DiskGuard(image_fs, min_free_percent)
    retry = RetryTimes(0.01, 0.02)
    client = registry_client(registry)
    fetcher = LayerFetcher(FetchConfig(name, peer_wait, 0.005, concurrency), store=store,
                           registry=client, peers=peers or PeersTwin(),
                           directory=PeerDirectory(kube), rate=ByteRate(None), disk=disk,
                           book=book, metrics=metrics)
    images = ImagePuller(cri=CRIImagesTwin(tmp_path), store=store, registry=client,
                         keyrings=lambda _caches, _registry: [], book=book, retry=retry,
                         platform=lambda: "linux/amd64")
    reconciler = NodeReconciler(store=store, fetcher=fetcher, images=images, book=book,
                                disk=disk, retry=retry, resync_seconds=60.0)
    return Node(name, kube, store, book, disk, fetcher, reconciler)


def held_back(tmp_path: Path, registry: RegistryTwin) -> tuple[Node, Digest]:
    """Node n1 wanting one layer that the registry holds back until released."""
    a = registry.add(blob(1))
    registry.hold(a)
    node = make_node("n1", tmp_path, registry)
    node.apply(nlc("n1", [entry(a, 3000)]))
    return node, a


@pytest.fixture
def registry() -> RegistryTwin:
    return RegistryTwin()


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconciler's pressure re-check in milliseconds instead of 10 s."""
    monkeypatch.setattr(reconcile, "PRESSURE_RECHECK", 0.01)


@contextlib.asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[None]:
    for node in nodes:
        node.start()
    try:
        yield
    finally:
        for node in nodes:
            await node.stop()


# --- replan gating -------------------------------------------------------------------


async def test_a_spec_change_mid_pass_drops_the_unwanted_fetch_and_starts_the_new_layer(
        tmp_path: Path, registry: RegistryTwin) -> None:
    a, b, c = (registry.add(blob(n)) for n in range(3))
    for digest in (a, b, c):
        registry.hold(digest)
    node = make_node("n1", tmp_path, registry, concurrency=2)
    node.apply(nlc("n1", [entry(a, 3000), entry(b, 3000)]))
    async with running(node):
        await until("a and b in flight", lambda: registry.in_flight == {a, b})
        # The operator replans: b is no longer wanted here, c is.
        node.apply(nlc("n1", [entry(a, 3000), entry(c, 3000)], generation=2))
        await until("b cancelled, c asked for", lambda: c in registry.in_flight
                    and set(node.reconciler.inflight) == {a, c})
        assert ingest_ref(b) not in node.store.ingests  # unwanted: its ingest is dropped
        assert ingest_lease_id(ingest_ref(b)) not in node.store.leases.leases
        registry.release(a)
        registry.release(c)
        await until("Ready", node.ready)
        status = node.status()
        assert status["observedGeneration"] == 2
        assert status["layers"] == {"wanted": 2, "held": 2, "bytesHeld": 6000}
        assert set(node.store.blobs) == {a, c}
        assert b not in node.store.blobs


async def test_held_layers_are_not_fetched_again_when_the_spec_changes(
        tmp_path: Path, registry: RegistryTwin) -> None:
    a, b, c = (registry.add(blob(n)) for n in range(3))
    node = make_node("n1", tmp_path, registry)
    node.apply(nlc("n1", [entry(a, 3000), entry(b, 3000)]))
    async with running(node):
        await until("Ready", node.ready)
        assert sorted(registry.requests) == sorted([(a, 0), (b, 0)])
        # A new plan: the same two layers in another order, and one more.
        node.apply(nlc("n1", [entry(b, 3000), entry(c, 3000), entry(a, 3000)], generation=2))
        await until("c held", lambda: c in node.store.blobs)
        await until("Ready at generation 2", lambda: node.ready()
                    and node.status()["observedGeneration"] == 2)
        assert sorted(registry.requests) == sorted([(a, 0), (b, 0), (c, 0)])
        assert sorted(node.store.opened) == sorted(ingest_ref(d) for d in (a, b, c))
        assert node.book.upstream == 9000  # each layer counted once


async def test_observed_generation_moves_only_with_the_counts_of_that_generation(
        tmp_path: Path, registry: RegistryTwin) -> None:
    # A status written between a new spec and the pass that acts on it keeps saying the
    # old generation: "Ready at generation 2" with generation 1's counts would let
    # api.warm call the node warm before it holds the new layer.
    a, b = (registry.add(blob(n)) for n in range(2))
    node = make_node("n1", tmp_path, registry)
    node.apply(nlc("n1", [entry(a, 3000)]))
    async with running(node):
        await until("Ready", node.ready)
        registry.hold(b)
        node.apply(nlc("n1", [entry(a, 3000), entry(b, 3000)], generation=2))
        status = node.status()  # before the reconciler's next pass
        assert status["observedGeneration"] == 1, status
        assert status["layers"] == {"wanted": 1, "held": 1, "bytesHeld": 3000}
        await until("b asked for", lambda: b in registry.in_flight)
        status = node.status()
        assert status["observedGeneration"] == 2, status
        assert status["layers"]["wanted"] == 2 and status["layers"]["held"] == 1
        assert conditions(status)["Ready"][0] == "False", status
        registry.release(b)
        await until("Ready at generation 2", lambda: node.ready()
                    and node.status()["observedGeneration"] == 2)


async def test_a_paused_spec_stops_every_fetch_keeping_its_ingest_and_unpausing_resumes(
        tmp_path: Path, registry: RegistryTwin) -> None:
    node, a = held_back(tmp_path, registry)
    async with running(node):
        await until("in flight", lambda: registry.in_flight == {a})
        node.apply(nlc("n1", [entry(a, 3000)], generation=2, paused=True))
        await until("stopped", lambda: not node.reconciler.inflight
                    and registry.in_flight == set())
        status = node.status()
        assert conditions(status)["Progressing"] == ("False", "Paused")
        assert status["observedGeneration"] == 2
        # Still wanted: the ingest and its lease stay for the resume.
        assert ingest_ref(a) in node.store.ingests
        assert ingest_lease_id(ingest_ref(a)) in node.store.leases.leases
        registry.release(a)
        node.apply(nlc("n1", [entry(a, 3000)], generation=3))
        await until("Ready", node.ready)
        assert registry.requests == [(a, 0), (a, 0)]
        assert node.store.leases.leases == {} and node.store.ingests == {}


# --- byte accounting across restarts ---------------------------------------------------


@dataclass
class AgentRun:
    agent: Agent
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def end(self) -> None:
        self.stop.set()
        await self.task
        await self.agent.close()

    def agent_reconciler_spec_gone(self) -> bool:
        """Whether the agent's reconciler has been told its object is gone."""
        return self.reconciler is not None and self.reconciler.spec is None

    @property
    def reconciler(self) -> NodeReconciler | None:
        return self.agent.reconciler


class _Runner:
    async def cleanup(self) -> None:
        """Nothing was bound."""


async def _no_site(_app: Any, _host: str, _port: int) -> _Runner:
    return _Runner()


def agent_settings(tmp_path: Path, node: str = "n1") -> AgentSettings:
    return AgentSettings(node_name=node, containerd_config=None, kubelet_config=None,
                         image_fs_path=tmp_path, peer_advertise_address="10.0.0.1",
                         status_interval_seconds=0.001, resync_seconds=60.0,
                         node_check_seconds=0.005,
                         retry_initial_seconds=0.01, retry_max_seconds=0.02)


async def start_agent(tmp_path: Path, kube: AgentKubeTwin, store: ContentStoreTwin,
                      registry: RegistryTwin) -> AgentRun:
    """The whole agent on twins: kube, containerd (no snapshots), registry, peers."""
    settings = agent_settings(tmp_path, kube.node)
    metrics_free = DiskGuard(_path(tmp_path), 0.0)

    def chains(book: StatusBook, disk: DiskGuard, retry: RetryTimes,
               metrics: AgentMetrics) -> ChainUnpacker:
        return ChainUnpacker(unpacker=None, snapshotter="overlayfs", book=book, disk=disk,
                             retry=retry, metrics=metrics)

    containerd = NodeContainerd(store, CRIImagesTwin(tmp_path), chains, None, store.close)
    agent = Agent(settings, kube=kube, containerd=containerd, peers=PeersTwin(),
                  registry_transport=registry.transport, disk=metrics_free, serve=_no_site)
    stop = asyncio.Event()
    return AgentRun(agent, stop, asyncio.create_task(agent.run(stop)))


def _path(tmp_path: Path) -> Callable[[], Awaitable[Path]]:
    async def locate() -> Path:
        return tmp_path
    return locate


def kube_ready(kube: AgentKubeTwin) -> bool:
    return conditions(kube.status()).get("Ready", ("", ""))[0] == "True"


async def test_byte_counters_survive_a_restart_and_a_held_layer_is_not_counted_twice(
        tmp_path: Path, registry: RegistryTwin) -> None:
    a, b = registry.add(blob(1)), registry.add(blob(2, 5000))
    kube, store = AgentKubeTwin("n1"), ContentStoreTwin()
    # What an earlier agent counted, kept in status.
    kube.put(nlc("n1", [entry(a, 3000), entry(b, 5000)],
                 status={"bytes": {"upstream": 1000, "peer": 200, "servedToPeers": 30}}))
    first = await start_agent(tmp_path, kube, store, registry)
    await until("Ready", lambda: kube_ready(kube))
    await first.end()
    assert kube.status()["bytes"] == {"upstream": 9000, "peer": 200, "servedToPeers": 30}
    requests = list(registry.requests)

    before = len(kube.patches)
    second = await start_agent(tmp_path, kube, store, registry)
    await until("the restarted agent's inventory in status", lambda: any(
        "layers" in patch for patch in kube.patches[before:]) and kube_ready(kube))
    await second.end()
    assert registry.requests == requests  # both layers held: nothing fetched again
    assert kube.status()["bytes"] == {"upstream": 9000, "peer": 200, "servedToPeers": 30}
    assert kube.status()["layers"] == {"wanted": 2, "held": 2, "bytesHeld": 8000}


async def test_a_restart_mid_ingest_resumes_and_counts_only_the_bytes_it_lacked(
        tmp_path: Path, registry: RegistryTwin) -> None:
    data = blob(1, 10_000)
    a = registry.add(data)
    kube, store = AgentKubeTwin("n1"), ContentStoreTwin()
    # A killed agent: 4,000 bytes in containerd's ingest (and counted in status), its lease
    # kept for the resume, and a stale lease of an older plan.
    ref = ingest_ref(a)
    store.put_ingest(ref, a, len(data), data[:4000])
    await store.leases.create(ingest_lease_id(ref), {MANAGED_BY_LABEL: MANAGED_BY})
    await store.leases.create("layercache-stale", {MANAGED_BY_LABEL: MANAGED_BY})
    kube.put(nlc("n1", [entry(a, len(data))],
                 status={"bytes": {"upstream": 4000, "peer": 0, "servedToPeers": 0}}))
    run = await start_agent(tmp_path, kube, store, registry)
    await until("Ready", lambda: kube_ready(kube))
    await run.end()
    assert registry.requests == [(a, 4000)]  # resumed from containerd's offset
    assert store.writes == [(a, 4000, 6000)]
    assert store.blobs[a] == data
    assert kube.status()["bytes"]["upstream"] == 10_000  # 4,000 before + 6,000 now
    assert store.leases.leases == {}  # the stale lease at start-up, the ingest's at commit


async def test_the_agent_follows_its_object_through_the_watch_and_reports_each_generation(
        tmp_path: Path, registry: RegistryTwin) -> None:
    a, b = registry.add(blob(1)), registry.add(blob(2))
    kube, store = AgentKubeTwin("n1"), ContentStoreTwin()
    kube.put(nlc("n1", [entry(a, 3000)]))
    run = await start_agent(tmp_path, kube, store, registry)
    try:
        await until("Ready at generation 1", lambda: kube_ready(kube)
                    and kube.status().get("observedGeneration") == 1)
        assert kube.status()["peerEndpoint"] == "http://10.0.0.1:5780"
        # The operator replans: b instead of a (a spec change: generation 2).
        kube.put(nlc("n1", [entry(b, 3000)]))
        # (Not Ready at generation 2 alone: the book takes the generation when the object
        # arrives, its counts at the next pass; a patch between the two says both.)
        await until("b held and released a, Ready at generation 2", lambda: b in store.blobs
                    and GC_ROOT_LABEL not in store.labels[a] and kube_ready(kube)
                    and kube.status().get("observedGeneration") == 2)
        assert kube.status()["layers"] == {"wanted": 1, "held": 1, "bytesHeld": 3000}
        assert GC_ROOT_LABEL not in store.labels[a]  # released: no cache wants it
        assert GC_ROOT_LABEL in store.labels[b]
        # The object is deleted: the agent keeps what it holds and survives the 404s.
        kube.delete("n1")
        await until("the reconciler saw the deletion",
                    lambda: run.agent_reconciler_spec_gone())
        assert GC_ROOT_LABEL in store.labels[b]
        assert not run.task.done()
    finally:
        await run.end()
    assert registry.requests == [(a, 0), (b, 0)]


async def test_the_nodes_disk_pressure_condition_pauses_the_agent_until_it_clears(
        tmp_path: Path, registry: RegistryTwin, fast: None) -> None:
    a = registry.add(blob(1))
    kube, store = AgentKubeTwin("n1"), ContentStoreTwin()
    assert kube.node_object is not None
    pressure = {"type": "DiskPressure", "status": "True"}
    kube.node_object["status"] = {"conditions": [pressure]}  # the kubelet's eviction manager
    kube.put(nlc("n1", [entry(a, 3000)]))
    run = await start_agent(tmp_path, kube, store, registry)
    try:
        await until("NodeDiskPressure in status", lambda: conditions(kube.status()).get(
            "Progressing") == ("False", "NodeDiskPressure"))
        assert kube.status()["diskPressure"] is True
        assert conditions(kube.status())["Degraded"] == ("True", "NodeDiskPressure")
        assert registry.requests == [] and a not in store.blobs
        pressure["status"] = "False"  # the node recovered; the agent's next Node check sees it
        await until("Ready", lambda: kube_ready(kube))
        assert kube.status()["diskPressure"] is False
        assert registry.requests == [(a, 0)]
    finally:
        await run.end()


# --- promotion and demotion: seeder and peer roles -----------------------------------


async def test_a_peer_layer_waits_for_its_seeder_and_crosses_the_upstream_link_once(
        tmp_path: Path, registry: RegistryTwin) -> None:
    a = registry.add(blob(1))
    registry.hold(a)
    kube = AgentKubeTwin("n2")
    kube.put(nlc("n1", [], status={"peerEndpoint": "http://n1.test:5780"}))
    seeder_store = ContentStoreTwin()
    peers = PeersTwin({"http://n1.test:5780": seeder_store})
    seeder = make_node("n1", tmp_path, registry, store=seeder_store)
    waiter = make_node("n2", tmp_path, registry, kube=kube, peers=peers)
    seeder.apply(nlc("n1", [entry(a, 3000, "Upstream")]))
    waiter.apply(nlc("n2", [entry(a, 3000, "Peer", ["n1"])]))
    async with running(seeder, waiter):
        await until("the seeder fetching", lambda: registry.in_flight == {a})
        assert a in waiter.reconciler.inflight and a not in waiter.store.blobs  # waiting
        registry.release(a)
        await until("both Ready", lambda: seeder.ready() and waiter.ready())
    assert registry.requests == [(a, 0)]  # the layer crossed the upstream link once
    assert peers.gets == [("http://n1.test:5780", a, 0)]
    assert (seeder.book.upstream, seeder.book.peer) == (3000, 0)
    assert (waiter.book.upstream, waiter.book.peer) == (0, 3000)
    assert waiter.store.labels[a][SOURCE_LABEL] == "peer"
    assert seeder.store.labels[a][SOURCE_LABEL] == "upstream"


async def test_a_layer_promoted_from_peer_to_seeder_is_fetched_upstream_once(
        tmp_path: Path, registry: RegistryTwin) -> None:
    # n2 waits on n1 for the layer; n1 leaves (no endpoint) and the operator promotes n2
    # to seed it. The fetch in progress is not started again: it ends its wait and goes
    # upstream, once.
    a = registry.add(blob(1))
    node = make_node("n2", tmp_path, registry, peer_wait=0.05)
    node.apply(nlc("n2", [entry(a, 3000, "Peer", ["n1"])]))
    async with running(node):
        await until("waiting on n1", lambda: a in node.reconciler.inflight)
        node.apply(nlc("n2", [entry(a, 3000, "Upstream")], generation=2))
        await until("Ready", node.ready)
    assert registry.requests == [(a, 0)]
    assert (node.book.upstream, node.book.peer) == (3000, 0)
    assert node.store.labels[a][SOURCE_LABEL] == "upstream"


async def test_a_seeder_copies_for_itself_only_after_the_layers_it_seeds(
        tmp_path: Path, registry: RegistryTwin) -> None:
    # One transfer slot, busy. A peer copy queues for it first; then the operator makes
    # this node the seeder of another layer. When the slot frees, the upstream transfer
    # (others wait for it) goes before the peer copy that waited longer (Slots).
    u = registry.add(blob(2))
    registry.hold(u)
    p_data = blob(1)
    kube = AgentKubeTwin("n2")
    kube.put(nlc("n1", [], status={"peerEndpoint": "http://n1.test:5780"}))
    peer_store = ContentStoreTwin()
    p = peer_store.put(p_data)
    peers = PeersTwin({"http://n1.test:5780": peer_store})
    node = make_node("n2", tmp_path, registry, kube=kube, peers=peers, concurrency=1)
    slots = node.fetcher.slots

    def queued() -> int:  # transfers waiting on the slots' condition (asyncio's own deque)
        return len(getattr(slots._changed, "_waiters", ()))

    async with running(node):
        async with slots.take(upstream=False):
            node.apply(nlc("n2", [entry(p, len(p_data), "Peer", ["n1"])]))
            await until("the peer copy queued", lambda: queued() == 1)
            node.apply(nlc("n2", [entry(p, len(p_data), "Peer", ["n1"]), entry(u, 3000)],
                           generation=2))
            await until("the upstream transfer queued behind it",
                        lambda: queued() == 2 and slots.upstream_waiting == 1)
        await until("the upstream transfer took the slot", lambda: u in registry.in_flight)
        assert p not in node.store.blobs and peers.gets == []  # the copy waits its turn
        registry.release(u)
        await until("Ready", node.ready)
        assert [digest for digest, _, _ in node.store.writes] == [u, p]


async def test_a_node_copies_from_its_relay_tree_parent_before_a_peer_that_answers_first(
        tmp_path: Path, registry: RegistryTwin) -> None:
    # n3's peers: n2 (its parent in the layer's relay tree, still fetching it) and n1 (a
    # holder, yes at once). n1's yes waits for n2's: the copy comes from n2, so n1 does
    # not upload the layer to every node.
    a = registry.add(blob(1))
    registry.hold(a)
    kube = AgentKubeTwin("n3")
    for name in ("n1", "n2"):
        kube.put(nlc(name, [], status={"peerEndpoint": f"http://{name}.test:5780"}))
    holder, parent_store = ContentStoreTwin(), ContentStoreTwin()
    holder.put(blob(1))
    peers = PeersTwin({"http://n1.test:5780": holder, "http://n2.test:5780": parent_store})
    parent = make_node("n2", tmp_path, registry, store=parent_store)
    node = make_node("n3", tmp_path, registry, kube=kube, peers=peers)
    parent.apply(nlc("n2", [entry(a, 3000, "Upstream")]))
    node.apply(nlc("n3", [entry(a, 3000, "Peer", ["n2", "n1"])]))
    async with running(parent, node):
        await until("the parent fetching", lambda: registry.in_flight == {a})
        await asyncio.sleep(0.05)  # n1 has said yes by now; the parent has not
        assert a not in node.store.blobs and peers.gets == []
        registry.release(a)
        await until("both Ready", lambda: parent.ready() and node.ready())
    assert peers.gets == [("http://n2.test:5780", a, 0)]


async def test_a_parent_whose_short_long_poll_said_no_is_asked_again_within_the_grace(
        tmp_path: Path, registry: RegistryTwin) -> None:
    # n4 has no endpoint yet, so n3's long-polls are short (the peer poll): its parent n2
    # says no before n1's yes. n2 must be asked again for the rest of the grace, not passed
    # over (bench A at N = 6: every node took the seeder's base, none its parent's).
    a = registry.add(blob(1))
    registry.hold(a)
    kube = AgentKubeTwin("n3")
    for name in ("n1", "n2"):
        kube.put(nlc(name, [], status={"peerEndpoint": f"http://{name}.test:5780"}))
    kube.put(nlc("n4", []))
    holder, parent_store = ContentStoreTwin(), ContentStoreTwin()
    holder.put(blob(1))
    peers = PeersTwin({"http://n1.test:5780": holder, "http://n2.test:5780": parent_store})
    parent = make_node("n2", tmp_path, registry, store=parent_store)
    node = make_node("n3", tmp_path, registry, kube=kube, peers=peers)
    parent.apply(nlc("n2", [entry(a, 3000, "Upstream")]))
    node.apply(nlc("n3", [entry(a, 3000, "Peer", ["n2", "n1", "n4"])]))
    async with running(parent, node):
        await until("the parent fetching", lambda: registry.in_flight == {a})
        await asyncio.sleep(0.1)  # many of n2's short long-polls have said no by now
        assert a not in node.store.blobs and peers.gets == []
        registry.release(a)
        await until("both Ready", lambda: parent.ready() and node.ready())
    assert peers.gets == [("http://n2.test:5780", a, 0)]


async def test_a_parent_slower_than_the_grace_is_passed_over_for_a_peer_that_holds_it(
        tmp_path: Path, registry: RegistryTwin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetcher_module, "PARENT_GRACE", 0.05)
    a = registry.add(blob(1))
    kube = AgentKubeTwin("n3")
    for name in ("n1", "n2"):
        kube.put(nlc(name, [], status={"peerEndpoint": f"http://{name}.test:5780"}))
    holder = ContentStoreTwin()
    holder.put(blob(1))
    peers = PeersTwin({"http://n1.test:5780": holder, "http://n2.test:5780": ContentStoreTwin()})
    node = make_node("n3", tmp_path, registry, kube=kube, peers=peers)
    node.apply(nlc("n3", [entry(a, 3000, "Peer", ["n2", "n1"])]))
    async with running(node):
        await until("Ready", node.ready)
    assert peers.gets == [("http://n1.test:5780", a, 0)]
    assert registry.requests == []


async def test_a_peer_that_publishes_its_endpoint_late_is_asked_within_the_peer_poll(
        tmp_path: Path, registry: RegistryTwin) -> None:
    # n1 holds the layer but its agent has not published its endpoint yet (its
    # NodeLayerCache was just created); n3 is known and never gets it. n2 must look n1
    # up again soon, not long-poll n3 for the whole peer wait and then go upstream (bench
    # A, N = 6: every node but the seeder held one layer ~19 s late, a long-poll later).
    a = registry.add(blob(1))
    kube = AgentKubeTwin("n2")
    kube.put(nlc("n1", []))
    kube.put(nlc("n3", [], status={"peerEndpoint": "http://n3.test:5780"}))
    holder = ContentStoreTwin()
    holder.put(blob(1))
    peers = PeersTwin({"http://n1.test:5780": holder, "http://n3.test:5780": ContentStoreTwin()})
    node = make_node("n2", tmp_path, registry, kube=kube, peers=peers, peer_wait=30.0)
    node.apply(nlc("n2", [entry(a, 3000, "Peer", ["n1", "n3"])]))
    async with running(node):
        await until("waiting", lambda: a in node.reconciler.inflight)
        await asyncio.sleep(0.05)
        kube.put(nlc("n1", [], status={"peerEndpoint": "http://n1.test:5780"}))
        await until("Ready", node.ready, seconds=5)  # the old code long-polled n3 for 20 s
    assert peers.gets == [("http://n1.test:5780", a, 0)]
    assert registry.requests == []


class GatedPeers(PeersTwin):
    """`PeersTwin` whose blob bodies stop after their first ``first`` bytes until ``gate``."""

    def __init__(self, stores: dict[str, ContentStoreTwin], first: int) -> None:
        super().__init__(stores)
        self.first = first
        self.gate = asyncio.Event()

    def source(self, endpoint: str, digest: Digest, size: int, rate: ByteRate,
               on_bytes: Callable[[int], None]) -> Any:
        inner = super().source(endpoint, digest, size, rate, on_bytes)

        async def from_offset(offset: int) -> AsyncIterator[bytes]:
            data = b"".join([chunk async for chunk in inner(offset)])
            yield data[:self.first]
            await self.gate.wait()
            yield data[self.first:]

        return from_offset


async def test_a_peer_copy_is_relayed_to_the_nodes_below_while_it_arrives(
        tmp_path: Path, registry: RegistryTwin) -> None:
    # Not only the seeder relays: a node copying from a peer offers what it received so
    # far to its own children in the relay tree, before its COMMIT.
    data = blob(1)
    kube = AgentKubeTwin("n2")
    kube.put(nlc("n1", [], status={"peerEndpoint": "http://n1.test:5780"}))
    holder = ContentStoreTwin()
    a = holder.put(data)
    peers = GatedPeers({"http://n1.test:5780": holder}, first=1000)
    node = make_node("n2", tmp_path, registry, kube=kube, peers=peers)
    node.apply(nlc("n2", [entry(a, len(data), "Peer", ["n1"])]))
    async with running(node):
        await until("relaying", lambda: node.fetcher.relays.get(a) is not None)
        relay = node.fetcher.relays.get(a)
        assert relay is not None and a not in node.store.blobs  # before its COMMIT
        reader = asyncio.create_task(_read_all(relay.read(0, len(data))))
        await asyncio.sleep(0)
        assert not reader.done()
        peers.gate.set()
        assert await asyncio.wait_for(reader, 5) == data
        await until("Ready", node.ready)
    assert node.fetcher.relays.get(a) is None and node.fetcher.relays.held == 0
    assert registry.requests == []


async def test_a_peer_copy_relay_leaves_the_budget_to_the_layer_this_node_seeds(
        tmp_path: Path, registry: RegistryTwin) -> None:
    # n2 seeds u (its registry answer held back a moment) and copies p from n1. p's relay
    # gets its bytes first; u's relay, the root of u's whole tree, must still get room
    # (a reviewer's finding: p's relay took the whole budget and u was never relayed).
    u = registry.add(blob(2))
    registry.hold(u)
    kube = AgentKubeTwin("n2")
    kube.put(nlc("n1", [], status={"peerEndpoint": "http://n1.test:5780"}))
    holder = ContentStoreTwin()
    p = holder.put(blob(1))
    peers = GatedPeers({"http://n1.test:5780": holder}, first=1000)
    node = make_node("n2", tmp_path, registry, kube=kube, peers=peers)
    node.fetcher.relays.budget = 4000  # room for one 3,000-byte layer
    node.apply(nlc("n2", [entry(u, 3000, "Upstream"), entry(p, 3000, "Peer", ["n1"])]))
    async with running(node):
        await until("p copying", lambda: bool(peers.gets))
        await until("u asked upstream", lambda: u in registry.in_flight)
        relay = node.fetcher.relays._relays[u]
        registry.release(u)
        await until("u held", lambda: u in node.store.blobs)
        peers.gate.set()
        await until("Ready", node.ready)
    assert relay.error is None and relay.length == 3000


async def _read_all(views: AsyncIterator[memoryview]) -> bytes:
    return b"".join([bytes(view) async for view in views])


# --- pin and release -----------------------------------------------------------------


async def test_held_blobs_are_pinned_for_the_caches_that_want_them_and_released_after(
        tmp_path: Path, registry: RegistryTwin) -> None:
    node = make_node("n1", tmp_path, registry)
    store = node.store
    kubelets = store.put(blob(1))  # pulled by the kubelet: no labels of ours
    ours_unwanted = store.put(blob(2), {GC_ROOT_LABEL: "t", MANAGED_BY_LABEL: MANAGED_BY,
                                        cache_label("team/gone"): "t"})
    foreign_root = store.put(blob(3), {GC_ROOT_LABEL: "t"})  # someone else's pin
    both = [CACHE, OTHER_CACHE]
    node.apply(nlc("n1", [entry(kubelets, 3000, caches=both)], caches=both))
    async with running(node):
        await until("pinned for both caches", lambda: {cache_label(CACHE),
                    cache_label(OTHER_CACHE), GC_ROOT_LABEL} <= set(store.labels[kubelets]))
        assert store.labels[kubelets][MANAGED_BY_LABEL] == MANAGED_BY
        assert store.labels[ours_unwanted] == {}  # released: left to containerd's GC
        assert store.labels[foreign_root] == {GC_ROOT_LABEL: "t"}  # never ours to drop
        assert registry.requests == []  # present already: pinned, not fetched

        # One cache lets go: its label goes, the pin stays for the other.
        node.apply(nlc("n1", [entry(kubelets, 3000)], caches=[CACHE], generation=2))
        await until("the other cache's label removed",
                    lambda: cache_label(OTHER_CACHE) not in store.labels[kubelets])
        assert GC_ROOT_LABEL in store.labels[kubelets]

        # No cache wants it: unpinned, but never deleted (the kubelet may use it).
        node.apply(nlc("n1", [], caches=[CACHE], generation=3))
        await until("unpinned", lambda: GC_ROOT_LABEL not in store.labels[kubelets])
        assert store.labels[kubelets] == {}
        assert kubelets in store.blobs


async def test_a_fetch_holds_its_ingest_under_a_lease_only_while_it_runs(
        tmp_path: Path, registry: RegistryTwin) -> None:
    node, a = held_back(tmp_path, registry)
    async with running(node):
        await until("in flight", lambda: registry.in_flight == {a})
        lease = node.store.leases.leases[ingest_lease_id(ingest_ref(a))]
        assert lease.labels[MANAGED_BY_LABEL] == MANAGED_BY and GC_EXPIRE_LABEL in lease.labels
        registry.release(a)
        await until("Ready", node.ready)
        assert node.store.leases.leases == {}
        labels = node.store.labels[a]
        assert {GC_ROOT_LABEL, MANAGED_BY_LABEL, cache_label(CACHE)} <= set(labels)


# --- the fetch window ----------------------------------------------------------------


async def test_at_most_a_window_of_fetches_runs_and_the_next_starts_when_one_ends(
        tmp_path: Path, registry: RegistryTwin) -> None:
    digests = [registry.add(blob(n)) for n in range(10)]
    for digest in digests:
        registry.hold(digest)
    node = make_node("n1", tmp_path, registry, concurrency=1)
    window = reconcile.WINDOW_PER_SLOT * 1
    node.apply(nlc("n1", [entry(d, 3000) for d in digests]))
    async with running(node):
        await until("the window full, one transfer",
                    lambda: len(node.reconciler.inflight) == window
                    and len(registry.in_flight) == 1)
        assert set(node.reconciler.inflight) == set(digests[:window])  # the earliest layers
        first = next(iter(registry.in_flight))
        registry.release(first)
        await until("the next layer in spec order started",
                    lambda: digests[window] in node.reconciler.inflight)
        assert first in node.store.blobs
        assert len(node.reconciler.inflight) == window
        await until("one transfer again", lambda: len(registry.in_flight) == 1)
        assert digests[window + 1] not in node.reconciler.inflight
        for digest in digests:
            if digest != first:
                registry.release(digest)
        await until("Ready", node.ready)
        assert len(node.store.blobs) == 10


# --- disk-pressure episodes ----------------------------------------------------------


async def test_a_disk_threshold_pauses_every_fetch_says_why_once_and_fetching_resumes(
        tmp_path: Path, registry: RegistryTwin, fast: None) -> None:
    digests = [registry.add(blob(n)) for n in range(3)]
    node = make_node("n1", tmp_path, registry, min_free_percent=100.0)  # nothing satisfies it
    reserved: list[int] = []
    reserve = node.disk.reserve

    async def counted(size: int) -> None:
        reserved.append(size)
        await reserve(size)

    node.disk.reserve = counted  # type: ignore[method-assign]
    node.apply(nlc("n1", [entry(d, 3000) for d in digests]))
    async with running(node):
        await until("pressure in status", lambda: node.status().get("diskPressure") is True)
        status = node.status()
        assert conditions(status)["Progressing"] == ("False", "DiskPressure")
        assert conditions(status)["Degraded"] == ("True", "DiskPressure")
        assert conditions(status)["Ready"] == ("False", "LayersMissing")
        assert status["missing"] == digests
        assert registry.requests == []  # nothing fetched
        await until("re-checked and refused again", lambda: len(reserved) >= 6)
        assert [e["reason"] for e in node.status()["errors"]] == ["DiskPressure"]  # once
        node.disk.min_free_percent = 0.0  # space freed
        await until("Ready", node.ready)
        status = node.status()
        assert status["diskPressure"] is False
        assert conditions(status)["Degraded"] == ("False", "AsExpected")
        assert sorted(registry.requests) == sorted((d, 0) for d in digests)


async def test_node_disk_pressure_pauses_fetches_with_its_own_reason_until_it_clears(
        tmp_path: Path, registry: RegistryTwin, fast: None) -> None:
    a = registry.add(blob(1))
    node = make_node("n1", tmp_path, registry)
    node.disk.node_pressure = True  # the kubelet's DiskPressure condition
    node.apply(nlc("n1", [entry(a, 3000)]))
    async with running(node):
        await until("the fetch refused", lambda: any(
            e["reason"] == "NodeDiskPressure" for e in node.status().get("errors", ())))
        status = node.status()
        assert conditions(status)["Degraded"] == ("True", "NodeDiskPressure")
        assert conditions(status)["Progressing"] == ("False", "NodeDiskPressure")
        assert status["diskPressure"] is True
        assert registry.requests == [] and a not in node.store.blobs
        node.disk.node_pressure = False  # as Agent._check_node sets it, and wakes the loop
        node.reconciler.wake.set()
        await until("Ready", node.ready)
        assert node.status()["diskPressure"] is False
        assert registry.requests == [(a, 0)]


# --- failures and their retry --------------------------------------------------------


async def test_wrong_bytes_are_never_committed_and_the_layer_is_retried(
        tmp_path: Path, registry: RegistryTwin) -> None:
    good = blob(1)
    a = registry.add(good)
    registry.blobs[a] = blob(9)  # same size, other bytes
    node = make_node("n1", tmp_path, registry)
    node.apply(nlc("n1", [entry(a, 3000)]))
    async with running(node):
        await until("refused twice, between two attempts", lambda: len(registry.requests) >= 2
                    and a in node.book.failing and ingest_ref(a) not in node.store.ingests)
        status = node.status()
        assert conditions(status)["Degraded"] == ("True", "DigestMismatch")
        assert status["errors"][0]["digest"] == a
        assert a not in node.store.blobs and node.store.writes == []  # never committed
        registry.blobs[a] = good  # the registry mends
        await until("Ready", node.ready)
        assert conditions(node.status())["Degraded"] == ("False", "AsExpected")
        assert node.store.blobs[a] == good
        assert {offset for _, offset in registry.requests} == {0}  # wrong bytes not resumed


async def test_a_rate_limited_layer_is_not_retried_before_retry_after(
        tmp_path: Path, registry: RegistryTwin) -> None:
    a = registry.add(blob(1))
    registry.status[a] = (429, {"Retry-After": "600"})
    node = make_node("n1", tmp_path, registry)
    node.apply(nlc("n1", [entry(a, 3000)]))
    async with running(node):
        await until("refused", lambda: a in node.book.failing)
        assert node.book.failing[a].reason == "UpstreamRateLimited"
        retry_at = node.reconciler.retry.earliest()
        assert retry_at is not None and retry_at - node.reconciler.loop_time > 590
        for _ in range(20):  # passes (woken by hand) do not retry it early
            node.reconciler.wake.set()
            await asyncio.sleep(0.001)
        assert registry.requests == [(a, 0)]
        assert a not in node.reconciler.inflight
