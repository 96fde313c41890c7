"""The agent container's memory limit, as the kernel enforces it on its cgroup.

The kubelet puts a container's ``resources.limits.memory`` into its cgroup: cgroup v2
``memory.max`` (``max`` when unlimited), cgroup v1 ``memory/memory.limit_in_bytes`` (a
page-rounded huge number when unlimited). A container sees its own cgroup at
``/sys/fs/cgroup`` (a private cgroup namespace, or the runtime's bind mount under v1).
The agent sizes what it keeps in memory for its peers from this (`layercache.agent.peer.relay`):
a relay budget that ignores the limit gets the agent OOM-killed mid-transfer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["memory_limit"]

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
#: cgroup v1 says "no limit" with a number this large or larger (LONG_MAX rounded to pages).
_UNLIMITED_V1: Final = 1 << 62


def memory_limit(root: Path = CGROUP_ROOT) -> int | None:
    """This process's cgroup memory limit in bytes; None when there is none or it is unknown.

    Reads ``<root>/memory.max`` (cgroup v2), else ``<root>/memory/memory.limit_in_bytes``
    (cgroup v1); never raises (a file missing or unreadable means unknown).
    """
    for path, unlimited in ((root / "memory.max", None),
                            (root / "memory" / "memory.limit_in_bytes", _UNLIMITED_V1)):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return None if unlimited is not None and value >= unlimited else value
    return None
