"""containerd's content store from the agent: blob metadata, reads, labels and ingests.

Follows ``containerd.services.content.v1.Content`` (containerd v1.6
``api/services/content/v1/content.proto``). The content store holds blobs by digest; a blob
is written through an *ingest* named by a caller-chosen *ref* and becomes a blob when it is
committed. Content is namespaced (``k8s.io`` is the CRI's, where the kubelet's pulls look).
`ContentStore.write` writes a blob the way containerd's own pull does (the Write protocol
of `layercache.containerd.ingest`), under a lease, and never leaves a half-written ingest
behind unless asked to keep it for a resume.
"""

from __future__ import annotations

import asyncio
import builtins  # annotations say builtins.list: the method `list` shadows it
import datetime
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import field_mask_pb2

from layercache.containerd.channel import CRI_NAMESPACE, DEFAULT_TIMEOUT, Client
from layercache.containerd.errors import AlreadyExists, ContainerdError, NotFound
from layercache.containerd.ingest import (
    INGEST_LEASE_EXPIRY,
    ChunkSource,
    ContentDigestMismatchError,
    WriteResult,
    ingest_lease_id,
    ingest_ref,
    write_stream,
)
from layercache.containerd.labels import (
    GC_ROOT_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    caches_of,
    is_managed,
    pin_labels,
    unpin_keys,
)
from layercache.containerd.leases import Leases
from layercache.containerd.protos import content_pb2, content_pb2_grpc
from layercache.oci.digest import Digest

# WriteResult and ingest_ref are the write's, defined with it and re-exported here.
__all__ = ["BlobInfo", "ContentStore", "IngestStatus", "WriteResult", "ingest_ref"]

log = logging.getLogger(__name__)


def _time(message: content_pb2.Info | content_pb2.Status, name: str) -> datetime.datetime | None:
    if not message.HasField(name):
        return None
    stamp: datetime.datetime = getattr(message, name).ToDatetime(tzinfo=datetime.UTC)
    return stamp


@dataclass(frozen=True)
class BlobInfo:
    """A committed blob: ``digest``, ``size`` in bytes, times (UTC) and labels."""

    digest: Digest
    size: int
    created_at: datetime.datetime | None = None
    updated_at: datetime.datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def pinned(self) -> bool:
        """Whether the blob carries ``containerd.io/gc.root`` (GC keeps it)."""
        return GC_ROOT_LABEL in self.labels

    @property
    def managed(self) -> bool:
        """Whether the blob carries our managed-by label."""
        return is_managed(self.labels)

    @property
    def caches(self) -> frozenset[str]:
        """The caches whose labels the blob carries."""
        return caches_of(self.labels)

    @classmethod
    def from_proto(cls, info: content_pb2.Info) -> BlobInfo:
        """Build from a ``content.v1.Info`` message."""
        return cls(Digest(info.digest), info.size, _time(info, "created_at"),
                   _time(info, "updated_at"), dict(info.labels))


@dataclass(frozen=True)
class IngestStatus:
    """An ingest in progress, as ``Content.Status`` reports it.

    ``offset``: bytes written so far; ``total``: the announced size in bytes (0 if not
    given); ``expected``: the announced digest, if any; times in UTC.
    """

    ref: str
    offset: int
    total: int
    expected: Digest | None
    started_at: datetime.datetime | None = None
    updated_at: datetime.datetime | None = None

    @classmethod
    def from_proto(cls, status: content_pb2.Status) -> IngestStatus:
        """Build from a ``content.v1.Status`` message."""
        return cls(status.ref, status.offset, status.total,
                   Digest(status.expected) if status.expected else None,
                   _time(status, "started_at"), _time(status, "updated_at"))


