"""containerd leases: keep what a piece of work creates from garbage collection while it runs.

Follows ``containerd.services.leases.v1.Leases`` (containerd v1.6
``api/services/leases/v1/leases.proto``). A lease is a GC root for the content, ingests and
snapshots created under it (calls carrying its id in the ``containerd-lease`` header); when
the lease is deleted they are collectable unless something else references them (an image,
a ``containerd.io/gc.root`` label, another lease). Leases are namespaced.

Every lease we create carries ``containerd.io/gc.expire`` (an RFC 3339 time): containerd's
GC removes a lease past that time, so a lease we fail to delete (agent killed, daemon
unreachable) cannot pin its resources forever.
"""

from __future__ import annotations

import asyncio
import builtins  # annotations say builtins.list: the method `list` shadows it
import datetime
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import grpc

from layercache.containerd.channel import CRI_NAMESPACE, DEFAULT_TIMEOUT, Client
from layercache.containerd.errors import AlreadyExists, ContainerdError, NotFound
from layercache.containerd.protos import leases_pb2, leases_pb2_grpc

__all__ = [
    "DEFAULT_EXPIRY",
    "GC_EXPIRE_LABEL",
    "Lease",
    "LeaseResource",
    "Leases",
    "expire_label",
]

log = logging.getLogger(__name__)

#: Lease label: RFC 3339 time after which containerd's GC deletes the lease.
GC_EXPIRE_LABEL: Final = "containerd.io/gc.expire"
#: Default safety expiry of our leases, in seconds: far beyond any one blob write.
DEFAULT_EXPIRY: Final = 3600.0


@dataclass(frozen=True)
class Lease:
    """A lease: its ``id``, creation time (UTC) and labels."""

    id: str
    created_at: datetime.datetime | None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def expires_at(self) -> datetime.datetime | None:
        """The ``containerd.io/gc.expire`` time, or None without (or with a bad) label."""
        text = self.labels.get(GC_EXPIRE_LABEL)
        try:
            return datetime.datetime.fromisoformat(text) if text else None
        except ValueError:
            return None


@dataclass(frozen=True)
class LeaseResource:
    """A resource a lease references, by ``type`` and ``id``.

    ``type`` is ``content`` (``id`` a digest), ``ingests`` (an ingest ref) or
    ``snapshots/<snapshotter>`` (a snapshot key).
    """

    id: str
    type: str


