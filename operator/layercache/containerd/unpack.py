"""Unpack layer chains into a node's snapshotter ahead of the kubelet's pulls.

containerd keys the unpacked form of an image's layers by chain ID (OCI image-spec
``config.md``; `layercache.oci.digest.chain_ids`): a CRI pull that finds the committed snapshot
of a chain skips fetching and unpacking every layer of it. `Unpacker.unpack_chain` makes
those snapshots from layer blobs already in the content store, the way containerd's own
unpacker does (containerd v2 ``core/unpack/unpacker.go``, v1.7 ``pkg/unpack``), per layer
whose chain snapshot is missing:

1. ``Snapshots.Prepare`` an active snapshot under a unique key
   ``layercache-extract-<uuid> <chain ID>`` on top of the previous chain, under a lease;
2. ``Diff.Apply`` the layer blob onto its mounts; the answer's digest is the diff ID of what
   was extracted, checked against the image config's — a mismatch removes the active
   snapshot and raises `DiffIDMismatchError`, so no snapshot is ever committed under a
   chain ID its content does not have;
3. ``Snapshots.Commit`` it under the chain ID with containerd's labels
   (``containerd.io/snapshot.ref``, ``…/snapshot/diff-id``, ``…/snapshot/parent-chain-id``)
   and our pin labels, plus `UNPACKED_SIZE_LABEL` (the uncompressed bytes extracted, as
   the differ counted them); ``ALREADY_EXISTS`` (someone committed it first) is success;
4. label the layer blob ``containerd.io/uncompressed=<diff ID>`` as containerd does.

GC: committed snapshots carry the same pin labels as our blobs (`labels.pin_labels`:
``containerd.io/gc.root``, managed-by, one per cache), not a long-lived lease. A label
survives agent restarts and lease expiry, and releasing one cache is removing its label
(`labels.unpin_keys`): the snapshot then stays while an image the kubelet pulled refers to
it (its config's ``containerd.io/gc.ref.snapshot.<snapshotter>`` label) and goes with
containerd's next GC otherwise. The lease only covers the unpack itself.

Crash safety: a kill between Prepare and Commit leaves an active snapshot under our key
prefix, never a committed one; `Unpacker.remove_stale` removes those on restart (and the
lease's ``gc.expire`` bounds them anyway).

Only overlayfs is supported (`SUPPORTED_SNAPSHOTTERS`); another snapshotter raises
`UnsupportedSnapshotterError` before any call, for the caller to report in status.
"""

from __future__ import annotations

import asyncio
import builtins  # annotations say builtins.list: the method `list` shadows it
import contextlib
import datetime
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import grpc
from google.protobuf import field_mask_pb2

