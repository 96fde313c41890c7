"""Operator start-up and clean-up: clients in kopf's memo, background tasks, settings."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import kopf
from kubernetes import client, config
from prometheus_client import REGISTRY

from layercache.kube import KubeApi
from layercache.reconciler import Reconciler
from layercache.settings import OperatorSettings

log = logging.getLogger("layercache.operator")


def api_client() -> client.ApiClient:
    """A kubernetes ApiClient: in-cluster when in a Pod, else the kubeconfig ($KUBECONFIG)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


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
    api = api_client()
    kube = KubeApi(api)
    await asyncio.to_thread(kube.ensure_peer_token, ours.namespace, ours.peer_token_secret)
    # The default registry is what start_http_server (operator_main) exports.
    reconciler = Reconciler(kube, ours, REGISTRY)
    memo.settings, memo.api, memo.reconciler = ours, api, reconciler
    memo.tasks = [asyncio.create_task(reconciler.run(), name="replan"),
                  asyncio.create_task(_aggregate_forever(reconciler), name="status"),
                  asyncio.create_task(reconciler.refresh_forever(), name="refresh")]


async def _aggregate_forever(reconciler: Reconciler) -> None:
    while True:
        await asyncio.sleep(reconciler.settings.status_interval_seconds)
        try:
            await reconciler.aggregate()
        except Exception:
            log.exception("status aggregation failed; retrying")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the background tasks and close the API client."""
    for task in getattr(memo, "tasks", []):
        task.cancel()
    if getattr(memo, "api", None) is not None:
        memo.api.close()
