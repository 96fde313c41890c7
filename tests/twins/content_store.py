"""In-memory twins of containerd's content store, leases and CRI images (`ContentStorePort`).

Dict-backed, with the rules of containerd's ``content.v1.Content`` and ``leases.v1.Leases``
the agent's loops depend on: a write goes through an ingest named by its ref, which keeps
its offset when the write fails (``keep_on_error``) so the next write resumes from it; COMMIT
refuses other bytes than the expected digest (`ContentDigestMismatchError`, ingest aborted)
or size (`SourceSizeError`); a blob committed already only gets the labels merged; info,
labels and reads of an absent blob are ``None`` or `NotFound`; a write makes its own lease
(``layercache-ingest-…``) unless given one, kept with a kept ingest. Pin and release use the
real label rules (`layercache.containerd.labels`). The integration tests
(``tests/integration/test_containerd_content.py``) hold the real `ContentStore` to them.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layercache.containerd.content import BlobInfo, IngestStatus
from layercache.containerd.cri import AuthConfig, CRIImage, ImageFsUsage
from layercache.containerd.errors import AlreadyExists, NotFound
from layercache.containerd.ingest import (
    INGEST_LEASE_EXPIRY,
    ChunkSource,
    ContentDigestMismatchError,
    SourceSizeError,
    WriteResult,
    ingest_lease_id,
)
from layercache.containerd.labels import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    pin_labels,
    unpin_keys,
)
from layercache.containerd.leases import DEFAULT_EXPIRY, Lease, expire_label
from layercache.oci.digest import Digest

__all__ = ["CRIImagesTwin", "ContentStoreTwin", "LeasesTwin"]

SOCKET = "twin"
_LABEL_FILTER = re.compile(r'^labels\."(?P<key>[^"]+)"==(?P<value>.*)$')


def _not_found(subject: str, operation: str) -> NotFound:
    return NotFound(socket=SOCKET, subject=subject, operation=operation, code="NotFound",
                    details="not found")


def _matches(filters: Sequence[str], ident: str, labels: Mapping[str, str]) -> bool:
    """Containerd's filter syntax, the forms the agent uses: ``id==``/``digest==``, labels."""
    if not filters:
        return True
    for text in filters:
        label = _LABEL_FILTER.match(text)
        if label is not None:
            if labels.get(label["key"]) == label["value"]:
                return True
        elif text.startswith(("id==", "digest==")):
            if text.split("==", 1)[1] == ident:
                return True
        else:
            raise NotImplementedError(f"filter {text!r} is not twinned")
    return False


