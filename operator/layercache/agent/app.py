"""The node agent's process: wire the parts together, run until SIGTERM, shut down cleanly.

Start-up order matters for crash safety and for peers:

1. read this node's NodeLayerCache (its spec, and the byte counters its status kept);
2. clean our stale leases and ingests in containerd (`layercache.agent.store.cleanup`), keeping
   the ingests of wanted layers so their writes resume, and the active snapshots of an
   interrupted unpack (`layercache.agent.store.unpacking`);
3. serve peers and metrics, then publish ``status.peerEndpoint``;
4. follow the object (watch thread), the Node (DiskPressure, platform) and both Secrets,
   and reconcile (`layercache.agent.reconcile`), reporting status as it goes.

On SIGTERM or SIGINT every fetch is cancelled (its ingest and lease kept for a resume),
the status is patched a last time and the servers close. ``kill -9`` skips all that, which
is what step 2 and the leases' ``containerd.io/gc.expire`` are for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from layercache.agent.fetch.fetcher import FetchConfig, LayerFetcher
from layercache.agent.fetch.transfer import ByteRate
from layercache.agent.kubeapi import KUBE_BACKOFF, AgentKube, Obj
from layercache.agent.limits import memory_limit
from layercache.agent.nodeinfo import NodeInfo
from layercache.agent.nodespec import Counters, parse_node_spec
from layercache.agent.peer.client import PeerClient, PeerDirectory
from layercache.agent.peer.relay import Relays, default_budget
from layercache.agent.peer.server import ContainerdLiveness, PeerServer, metrics_app, start_site
from layercache.agent.ports import AgentKubePort, PeerSource
from layercache.agent.reconcile import NodeReconciler
from layercache.agent.secrets import LiveKeyring, Secrets
from layercache.agent.settings import AgentSettings
from layercache.agent.status.disk import DiskGuard
from layercache.agent.status.disksavings import DiskMeter
from layercache.agent.status.kubelet import read_kubelet_disk
from layercache.agent.status.report import StatusBook, StatusReporter
from layercache.agent.store.cleanup import clean_stale
from layercache.agent.store.images import ImagePuller
from layercache.agent.store.unpacking import ChainUnpacker, configured_snapshotter
from layercache.api import Reason
from layercache.backoff import RetryTimes
from layercache.containerd.content import ContentStore
from layercache.containerd.cri import CRIImages
from layercache.containerd.ports import ContentStorePort, CRIImagesPort
from layercache.containerd.unpack import Snapshots
from layercache.metrics import AgentGauges, AgentMetrics
from layercache.registry.client import RegistryClient, registry_options
from layercache.registry.hosts import RegistryHosts
from layercache.registry.mirrors import HostsDirectory, MirrorTransport

__all__ = ["Agent", "NodeContainerd", "run_agent"]

log = logging.getLogger(__name__)

# How often the agent checks that containerd answers (see ContainerdLiveness), and the digest
# it asks about: the empty blob's, absent or present, both are an answer.
_LIVENESS_SECONDS = 10.0
_NO_BLOB = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


async def _retrying(what: str, call: Callable[[], Awaitable[Any]]) -> Any:
    """``call()`` until it succeeds: start-up cannot go on without it (backoff up to 30 s)."""
    delays = KUBE_BACKOFF.delays()
    while True:
        try:
            return await call()
        except Exception as error:
            delay = next(delays)
            log.warning("%s failed: %s; retrying in %.0f s", what, error, delay)
            await asyncio.sleep(delay)


async def _every(seconds: float, step: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await step()
        except Exception:  # a periodic step must not end the agent
            log.exception("periodic step %s failed", getattr(step, "__name__", step))


def _disk_gauges(book: StatusBook) -> tuple[int, int, int, int]:
    """The node's (blobs, snapshots, separate, saved) disk bytes; zeros until measured."""
    if book.disk is None:
        return 0, 0, 0, 0
    node = book.disk.node
    return node.blobs, node.snapshots, node.separate, node.saved


#: Makes the unpacker of the node's chains, given the status book, disk guard, retry times
#: and metrics of the agent.
ChainsFactory = Callable[[StatusBook, DiskGuard, RetryTimes, AgentMetrics], ChainUnpacker]
#: Serves an aiohttp app on (bind address, port); returns the runner to clean up at the end.
Serve = Callable[[web.Application, str, int], Awaitable[Any]]


