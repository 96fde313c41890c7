"""Never fill the disk: check the image filesystem before each fetch and reserve its bytes.

The image filesystem is where containerd keeps content and snapshots; CRI ``ImageFsInfo``
names its mount point (containerd: the snapshotter directory under its root, which holds
the content store too on a standard install). `DiskGuard.reserve` reads ``os.statvfs``
there and refuses a fetch when the space left after it — and after every fetch still
running, whose remaining bytes are reserved — would fall under the floor: the kubelet's own
disk thresholds on this node plus a margin (`layercache.agent.status.kubelet`), so a fetch never
brings the node to an eviction, or ``min_free_percent`` of the filesystem when that is
higher. The Node's ``DiskPressure`` condition (set by the kubelet's eviction manager)
stops fetching as well. When the mount point cannot be examined, fetching stops too:
unknown free space is not free space.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from layercache.agent.status.kubelet import KubeletDisk
from layercache.api import Reason

__all__ = ["DiskGuard", "DiskPressureError", "DiskState"]

log = logging.getLogger(__name__)


class DiskPressureError(Exception):
    """A fetch was refused for lack of space; ``reason`` is CamelCase, as in status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DiskState:
    """The image filesystem at one moment: ``path`` examined, sizes in bytes."""

    path: str
    total: int
    available: int


class DiskGuard:
    """Reserves room on the image filesystem for fetches.

    ``locate`` finds the path to examine (CRI ImageFsInfo's mount point, or a configured
    path); ``min_free_percent`` (0 to 100) is the share of the filesystem that must stay
    free; ``kubelet`` the kubelet's thresholds, which raise that floor (None: not known,
    only ``min_free_percent`` counts). `node_pressure` is set from the Node's
    ``DiskPressure`` condition by the caller.
    """

    def __init__(self, locate: Callable[[], Awaitable[Path]], min_free_percent: float = 0.0,
                 kubelet: KubeletDisk | None = None) -> None:
        self.locate = locate
        self.min_free_percent = min_free_percent
        self.kubelet = kubelet
        self.node_pressure = False
        #: The last refusal, until a reservation succeeds again.
        self.refusal: DiskPressureError | None = None
        self.reserved = 0
        self._path: Path | None = None
        # One reservation at a time: two checks must not both count the same free bytes.
        self._lock = asyncio.Lock()

    async def state(self) -> DiskState:
        """Total and available bytes of the image filesystem (to unprivileged users).

        Raises:
            DiskPressureError: ``ImageFsUnknown`` when the path cannot be found or examined.

        """
        try:
            if self._path is None:
                self._path = await self.locate()
            stat = await asyncio.to_thread(os.statvfs, self._path)
        except Exception as error:
            self._path = None
            raise DiskPressureError(Reason.IMAGE_FS_UNKNOWN,
                                    f"cannot examine the image filesystem: {error}") from None
        return DiskState(str(self._path), stat.f_blocks * stat.f_frsize,
                         stat.f_bavail * stat.f_frsize)

    async def reserve(self, size: int) -> None:
        """Reserve ``size`` bytes for a fetch about to start; `release` them when it ends.

        Raises:
            DiskPressureError: ``NodeDiskPressure`` (the kubelet reports DiskPressure),
                ``DiskPressure`` (too little would stay free) or ``ImageFsUnknown``.

        """
        try:
            await self._reserve(size)
        except DiskPressureError as error:
            self.refusal = error
            raise
        self.refusal = None

    async def _reserve(self, size: int) -> None:
        if self.node_pressure:
            raise DiskPressureError(Reason.NODE_DISK_PRESSURE,
                                    "the Node reports DiskPressure: fetching stopped")
        async with self._lock:
            state = await self.state()
            floor, why = self.floor(state.total)
            left = state.available - self.reserved - size
            if left < floor:
                # The reason first: status keeps only the start of a long message.
                raise DiskPressureError(
                    Reason.DISK_PRESSURE,
                    f"floor {floor / max(state.total, 1):.1%} free ({floor} bytes), from "
                    f"{why}: fetching {size} bytes (with {self.reserved} reserved) would "
                    f"cross it on {state.path} ({state.available} of {state.total} free)")
            self.reserved += size

    def floor(self, total: int) -> tuple[int, str]:
        """Free bytes every fetch must leave on a filesystem of ``total`` bytes, and why."""
        floor = int(total * self.min_free_percent / 100)
        why = f"LAYERCACHE_MIN_FREE_PERCENT={self.min_free_percent:g}"
        if self.kubelet is not None:
            kubelet, kubelet_why = self.kubelet.floor(total)
            if kubelet >= floor:
                floor, why = kubelet, kubelet_why
        return floor, why

    def release(self, size: int) -> None:
        """Give back ``size`` bytes reserved by `reserve` (the fetch ended)."""
        self.reserved = max(0, self.reserved - size)
