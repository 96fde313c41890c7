"""`layercache operator`: run the kopf operator (handlers in layercache.handlers)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from typing import Any, cast

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
    # One identity for kopf's peering entry and for our own check of who is active
    # (layercache.leadership); unique per process, readable as the Pod's name.
    identity = f"{socket.gethostname()}-{secrets.token_hex(4)}"
    asyncio.run(kopf.operator(
        clusterwide=True,
        identity=cast(Any, identity),  # kopf's Identity is a NewType of str
        memo=kopf.Memo(identity=identity),
        standalone=settings.standalone,
        # kopf makes peering mandatory whenever a name is given, and mandatory peering in
        # standalone mode pauses every watch forever: name it only when peering.
        peering_name=None if settings.standalone else settings.peering,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
    ))


if __name__ == "__main__":
    run_operator()