from layercache.containerd.channel import CRI_NAMESPACE, DEFAULT_TIMEOUT, Client
from layercache.containerd.content import ContentStore
from layercache.containerd.errors import AlreadyExists, ContainerdError, NotFound
from layercache.containerd.labels import (
    CACHE_LABEL_PREFIX,
    GC_ROOT_LABEL,
    is_managed,
    pin_labels,
    unpin_keys,
)
from layercache.containerd.leases import Leases
from layercache.containerd.protos import (
    descriptor_pb2,
    diff_pb2,
    diff_pb2_grpc,
    mount_pb2,
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from layercache.oci.digest import Digest, chain_ids
from layercache.registry.manifest import LayerDescriptor

__all__ = [
    "DEFAULT_SNAPSHOTTER",
    "SNAPSHOT_DIFF_ID_LABEL",
    "SNAPSHOT_PARENT_LABEL",
    "SNAPSHOT_REF_LABEL",
    "SUPPORTED_SNAPSHOTTERS",
    "UNCOMPRESSED_LABEL",
    "UNPACKED_SIZE_LABEL",
    "UNPACK_KEY_PREFIX",
    "Applied",
    "DiffIDMismatchError",
    "Differ",
    "LayerToUnpack",
    "Mount",
    "SnapshotInfo",
    "SnapshotUsage",
    "Snapshots",
    "UnpackResult",
    "Unpacker",
    "UnsupportedSnapshotterError",
]

log = logging.getLogger(__name__)

#: The snapshotter the CRI plugin uses unless configured otherwise.
DEFAULT_SNAPSHOTTER: Final = "overlayfs"
#: Snapshotters `Unpacker.unpack_chain` supports.
SUPPORTED_SNAPSHOTTERS: Final = frozenset({DEFAULT_SNAPSHOTTER})
#: Prefix of the keys of our active (extraction) snapshots; containerd's own is ``extract-``.
UNPACK_KEY_PREFIX: Final = "layercache-extract-"
#: Snapshot labels containerd's unpacker sets on Prepare and Commit.
SNAPSHOT_REF_LABEL: Final = "containerd.io/snapshot.ref"
SNAPSHOT_DIFF_ID_LABEL: Final = "containerd.io/snapshot/diff-id"
SNAPSHOT_PARENT_LABEL: Final = "containerd.io/snapshot/parent-chain-id"
#: Our snapshot label: uncompressed bytes of the layer extracted into it (Diff.Apply's count).
UNPACKED_SIZE_LABEL: Final = "layercache.dev/unpacked-size"
#: Content label containerd's unpacker sets on a layer blob: its diff ID.
UNCOMPRESSED_LABEL: Final = "containerd.io/uncompressed"
#: Seconds the unpack lease outlives a killed agent: far beyond one layer's extraction.
_LEASE_EXPIRY: Final = 3600.0


class UnsupportedSnapshotterError(ValueError):
    """The snapshotter is not one we can unpack into (only overlayfs is)."""

    def __init__(self, snapshotter: str) -> None:
        supported = ", ".join(sorted(SUPPORTED_SNAPSHOTTERS))
        super().__init__(f"snapshotter {snapshotter!r} is not supported for unpacking "
                         f"(supported: {supported})")
        self.snapshotter = snapshotter


class DiffIDMismatchError(Exception):
    """Extracting layer ``layer`` gave diff ID ``actual``, not the config's ``expected``.

    Nothing was committed under ``chain_id``; the active snapshot was removed.
    """

    def __init__(self, *, layer: str, expected: str, actual: str, chain_id: str) -> None:
        super().__init__(f"layer {layer} extracted to diff ID {actual}, but the image config "
                         f"says rootfs.diff_ids has {expected}; chain {chain_id} not committed")
        self.layer = layer
        self.expected = expected
        self.actual = actual
        self.chain_id = chain_id


class Mount(NamedTuple):
    """A mount of an active snapshot: ``type`` (``bind``, ``overlay``), ``source``, options."""

    type: str
    source: str
    options: tuple[str, ...]


class Applied(NamedTuple):
    """What ``Diff.Apply`` extracted: its ``diff_id`` and ``size`` (uncompressed bytes)."""

    diff_id: Digest
    size: int


class SnapshotUsage(NamedTuple):
    """Disk a snapshot uses on its own: ``size`` in bytes, ``inodes`` in files."""

    size: int
    inodes: int


class LayerToUnpack(NamedTuple):
    """One layer of a chain: its blob's descriptor and its diff ID (from the image config)."""

    descriptor: LayerDescriptor
    diff_id: Digest


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot: ``name`` (key of an active one), ``parent``, ``kind``, labels, created."""

    name: str
    parent: str
    kind: str
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime.datetime | None = None

    @property
    def committed(self) -> bool:
        """Whether the snapshot is committed (the form a chain ID names)."""
        return self.kind == "COMMITTED"

    @classmethod
    def from_proto(cls, info: snapshots_pb2.Info) -> SnapshotInfo:
        """The dataclass of a ``containerd.services.snapshots.v1.Info`` message."""
        created = (info.created_at.ToDatetime(tzinfo=datetime.UTC)
                   if info.HasField("created_at") else None)
        return cls(info.name, info.parent, snapshots_pb2.Kind.Name(info.kind),
                   dict(info.labels), created)


@dataclass(frozen=True)
class UnpackResult:
    """What `Unpacker.unpack_chain` did: chain IDs bottom first, and which it committed.

    ``extracted_bytes``: uncompressed bytes of the layers it extracted (0 when all existed).
    """

    chain_ids: tuple[Digest, ...]
    committed: tuple[Digest, ...]
    existing: tuple[Digest, ...]
    extracted_bytes: int = 0


class Snapshots(Client):
    """The snapshots of one snapshotter (default overlayfs) in one namespace (default k8s.io).

    Follows ``containerd.services.snapshots.v1.Snapshots``. Errors are
    `layercache.containerd.errors` classes; every call may raise ``Unavailable``.
    """

    def __init__(self, socket: str | os.PathLike[str], namespace: str = CRI_NAMESPACE, *,
                 snapshotter: str = DEFAULT_SNAPSHOTTER,
                 channel: grpc.aio.Channel | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(socket, namespace=namespace, channel=channel, timeout=timeout)
        self.snapshotter = snapshotter

    @property
    def stub(self) -> snapshots_pb2_grpc.SnapshotsStub:
        """The generated gRPC stub on this client's channel."""
        return self.stub_for(snapshots_pb2_grpc.SnapshotsStub)

    def _subject(self, key: str) -> str:
        return f"snapshot {key!r} ({self.snapshotter})"

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None,
                      *, lease: str | None = None) -> builtins.list[Mount]:
        """Create active snapshot ``key`` on committed ``parent`` (empty: none); its mounts.

        Raises:
            AlreadyExists: ``key`` is taken.
            NotFound: ``parent`` does not exist.

        """
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {}))
        with self.errors(self._subject(key), "Snapshots.Prepare"):
            response: snapshots_pb2.PrepareSnapshotResponse = await self.stub.Prepare(
                request, metadata=self.metadata(lease), timeout=self.timeout)
        return [Mount(m.type, m.source, tuple(m.options)) for m in response.mounts]

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None, *,
                     lease: str | None = None) -> None:
        """Commit active snapshot ``key`` as ``name`` with ``labels``; ``key`` is gone after.

        Raises:
            AlreadyExists: ``name`` exists (``key`` stays active: remove it).
            NotFound: no active snapshot ``key``.

        """
        request = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=dict(labels or {}))
        with self.errors(self._subject(f"{key} -> {name}"), "Snapshots.Commit"):
            await self.stub.Commit(request, metadata=self.metadata(lease), timeout=self.timeout)

    async def remove(self, key: str, *, missing_ok: bool = True) -> bool:
        """Remove snapshot ``key`` (active key or committed name); False when it was absent.

        Raises:
            NotFound: absent and not ``missing_ok``.
            FailedPrecondition: it has children.

        """
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key)
        try:
            with self.errors(self._subject(key), "Snapshots.Remove"):
                await self.stub.Remove(request, metadata=self.metadata(), timeout=self.timeout)
        except NotFound:
            if not missing_ok:
                raise
            return False
        return True

    async def stat(self, key: str) -> SnapshotInfo | None:
        """Snapshot ``key`` (a key or a committed name), or None when absent."""
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)
        try:
            with self.errors(self._subject(key), "Snapshots.Stat"):
                response: snapshots_pb2.StatSnapshotResponse = await self.stub.Stat(
                    request, metadata=self.metadata(), timeout=self.timeout)
        except NotFound:
            return None
        return SnapshotInfo.from_proto(response.info)

    async def update_labels(self, key: str, set_labels: Mapping[str, str] | None = None,
                            remove: Iterable[str] = ()) -> SnapshotInfo:
        """Set and remove labels of snapshot ``key``, leaving its others (``Snapshots.Update``).

        Raises:
            NotFound: no such snapshot.

        """
        set_labels = dict(set_labels or {})
        paths = [f"labels.{label}" for label in [*set_labels, *remove]]
        request = snapshots_pb2.UpdateSnapshotRequest(
            snapshotter=self.snapshotter,
            info=snapshots_pb2.Info(name=key, labels=set_labels),
            update_mask=field_mask_pb2.FieldMask(paths=paths))
        with self.errors(self._subject(key), "Snapshots.Update"):
            response: snapshots_pb2.UpdateSnapshotResponse = await self.stub.Update(
                request, metadata=self.metadata(), timeout=self.timeout)
        return SnapshotInfo.from_proto(response.info)

    async def usage(self, key: str) -> SnapshotUsage:
        """Disk used by snapshot ``key`` itself (``Snapshots.Usage``): bytes and inodes.

        A committed snapshot's usage is its own layer's (its diff), not its parents': the
        disk a chain takes is the sum over its snapshots. containerd's overlayfs computes it
        at commit and keeps it, so the call is cheap for committed snapshots.

        Raises:
            NotFound: no such snapshot.

        """
        request = snapshots_pb2.UsageRequest(snapshotter=self.snapshotter, key=key)
        with self.errors(self._subject(key), "Snapshots.Usage"):
            response: snapshots_pb2.UsageResponse = await self.stub.Usage(
                request, metadata=self.metadata(), timeout=self.timeout)
        return SnapshotUsage(response.size, response.inodes)

    async def list(self, filters: Sequence[str] = ()) -> builtins.list[SnapshotInfo]:
        """Snapshots matching any of ``filters`` (containerd filter syntax); all when empty."""
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter=self.snapshotter,
                                                     filters=list(filters))
        found: builtins.list[SnapshotInfo] = []
        with self.errors(f"snapshots ({self.snapshotter})", "Snapshots.List"):
            stream = self.stub.List(request, metadata=self.metadata(), timeout=self.timeout)
            async for response in stream:
                found.extend(SnapshotInfo.from_proto(info) for info in response.info)
        return found


