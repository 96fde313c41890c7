"""LayerCache handlers: resolve on create/resume/spec change, release on delete.

Tags are refreshed by the reconciler's own loop (`Reconciler.refresh_forever`), not a kopf
timer: timers make kopf add a finalizer, which would block deleting a cache while the
operator is down. The delete handler is optional for the same reason.
"""

from __future__ import annotations

from typing import Any

import kopf

from layercache.kube import GROUP, LC_PLURAL, VERSION
from layercache.reconciler import CacheState, Reconciler

RESOURCE = (GROUP, VERSION, LC_PLURAL)


def _report(state: CacheState, body: kopf.Body) -> None:
    if state.invalid:
        kopf.warn(body, reason="InvalidSpec", message=state.invalid)
    for error in state.errors[:5]:
        kopf.warn(body, reason=error.reason,
                  message=f"{error.reference or 'pull secret'}: {error.message}"[:1024])


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(namespace: str | None, name: str, spec: kopf.Spec, meta: kopf.Meta,
                    body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Resolve the cache's images and ask for a replan; bad input is reported, not raised.

    One bad LayerCache never stops the others: every error ends in its status and Events.
    """
    reconciler: Reconciler = memo.reconciler
    assert namespace is not None  # LayerCache is namespaced
    state = await reconciler.resolve(namespace, name, meta.get("generation", 0), dict(spec),
                                     meta.get("uid", ""))
    _report(state, body)
    if state.spec is not None and not state.invalid:
        kopf.info(body, reason="Resolved",
                  message=f"{len(state.resolved)} image(s) resolved, {len(state.errors)} failed")
    reconciler.trigger()


@kopf.on.delete(*RESOURCE, optional=True)
async def release(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Forget the cache; the replan releases layers no other cache wants."""
    reconciler: Reconciler = memo.reconciler
    assert namespace is not None
    reconciler.forget(namespace, name)
    reconciler.trigger()


def tag_moved(state: CacheState, moved: list[str]) -> None:
    """Post a `TagMoved` Event on the cache (the reconciler's refresh loop calls this)."""
    body = kopf.Body({"apiVersion": f"{GROUP}/{VERSION}", "kind": "LayerCache", "metadata": {
        "name": state.name, "namespace": state.namespace, "uid": state.uid}})
    kopf.info(body, reason="TagMoved", message=f"re-resolved: {', '.join(moved[:5])}"[:1024])
