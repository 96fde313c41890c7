"""`layercache operator`: run the kopf operator (handlers in layercache.controller.handlers).

Replicas elect a leader through a Lease (layercache.controller.leadership); kopf runs only in the
leader. A standby answers its liveness probe (`/healthz`) itself until it leads.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from typing import Any, cast

import kopf
from aiohttp import web
from prometheus_client import REGISTRY, Gauge, start_http_server

from layercache import kubeclient
from layercache.controller.leadership import LeaseElection
from layercache.controller.settings import OperatorSettings
from layercache.metrics import leader_gauge

log = logging.getLogger("layercache.operator")

__all__ = ["run_operator"]


def run_operator(*, verbose: bool = False) -> None:
    """Run the operator until SIGTERM/SIGINT (blocking).

    Watches LayerCaches cluster-wide; with `LAYERCACHE_STANDALONE=false` (the default)
    replicas elect a leader through the Lease `LAYERCACHE_LEASE_NAME` in
    `LAYERCACHE_NAMESPACE`, and only the leader runs kopf.

    Raises:
        SystemExit: 1 when this replica lost the Lease (its Pod restarts as a candidate).
    """
    import layercache.controller.handlers  # noqa: F401 - registers the handlers with kopf

    settings = OperatorSettings()
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat[settings.log_format.upper()],
                   log_prefix=True)
    if not verbose:  # kopf.configure knows only debug, info and quiet (warning)
        logging.getLogger().setLevel(settings.log_level)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    leader = leader_gauge(REGISTRY)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    # One identity per process, readable as the Pod's name (the Lease's holderIdentity).
    identity = f"{socket.gethostname()}-{secrets.token_hex(4)}"
    if settings.standalone:
        leader.set(1)
        asyncio.run(_kopf(settings, identity, None))
    elif not asyncio.run(_elected(settings, identity, leader)):
        raise SystemExit(1)


def _kopf(settings: OperatorSettings, identity: str, stop: asyncio.Event | None
          ) -> Any:
    # kopf's own peering is off (standalone): leadership is the Lease's (or there is none).
    return kopf.operator(
        clusterwide=True,
        identity=cast(Any, identity),  # kopf's Identity is a NewType of str
        # `lost`: the controller stops its loops when set (layercache.controller.controller).
        memo=kopf.Memo(identity=identity, lost=stop),
        standalone=True,
        stop_flag=stop,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
    )


async def _standby_health(port: int) -> web.AppRunner:
    """Serve `/healthz` (200 `standby`) on `port` while kopf, which serves it later, waits."""
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="standby")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    # Every interface, as kopf's own endpoint: the kubelet probes the Pod's IP.
    await web.TCPSite(runner, "0.0.0.0", port, reuse_address=True).start()  # noqa: S104
    return runner


async def _elected(settings: OperatorSettings, identity: str, leader: Gauge) -> bool:
    """Wait for the Lease, run kopf while holding it (``leader`` 1); False when it was lost."""
    api = kubeclient.api_client()
    election = LeaseElection(api, settings.namespace, settings.lease_name, identity)
    health = await _standby_health(settings.health_port)
    log.info("candidate %s for Lease %s/%s", identity, settings.namespace, settings.lease_name)
    try:
        await election.leading()
    finally:
        await health.cleanup()
    log.info("leader %s: Lease %s/%s acquired, starting", identity, settings.namespace,
             settings.lease_name)
    leader.set(1)
    try:
        await _kopf(settings, identity, election.lost)
    finally:
        leader.set(0)
        await asyncio.to_thread(election.release)
        api.close()  # type: ignore[no-untyped-call]
    if election.lost.is_set():
        log.error("lost Lease %s/%s: stopped, exiting so that the Pod restarts as a candidate",
                  settings.namespace, settings.lease_name)
        return False
    return True


if __name__ == "__main__":
    run_operator()