class Differ(Client):
    """containerd's diff service (``containerd.services.diff.v1.Diff``) in one namespace."""

    def __init__(self, socket: str | os.PathLike[str], namespace: str = CRI_NAMESPACE, *,
                 channel: grpc.aio.Channel | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(socket, namespace=namespace, channel=channel, timeout=timeout)

    @property
    def stub(self) -> diff_pb2_grpc.DiffStub:
        """The generated gRPC stub on this client's channel."""
        return self.stub_for(diff_pb2_grpc.DiffStub)

    async def apply(self, layer: LayerDescriptor, mounts: Sequence[Mount], *,
                    lease: str | None = None) -> Digest:
        """Extract blob ``layer`` (from the content store) onto ``mounts``; the diff ID applied.

        The returned digest is that of the uncompressed tar containerd extracted. Raises as
        `apply_layer`.
        """
        return (await self.apply_layer(layer, mounts, lease=lease)).diff_id

    async def apply_layer(self, layer: LayerDescriptor, mounts: Sequence[Mount], *,
                          lease: str | None = None) -> Applied:
        """Extract blob ``layer`` onto ``mounts``: the diff ID and uncompressed bytes applied.

        containerd's differ answers with the descriptor of the uncompressed tar it read
        (``core/diff/apply``: digest = diff ID, size = bytes read).

        Raises:
            NotFound: the blob is not in the content store.
            ContainerdError: the extraction failed (bad archive, unsupported media type …).

        """
        request = diff_pb2.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=layer.media_type, digest=layer.digest,
                                           size=layer.size),
            mounts=[mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
                    for m in mounts])
        with self.errors(f"layer {layer.digest}", "Diff.Apply"):
            response: diff_pb2.ApplyResponse = await self.stub.Apply(
                request, metadata=self.metadata(lease), timeout=self.timeout)
        return Applied(Digest(response.applied.digest), response.applied.size)


