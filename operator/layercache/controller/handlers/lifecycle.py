"""Operator start-up and clean-up: settings, clients and the `Controller` in kopf's memo.

The controller starts and stops its own loops (`Controller.start`, `Controller.stop`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from kubernetes import client
from prometheus_client import REGISTRY

from layercache import kubeclient
from layercache.controller.controller import Controller
from layercache.controller.kube import KubeApi
from layercache.controller.settings import OperatorSettings

log = logging.getLogger("layercache.operator")


def api_client() -> client.ApiClient:
    """The operator's ApiClient: $KUBECONFIG or ~/.kube/config if any, else in-cluster.

    Built by `layercache.kubeclient.api_client`, so every call has a deadline.
    """
    return kubeclient.api_client()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Load settings, open clients, start the controller."""
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
    # The default registry is what start_http_server (controller.main) exports.
    controller = Controller(kube, ours, REGISTRY)
    memo.settings, memo.api, memo.controller = ours, api, controller
    # kopf runs only in the leader (layercache.controller.main); `lost` (the Lease's,
    # None when standalone) stops the loops as soon as the Lease is lost.
    controller.start(lost=getattr(memo, "lost", None))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the controller's loops and close the API client."""
    controller: Controller | None = getattr(memo, "controller", None)
    if controller is not None:
        controller.stop()
    if getattr(memo, "api", None) is not None:
        memo.api.close()
