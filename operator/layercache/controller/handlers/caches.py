"""LayerCache handlers: resolve on create/resume/spec change, release on deletion.

Tags are refreshed by the controller's own loop (`Controller.refresh_forever`), not a kopf
timer: timers make kopf add a finalizer, which would block deleting a cache while the
operator is down. Deletion is seen as a DELETED event for the same reason.
"""

from __future__ import annotations

from typing import Any

import kopf

from layercache.api import GROUP, LC_PLURAL, VERSION
from layercache.controller.controller import Controller
from layercache.controller.state import CacheState

RESOURCE = (GROUP, VERSION, LC_PLURAL)


def _report(state: CacheState, body: kopf.Body) -> None:
    if state.invalid:
        kopf.warn(body, reason="InvalidSpec", message=state.invalid)
    for error in state.errors[:5]:
        kopf.warn(body, reason=error.reason,
                  message=f"{error.reference or 'pull secret'}: {error.message}"[:1024])
    if state.spec is not None and not state.invalid:
        kopf.info(body, reason="Resolved",
                  message=f"{len(state.resolved)} image(s) resolved, {len(state.errors)} failed")


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(namespace: str | None, name: str, spec: kopf.Spec, meta: kopf.Meta,
                    status: kopf.Status, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Resolve the cache's images and ask for a replan; bad input is reported, not raised.

    One bad LayerCache never stops the others: every error ends in its status and Events.
    """
    controller: Controller = memo.controller
    assert namespace is not None  # LayerCache is namespaced
    state = await controller.resolve(namespace, name, meta.get("generation", 0), dict(spec),
                                     meta.get("uid", ""), dict(status))
    _report(state, body)
    controller.trigger()


@kopf.on.event(*RESOURCE)
async def gone(event: kopf.RawEvent, namespace: str | None, name: str, meta: kopf.Meta,
               memo: kopf.Memo, **_: Any) -> None:
    """Forget a deleted cache; the replan releases layers no other cache wants.

    An event handler, not `on.delete`: with no finalizer (on purpose, so deletion never
    waits for the operator) kopf calls no delete handler, but it still sees DELETED.
    """
    if event.get("type") != "DELETED" or namespace is None:
        return
    controller: Controller = memo.controller
    controller.forget(namespace, name, meta.get("uid", ""))
    controller.trigger()
