"""`layercache operator`: run the kopf operator (handlers in layercache.handlers)."""

from __future__ import annotations

import asyncio
import logging

import kopf
from prometheus_client import start_http_server

from layercache.settings import OperatorSettings

__all__ = ["run_operator"]


def run_operator(*, verbose: bool = False) -> None:
    """Run the operator until SIGTERM/SIGINT (blocking).

    Watches LayerCaches cluster-wide; with `LAYERCACHE_STANDALONE=false` (the default)
    replicas elect one active peer through kopf peering (needs the peering CRDs).
    """
    import layercache.handlers  # noqa: F401 - registers the handlers with kopf

    settings = OperatorSettings()
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON, log_prefix=True)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    asyncio.run(kopf.operator(
        clusterwide=True,
        standalone=settings.standalone,
        # kopf makes peering mandatory whenever a name is given, and mandatory peering in
        # standalone mode pauses every watch forever: name it only when peering.
        peering_name=None if settings.standalone else settings.peering,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
    ))


if __name__ == "__main__":
    run_operator()