@dataclass
class NodeContainerd:
    """The node's containerd as the agent's parts use it: `connect` makes the real one.

    ``store`` and ``cri`` are the content store and CRI image service; ``chains`` makes the
    chain unpacker (snapshots); ``meter`` measures the disk-savings figures (None: never).
    """

    store: ContentStorePort
    cri: CRIImagesPort
    chains: ChainsFactory
    meter: DiskMeter | None
    close: Callable[[], Awaitable[None]]

    @classmethod
    def connect(cls, settings: AgentSettings) -> NodeContainerd:
        """Clients on ``settings.containerd_socket``, sharing one gRPC channel (lazy)."""
        socket, namespace = settings.containerd_socket, settings.containerd_namespace
        store = ContentStore(socket, namespace)
        snapshotter = settings.snapshotter or configured_snapshotter(settings.containerd_config)

        def chains(book: StatusBook, disk: DiskGuard, retry: RetryTimes,
                   metrics: AgentMetrics) -> ChainUnpacker:
            return ChainUnpacker.for_node(socket, namespace, snapshotter, book=book,
                                          disk=disk, retry=retry, metrics=metrics)

        meter = DiskMeter(store, Snapshots(socket, namespace, snapshotter=snapshotter,
                                           channel=store.channel))
        return cls(store, CRIImages(socket, channel=store.channel), chains, meter, store.close)


