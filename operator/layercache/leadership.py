"""Whether this operator replica is the active one, as kopf peering decides it.

kopf pauses only its own watchers on a standby replica; tasks started from `on.startup`
(our replan, status and tag-refresh loops) keep running. A replica demoted by a peer of
higher priority would otherwise go on writing node specs and statuses from a frozen view
of the cluster next to the new active one. So the loops run only while this replica is
active, judged from the same ClusterKopfPeering status and by the same rule kopf applies
(`kopf._core.engines.peering.process_peering_event`): a replica is active when no other
live peer has a priority equal to or higher than its own. A peer is live until
`lastseen + lifetime` (seconds) has passed.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

__all__ = ["is_active"]


def _deadline(info: Mapping[str, Any]) -> datetime.datetime | None:
    lastseen = info.get("lastseen")
    if not isinstance(lastseen, str):
        return None
    try:
        seen = datetime.datetime.fromisoformat(lastseen)
    except ValueError:
        return None
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=datetime.UTC)
    return seen + datetime.timedelta(seconds=int(info.get("lifetime", 60)))


def is_active(peers: Mapping[str, Any] | None, identity: str, priority: int,
              now: datetime.datetime | None = None) -> bool:
    """Whether replica `identity` with `priority` is the active peer.

    Args:
        peers: the ClusterKopfPeering's `status`: identity → {priority, lifetime (seconds),
            lastseen (ISO 8601)}; None or empty when no peer has registered yet.
        identity: this replica's kopf identity.
        priority: this replica's kopf peering priority.
        now: the time to judge liveness at (default: now, UTC).

    Returns:
        False while another live peer has a priority >= ours (kopf pauses on both: a
        higher one wins, an equal one pauses everybody), True otherwise.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    for other, info in (peers or {}).items():
        if other == identity or not isinstance(info, Mapping):
            continue
        deadline = _deadline(info)
        if deadline is not None and deadline <= now:
            continue  # dead: kopf ignores it too
        if int(info.get("priority", 0)) >= priority:
            return False
    return True
