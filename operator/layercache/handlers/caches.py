"""LayerCache handlers: resolve on create/resume/spec change, refresh tags, release on delete."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from layercache.kube import GROUP, LC_PLURAL, VERSION
from layercache.reconciler import CacheState, Reconciler

RESOURCE = (GROUP, VERSION, LC_PLURAL)
#: How often each cache checks whether its refreshInterval has passed (seconds).
REFRESH_CHECK_SECONDS = 15.0


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
    state = await reconciler.resolve(namespace, name, meta.get("generation", 0), dict(spec))
    _report(state, body)
    if state.spec is not None and not state.invalid:
        kopf.info(body, reason="Resolved",
                  message=f"{len(state.resolved)} image(s) resolved, {len(state.errors)} failed")
    reconciler.trigger()


@kopf.timer(*RESOURCE, interval=REFRESH_CHECK_SECONDS, initial_delay=REFRESH_CHECK_SECONDS)
async def refresh(namespace: str | None, name: str, spec: kopf.Spec, meta: kopf.Meta,
                  body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Re-resolve tags every refreshInterval; a moved tag replans the cache."""
    reconciler: Reconciler = memo.reconciler
    assert namespace is not None
    key = f"{namespace}/{name}"
    if not reconciler.due_for_refresh(key):
        return
    before = reconciler.caches[key].digests()
    state = await reconciler.resolve(namespace, name, meta.get("generation", 0), dict(spec))
    moved = sorted(ref for ref, digest in state.digests().items() if before.get(ref) != digest)
    if moved:
        kopf.info(body, reason="TagMoved",
                  message=f"re-resolved: {', '.join(r for r, _ in moved[:5])}"[:1024])
    reconciler.trigger()


@kopf.on.delete(*RESOURCE, optional=True)
async def release(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Forget the cache; the replan releases layers no other cache wants."""
    reconciler: Reconciler = memo.reconciler
    assert namespace is not None
    reconciler.forget(namespace, name)
    reconciler.trigger()
    await asyncio.sleep(0)