class LeasesTwin:
    """Leases by id, with their labels (``gc.expire`` set as the real client sets it)."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}

    async def create(self, lease_id: str = "", labels: Mapping[str, str] | None = None, *,
                     expire: float | None = DEFAULT_EXPIRY, exist_ok: bool = False) -> Lease:
        """Create a lease; `AlreadyExists` for a taken id unless ``exist_ok``."""
        lease_id = lease_id or f"twin-{len(self.leases)}"
        if lease_id in self.leases:
            if not exist_ok:
                raise AlreadyExists(socket=SOCKET, subject=f"lease {lease_id!r}",
                                    operation="Leases.Create", code="AlreadyExists",
                                    details="already exists")
            return self.leases[lease_id]
        all_labels = {**(labels or {}), **(expire_label(expire) if expire is not None else {})}
        lease = Lease(lease_id, datetime.datetime.now(datetime.UTC), all_labels)
        self.leases[lease_id] = lease
        return lease

    async def list(self, filters: Sequence[str] = ()) -> builtins.list[Lease]:
        """Leases matching any of ``filters``."""
        return [lease for lease in self.leases.values()
                if _matches(filters, lease.id, lease.labels)]

    async def delete(self, lease_id: str, *, sync: bool = False,
                     missing_ok: bool = False) -> None:
        """Delete a lease; `NotFound` unless ``missing_ok``."""
        if self.leases.pop(lease_id, None) is None and not missing_ok:
            raise _not_found(f"lease {lease_id!r}", "Leases.Delete")

    async def delete_quietly(self, lease_id: str, *, sync: bool = False) -> None:
        """Delete a lease if it exists."""
        self.leases.pop(lease_id, None)


@dataclass
class Ingest:
    """An ingest in progress: the bytes written so far under ``ref``."""

    ref: str
    expected: Digest
    total: int
    data: bytearray = field(default_factory=bytearray)


def _is_resumable(source: ChunkSource) -> bool:
    return not hasattr(source, "__aiter__") and callable(source)


class ContentStoreTwin:
    """Blobs by digest with labels, ingests by ref, and `leases` (see the module docstring).

    ``writes`` records each committed write as (digest, resumed_from, written) bytes,
    ``opened`` the ref of every write asked for (committed, refused or found existing);
    ``writing`` holds the refs of writes in progress (a test observes concurrency there).
    """

    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self.labels: dict[Digest, dict[str, str]] = {}
        self.ingests: dict[str, Ingest] = {}
        self._leases = LeasesTwin()
        self.writes: list[tuple[Digest, int, int]] = []
        self.opened: list[str] = []
        self.writing: set[str] = set()
        #: Notified whenever a blob is committed (a twin peer's long-poll waits on it).
        self.committed = asyncio.Condition()

    @property
    def leases(self) -> LeasesTwin:
        """The leases of this namespace."""
        return self._leases

    def put(self, data: bytes, labels: Mapping[str, str] | None = None) -> Digest:
        """Commit ``data`` as a blob directly (as the kubelet's pull would); its digest."""
        digest = Digest.from_bytes(data)
        self.blobs[digest] = data
        self.labels.setdefault(digest, {}).update(labels or {})
        return digest

    def put_ingest(self, ref: str, expected: Digest, total: int, data: bytes) -> None:
        """An ingest holding ``data`` so far, as a killed writer leaves it."""
        self.ingests[ref] = Ingest(ref, expected, total, bytearray(data))

    def _info(self, digest: Digest) -> BlobInfo:
        return BlobInfo(digest, len(self.blobs[digest]), labels=dict(self.labels[digest]))

    async def info(self, digest: str) -> BlobInfo | None:
        """The committed blob, or None."""
        digest = Digest(digest)
        return self._info(digest) if digest in self.blobs else None

    async def list(self, filters: Sequence[str] = ()) -> builtins.list[BlobInfo]:
        """Committed blobs matching any of ``filters``."""
        return [self._info(d) for d in self.blobs if _matches(filters, d, self.labels[d])]

    async def read(self, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset`` (``size`` at most, 0: to the end), in 1 MiB chunks."""
        digest = Digest(digest)
        if digest not in self.blobs:
            raise _not_found(f"content {digest}", "Content.Read")
        data = self.blobs[digest]
        end = len(data) if size == 0 else min(len(data), offset + size)
        for start in range(offset, end, 1 << 20):
            yield data[start:min(end, start + (1 << 20))]

    async def update_labels(self, digest: str, set_labels: Mapping[str, str] | None = None,
                            remove: Iterable[str] = ()) -> BlobInfo:
        """Set and remove labels of a blob, leaving the others; `NotFound` when absent."""
        digest = Digest(digest)
        if digest not in self.blobs:
            raise _not_found(f"content {digest}", "Content.Update")
        labels = self.labels[digest]
        labels.update(set_labels or {})
        for key in remove:
            labels.pop(key, None)
        return self._info(digest)

    async def delete(self, digest: str) -> None:
        """Delete a blob; `NotFound` when absent."""
        digest = Digest(digest)
        if self.blobs.pop(digest, None) is None:
            raise _not_found(f"content {digest}", "Content.Delete")
        self.labels.pop(digest, None)

    async def pin(self, digest: str, caches: Iterable[str] = ()) -> BlobInfo:
        """Label the blob a GC root wanted by ``caches``."""
        return await self.update_labels(digest, pin_labels(caches))

    async def release(self, digest: str, caches: Iterable[str] | None = None) -> bool:
        """Let ``caches`` (None: all) go of the blob; True when it is no longer pinned."""
        info = await self.info(digest)
        if info is None:
            return True
        keys = unpin_keys(info.labels, caches)
        if keys:
            info = await self.update_labels(digest, remove=keys)
        return not (info.pinned and info.managed)

    async def status(self, ref: str) -> IngestStatus | None:
        """The ingest ``ref`` (offset = bytes held), or None."""
        ingest = self.ingests.get(ref)
        if ingest is None:
            return None
        return IngestStatus(ref, len(ingest.data), ingest.total, ingest.expected)

    async def list_statuses(self, filters: Sequence[str] = ()) -> builtins.list[IngestStatus]:
        """Every ingest in progress (filters are not twinned: the agent passes none)."""
        if filters:
            raise NotImplementedError("ingest filters are not twinned")
        return [IngestStatus(i.ref, len(i.data), i.total, i.expected)
                for i in self.ingests.values()]

    async def abort(self, ref: str) -> bool:
        """Drop ingest ``ref``; False when there was none."""
        return self.ingests.pop(ref, None) is not None

    async def abort_quietly(self, ref: str) -> None:
        """`abort`."""
        await self.abort(ref)

    async def write(self, ref: str, expected: str, total: int, source: ChunkSource, *,
                    caches: Iterable[str] = (), labels: Mapping[str, str] | None = None,
                    pin: bool = True, lease: str | None = None,
                    keep_on_error: bool = False) -> WriteResult:
        """Write and commit blob ``expected`` through ingest ``ref`` (module docstring).

        Raises:
            ContentDigestMismatchError: the bytes hash to another digest (ingest aborted).
            SourceSizeError: the source gave more or fewer than ``total`` bytes.

        """
        expected = Digest(expected)
        self.opened.append(ref)
        commit_labels = {**(labels or {}), **(pin_labels(caches) if pin else {})}
        own_lease = lease is None
        lease_id = lease or ingest_lease_id(ref)
        keep = False
        try:
            if own_lease:
                await self.leases.create(lease_id, {MANAGED_BY_LABEL: MANAGED_BY},
                                         expire=INGEST_LEASE_EXPIRY, exist_ok=True)
            if expected in self.blobs:  # committed before: drop a stale ingest, merge labels
                self.ingests.pop(ref, None)
                info = await self.update_labels(expected, commit_labels)
                return WriteResult(expected, info.size, 0, 0, already_existed=True)
            start = await self._receive(ref, expected, total, source)
            self.blobs[expected] = bytes(self.ingests.pop(ref).data)
            self.labels[expected] = dict(commit_labels)
            self.writes.append((expected, start, total - start))
            async with self.committed:
                self.committed.notify_all()
            return WriteResult(expected, total, start, total - start, already_existed=False)
        except BaseException as error:
            keep = keep_on_error and not isinstance(error, ContentDigestMismatchError)
            if not keep:
                self.ingests.pop(ref, None)
            raise
        finally:
            if own_lease and not keep:
                await self.leases.delete_quietly(lease_id)

    async def _receive(self, ref: str, expected: Digest, total: int,
                       source: ChunkSource) -> int:
        """Write ``source`` into the ingest, then check size and digest; the resume offset."""
        ingest = self.ingests.get(ref)
        if ingest is None or ingest.total != total or ingest.expected != expected:
            ingest = self.ingests[ref] = Ingest(ref, expected, total)
        resumable = _is_resumable(source)
        start = len(ingest.data) if resumable else 0
        del ingest.data[start:]
        chunks = source(start) if callable(source) else source
        self.writing.add(ref)
        try:
            async for chunk in chunks:
                if len(ingest.data) + len(chunk) > total:
                    raise SourceSizeError(ref, expected, total, len(ingest.data) + len(chunk),
                                          more=True)
                ingest.data += chunk
                await asyncio.sleep(0)  # one WRITE message: other tasks run meanwhile
        finally:
            self.writing.discard(ref)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        if len(ingest.data) != total:
            raise SourceSizeError(ref, expected, total, len(ingest.data), more=False)
        actual = Digest.from_bytes(bytes(ingest.data))
        if actual != expected:
            raise ContentDigestMismatchError(expected, actual, total, socket=SOCKET, ref=ref)
        return start

    async def close(self) -> None:
        """Nothing to close."""


class CRIImagesTwin:
    """The CRI image service (`CRIImagesPort`): images by reference, pulled on request.

    ``pulls`` records each pulled reference; ``mountpoint`` is the image filesystem's.
    """

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.images: dict[str, CRIImage] = {}
        self.pulls: list[str] = []

    async def status(self, image: str) -> CRIImage | None:
        """The image named ``image``, or None."""
        return self.images.get(image)

    async def pull(self, image: str, auth: AuthConfig | None = None) -> str:
        """Name ``image`` as pulled; its image ref."""
        self.pulls.append(image)
        ref = f"sha256:{len(self.pulls):064x}"
        self.images[image] = CRIImage(id=ref, repo_tags=(), repo_digests=(image,), size=0,
                                       pinned=False)
        return ref

    async def fs_info(self) -> ImageFsUsage:
        """The image filesystem: ``mountpoint``, nothing used."""
        return ImageFsUsage(0, 0, str(self.mountpoint))
