"""The agent's ports: what its loops need from Kubernetes and from its peers.

The loops (`layercache.agent.reconcile.NodeReconciler`, `layercache.agent.app.Agent`, the
fetcher, the status reporter) depend on these Protocols, not on the clients behind them:

- `AgentKubePort`: this node's NodeLayerCache (read, watch, status patch), the peers'
  NodeLayerCaches (for their ``status.peerEndpoint``), the Node, and two Secrets of the
  agent's namespace — `layercache.agent.kubeapi.AgentKube` over the Kubernetes API;
- `PeerSource`: a peer agent's blobs — `layercache.agent.peer.client.PeerClient` over HTTP;
- containerd's content store: `layercache.containerd.ports.ContentStorePort`.

``tests/twins/`` implements each in memory, so the unit tests run the loops through their
histories in milliseconds; the integration tests run them against the real apiserver,
containerd and peer agents.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from layercache.agent.fetch.transfer import ByteRate, OnBytes
from layercache.containerd.ingest import ResumableSource
from layercache.oci.digest import Digest

__all__ = ["AgentKubePort", "Obj", "ObjectWatch", "OnObject", "PeerSource"]

#: A Kubernetes object as the API returns it (a dict).
Obj = dict[str, Any]
#: Called in the event loop with the agent's NodeLayerCache after each change (None: gone).
OnObject = Callable[[Obj | None], None]


class ObjectWatch(Protocol):
    """A running watch of this node's NodeLayerCache (`layercache.agent.kubeapi.OwnObjectWatch`)."""

    def start(self) -> None:
        """Start following: deliver the current object, then each change."""
        ...

    def stop(self) -> None:
        """Stop following; returns at once, no delivery after it."""
        ...


class AgentKubePort(Protocol):
    """The agent's Kubernetes API (`layercache.agent.kubeapi.AgentKube`); ``node``: its node.

    Failures raise ``kubernetes.client.exceptions.ApiException`` (its ``status`` the HTTP
    status), as the real client does.
    """

    node: str

    def list_own(self) -> tuple[Obj | None, str]:
        """Blocking: this node's NodeLayerCache (None when absent) and the list's version."""
        ...

    def watch_own(self, loop: asyncio.AbstractEventLoop, on_change: OnObject) -> ObjectWatch:
        """A watch (not started) handing each version of the own object to ``on_change``."""
        ...

    async def get_cache(self, node: str) -> Obj | None:
        """The NodeLayerCache of ``node``, or None when there is none."""
        ...

    async def patch_status(self, status: Mapping[str, Any]) -> None:
        """Merge-patch ``status`` into this node's NodeLayerCache (404 when it is gone)."""
        ...

    async def get_node(self) -> Obj | None:
        """This node's Node object, or None when absent."""
        ...

    async def read_secret(self, name: str) -> dict[str, str] | None:
        """The ``data`` (base64 values) of Secret ``name``, or None when absent."""
        ...

    def close(self) -> None:
        """Release the connections."""
        ...


class PeerSource(Protocol):
    """Another node's agent as a source of blobs (`layercache.agent.peer.client.PeerClient`).

    Failures raise `layercache.agent.peer.client.PeerError` (and its subclasses).
    """

    async def has(self, endpoint: str, digest: Digest, wait: float = 0.0) -> bool:
        """Whether the peer at ``endpoint`` holds or receives ``digest`` (long-poll ``wait`` s)."""
        ...

    def source(self, endpoint: str, digest: Digest, size: int, rate: ByteRate,
               on_bytes: OnBytes) -> ResumableSource:
        """A resumable source of blob ``digest`` (``size`` bytes) from the peer."""
        ...

    async def aclose(self) -> None:
        """Close the connection pool."""
        ...
