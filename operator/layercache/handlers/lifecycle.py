"""Operator start-up and clean-up: clients in kopf's memo, background tasks, settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
from kubernetes import client
from prometheus_client import REGISTRY

from layercache import kubeclient
from layercache.kube import KubeApi
from layercache.reconciler import Reconciler
from layercache.settings import OperatorSettings
from layercache.warmsignal import WarmSignal

log = logging.getLogger("layercache.operator")


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
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = kubeclient.WATCH_SECONDS
    # kopf's own API calls (its aiohttp client): deadlines too, as for ours (kubeclient).
    settings.networking.connect_timeout = kubeclient.CONNECT_TIMEOUT
    settings.networking.request_timeout = kubeclient.REQUEST_TIMEOUT
    settings.watching.client_timeout = kubeclient.WATCH_SECONDS + kubeclient.REQUEST_TIMEOUT
    api = api_client()
    kube = KubeApi(api)
    await asyncio.to_thread(kube.ensure_peer_token, ours.namespace, ours.peer_token_secret)
    # The default registry is what start_http_server (operator_main) exports.
    reconciler = Reconciler(kube, ours, REGISTRY)
    memo.settings, memo.api, memo.reconciler = ours, api, reconciler
    # kopf runs only in the leader (layercache.operator_main), so the loops always run.
    memo.tasks = _start_loops(reconciler)


def _start_loops(reconciler: Reconciler) -> list[asyncio.Task[None]]:
    interval = reconciler.settings.status_interval_seconds
    warm = WarmSignal(reconciler.kube, reconciler.settings)
    return [asyncio.create_task(reconciler.run(), name="replan"),
            asyncio.create_task(_every(interval, reconciler.aggregate), name="status"),
            asyncio.create_task(reconciler.refresh_forever(), name="refresh"),
            asyncio.create_task(_every(interval, warm.run_once), name="warm nodes")]


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
