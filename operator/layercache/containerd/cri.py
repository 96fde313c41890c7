"""The CRI image service on containerd's socket: pull, inspect, remove images as kubelets do.

Follows ``runtime.v1.ImageService`` (Kubernetes ``k8s.io/cri-api``
``pkg/apis/runtime/v1/api.proto``), which containerd's CRI plugin serves on its main socket.
CRI calls carry no namespace: the plugin always works in ``k8s.io``, the namespace whose
content store `layercache.containerd.content.ContentStore` writes into by default, which is
why a pull after our writes finds the layer blobs present and skips fetching them.

Credentials (`AuthConfig`) go only into the request: they are not in reprs, logs or
exception messages (the daemon's error details are scrubbed of them).
"""

from __future__ import annotations

import builtins  # annotations say builtins.list: the method `list` shadows it
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc

from layercache.containerd.channel import DEFAULT_TIMEOUT, Client
from layercache.containerd.errors import ContainerdError
from layercache.containerd.protos import cri_pb2, cri_pb2_grpc

__all__ = ["AuthConfig", "CRIImage", "CRIImages", "ImageFsUsage"]


@dataclass(frozen=True)
class AuthConfig:
    """Registry credentials for a pull (CRI ``AuthConfig``); secrets are left out of repr.

    Give ``username`` and ``password``, or ``auth`` (base64 ``user:password``), or an
    ``identity_token`` / ``registry_token``. ``server_address`` is informational.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The non-empty secret values, to scrub from error messages."""
        return tuple(s for s in (self.password, self.auth, self.identity_token,
                                 self.registry_token) if s)

    def to_proto(self) -> cri_pb2.AuthConfig:
        """The ``runtime.v1.AuthConfig`` message."""
        return cri_pb2.AuthConfig(
            username=self.username, password=self.password, auth=self.auth,
            server_address=self.server_address, identity_token=self.identity_token,
            registry_token=self.registry_token)


@dataclass(frozen=True)
class CRIImage:
    """An image as the CRI reports it.

    ``id`` is the image ID (the config digest, ``sha256:…``); ``repo_tags`` and
    ``repo_digests`` the references it is known by; ``size`` its size in bytes (containerd:
    the unpacked size of its layers); ``pinned`` whether the runtime exempts it from the
    kubelet's image GC.
    """

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    pinned: bool

    @classmethod
    def from_proto(cls, image: cri_pb2.Image) -> CRIImage:
        """Build from a ``runtime.v1.Image`` message."""
        return cls(image.id, tuple(image.repo_tags), tuple(image.repo_digests), image.size,
                   image.pinned)


class ImageFsUsage(NamedTuple):
    """Use of the image filesystem (CRI ``FilesystemUsage``): bytes, inodes, mount point."""

    used_bytes: int
    inodes_used: int
    mountpoint: str


class CRIImages(Client):
    """The CRI image service on ``socket``; ``timeout`` (seconds) bounds each call but pulls.

    Errors are `layercache.containerd.errors` classes; every method may raise
    ``Unavailable`` (daemon unreachable or too slow, retryable). A failed pull is mostly
    reported by containerd as ``UNKNOWN`` (a plain `ContainerdError`) with the registry's
    answer in the details.
    """

    def __init__(self, socket: str | os.PathLike[str], *,
                 channel: grpc.aio.Channel | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(socket, namespace=None, channel=channel, timeout=timeout)

    @property
    def stub(self) -> cri_pb2_grpc.ImageServiceStub:
        """The generated gRPC stub on this client's channel."""
        return self.stub_for(cri_pb2_grpc.ImageServiceStub)

    async def pull(self, image: str, auth: AuthConfig | None = None) -> str:
        """Pull ``image`` (a reference) as the kubelet would (``PullImage``).

        containerd resolves the reference at the registry, fetches the blobs its content
        store lacks, unpacks the layers and names the image. No deadline: bound it with
        ``asyncio.timeout`` (cancelling the call cancels the pull). Returns the image ref
        (the image ID).

        Raises:
            ContainerdError: the pull failed (registry refused, not found, …); the message
                names the socket and the image and never the credentials.

        """
        request = cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=image),
                                           auth=auth.to_proto() if auth else None)
        with self.errors(f"image {image}", "ImageService.PullImage",
                         secrets=auth.secrets if auth else ()):
            response: cri_pb2.PullImageResponse = await self.stub.PullImage(
                request)
        return response.image_ref

    async def status(self, image: str) -> CRIImage | None:
        """The image ``image`` (reference or ID) (``ImageStatus``), or None when absent.

        An absent image is an unset ``image`` in the reply, not an error.
        """
        request = cri_pb2.ImageStatusRequest(image=cri_pb2.ImageSpec(image=image))
        with self.errors(f"image {image}", "ImageService.ImageStatus"):
            response: cri_pb2.ImageStatusResponse = await self.stub.ImageStatus(
                request, timeout=self.timeout)
        return CRIImage.from_proto(response.image) if response.HasField("image") else None

    async def list(self, image: str | None = None) -> builtins.list[CRIImage]:
        """Images known to the CRI (``ListImages``), only those matching ``image`` if set."""
        image_filter = (cri_pb2.ImageFilter(image=cri_pb2.ImageSpec(image=image))
                        if image else None)
        with self.errors(f"image {image}" if image else "images", "ImageService.ListImages"):
            response: cri_pb2.ListImagesResponse = await self.stub.ListImages(
                cri_pb2.ListImagesRequest(filter=image_filter), timeout=self.timeout)
        return [CRIImage.from_proto(found) for found in response.images]

    async def remove(self, image: str) -> None:
        """Remove the image ``image`` (reference or ID) (``RemoveImage``).

        Idempotent: removing an absent image succeeds. Its blobs stay while something else
        (our ``gc.root`` labels, another image, a lease) keeps them.
        """
        request = cri_pb2.RemoveImageRequest(image=cri_pb2.ImageSpec(image=image))
        with self.errors(f"image {image}", "ImageService.RemoveImage"):
            await self.stub.RemoveImage(request, timeout=self.timeout)

    async def fs_info(self) -> ImageFsUsage:
        """Use of the image filesystem (``ImageFsInfo``): bytes and inodes used, mount point.

        containerd reports its snapshotter's directory (for overlayfs
        ``<root>/io.containerd.snapshotter.v1.overlayfs``).

        Raises:
            ContainerdError: the reply named no image filesystem.

        """
        with self.errors("image filesystem", "ImageService.ImageFsInfo"):
            response: cri_pb2.ImageFsInfoResponse = await self.stub.ImageFsInfo(
                cri_pb2.ImageFsInfoRequest(), timeout=self.timeout)
        if not response.image_filesystems:
            raise ContainerdError(socket=self.socket, subject="image filesystem",
                                  operation="ImageService.ImageFsInfo", code=None,
                                  details="no image filesystem in the reply")
        usage = response.image_filesystems[0]
        return ImageFsUsage(usage.used_bytes.value, usage.inodes_used.value,
                            usage.fs_id.mountpoint)
