"""Operator start-up and clean-up: clients in kopf's memo, background tasks, settings."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
from kubernetes import client
from prometheus_client import REGISTRY

from layercache import kubeclient
from layercache.kube import KubeApi
from layercache.leadership import is_active
from layercache.reconciler import Reconciler
from layercache.settings import OperatorSettings
from layercache.warmsignal import WarmSignal

log = logging.getLogger("layercache.operator")

#: How often a replica checks whether it is the active peer (kopf's peers refresh their
#: entry every few seconds and are dead after their 60 s lifetime).
LEADERSHIP_POLL_SECONDS = 5.0


def api_client() -> client.ApiClient:
    """The operator's ApiClient: $KUBECONFIG or ~/.kube/config if any, else in-cluster.

    Built by `layercache.kubeclient.api_client`, so every call has a deadline.
    """
    return kubeclient.api_client()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Load settings, open clients, start the replan and status loops."""
    ours = OperatorSettings()
    log.info("layercache operator starting: %s", ours.summary())
    settings.persistence.finalizer = "layercache.dev/finalizer"
    # kopf freezes every replica when two share a priority; distinct ones make the highest
    # active and the others stand by until it is gone.
    settings.peering.priority = (ours.priority if ours.priority is not None
                                 else secrets.randbelow(1_000_000) + 1)
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    # kopf's own API calls (its aiohttp client): deadlines too, as for ours (kubeclient).
    settings.networking.connect_timeout = kubeclient.CONNECT_TIMEOUT
    settings.networking.request_timeout = kubeclient.REQUEST_TIMEOUT
    settings.watching.client_timeout = 300 + kubeclient.REQUEST_TIMEOUT
    api = api_client()
    kube = KubeApi(api)
    await asyncio.to_thread(kube.ensure_peer_token, ours.namespace, ours.peer_token_secret)
    # The default registry is what start_http_server (operator_main) exports.
    reconciler = Reconciler(kube, ours, REGISTRY)
    memo.settings, memo.api, memo.reconciler = ours, api, reconciler
    if ours.standalone:
        memo.tasks = _start_loops(reconciler)
    else:
        identity = getattr(memo, "identity", None)
        assert identity, "run_operator passes the peering identity in the memo"
        memo.tasks = [asyncio.create_task(
            _lead(reconciler, kube, ours.peering, identity, lambda: settings.peering.priority),
            name="leadership")]


def _start_loops(reconciler: Reconciler) -> list[asyncio.Task[None]]:
    interval = reconciler.settings.status_interval_seconds
    warm = WarmSignal(reconciler.kube, reconciler.settings)
    return [asyncio.create_task(reconciler.run(), name="replan"),
            asyncio.create_task(_every(interval, reconciler.aggregate), name="status"),
            asyncio.create_task(reconciler.refresh_forever(), name="refresh"),
            asyncio.create_task(_every(interval, warm.run_once), name="warm nodes")]


async def _lead(reconciler: Reconciler, kube: KubeApi, peering: str, identity: str,
                priority: Callable[[], int]) -> None:
    """Run the write loops only while this replica is kopf's active peer.

    kopf pauses its watchers on a standby but not tasks started here (see
    layercache.leadership). On promotion every LayerCache is resolved afresh, because what
    changed while another replica was active reached this one's handlers never; on
    demotion the loops stop and the caches are forgotten, so stale state is neither written
    nor exported as metrics.
    """
    loops: list[asyncio.Task[None]] = []
    try:
        while True:
            try:
                peers = await asyncio.to_thread(kube.peering_status, peering)
                active = is_active(peers, identity, priority())
            except Exception:
                log.exception("peering %s unreadable; keeping the current role", peering)
                active = bool(loops)
            if active and not loops:
                log.info("active replica (%s): taking over every LayerCache", identity)
                await _adopt(reconciler, kube)
                loops = _start_loops(reconciler)
            elif not active and loops:
                log.info("standby (%s): a peer of higher priority is active", identity)
                await _stop(loops)
                loops = []
                reconciler.caches.clear()
            await asyncio.sleep(LEADERSHIP_POLL_SECONDS)
    finally:
        await _stop(loops)


async def _adopt(reconciler: Reconciler, kube: KubeApi) -> None:
    for obj in await asyncio.to_thread(kube.layer_caches):
        meta = obj["metadata"]
        try:
            await reconciler.resolve(meta["namespace"], meta["name"], meta.get("generation", 0),
                                     obj.get("spec") or {}, meta.get("uid", ""),
                                     obj.get("status") or {})
        except Exception:  # one cache's failure stops no other; its refresh retries it
            log.exception("LayerCache %s/%s not resolved", meta["namespace"], meta["name"])
    reconciler.trigger()


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _every(seconds: float, step: Callable[[], Awaitable[object]]) -> None:
    """``step()`` every ``seconds``; a failed step is logged and retried, never fatal."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await step()
        except Exception:
            log.exception("%s failed; retrying", getattr(step, "__qualname__", step))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the background tasks and close the API client."""
    for task in getattr(memo, "tasks", []):
        task.cancel()
    if getattr(memo, "api", None) is not None:
        memo.api.close()
