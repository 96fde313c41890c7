"""containerd's content store, leases and CRI images as the agent uses them: its ports.

`layercache.containerd.content.ContentStore` (with `layercache.containerd.leases.Leases`)
implements them over gRPC; ``tests/twins/content_store.py`` implements them in memory for
the agent's millisecond unit tests. Only what the agent calls is declared; the semantics
are containerd's ``content.v1.Content`` and ``leases.v1.Leases`` services (containerd v1.6
``api/services/content/v1/content.proto``, ``api/services/leases/v1/leases.proto``) as the
real classes document them: a blob is committed from an ingest named by a ref only when its
bytes have the expected size and digest; an ingest keeps its offset so a write resumes.
"""

from __future__ import annotations

import builtins  # annotations say builtins.list: the method `list` shadows it
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol

from layercache.containerd.content import BlobInfo, IngestStatus
from layercache.containerd.cri import AuthConfig, CRIImage, ImageFsUsage
from layercache.containerd.ingest import ChunkSource, WriteResult
from layercache.containerd.leases import Lease

__all__ = ["CRIImagesPort", "ContentStorePort", "LeasesPort"]


class LeasesPort(Protocol):
    """The leases of one namespace (`layercache.containerd.leases.Leases`)."""

    async def create(self, lease_id: str = "", labels: Mapping[str, str] | None = None, *,
                     expire: float | None = ..., exist_ok: bool = False) -> Lease:
        """Create a lease (``AlreadyExists`` unless ``exist_ok``)."""
        ...

    async def list(self, filters: Sequence[str] = ()) -> builtins.list[Lease]:
        """Leases matching any of ``filters`` (containerd's filter syntax); all when empty."""
        ...

    async def delete(self, lease_id: str, *, sync: bool = False,
                     missing_ok: bool = False) -> None:
        """Delete a lease (``NotFound`` unless ``missing_ok``)."""
        ...

    async def delete_quietly(self, lease_id: str, *, sync: bool = False) -> None:
        """`delete`, ignoring an absent lease and logging other failures."""
        ...


class ContentStorePort(Protocol):
    """The content store of one namespace (`layercache.containerd.content.ContentStore`)."""

    @property
    def leases(self) -> LeasesPort:
        """The leases of the same namespace."""
        ...

    async def info(self, digest: str) -> BlobInfo | None:
        """The committed blob ``digest``, or None when absent."""
        ...

    async def list(self, filters: Sequence[str] = ()) -> builtins.list[BlobInfo]:
        """Committed blobs matching any of ``filters``; all when empty."""
        ...

    def read(self, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        """Blob ``digest`` from byte ``offset``, ``size`` bytes at most (0: to the end)."""
        ...

    async def pin(self, digest: str, caches: Iterable[str] = ()) -> BlobInfo:
        """Label the blob a GC root wanted by ``caches`` (``NotFound`` when absent)."""
        ...

    async def release(self, digest: str, caches: Iterable[str] | None = None) -> bool:
        """Let ``caches`` (None: all) go of the blob; True when it is no longer pinned."""
        ...

    async def status(self, ref: str) -> IngestStatus | None:
        """The ingest ``ref``, or None when there is none."""
        ...

    async def list_statuses(self, filters: Sequence[str] = ()) -> builtins.list[IngestStatus]:
        """Ingests in progress matching any of ``filters``; all when empty."""
        ...

    async def abort(self, ref: str) -> bool:
        """Abort ingest ``ref``; False when there was none."""
        ...

    async def abort_quietly(self, ref: str) -> None:
        """`abort`, logging instead of raising."""
        ...

    async def write(self, ref: str, expected: str, total: int, source: ChunkSource, *,
                    caches: Iterable[str] = (), labels: Mapping[str, str] | None = None,
                    pin: bool = True, lease: str | None = None,
                    keep_on_error: bool = False) -> WriteResult:
        """Write and commit blob ``expected`` of ``total`` bytes through ingest ``ref``.

        Resumes from the ingest's offset when ``source`` is resumable; refuses a wrong
        digest (``ContentDigestMismatchError``, ingest aborted) or size (``SourceSizeError``).
        """
        ...

    async def close(self) -> None:
        """Close the connection."""
        ...


class CRIImagesPort(Protocol):
    """The CRI image service as the agent uses it (`layercache.containerd.cri.CRIImages`)."""

    async def status(self, image: str) -> CRIImage | None:
        """The image named ``image`` (``ImageStatus``), or None when the node lacks it."""
        ...

    async def pull(self, image: str, auth: AuthConfig | None = None) -> str:
        """Pull ``image`` as the kubelet would (``PullImage``); returns the image ref."""
        ...

    async def fs_info(self) -> ImageFsUsage:
        """The image filesystem (``ImageFsInfo``): its mount point and usage."""
        ...