class ContentStore(Client):
    """The content store of one containerd namespace (default ``k8s.io``) on ``socket``.

    ``channel`` may be shared with other clients; ``timeout`` bounds each unary call and
    each message of a stream (seconds). Errors are `layercache.containerd.errors` classes;
    every method may raise ``Unavailable`` (daemon unreachable or too slow, retryable).
    """

    def __init__(self, socket: str | os.PathLike[str], namespace: str = CRI_NAMESPACE, *,
                 channel: grpc.aio.Channel | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(socket, namespace=namespace, channel=channel, timeout=timeout)
        self._leases: Leases | None = None

    @property
    def stub(self) -> content_pb2_grpc.ContentStub:
        """The generated gRPC stub on this client's channel."""
        return self.stub_for(content_pb2_grpc.ContentStub)

    @property
    def leases(self) -> Leases:
        """The leases of this namespace, on the same channel."""
        if self._leases is None:
            self._leases = Leases(self.socket, self.namespace or CRI_NAMESPACE,
                                  channel=self.channel, timeout=self.timeout)
        return self._leases

    async def close(self) -> None:
        """Close the channel if this client opened it; `leases` reopens with the client."""
        self._leases = None
        await super().close()

    async def info(self, digest: str) -> BlobInfo | None:
        """The committed blob ``digest`` (``Content.Info``), or None when absent."""
        digest = Digest(digest)
        try:
            with self.errors(f"content {digest}", "Content.Info"):
                response: content_pb2.InfoResponse = await self.stub.Info(
                    content_pb2.InfoRequest(digest=digest), metadata=self.metadata(),
                    timeout=self.timeout)
        except NotFound:
            return None
        return BlobInfo.from_proto(response.info)

    async def list(self, filters: Sequence[str] = ()) -> builtins.list[BlobInfo]:
        """Blobs matching any of ``filters`` (``Content.List``); all when empty.

        ``filters`` use containerd's filter syntax, e.g. `labels.MANAGED_FILTER` or
        ``digest==sha256:…``.
        """
        request = content_pb2.ListContentRequest(filters=list(filters))
        found: builtins.list[BlobInfo] = []
        with self.errors("content", "Content.List"):
            async for response in self.stub.List(request, metadata=self.metadata(),
                                                 timeout=self.timeout):
                found.extend(BlobInfo.from_proto(info) for info in response.info)
        return found

    async def read(self, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        """Stream blob ``digest`` from byte ``offset`` (``Content.Read``).

        Yields chunks in order (containerd sends up to 1 MiB each); ``size`` bytes at most,
        or to the end when 0. No overall deadline: the caller bounds a long read.

        Raises:
            NotFound: no such blob (on the first iteration).

        """
        digest = Digest(digest)
        request = content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        call = self.stub.Read(request, metadata=self.metadata())
        try:
            with self.errors(f"content {digest}", "Content.Read"):
                async for response in call:
                    yield response.data
        finally:
            call.cancel()  # a no-op when the stream ended; frees it when the reader stopped

    async def delete(self, digest: str) -> None:
        """Delete blob ``digest`` from this namespace (``Content.Delete``).

        Raises:
            NotFound: no such blob.

        """
        digest = Digest(digest)
        with self.errors(f"content {digest}", "Content.Delete"):
            await self.stub.Delete(content_pb2.DeleteContentRequest(digest=digest),
                                   metadata=self.metadata(), timeout=self.timeout)

    async def update_labels(self, digest: str, set_labels: Mapping[str, str] | None = None,
                            remove: Iterable[str] = ()) -> BlobInfo:
        """Set and remove labels of blob ``digest``, leaving its other labels (``Content.Update``).

        One field-mask path ``labels.<key>`` per key touched: containerd then updates just
        those keys, and a masked key absent from the request is removed.

        Raises:
            NotFound: no such blob.

        """
        digest = Digest(digest)
        set_labels = dict(set_labels or {})
        paths = [f"labels.{key}" for key in [*set_labels, *remove]]
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=set_labels),
            update_mask=field_mask_pb2.FieldMask(paths=paths))
        with self.errors(f"content {digest}", "Content.Update"):
            response: content_pb2.UpdateResponse = await self.stub.Update(
                request, metadata=self.metadata(), timeout=self.timeout)
        return BlobInfo.from_proto(response.info)

    async def pin(self, digest: str, caches: Iterable[str] = ()) -> BlobInfo:
        """Label blob ``digest`` as a GC root wanted by ``caches`` (`labels.pin_labels`).

        Raises:
            NotFound: no such blob.

        """
        return await self.update_labels(digest, pin_labels(caches))

    async def release(self, digest: str, caches: Iterable[str] | None = None) -> bool:
        """Let ``caches`` (None: every cache) go of blob ``digest``; True when it is unpinned.

        Removes the caches' labels and, when no cache wants the blob any more, our
        ``gc.root`` and managed-by labels (`labels.unpin_keys`): the blob is then left to
        containerd's GC (kept while an image or lease references it). Returns False while
        other caches still hold it; True also when the blob is gone already. Read, then
        update: one agent per node releases, so the two steps do not race.
        """
        info = await self.info(digest)
        if info is None:
            return True
        keys = unpin_keys(info.labels, caches)
        if keys:
            try:
                info = await self.update_labels(digest, remove=keys)
            except NotFound:
                return True
        return not (info.pinned and info.managed)

    async def status(self, ref: str) -> IngestStatus | None:
        """The ingest ``ref`` (``Content.Status``), or None when there is none."""
        try:
            with self.errors(f"ingest ref {ref!r}", "Content.Status"):
                response: content_pb2.StatusResponse = await self.stub.Status(
                    content_pb2.StatusRequest(ref=ref), metadata=self.metadata(),
                    timeout=self.timeout)
        except NotFound:
            return None
        return IngestStatus.from_proto(response.status)

    async def list_statuses(self, filters: Sequence[str] = ()) -> builtins.list[IngestStatus]:
        """Ingests in progress matching any of ``filters`` (``Content.ListStatuses``).

        ``filters`` use containerd's filter syntax, e.g. ``ref~=layercache``; all when empty.
        """
        request = content_pb2.ListStatusesRequest(filters=list(filters))
        with self.errors("ingests", "Content.ListStatuses"):
            response: content_pb2.ListStatusesResponse = await self.stub.ListStatuses(
                request, metadata=self.metadata(), timeout=self.timeout)
        return [IngestStatus.from_proto(status) for status in response.statuses]

    async def abort(self, ref: str) -> bool:
        """Abort the ingest ``ref`` and free its data (``Content.Abort``).

        Returns False when there was no such ingest.
        """
        try:
            with self.errors(f"ingest ref {ref!r}", "Content.Abort"):
                await self.stub.Abort(content_pb2.AbortRequest(ref=ref),
                                      metadata=self.metadata(), timeout=self.timeout)
        except NotFound:
            return False
        return True

    async def abort_quietly(self, ref: str) -> None:
        """`abort`, logging instead of raising: for cleanup after another error."""
        try:
            await self.abort(ref)
        except ContainerdError as error:
            log.warning("ingest %s not aborted, left for containerd's GC: %s", ref, error)

    async def write(self, ref: str, expected: str, total: int, source: ChunkSource, *,
                    caches: Iterable[str] = (), labels: Mapping[str, str] | None = None,
                    pin: bool = True, lease: str | None = None,
                    keep_on_error: bool = False) -> WriteResult:
        """Write blob ``expected`` of ``total`` bytes from ``source`` through ingest ``ref``.

        Follows containerd's Write protocol (`layercache.containerd.ingest`): STAT gives the
        resume offset, WRITE sends ~1 MiB messages at matching offsets, COMMIT names
        ``total``, ``expected`` and the labels, and containerd verifies size and digest.

        Args:
            ref: the ingest ref; use one per blob (`ingest_ref`) so a retry resumes.
            expected: the blob's digest.
            total: the blob's size in bytes.
            source: a ``Callable[[int], AsyncIterable[bytes]]`` giving the bytes from an
                offset (resumable: only what the ingest lacks is sent), or an
                ``AsyncIterable[bytes]`` of the whole blob (a left-over ingest is truncated
                and rewritten).
            caches: caches that want the blob, labelled with ``gc.root`` when ``pin``.
            labels: further labels for the blob.
            pin: label the blob ``containerd.io/gc.root`` and managed-by (`labels.pin_labels`)
                so GC keeps it after the lease; False leaves it to whoever references it.
            lease: the lease to write under; None writes under a lease of this ref's own
                (``gc.expire`` in `INGEST_LEASE_EXPIRY`), deleted when the write ends unless
                the ingest is kept.
            keep_on_error: on failure or cancellation, keep the ingest (and the ref's own
                lease) so a later write with the same ref resumes; otherwise it is aborted.
                A digest mismatch always aborts: those bytes are wrong.

        Returns:
            The blob's digest and size, bytes resumed and sent, whether it existed already
            (then the labels are merged into the existing blob's).

        Raises:
            ContentDigestMismatchError: the bytes hash to another digest (a
                `layercache.oci.digest.DigestMismatchError`); the ingest is aborted.
            SourceSizeError: the source gave more or fewer than ``total`` bytes.
            Unavailable: containerd unreachable or too slow, or the ref stayed locked by
                another writer (retryable).
            ContainerdError: any other failure containerd reported.

        """
        expected = Digest(expected)
        if not ref or total < 0:
            raise ValueError(f"write of {expected} needs a ref and a size >= 0, "
                             f"got ref={ref!r} total={total}")
        commit_labels = {**(labels or {}), **(pin_labels(caches) if pin else {})}
        own_lease = lease is None
        lease_id = lease or ingest_lease_id(ref)
        keep = False
        try:
            if own_lease:  # in the try: a create cut short by a cancel is deleted too
                await self.leases.create(lease_id, {MANAGED_BY_LABEL: MANAGED_BY},
                                         expire=INGEST_LEASE_EXPIRY, exist_ok=True)
            try:
                outcome = await write_stream(self, ref=ref, expected=expected,
                                             total=total, source=source,
                                             labels=commit_labels, lease=lease_id)
            except AlreadyExists:
                return await self._existing(ref, expected, commit_labels)
            return WriteResult(expected, total, outcome.resumed_from, outcome.written,
                               already_existed=False)
        except BaseException as error:
            keep = keep_on_error and not isinstance(error, ContentDigestMismatchError)
            if not keep:
                await asyncio.shield(self.abort_quietly(ref))
            raise
        finally:
            if own_lease and not keep:
                await asyncio.shield(self.leases.delete_quietly(lease_id))

    async def _existing(self, ref: str, expected: Digest,
                        commit_labels: Mapping[str, str]) -> WriteResult:
        """The blob was committed before: drop a stale ingest of ``ref``, merge the labels."""
        await self.abort_quietly(ref)
        # No labels: read, not update (an empty field mask would replace every label).
        info = (await self.update_labels(expected, commit_labels) if commit_labels
                else await self.info(expected))
        if info is None:
            raise NotFound(socket=self.socket, subject=f"content {expected}",
                           operation="Content.Info", code=None,
                           details="reported as existing, then gone")
        return WriteResult(expected, info.size, resumed_from=0, written=0,
                           already_existed=True)
