"""Pieces shared by the containerd contract tests (content, unpack): nodes, registry, GC.

Each contract test module starts its own simulated nodes (one containerd each) per profile
and its own plain registry holding the image family behind the counting fault proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from layercache.containerd.ingest import ResumableSource
from layercache.containerd.leases import Leases
from testbed.faultproxy import FaultProxy, start_fault_proxy
from testbed.images import Family, push_family
from testbed.nodes import SimNode
from testbed.registry import start_registry

__all__ = ["SANDBOX_IMAGE", "collect_garbage", "family_registry", "memory_source", "running_node"]

#: The pod sandbox image the simulated nodes are started with.
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"


def running_node(name: str, workdir: Path, profile: str) -> Iterator[SimNode]:
    """Yield a started containerd node of ``profile`` in ``workdir``; stop it after."""
    node = SimNode(name, workdir, containerd=profile)
    try:
        node.start(SANDBOX_IMAGE)
        node.wait()
        yield node
    finally:
        node.stop()


@contextmanager
def family_registry(workdir: Path, family: Family) -> Iterator[FaultProxy]:
    """A plain registry in ``workdir`` holding ``family``, behind a counting proxy."""
    registry = start_registry("plain", workdir / "plain")
    try:
        push_family(family, registry.host)
        proxy = start_fault_proxy(workdir / "proxy", registry.url)
        try:
            yield proxy
        finally:
            proxy.stop()
    finally:
        registry.stop()


async def collect_garbage(leases: Leases) -> None:
    """Run containerd's GC now: deleting a lease with ``sync`` waits for a collection."""
    async with leases.lease(sync=True):
        pass


def memory_source(data: bytes, piece: int = 256 * 1024) -> ResumableSource:
    """A resumable source over ``data`` yielding ``piece``-byte chunks from an offset."""
    async def from_offset(offset: int) -> AsyncIterator[bytes]:
        for start in range(offset, len(data), piece):
            yield data[start:start + piece]
    return from_offset
