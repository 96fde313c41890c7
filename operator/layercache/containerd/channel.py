"""The gRPC channel to a node's containerd socket, and what every client on it shares.

containerd serves its own services and the CRI (``runtime.v1``) on one unix socket, gRPC
without TLS. Its services are namespaced: each call names its namespace in the metadata
header ``containerd-namespace`` (``k8s.io`` is the one the CRI plugin, hence the kubelet,
uses), and may name a lease in ``containerd-lease`` so the objects it creates belong to
that lease until it is deleted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import grpc

from layercache.containerd.errors import rpc_errors

__all__ = [
    "CRI_NAMESPACE",
    "DEFAULT_TIMEOUT",
    "LEASE_HEADER",
    "MAX_MESSAGE_BYTES",
    "NAMESPACE_HEADER",
    "Client",
    "open_channel",
    "socket_path",
]

_Stub = TypeVar("_Stub")

#: Metadata header naming the containerd namespace of a call.
NAMESPACE_HEADER: Final = "containerd-namespace"
#: Metadata header naming the lease that the objects a call creates belong to.
LEASE_HEADER: Final = "containerd-lease"
#: The namespace of the CRI plugin: images the kubelet pulls, and the blobs we give it.
CRI_NAMESPACE: Final = "k8s.io"
#: Seconds a unary call (or one step of a stream) may take before it fails as Unavailable.
DEFAULT_TIMEOUT: Final = 30.0
#: Largest message accepted, in bytes; the kubelet's CRI client allows the same 16 MiB.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


def socket_path(socket: str | os.PathLike[str]) -> str:
    """The filesystem path of ``socket``: a path, or a ``unix://`` URL as the kubelet takes."""
    text = os.fspath(socket)
    return text.removeprefix("unix://")


def open_channel(socket: str | os.PathLike[str]) -> grpc.aio.Channel:
    """A new asyncio gRPC channel to the unix socket ``socket`` (connects on first call)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.aio.insecure_channel(f"unix://{socket_path(socket)}", options=options)


class Client:
    """Base of the containerd clients: a socket, its channel, a namespace and a timeout.

    The channel is opened on first use (it belongs to the running event loop) and closed by
    `close` or ``async with``; a ``channel`` passed in is shared and left open. ``timeout``
    (seconds) bounds each unary call and each step of a stream.
    """

    def __init__(self, socket: str | os.PathLike[str], *, namespace: str | None,
                 channel: grpc.aio.Channel | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = socket_path(socket)
        self.namespace = namespace
        self.timeout = timeout
        self._channel = channel
        self._owns_channel = channel is None
        self._stubs: dict[Callable[..., Any], Any] = {}

    @property
    def channel(self) -> grpc.aio.Channel:
        """The gRPC channel, opened on first use."""
        if self._channel is None:
            self._channel = open_channel(self.socket)
        return self._channel

    def stub_for(self, stub_class: Callable[[grpc.aio.Channel], _Stub]) -> _Stub:
        """The generated stub ``stub_class`` on this client's channel, made once."""
        if stub_class not in self._stubs:
            self._stubs[stub_class] = stub_class(self.channel)
        stub: _Stub = self._stubs[stub_class]
        return stub

    def metadata(self, lease: str | None = None) -> tuple[tuple[str, str], ...]:
        """Call metadata: the namespace header, and the lease header when ``lease`` is set."""
        headers: list[tuple[str, str]] = []
        if self.namespace:
            headers.append((NAMESPACE_HEADER, self.namespace))
        if lease:
            headers.append((LEASE_HEADER, lease))
        return tuple(headers)

    def errors(self, subject: str, operation: str,
               secrets: Iterable[str] = ()) -> AbstractContextManager[None]:
        """Map gRPC errors raised in the block to `layercache.containerd.errors` classes."""
        return rpc_errors(socket=self.socket, subject=subject, operation=operation,
                          secrets=secrets)

    async def close(self) -> None:
        """Close the channel if this client opened it (idempotent)."""
        if self._owns_channel and self._channel is not None:
            channel, self._channel = self._channel, None
            self._stubs.clear()
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