class Agent:
    """One node's agent: its clients, servers and tasks (see the module docstring).

    The ports default to the real ones for ``settings``; a test hands in twins (``kube``,
    ``containerd``, ``peers``), an in-memory ``registry_transport`` for the registry client,
    a ``disk`` guard of its own, and ``serve`` (default `start_site`) for the peer and
    metrics servers.
    """

    def __init__(self, settings: AgentSettings, *, kube: AgentKubePort | None = None,
                 containerd: NodeContainerd | None = None, peers: PeerSource | None = None,
                 registry_transport: httpx.AsyncBaseTransport | None = None,
                 disk: DiskGuard | None = None, serve: Serve = start_site) -> None:
        self.settings = settings
        self.kube: AgentKubePort = kube if kube is not None else AgentKube(settings)
        self.registry_metrics = CollectorRegistry()
        self.metrics = AgentMetrics(settings.node_name, self.registry_metrics)
        self.secrets = Secrets(self.kube, settings.peer_token_secret, settings.registry_secret)
        self.containerd = containerd if containerd is not None else NodeContainerd.connect(
            settings)
        self.store = self.containerd.store
        self.cri = self.containerd.cri
        self.serve = serve
        self.node_info = NodeInfo()
        self.disk = disk if disk is not None else DiskGuard(
            self._image_fs, settings.min_free_percent or 0.0,
            read_kubelet_disk(settings.kubelet_config))
        registries, default = registry_options(settings.insecure_registries,
                                               ca_file=settings.registry_ca_file)
        # Upstream fetches take the hosts (mirrors) the node's containerd pulls through.
        hosts = HostsDirectory(settings.registry_config_path)
        self.registry = RegistryClient(
            keyring=LiveKeyring(self.secrets), registries=registries, default=default,
            hosts=RegistryHosts(self.metrics.registry_requests.request),
            transport_factory=(lambda tls: MirrorTransport(hosts, tls)) if hosts.roots
            else None, transport=registry_transport)
        self.peers: PeerSource = (peers if peers is not None
                                  else PeerClient(lambda: self.secrets.token))
        # Cut-through: shared by the fetcher and the peer server, sized to the memory limit.
        self.relays = Relays(settings.relay_budget_bytes or default_budget(memory_limit()))
        self.runners: list[Any] = []
        #: The control loop, once `run` made it.
        self.reconciler: NodeReconciler | None = None

    async def _image_fs(self) -> Path:
        if self.settings.image_fs_path is not None:
            return self.settings.image_fs_path
        return Path((await self.cri.fs_info()).mountpoint)

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, run until ``stop`` is set, then shut down."""
        settings = self.settings
        obj, _ = await _retrying("reading own NodeLayerCache",
                                 lambda: asyncio.to_thread(self.kube.list_own))
        spec = parse_node_spec(obj) if obj is not None else None
        book = StatusBook(spec.counters if spec is not None else Counters(), self.metrics,
                          lambda: self.secrets.secrets)
        await self._refresh_secrets(book)
        await _retrying("cleaning stale leases", lambda: clean_stale(
            self.store, spec.wanted if spec is not None else ()))
        retry = RetryTimes(settings.retry_initial_seconds, settings.retry_max_seconds)
        fetcher = LayerFetcher(
            FetchConfig(settings.node_name, settings.peer_wait_seconds,
                        settings.peer_poll_seconds, settings.concurrency),
            store=self.store, registry=self.registry, peers=self.peers,
            directory=PeerDirectory(self.kube), rate=ByteRate(settings.max_bytes_per_second),
            disk=self.disk, book=book, metrics=self.metrics,
            keyrings=self.secrets.keyrings_for, relays=self.relays)
        images = ImagePuller(cri=self.cri, store=self.store, registry=self.registry,
                             keyrings=self.secrets.keyrings_for, book=book, retry=retry,
                             platform=lambda: self.node_info.platform)
        chains = self.containerd.chains(book, self.disk, retry, self.metrics)
        await _retrying("removing stale unpack snapshots", chains.remove_stale)
        reconciler = self.reconciler = NodeReconciler(
            store=self.store, fetcher=fetcher, images=images, book=book, disk=self.disk,
            retry=retry, resync_seconds=settings.resync_seconds, chains=chains,
            meter=self.containerd.meter)
        reconciler.set_object(obj)
        self.metrics.track(lambda: AgentGauges(
            book.wanted, book.held, book.bytes_held, book.pressure is not None,
            book.chains_wanted, book.chains_unpacked, book.bytes_unpacked,
            *_disk_gauges(book)))
        # A cheap containerd call (a lookup of a digest nobody has) every few seconds; a
        # stale socket mount or a dead containerd fails /healthz after a minute.
        liveness = ContainerdLiveness(lambda: self.store.info(_NO_BLOB))
        server = PeerServer(self.store, lambda: self.secrets.token, book.served_bytes,
                            liveness, self.relays)
        self.runners.append(await self.serve(server.app(), settings.peer_bind,
                                             settings.peer_port))
        self.runners.append(await self.serve(metrics_app(self.registry_metrics),
                                             settings.metrics_bind, settings.metrics_port))
        await self._check_node(reconciler)
        book.peer_endpoint = self._endpoint()
        reporter = StatusReporter(book, self.kube.patch_status, settings.status_interval_seconds)
        await reporter.flush()
        loop = asyncio.get_running_loop()
        watch = self.kube.watch_own(loop, reconciler.set_object)
        watch.start()
        tasks = [asyncio.create_task(coro, name=name) for name, coro in (
            ("reconcile", reconciler.run()),
            ("status", reporter.run()),
            ("node", _every(settings.node_check_seconds,
                            lambda: self._check_node(reconciler))),
            ("secrets", _every(settings.secret_refresh_seconds,
                               lambda: self._refresh_secrets(book))),
            ("containerd", _every(_LIVENESS_SECONDS, liveness.check)),
        )]
        log.info("agent running", extra={"peer_endpoint": book.peer_endpoint,
                                         "relay_budget_bytes": self.relays.budget})
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                task.result()  # a task that ended on its own failed: raise its error
        finally:
            watch.stop()
            for task in [stopping, *tasks]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await reporter.flush()

    async def close(self) -> None:
        """Close the servers and every client."""
        for runner in self.runners:
            await runner.cleanup()
        await self.peers.aclose()
        await self.registry.aclose()
        await self.containerd.close()
        self.kube.close()

    async def _refresh_secrets(self, book: StatusBook) -> None:
        problems = await self.secrets.refresh()
        for reason in [r for r in book.problems if r != Reason.INVALID_SPEC]:
            book.problems.pop(reason)
        for problem in problems:
            if problem.reason not in book.problems:
                book.problems[problem.reason] = book.error(problem.reason, problem.message)
        book.touch()

    async def _check_node(self, reconciler: NodeReconciler) -> None:
        try:
            node: Obj | None = await self.kube.get_node()
        except ApiException as error:
            log.warning("cannot read Node %s: HTTP %s", self.settings.node_name, error.status)
            return
        before = self.disk.node_pressure
        self.node_info.update(node)
        self.disk.node_pressure = self.node_info.disk_pressure
        if before != self.disk.node_pressure:
            log.warning("Node DiskPressure is now %s", self.disk.node_pressure)
            reconciler.wake.set()

    def _endpoint(self) -> str | None:
        address = self.settings.peer_advertise_address or self.node_info.internal_ip
        if not address:
            log.error("no address to advertise: set LAYERCACHE_PEER_ADVERTISE_ADDRESS "
                      "(or POD_IP); peers cannot reach this agent")
            return None
        host = f"[{address}]" if ":" in address else address
        return f"http://{host}:{self.settings.peer_port}"


async def run_agent(settings: AgentSettings) -> None:
    """Run the agent until SIGTERM or SIGINT (see the module docstring)."""
    log.info("starting layercache agent", extra={"settings": settings.describe()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    agent = Agent(settings)
    try:
        await agent.run(stop)
    finally:
        with contextlib.suppress(Exception):
            await agent.close()
    log.info("agent stopped")
