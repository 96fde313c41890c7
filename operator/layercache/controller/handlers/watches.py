"""The cluster watch that changes the plan through kopf: Nodes.

Nodes joining, leaving or relabelled change who wants what; the controller decides whether
an event changed anything planning reads (`Controller.node_event`). NodeLayerCaches (what
each node holds) are not watched through kopf: at 1,000 nodes its per-event deep copies
were most of the operator's time; the controller's own watch keeps them in an index
(layercache.controller.nodeindex).
"""

from __future__ import annotations

from typing import Any

import kopf

from layercache.controller.controller import Controller


@kopf.on.event("", "v1", "nodes")
async def node_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Replan when a node is added, deleted, relabelled, (un)tainted or cordoned."""
    controller: Controller | None = getattr(memo, "controller", None)
    if controller is not None:
        controller.node_event(event.get("type"), body)

