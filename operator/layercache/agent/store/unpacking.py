"""Unpack this node's wanted chains into its snapshotter once their blobs are held.

`NodeLayerCache.spec.chains` lists prefixes of the caches' images by chain ID, each after
its parent. Once the content store holds every blob of one, `ChainUnpacker` makes its
committed snapshot in the CRI's namespace and snapshotter (`layercache.containerd.unpack`:
Prepare → Apply → verify the diff ID → Commit, as containerd's own unpacker), so a later
CRI pull of any image built on it skips fetching and unpacking those layers.

- The snapshotter is `AgentSettings.snapshotter`, else the CRI's from the node containerd's
  config file (`configured_snapshotter`), else overlayfs. Another snapshotter is reported
  (``UnsupportedSnapshotter``) and nothing is unpacked; the agent goes on fetching.
- Inventory comes from containerd (``Snapshots.List``), re-read with the blobs': a chain is
  unpacked when a committed snapshot has its chain ID and carries the pin labels of every
  cache wanting it. Committed snapshots of ours no cache wants any more are released
  (labels removed, never the snapshot: `Unpacker.release`), so containerd's GC removes
  them unless an image the kubelet pulled refers to them.
- At start-up, active snapshots an unpack killed midway left are removed
  (`Unpacker.remove_stale`); each chain is then unpacked again from its parent.
- Before a chain is unpacked, its estimated size (``unpackedBytes``) is reserved on the
  image filesystem (`DiskGuard`): the free-space floor holds for snapshots as for blobs.
- Failures are recorded by reason (``DiffIDMismatch``, ``UnpackFailed``, disk reasons) in
  status and metrics, and retried with the reconciler's backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layercache.agent.nodespec import NodeSpec, WantedChain
from layercache.agent.status.disk import DiskGuard, DiskPressureError
from layercache.agent.status.report import StatusBook
from layercache.api import Reason
from layercache.backoff import RetryTimes
from layercache.containerd.labels import GC_ROOT_LABEL, caches_of, is_managed
from layercache.containerd.unpack import (
    DEFAULT_SNAPSHOTTER,
    UNPACKED_SIZE_LABEL,
    DiffIDMismatchError,
    LayerToUnpack,
    SnapshotInfo,
    Unpacker,
    UnsupportedSnapshotterError,
)
from layercache.metrics import AgentMetrics
from layercache.oci.digest import Digest
from layercache.registry.manifest import LayerDescriptor

__all__ = ["ChainUnpacker", "configured_snapshotter"]

log = logging.getLogger(__name__)


def configured_snapshotter(config: Path | None) -> str:
    """The CRI's snapshotter named in containerd config file ``config``; overlayfs if none.

    Reads ``[plugins."io.containerd.cri.v1.images"] snapshotter`` (containerd 2.x, config
    version 3) and ``[plugins."io.containerd.grpc.v1.cri".containerd] snapshotter`` (1.7,
    version 2). A missing or unreadable file means containerd's default, overlayfs.
    """
    if config is None:
        return DEFAULT_SNAPSHOTTER
    try:
        parsed = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        log.info("containerd config %s not read (%s): snapshotter %s assumed", config, error,
                 DEFAULT_SNAPSHOTTER)
        return DEFAULT_SNAPSHOTTER
    plugins: Mapping[str, Any] = parsed.get("plugins") or {}
    for found in ((plugins.get("io.containerd.cri.v1.images") or {}).get("snapshotter"),
                  ((plugins.get("io.containerd.grpc.v1.cri") or {}).get("containerd") or {})
                  .get("snapshotter")):
        if isinstance(found, str) and found:
            return found
    return DEFAULT_SNAPSHOTTER


class ChainUnpacker:
    """Unpacks and releases one node's chains (see the module docstring).

    ``unpacker`` is None when the snapshotter is not supported (``snapshotter`` names it).
    """

    def __init__(self, *, unpacker: Unpacker | None, snapshotter: str, book: StatusBook,
                 disk: DiskGuard, retry: RetryTimes, metrics: AgentMetrics) -> None:
        self.unpacker = unpacker
        self.snapshotter = snapshotter
        self.book = book
        self.disk = disk
        self.retry = retry
        self.metrics = metrics
        #: Chain ID → uncompressed bytes we extracted into it (0: committed by another).
        self.unpacked: dict[Digest, int] = {}
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def for_node(cls, socket: Path, namespace: str, snapshotter: str, *, book: StatusBook,
                 disk: DiskGuard, retry: RetryTimes, metrics: AgentMetrics) -> ChainUnpacker:
        """One on the node's containerd; an unsupported snapshotter is a standing problem."""
        unpacker: Unpacker | None = None
        try:
            unpacker = Unpacker(socket, namespace, snapshotter=snapshotter)
        except UnsupportedSnapshotterError as error:
            book.problems[Reason.UNSUPPORTED_SNAPSHOTTER] = book.error(
                Reason.UNSUPPORTED_SNAPSHOTTER, str(error))
        return cls(unpacker=unpacker, snapshotter=snapshotter, book=book, disk=disk,
                   retry=retry, metrics=metrics)

    async def remove_stale(self) -> None:
        """Remove active snapshots a killed unpack left (start-up)."""
        if self.unpacker is not None:
            removed = await self.unpacker.remove_stale()
            if removed:
                log.info("removed %d stale active snapshot(s) of an interrupted unpack",
                         len(removed))

    async def inventory(self, spec: NodeSpec | None) -> None:
        """Read the snapshots; note the unpacked chains; release ours nobody wants.

        Raises:
            ContainerdError: listing or relabelling failed.

        """
        if self.unpacker is None:
            self.unpacked = {}
            return
        committed = {info.name: info for info in await self.unpacker.snapshots.list()
                     if info.committed}
        wanted = {chain.chain_id: chain for chain in spec.chains} if spec is not None else {}
        self.unpacked = {chain_id: _extracted(committed[chain_id])
                         for chain_id, chain in wanted.items()
                         if chain_id in committed and _pinned(committed[chain_id], chain)}
        if spec is None:
            return  # no object: keep what we hold until the operator says otherwise
        for name, info in committed.items():
            if not (is_managed(info.labels) and GC_ROOT_LABEL in info.labels):
                continue
            chain = wanted.get(Digest(name)) if name.startswith("sha256:") else None
            stale = caches_of(info.labels) - set(chain.caches if chain else ())
            if chain is None:
                await self.unpacker.release([name])
                log.info("released snapshot %s: no longer wanted", name)
            elif stale:
                await self.unpacker.release([name], stale)

    def ready(self, spec: NodeSpec, held: Mapping[Digest, int]) -> list[WantedChain]:
        """Chains to unpack now: blobs held, not unpacked, not waiting to retry."""
        now = asyncio.get_running_loop().time()
        return [chain for chain in spec.chains
                if chain.chain_id not in self.unpacked
                and all(digest in held for digest in chain.layers)
                and self.retry.ready(_key(chain), now)]

    def start(self, spec: NodeSpec, held: Mapping[Digest, int], on_done: Any) -> None:
        """Unpack the ready chains in a background task, one at a time (if none runs)."""
        if self.unpacker is None or (self.task is not None and not self.task.done()):
            return
        chains = self.ready(spec, held)
        if chains:
            self.task = asyncio.create_task(self._unpack_all(spec, chains), name="unpack")
            self.task.add_done_callback(on_done)

    async def stop(self) -> None:
        """Cancel a running unpack (its active snapshot is removed) and close the client."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.unpacker is not None:
            await self.unpacker.close()

    async def _unpack_all(self, spec: NodeSpec, chains: list[WantedChain]) -> None:
        layers = {layer.digest: layer for layer in spec.layers}
        for chain in chains:
            if not await self._unpack(chain, layers):
                break  # a refusal or failure: the rest wait for the next pass

    async def _unpack(self, chain: WantedChain, layers: Mapping[Digest, Any]) -> bool:
        assert self.unpacker is not None
        key = _key(chain)
        started = time.monotonic()
        try:
            await self.disk.reserve(chain.unpacked_bytes)
        except DiskPressureError as error:
            self.book.error(error.reason, f"unpacking chain {chain.chain_id}: {error}")
            self.retry.failed(key, asyncio.get_running_loop().time())
            return False
        try:
            pairs = [LayerToUnpack(LayerDescriptor(media_type=layers[d].media_type, digest=d,
                                                   size=layers[d].size), diff_id)
                     for d, diff_id in zip(chain.layers, chain.diff_ids, strict=True)]
            result = await self.unpacker.unpack_chain(pairs, chain.caches)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            reason = (Reason.DIFF_ID_MISMATCH if isinstance(error, DiffIDMismatchError)
                      else Reason.UNPACK_FAILED)
            self.book.failing[key] = self.book.error(
                reason, f"chain {chain.chain_id}: {error}", str(chain.layers[-1]))
            self.retry.failed(key, asyncio.get_running_loop().time())
            self.metrics.unpacked(False, time.monotonic() - started)
            return False
        finally:
            self.disk.release(chain.unpacked_bytes)
        self.metrics.unpacked(True, time.monotonic() - started)
        self.retry.succeeded(key)
        self.book.failing.pop(key, None)
        # Only the top layer's snapshot is this chain's own (its parents are listed before).
        own = chain.chain_id in result.committed
        self.unpacked[chain.chain_id] = result.extracted_bytes if own else self.unpacked.get(
            chain.chain_id, 0)
        log.info("chain %s unpacked (%d layers, %d extracted, %.2f s)", chain.chain_id.short,
                 len(chain.layers), len(result.committed), time.monotonic() - started,
                 extra={"chain_id": chain.chain_id})
        self.book.touch()
        return True

    def report(self, spec: NodeSpec | None) -> None:
        """Put the chain counts in the status book."""
        chains = spec.chains if spec is not None else ()
        self.book.chains_wanted = len(chains)
        self.book.chains_unpacked = sum(1 for c in chains if c.chain_id in self.unpacked)
        self.book.bytes_unpacked = sum(self.unpacked.get(c.chain_id, 0) for c in chains)
        self.book.chains_pending = (self.book.chains_wanted - self.book.chains_unpacked
                                    if self.unpacker is not None else 0)


def _key(chain: WantedChain) -> str:
    """The retry and failure key of a chain."""
    return f"chain {chain.chain_id}"


def _pinned(info: SnapshotInfo, chain: WantedChain) -> bool:
    """Whether the committed snapshot carries the pin labels of every cache wanting it."""
    return GC_ROOT_LABEL in info.labels and set(chain.caches) <= caches_of(info.labels)


def _extracted(info: SnapshotInfo) -> int:
    """Bytes we extracted into a snapshot (its label), 0 for one another unpacker made."""
    try:
        return int(info.labels.get(UNPACKED_SIZE_LABEL, "0"))
    except ValueError:
        return 0