def _pin_existing(labels: Mapping[str, str], caches: Iterable[str]) -> dict[str, str]:
    """Labels to add to a committed snapshot someone else made, so ``caches`` hold it.

    A ``gc.root`` we did not set (no managed-by label) is left alone and not claimed: only
    our cache labels are added then, so a later release never removes another's root.
    """
    wanted = pin_labels(caches)
    if GC_ROOT_LABEL in labels and not is_managed(labels):
        return {k: v for k, v in wanted.items() if k.startswith(CACHE_LABEL_PREFIX)}
    return wanted


class Unpacker(Client):
    """Unpack layer chains into one snapshotter of one namespace on a node's containerd.

    ``namespace`` defaults to ``k8s.io`` (the CRI's: what the kubelet's pulls find),
    ``snapshotter`` to overlayfs; ``timeout`` bounds each call in seconds (extracting a
    large layer takes a while: keep it generous).

    Raises:
        UnsupportedSnapshotterError: ``snapshotter`` is not in `SUPPORTED_SNAPSHOTTERS`.

    """

    def __init__(self, socket: str | os.PathLike[str], namespace: str = CRI_NAMESPACE, *,
                 snapshotter: str = DEFAULT_SNAPSHOTTER,
                 channel: grpc.aio.Channel | None = None,
                 timeout: float = 300.0) -> None:
        if snapshotter not in SUPPORTED_SNAPSHOTTERS:
            raise UnsupportedSnapshotterError(snapshotter)
        super().__init__(socket, namespace=namespace, channel=channel, timeout=timeout)
        self.snapshotter = snapshotter
        self._snapshots: Snapshots | None = None
        self._differ: Differ | None = None
        self._content: ContentStore | None = None

    @property
    def snapshots(self) -> Snapshots:
        """The snapshots of this unpacker's snapshotter, on the same channel."""
        if self._snapshots is None:
            self._snapshots = Snapshots(self.socket, self.namespace or CRI_NAMESPACE,
                                        snapshotter=self.snapshotter, channel=self.channel,
                                        timeout=self.timeout)
        return self._snapshots

    @property
    def differ(self) -> Differ:
        """The diff service, on the same channel."""
        if self._differ is None:
            self._differ = Differ(self.socket, self.namespace or CRI_NAMESPACE,
                                  channel=self.channel, timeout=self.timeout)
        return self._differ

    @property
    def content(self) -> ContentStore:
        """The content store, on the same channel."""
        if self._content is None:
            self._content = ContentStore(self.socket, self.namespace or CRI_NAMESPACE,
                                         channel=self.channel, timeout=self.timeout)
        return self._content

    @property
    def leases(self) -> Leases:
        """The leases, on the same channel (the content store's)."""
        return self.content.leases

    async def unpack_chain(self, layers: Sequence[LayerToUnpack | tuple[LayerDescriptor, str]],
                           caches: Iterable[str] = ()) -> UnpackResult:
        """Make the committed snapshots of every prefix of ``layers`` (bottom first).

        ``layers`` are the image's layer descriptors with their diff IDs (the config's
        ``rootfs.diff_ids``), base first; their blobs must be in the content store. Chains
        already committed are kept (and gain our pin labels for ``caches``); missing ones
        are extracted as the module docstring says. Idempotent.

        Returns:
            The chain IDs, and which of them were committed now or existed already.

        Raises:
            DiffIDMismatchError: a blob extracted to another diff ID (nothing committed for
                it or above it).
            NotFound: a blob is not in the content store.
            ContainerdError / Unavailable: a containerd call failed; active snapshots of
                this call are removed, committed lower chains stay (they are correct).

        """
        caches = tuple(caches)
        pairs = [LayerToUnpack(desc, Digest(diff_id)) for desc, diff_id in layers]
        chain = chain_ids(pair.diff_id for pair in pairs)
        committed: list[Digest] = []
        existing: list[Digest] = []
        extracted = 0
        async with self.leases.lease(labels={"layercache.dev/purpose": "unpack"},
                                     expire=_LEASE_EXPIRY) as lease:
            parent: str = ""
            for index, (pair, chain_id) in enumerate(zip(pairs, chain, strict=True)):
                found = await self.snapshots.stat(chain_id)
                if found is not None and found.committed:
                    await self.snapshots.update_labels(
                        chain_id, _pin_existing(found.labels, caches))
                    existing.append(chain_id)
                elif (size := await self._unpack_layer(pair, chain_id, parent, index, caches,
                                                       lease)) is not None:
                    committed.append(chain_id)
                    extracted += size
                else:
                    existing.append(chain_id)
                await self._label_uncompressed(pair)
                parent = chain_id
        return UnpackResult(tuple(chain), tuple(committed), tuple(existing), extracted)

    async def _unpack_layer(self, layer: LayerToUnpack, chain_id: Digest, parent: str,
                            index: int, caches: Sequence[str], lease: str) -> int | None:
        """Prepare → Apply → verify → Commit one layer; bytes extracted, None if another won."""
        labels: dict[str, str] = {SNAPSHOT_REF_LABEL: chain_id,
                                  SNAPSHOT_DIFF_ID_LABEL: layer.diff_id}
        if index > 0:
            labels[SNAPSHOT_PARENT_LABEL] = parent
        key = f"{UNPACK_KEY_PREFIX}{uuid.uuid4().hex} {chain_id}"
        mounts = await self.snapshots.prepare(key, parent, labels, lease=lease)
        try:
            applied = await self.differ.apply_layer(layer.descriptor, mounts, lease=lease)
            if applied.diff_id != layer.diff_id:
                raise DiffIDMismatchError(layer=layer.descriptor.digest,
                                          expected=layer.diff_id, actual=applied.diff_id,
                                          chain_id=chain_id)
            await self.snapshots.commit(
                chain_id, key, {**labels, **pin_labels(caches),
                                UNPACKED_SIZE_LABEL: str(applied.size)}, lease=lease)
        except AlreadyExists:
            # Committed by someone else (a CRI pull) meanwhile: theirs is as good as ours.
            await self._remove_quietly(key)
            found = await self.snapshots.stat(chain_id)
            if found is not None:
                await self.snapshots.update_labels(chain_id, _pin_existing(found.labels, caches))
            return None
        except BaseException:
            # Shielded: a cancelled unpack still removes its active snapshot.
            await asyncio.shield(self._remove_quietly(key))
            raise
        log.info("unpacked layer %s as snapshot %s", layer.descriptor.digest, chain_id)
        return applied.size

    async def _label_uncompressed(self, layer: LayerToUnpack) -> None:
        """Label the layer blob with its diff ID, as containerd's unpacker does."""
        # A chain committed by someone else may come from a blob that is not here.
        with contextlib.suppress(NotFound):
            await self.content.update_labels(layer.descriptor.digest,
                                             {UNCOMPRESSED_LABEL: layer.diff_id})

    async def _remove_quietly(self, key: str) -> None:
        try:
            await self.snapshots.remove(key)
        except ContainerdError as error:
            log.warning("active snapshot %r left for cleanup: %s", key, error)

    async def release(self, chains: Iterable[str],
                      caches: Iterable[str] | None = None) -> builtins.list[str]:
        """Let ``caches`` (None: every cache) go of the committed snapshots ``chains``.

        Removes the caches' labels and, when no cache wants a snapshot any more, our
        ``gc.root`` and managed-by labels (`labels.unpin_keys`), never the snapshot itself:
        containerd's GC then removes it only if nothing else refers to it (an image the
        kubelet pulled, through its config's ``gc.ref.snapshot`` label, or a child snapshot).

        Returns:
            The chain IDs now unpinned by us (absent ones included).

        """
        caches = None if caches is None else tuple(caches)
        unpinned: list[str] = []
        for chain_id in chains:
            info = await self.snapshots.stat(chain_id)
            keys = unpin_keys(info.labels, caches) if info is not None else []
            if info is not None and keys:
                try:
                    info = await self.snapshots.update_labels(chain_id, remove=keys)
                except NotFound:
                    info = None
            if info is None or not (GC_ROOT_LABEL in info.labels and is_managed(info.labels)):
                unpinned.append(chain_id)
        return unpinned

    async def remove_stale(self) -> builtins.list[str]:
        """Remove every active snapshot whose key has our prefix; the keys removed.

        For an agent's start: an unpack killed between Prepare and Commit leaves one. Only
        one agent unpacks per node, so every such snapshot then is stale.
        """
        removed: list[str] = []
        for info in await self.snapshots.list():
            stale = info.kind == "ACTIVE" and info.name.startswith(UNPACK_KEY_PREFIX)
            if stale and await self.snapshots.remove(info.name):
                removed.append(info.name)
        return removed

    async def close(self) -> None:
        """Close the channel if this client opened it; the sub-clients reopen with it."""
        self._snapshots = self._differ = None
        self._content = None
        await super().close()
