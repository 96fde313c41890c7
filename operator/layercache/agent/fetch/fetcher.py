"""Fetch one layer into containerd: from a peer that holds it, else from the registry.

For a ``Peer`` layer, the listed peers are asked together with a long-poll ``HEAD
?wait=`` (`layercache.agent.peer.server`: each answers as soon as it holds the blob *or starts
receiving it*, else after up to `LONG_POLL` seconds) until one has it — then it is copied
from there, cut-through while that peer still receives it (`layercache.agent.peer.relay`) — or
until `AgentSettings.peer_wait_seconds` have passed; then the registry. The first listed
peer, the node's parent in the layer's relay tree (`layercache.plan.distribute`), is
preferred: another's yes waits `PARENT_GRACE` seconds for its. Peers that answer
at once without it (an older agent, an error) are asked again after
`AgentSettings.peer_poll_seconds`, growing to 5 times that, with jitter. A peer whose
``GET`` fails is dropped for that layer at once, and with every peer dropped the registry
is next without waiting further, resuming from what the ingest holds; a peer that stops
mid-body (killed mid-relay, or its own transfer failed: the nodes below it in the tree
would otherwise wait out `peer_wait_seconds`), or whose bytes do not match the digest (the
seeder's upstream sent wrong bytes, relayed as they came), sends us to the registry at
once. Not to another relaying peer: that one may be reading from this node's own relay,
and the two would wait on each other. A cut costs at most
`layercache.plan.distribute.FANOUT` upstream transfers (the cut node's children), and
the subtrees below them go on from their relays.
An ``Upstream`` layer (this node seeds it) goes to the registry at once. Either way what
arrives is relayed to the node's children in the tree as it arrives (within
`Relays.budget`), also across a fall-back from a peer to the registry:

- the write goes through containerd's content API under a lease, with the ingest ref
  derived from the digest (`layercache.containerd.content.ingest_ref`): a retry — or a
  restarted agent — resumes from the ingest's STAT offset instead of byte 0; a source that
  refuses that resume (another range, 416) gets the ingest aborted and the blob written
  again from byte 0 at once;
- the bytes are verified (`layercache.agent.fetch.transfer.metered` and containerd's COMMIT
  check); a mismatching ingest is aborted, never committed;
- the blob is committed with ``containerd.io/gc.root``, our managed-by and cache labels,
  the source it came from, and containerd's ``distribution.source`` label;
- a transfer holds one of `AgentSettings.concurrency` slots (`Slots`: upstream transfers
  before peer copies, so a node seeds what others wait for before it copies for itself)
  and reserves its remaining bytes on the image filesystem
  (`layercache.agent.status.disk.DiskGuard`) while it runs.

`failure_reason` turns any exception into the CamelCase reason status and metrics use
(the table is `layercache.api.reasons`, shared with the operator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from layercache.agent.fetch.transfer import ByteRate, ResumeRefusedError, upstream_source
from layercache.agent.nodespec import WantedLayer
from layercache.agent.peer.client import (
    PeerCutError,
    PeerDirectory,
    PeerError,
    PeerUnauthorizedError,
)
from layercache.agent.peer.relay import Relay, Relays, relayed
from layercache.agent.ports import PeerSource
from layercache.agent.status.disk import DiskGuard
from layercache.agent.status.report import StatusBook
from layercache.api import Reason, reasons
from layercache.backoff import Backoff
from layercache.containerd.content import WriteResult, ingest_ref
from layercache.containerd.ingest import (
    ContentDigestMismatchError,
    ResumableSource,
    SourceSizeError,
    ingest_lease_id,
)
from layercache.containerd.ports import ContentStorePort
from layercache.metrics import AgentMetrics, FetchSource
from layercache.oci.digest import Digest, DigestMismatchError
from layercache.oci.mediatypes import layer_type
from layercache.registry.client import RegistryClient
from layercache.registry.credentials import Keyring, first_accepted
from layercache.registry.errors import (
    NonDistributableLayerError,
)

__all__ = ["FetchConfig", "LayerFetcher", "Slots", "failure_reason"]

log = logging.getLogger(__name__)

#: Label naming where a blob's bytes came from (``upstream`` or ``peer``).
SOURCE_LABEL = "layercache.dev/source"
#: A peer wait polls every ``peer_poll`` seconds at first, growing to this many times that.
POLL_GROWTH = 5.0
#: Longest long-poll asked of a peer (seconds; the server caps it too).
LONG_POLL = 20.0
#: Seconds another peer's yes waits for the first listed peer's (the relay-tree parent).
PARENT_GRACE = 1.0
#: Times within one grace the parent is asked again after it said no (its long-poll was
#: short: a listed peer had no endpoint yet); bounds the asking of an agent that never
#: long-polls.
REASK_PARENT = 3
#: containerd's own label for the repository a blob was pulled from, per registry host.
DISTRIBUTION_SOURCE_PREFIX = "containerd.io/distribution.source."

def failure_reason(error: BaseException) -> str:
    """The CamelCase reason for ``error`` fetching a layer (``UpstreamUnavailable`` …).

    `layercache.api.reasons.failure_reason`, its fetch column.
    """
    return str(reasons.failure_reason(error, "fetch"))


class Slots:
    """``count`` transfer slots; a waiting upstream transfer is served before any peer copy.

    Why: a node seeds layers other nodes wait for; its own peer copies must not hold every
    slot while those wait (the issue-15 rule "the seeder fetches its upstream layers
    before its own peer fetches").
    """

    def __init__(self, count: int) -> None:
        self.free = count
        self.upstream_waiting = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, upstream: bool) -> AsyncIterator[None]:
        """Hold one slot for the block; ``upstream`` transfers go first."""
        async with self._changed:
            self.upstream_waiting += upstream
            try:
                await self._changed.wait_for(
                    lambda: self.free > 0 and (upstream or not self.upstream_waiting))
            finally:
                self.upstream_waiting -= upstream
                self._changed.notify_all()  # a peer copy may go now that no upstream waits
            self.free -= 1
        try:
            yield
        finally:
            async with self._changed:
                self.free += 1
                self._changed.notify_all()


@dataclass(frozen=True)
class FetchConfig:
    """This node's name, the peer wait (``peer_wait``, ``peer_poll``: seconds), concurrency."""

    node: str
    peer_wait: float
    peer_poll: float
    concurrency: int


class LayerFetcher:
    """Fetches layers into ``store`` (see the module docstring); one per agent."""

    def __init__(self, config: FetchConfig, *, store: ContentStorePort,
                 registry: RegistryClient, peers: PeerSource, directory: PeerDirectory,
                 rate: ByteRate, disk: DiskGuard, book: StatusBook, metrics: AgentMetrics,
                 keyrings: Callable[[Sequence[str], str], list[Keyring]] | None = None,
                 relays: Relays | None = None) -> None:
        self.config = config
        #: (caches, registry) → keyrings to try upstream (`Secrets.keyrings_for`); None:
        #: the registry client's own keyring.
        self.keyrings = keyrings
        self.store = store
        self.registry = registry
        self.peers = peers
        self.directory = directory
        self.rate = rate
        self.disk = disk
        self.book = book
        self.metrics = metrics
        #: Blobs being received, served to peers cut-through (the peer server's).
        self.relays = relays if relays is not None else Relays()
        self.slots = Slots(config.concurrency)

    async def fetch(self, layer: WantedLayer, caches: Sequence[str]) -> FetchSource:
        """Bring ``layer`` into the content store; returns where it came from.

        Raises:
            DiskPressureError: not enough space (or the Node reports DiskPressure).
            DigestMismatchError, SourceSizeError: the registry sent other bytes.
            RegistryError: the registry refused or failed (after its retries).
            ContainerdError: containerd refused or failed.

        """
        kind = layer_type(layer.media_type) if layer.media_type else None
        if kind is not None and not kind.distributable:
            raise NonDistributableLayerError(str(layer.digest), layer.media_type)
        others = [peer for peer in layer.peers if peer != self.config.node]
        # One relay for the whole fetch: what arrives from a peer and then, after a cut,
        # from the registry (resuming where the ingest stands) is one byte stream to the
        # nodes below this one in the layer's relay tree.
        with self.relays.receiving(layer.digest, layer.size) as relay:
            if layer.source == "Peer" and others and await self._from_peers(
                    layer, others, caches, relay):
                found: FetchSource = "peer"
            else:
                await self._from_upstream(layer, caches, relay)
                found = "upstream"
        self.relays.announce(layer.digest)
        return found

    async def _from_peers(self, layer: WantedLayer, peers: Sequence[str],
                          caches: Sequence[str], relay: Relay | None) -> bool:
        """Copy ``layer`` from the first peer that holds it; False once the wait is over.

        A peer whose ``GET`` fails after its ``HEAD`` said it holds the blob (an error
        status, a body cut short or with wrong bytes) is dropped for this layer at once:
        asking it again would fail again. With every peer dropped, the wait ends early; a
        body cut mid-way or with wrong bytes ends it at once (see the module docstring).
        What arrives is fed to ``relay`` (this node's children in the relay tree read it);
        wrong bytes fail it, so they stop and resume elsewhere.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.peer_wait
        refused: set[str] = set()
        dropped: set[str] = set()
        poll = Backoff(self.config.peer_poll, self.config.peer_poll * POLL_GROWTH, factor=1.5,
                       jitter=True)
        polls = 1
        while True:
            asked = loop.time()
            wait = min(LONG_POLL, max(0.0, deadline - asked))
            for node, endpoint in await self._holders(layer, peers, dropped, refused, wait):
                source = self.peers.source(endpoint, layer.digest, layer.size, self.rate,
                                           lambda n: self.book.fetched("peer", n))
                if relay is not None:
                    source = relayed(source, relay)
                try:
                    await self._write(layer, caches, "peer", source, peer=node)
                    return True
                except (PeerError, ResumeRefusedError) as error:
                    log.info("peer %s failed to send %s, dropped for it: %s", node,
                             layer.digest.short, error, extra={"digest": layer.digest})
                    if isinstance(error, PeerUnauthorizedError) and node not in refused:
                        refused.add(node)
                        self.book.error(Reason.PEER_UNAUTHORIZED, str(error), layer.digest)
                    dropped.add(node)
                    self.directory.forget(node)
                    if isinstance(error, PeerCutError):
                        # Cut mid-body: the peer died or its own transfer failed (say its
                        # registry refused it); the registry, resuming from what the ingest
                        # holds, now (see the module docstring), still relaying to our own
                        # children in the tree.
                        log.info("peer %s cut %s mid-body: fetching upstream", node,
                                 layer.digest.short, extra={"digest": layer.digest})
                        return False
                except DigestMismatchError as error:
                    # Wrong bytes from a peer are the seeder's upstream body relayed as it
                    # came (cut-through); the seeder finds out at its own COMMIT and retries,
                    # while the nodes on that path wait on it: the registry now.
                    if relay is not None:  # relayed on already: our children stop too
                        relay.fail(f"peer {node} sent wrong bytes")
                    dropped.add(node)
                    self.book.error("DigestMismatch", f"from peer {node}: {error}", layer.digest)
                    log.info("peer %s sent %s with wrong bytes: fetching upstream", node,
                             layer.digest.short, extra={"digest": layer.digest})
                    return False
            if dropped.issuperset(peers):
                log.info("every peer failed to send %s: fetching upstream", layer.digest.short,
                         extra={"digest": layer.digest})
                return False
            if loop.time() >= deadline:
                log.info("no peer served %s in %.0f s: fetching upstream", layer.digest.short,
                         self.config.peer_wait, extra={"digest": layer.digest})
                return False
            if loop.time() - asked < min(poll.step(polls), wait):
                # Answered at once without the blob (an agent without long-polls, errors):
                # jittered and growing, so many waiting nodes do not poll in step.
                await asyncio.sleep(min(poll.delay(polls), max(0.0, deadline - loop.time())))
                polls += 1

    async def _holders(self, layer: WantedLayer, peers: Sequence[str], dropped: set[str],
                       refused: set[str], wait: float) -> list[tuple[str, str]]:
        """The peers (node, endpoint) that hold ``layer`` or receive it, asked together.

        Each is asked with a long-poll of ``wait`` seconds (one without an endpoint yet is
        looked up again every peer poll, and asked once it has one); returns as soon as one says
        yes (with any others that said yes by then, in ``peers`` order), or an empty list
        once all said no. A yes from another peer waits up to `PARENT_GRACE` seconds for
        the first listed peer's: this node's parent in the layer's relay tree, which says
        yes once its own first bytes arrive — a moment after the seeder, which would
        otherwise answer first to every node and upload the layer to each.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        asked = [node for node in peers if node not in dropped]
        endpoints = await asyncio.gather(*(self.directory.endpoint(node) for node in asked))
        asking: dict[asyncio.Task[bool], tuple[str, str]] = {}
        # A peer whose agent has not published its endpoint yet (its NodeLayerCache was
        # just created) may be the one with the layer: looked up again every peer poll
        # while the others long-poll, and asked as soon as it has one.
        looking: dict[asyncio.Task[str | None], str] = {}
        for node, endpoint in zip(asked, endpoints, strict=True):
            if endpoint is not None:
                asking[asyncio.create_task(self.peers.has(endpoint, layer.digest, wait))] = (
                    node, endpoint)
            else:
                looking[asyncio.create_task(self._endpoint_soon(node, until))] = node
        parent: asyncio.Task[Any] | None = next(
            (task for task, (node, _) in asking.items() if node == peers[0]),
            next((task for task, node in looking.items() if node == peers[0]), None))
        yes: list[tuple[str, str]] = []
        pending: set[asyncio.Task[Any]] = {*asking, *looking}
        grace_end: float | None = None
        reasked = 0
        parent_said_no = False  # its last long-poll ended without the layer
        try:
            while pending and not (yes and parent not in pending):
                timeout = None if grace_end is None else max(0.0, grace_end - loop.time())
                done, pending = await asyncio.wait(pending, timeout=timeout,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break  # the parent did not say yes within the grace: take the others
                for task in done:
                    if task in looking:
                        node = looking.pop(task)
                        endpoint = task.result()
                        if endpoint is not None:
                            late = asyncio.create_task(self.peers.has(
                                endpoint, layer.digest, max(0.0, until - loop.time())))
                            asking[late] = (node, endpoint)
                            pending.add(late)
                            parent = late if task is parent else parent
                        continue
                    answer = self._answer(layer, asking[task][0], task, refused)
                    if answer:
                        yes.append(asking[task])
                    if task is parent:
                        parent_said_no = answer is False
                if yes and grace_end is None:
                    grace_end = loop.time() + PARENT_GRACE
                if (parent is not None and parent_said_no and yes and reasked < REASK_PARENT
                        and grace_end is not None and loop.time() < grace_end):
                    # The parent's long-poll ended without the layer before the grace did
                    # (it is short while a listed peer has no endpoint yet): ask it again
                    # for the rest of the grace; it says yes at its own first bytes.
                    reasked += 1
                    node, endpoint = asking[parent]
                    parent = asyncio.create_task(self.peers.has(
                        endpoint, layer.digest, grace_end - loop.time()))
                    asking[parent] = (node, endpoint)
                    pending.add(parent)
                    parent_said_no = False
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        order = {node: index for index, node in enumerate(peers)}
        found = sorted(yes, key=lambda held: order[held[0]])
        if found and parent is not None and found[0][0] != peers[0]:
            log.debug("%s: parent %s passed over for %s (%s)", layer.digest.short, peers[0],
                      found[0][0], "no answer within the grace" if parent in pending
                      else "said no" if parent_said_no else "failed",
                      extra={"digest": layer.digest})
        return found

    async def _endpoint_soon(self, node: str, until: float) -> str | None:
        """``node``'s endpoint once it has one, looked up every peer poll until ``until``."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.config.peer_poll, max(0.0, until - loop.time())))
            endpoint = await self.directory.endpoint(node)
            if endpoint is not None or loop.time() >= until:
                return endpoint

    def _answer(self, layer: WantedLayer, node: str, task: asyncio.Task[bool],
                refused: set[str]) -> bool | None:
        """Peer ``node``'s finished long-poll ``task``: holds ``layer``, not, or None (failed)."""
        try:
            return task.result()
        except PeerUnauthorizedError as error:
            if node not in refused:  # once per layer and peer, not once per poll
                refused.add(node)
                self.book.error(Reason.PEER_UNAUTHORIZED, str(error), layer.digest)
        except PeerError as error:
            log.info("peer %s cannot serve %s: %s", node, layer.digest.short, error)
            self.directory.forget(node)
        return None

    async def _from_upstream(self, layer: WantedLayer, caches: Sequence[str],
                             relay: Relay | None) -> None:
        """Copy ``layer`` from its registry; transient failures retry and resume.

        Only the credentials of the caches that want the layer are used, each in turn
        until the registry accepts one (`first_accepted`). What arrives is fed to ``relay``
        (peers may read it while it arrives: cut-through), unless that failed already.
        """
        source = upstream_source(self.registry, layer.repository, layer.digest, layer.size,
                                 self.rate, lambda n: self.book.fetched("upstream", n))
        what = f"layer {layer.digest.short} from {layer.repository.name}"
        if relay is not None and relay.error is None:
            if layer.source == "Upstream":
                relay.seeding = True  # the root of the layer's tree: a budget of its own
            source = relayed(source, relay)

        async def copy() -> None:
            async for attempt in self.registry.retry.retrying(what):
                with attempt:
                    await self._write(layer, caches, "upstream", source)

        if self.keyrings is None:
            await copy()
        else:
            await first_accepted(self.keyrings(layer.caches or caches,
                                               layer.repository.registry), copy)

    def _labels(self, layer: WantedLayer, source: FetchSource) -> dict[str, str]:
        return {SOURCE_LABEL: source,
                DISTRIBUTION_SOURCE_PREFIX + layer.repository.registry:
                    layer.repository.repository}

    async def _write(self, layer: WantedLayer, caches: Sequence[str], source_kind: FetchSource,
                     source: ResumableSource, peer: str | None = None) -> None:
        """One write attempt in a transfer slot, with its bytes reserved on disk.

        ``peer``: the node a peer copy comes from (logged with the result: which node
        served which is the relay tree's profile).

        A resume the source refuses (`ResumeRefusedError`: a ``206`` from another byte, or
        ``416``) aborts the ingest and writes the blob again from byte 0, at once: those
        held bytes can never be continued, and keeping them would refuse every retry.

        Raises:
            DiskPressureError, DigestMismatchError, SourceSizeError, ContainerdError, and
            whatever ``source`` raises (`PeerError`, `RegistryError`).

        """
        ref = ingest_ref(layer.digest)
        async with self.slots.take(upstream=source_kind == "upstream"):
            try:
                result = await self._write_once(layer, caches, source_kind, source)
            except ResumeRefusedError as error:
                log.warning("%s: dropping the %d bytes held and starting over from byte 0",
                            error, error.offset, extra={"digest": layer.digest})
                await asyncio.shield(self.drop_ingest(layer.digest))
                result = await self._write_once(layer, caches, source_kind, source)
        log.info("layer %s held (%s)", layer.digest.short, source_kind,
                 extra={"digest": layer.digest, "source": source_kind, "bytes": layer.size,
                        "resumed_from": result.resumed_from, "written": result.written,
                        "already_existed": result.already_existed, "ref": ref}
                 | ({"peer": peer} if peer is not None else {}))

    async def _write_once(self, layer: WantedLayer, caches: Sequence[str],
                          source_kind: FetchSource, source: ResumableSource) -> WriteResult:
        """One Write stream, resuming ingest ``ingest_ref(layer.digest)`` if it exists."""
        ingest = await self.store.status(ingest_ref(layer.digest))
        held = ingest.offset if ingest is not None and ingest.total == layer.size else 0
        need = layer.size - held
        await self.disk.reserve(need)
        started = time.monotonic()
        ok = False
        try:
            result = await self.store.write(
                ingest_ref(layer.digest), layer.digest, layer.size, source, caches=caches,
                labels=self._labels(layer, source_kind), keep_on_error=True)
            ok = True
        except (DigestMismatchError, SourceSizeError) as error:
            if not isinstance(error, ContentDigestMismatchError):
                # Kept for a resume by keep_on_error, but these bytes are wrong: drop them.
                await asyncio.shield(self.drop_ingest(layer.digest))
            raise
        finally:
            self.disk.release(need)
            self.metrics.ingested(source_kind, ok, time.monotonic() - started)
        return result

    async def drop_ingest(self, digest: Digest) -> None:
        """Abort the ingest of ``digest`` and delete its lease (logging, not raising)."""
        ref = ingest_ref(digest)
        await self.store.abort_quietly(ref)
        await self.store.leases.delete_quietly(ingest_lease_id(ref))