def expire_label(seconds: float) -> dict[str, str]:
    """``{containerd.io/gc.expire: <now + seconds, RFC 3339 UTC>}``."""
    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return {GC_EXPIRE_LABEL: at.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _lease(message: leases_pb2.Lease) -> Lease:
    created = (message.created_at.ToDatetime(tzinfo=datetime.UTC)
               if message.HasField("created_at") else None)
    return Lease(message.id, created, dict(message.labels))


class Leases(Client):
    """The leases of one containerd namespace (default ``k8s.io``) on ``socket``.

    ``channel`` may be shared with other clients; ``timeout`` bounds each call (seconds).
    """

    def __init__(self, socket: str | os.PathLike[str], namespace: str = CRI_NAMESPACE, *,
                 channel: grpc.aio.Channel | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(socket, namespace=namespace, channel=channel, timeout=timeout)

    @property
    def stub(self) -> leases_pb2_grpc.LeasesStub:
        """The generated gRPC stub on this client's channel."""
        return self.stub_for(leases_pb2_grpc.LeasesStub)

    async def create(self, lease_id: str = "", labels: Mapping[str, str] | None = None, *,
                     expire: float | None = DEFAULT_EXPIRY, exist_ok: bool = False) -> Lease:
        """Create a lease (``Leases.Create``).

        Args:
            lease_id: the id; empty lets containerd pick one.
            labels: the lease's labels.
            expire: seconds from now until containerd's GC may delete the lease (the
                ``containerd.io/gc.expire`` label), or None for no expiry.
            exist_ok: return the existing lease instead of raising when the id is taken
                (its labels and expiry are left as they are).

        Raises:
            AlreadyExists: the id is taken and ``exist_ok`` is false.
            Unavailable: containerd is unreachable or did not answer in time.
            ContainerdError: any other failure.

        """
        all_labels = {**(labels or {}), **(expire_label(expire) if expire is not None else {})}
        request = leases_pb2.CreateRequest(id=lease_id, labels=all_labels)
        try:
            with self.errors(f"lease {lease_id!r}", "Leases.Create"):
                response: leases_pb2.CreateResponse = await self.stub.Create(
                    request, metadata=self.metadata(), timeout=self.timeout)
        except AlreadyExists:
            if not exist_ok:
                raise
            found = await self.list([f"id=={lease_id}"])
            if not found:  # deleted between the two calls: create it after all
                return await self.create(lease_id, labels, expire=expire, exist_ok=False)
            return found[0]
        return _lease(response.lease)

    async def delete(self, lease_id: str, *, sync: bool = False,
                     missing_ok: bool = False) -> None:
        """Delete a lease (``Leases.Delete``).

        With ``sync`` containerd runs its garbage collection before answering, so whatever
        only the lease kept is gone when this returns.

        Raises:
            NotFound: no such lease and ``missing_ok`` is false.
            Unavailable / ContainerdError: as for `create`.

        """
        request = leases_pb2.DeleteRequest(id=lease_id, sync=sync)
        try:
            with self.errors(f"lease {lease_id!r}", "Leases.Delete"):
                await self.stub.Delete(request, metadata=self.metadata(), timeout=self.timeout)
        except NotFound:
            if not missing_ok:
                raise

    async def list(self, filters: Sequence[str] = ()) -> list[Lease]:
        """Leases matching any of ``filters``; all leases when empty.

        ``filters`` use containerd's filter syntax, e.g. ``id==x`` or ``labels."a"==b``.
        """
        request = leases_pb2.ListRequest(filters=list(filters))
        with self.errors("leases", "Leases.List"):
            response: leases_pb2.ListResponse = await self.stub.List(
                request, metadata=self.metadata(), timeout=self.timeout)
        return [_lease(lease) for lease in response.leases]

    async def add_resource(self, lease_id: str, resource: LeaseResource) -> None:
        """Make lease ``lease_id`` reference ``resource`` (``Leases.AddResource``).

        Raises:
            NotFound: no such lease.

        """
        request = leases_pb2.AddResourceRequest(
            id=lease_id, resource=leases_pb2.Resource(id=resource.id, type=resource.type))
        with self.errors(f"lease {lease_id!r} resource {resource.id}", "Leases.AddResource"):
            await self.stub.AddResource(request, metadata=self.metadata(),
                                        timeout=self.timeout)

    async def delete_resource(self, lease_id: str, resource: LeaseResource) -> None:
        """Drop the reference from lease ``lease_id`` to ``resource``."""
        request = leases_pb2.DeleteResourceRequest(
            id=lease_id, resource=leases_pb2.Resource(id=resource.id, type=resource.type))
        with self.errors(f"lease {lease_id!r} resource {resource.id}",
                         "Leases.DeleteResource"):
            await self.stub.DeleteResource(request, metadata=self.metadata(),
                                           timeout=self.timeout)

    async def list_resources(self, lease_id: str) -> builtins.list[LeaseResource]:
        """The resources lease ``lease_id`` references.

        Raises:
            NotFound: no such lease.

        """
        request = leases_pb2.ListResourcesRequest(id=lease_id)
        with self.errors(f"lease {lease_id!r}", "Leases.ListResources"):
            response: leases_pb2.ListResourcesResponse = await self.stub.ListResources(
                request, metadata=self.metadata(), timeout=self.timeout)
        return [LeaseResource(r.id, r.type) for r in response.resources]

    @asynccontextmanager
    async def lease(self, lease_id: str | None = None,
                    labels: Mapping[str, str] | None = None, *,
                    expire: float | None = DEFAULT_EXPIRY,
                    sync: bool = False) -> AsyncIterator[str]:
        """Create a lease for the block and delete it when the block ends, however it ends.

        Yields the lease id (``lease_id``, or ``layercache-<uuid>``), to pass as the
        ``lease`` of calls made in the block. The delete runs on success, on exceptions and
        on cancellation (shielded, so a cancelled task still finishes it); if containerd
        cannot be reached then, the failure is logged, not raised, and the lease's
        ``containerd.io/gc.expire`` label bounds how long it outlives the block. ``sync``
        makes the delete wait for containerd's garbage collection.

        Raises:
            AlreadyExists: ``lease_id`` is taken (nothing is deleted then).
            Unavailable / ContainerdError: the lease could not be created.

        """
        lease_id = lease_id or f"layercache-{uuid.uuid4().hex}"
        await self.create(lease_id, labels, expire=expire)
        try:
            yield lease_id
        finally:
            await asyncio.shield(self.delete_quietly(lease_id, sync=sync))

    async def delete_quietly(self, lease_id: str, *, sync: bool = False) -> None:
        """`delete`, ignoring an absent lease and logging other failures instead of raising.

        For cleanup after the work is done or has failed: the lease's ``gc.expire`` label
        bounds how long a lease that could not be deleted lives.
        """
        try:
            await self.delete(lease_id, sync=sync, missing_ok=True)
        except ContainerdError as error:
            log.warning("lease %s left for containerd's GC to expire: %s", lease_id, error)
