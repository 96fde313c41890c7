"""The one way layercache builds a Kubernetes API client: operator, agent and CLI alike.

Where it connects, as kubectl does: a kubeconfig file named by the caller, else
``$KUBECONFIG`` (a ``:``-separated list is merged) or ``~/.kube/config`` when either exists
or a context is asked for; else the in-cluster ServiceAccount (token, CA and
``KUBERNETES_SERVICE_HOST``).

Every request gets a deadline unless its caller passes its own ``_request_timeout``: the
official client waits forever by default, so one hung connection (an apiserver or load
balancer that accepts and never answers) would stall the operator's replans or the agent's
status reports for good. Plain requests get `CONNECT_TIMEOUT` to connect and `REQUEST_TIMEOUT`
for each read; a watch (``watch=true``) may stay quiet as long as the ``timeoutSeconds`` it
asked the server for, plus `REQUEST_TIMEOUT`, after which the watch is over anyway.

The timeout policy, in one place (every process builds its client here):

- connect: `CONNECT_TIMEOUT` (10 s) everywhere: a reachable apiserver accepts in
  milliseconds, and a connection failure is retried (twice) by the client itself;
- read, operator and agent: `REQUEST_TIMEOUT` (30 s): both retry on their own loops
  (kopf, the replan and status loops, the agent's `layercache.backoff`), so the bound only
  has to end a hung call, well above what a slow list of a large cluster takes;
- read, ``kubectl layercache status`` and other commands a person waits on:
  `INTERACTIVE_TIMEOUT` (15 s): an answer or a clear error within seconds, not a minute;
- watches: the server ends them after `WATCH_SECONDS` (300 s, the operator's kopf watches
  and the agent's own-object watch alike), and the client gives up `REQUEST_TIMEOUT` later;
- kopf's own aiohttp client gets the same connect, read and watch numbers (its settings
  are set from these constants at start-up, `layercache.controller.handlers.lifecycle`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import urllib3
from kubernetes import client, config

__all__ = ["CONNECT_TIMEOUT", "INTERACTIVE_TIMEOUT", "REQUEST_TIMEOUT", "WATCH_SECONDS",
           "api_client", "uses_kubeconfig"]

#: Seconds to establish a connection to the API server.
CONNECT_TIMEOUT: Final = 10.0
#: Seconds a plain request may wait for the server between bytes (urllib3 read timeout).
REQUEST_TIMEOUT: Final = 30.0
#: The read timeout of commands a person waits on (``kubectl layercache status``).
INTERACTIVE_TIMEOUT: Final = 15.0
#: Seconds the apiserver keeps one of our watch requests open before we start the next.
WATCH_SECONDS: Final = 300
#: Seconds a watch without ``timeoutSeconds`` may stay quiet (the apiserver ends its
#: watches after 30-60 minutes by default).
WATCH_DEFAULT_SECONDS: Final = 3600

# The kubernetes client's config loaders carry no annotations.
_config: Any = config


class _DeadlineApiClient(client.ApiClient):
    """An `ApiClient` whose requests without ``_request_timeout`` get a default one."""

    def __init__(self, configuration: client.Configuration, timeout: float) -> None:
        super().__init__(configuration)
        self.timeout = timeout

    def call_api(self, method: Any, url: Any, header_params: Any = None, body: Any = None,
                 post_params: Any = None, _request_timeout: Any = None) -> Any:
        if _request_timeout is None:
            _request_timeout = request_timeout(str(url), self.timeout)
        return super().call_api(method, url, header_params, body, post_params,
                                _request_timeout)


def request_timeout(url: str, timeout: float) -> tuple[float, float]:
    """``(connect, read)`` seconds for a request to ``url``: a watch may wait longer.

    ``timeout`` is the read timeout of a plain request; a watch's is its ``timeoutSeconds``
    query parameter (or `WATCH_DEFAULT_SECONDS`) plus ``timeout``.
    """
    query = parse_qs(urlsplit(url).query)
    if (query.get("watch") or [""])[0].lower() in {"true", "1"}:
        seconds = (query.get("timeoutSeconds") or [""])[0]
        server = int(seconds) if seconds.isdigit() else WATCH_DEFAULT_SECONDS
        return min(CONNECT_TIMEOUT, timeout), server + timeout
    return min(CONNECT_TIMEOUT, timeout), timeout


def uses_kubeconfig(kubeconfig: Path | None = None, context: str | None = None) -> bool:
    """Whether `api_client` would read a kubeconfig (True) or go in-cluster (False)."""
    if kubeconfig is not None or context is not None or os.environ.get("KUBECONFIG"):
        return True
    try:
        return (Path.home() / ".kube" / "config").is_file()
    except PermissionError:
        # A home this process may not enter is no kubeconfig: the chart's agent runs as
        # root without CAP_DAC_OVERRIDE, and the image's HOME is nonroot's 0750 directory.
        return False


def api_client(kubeconfig: Path | None = None, context: str | None = None, *,
               timeout: float | None = None) -> client.ApiClient:
    """A kubernetes `ApiClient` with request deadlines (see the module docstring).

    ``kubeconfig``: file to read (None: ``$KUBECONFIG`` or ``~/.kube/config``, else
    in-cluster); ``context``: kubeconfig context (None: the current one); ``timeout``:
    read timeout of a plain request in seconds (None: `REQUEST_TIMEOUT`). The caller
    closes the client.

    Raises:
        kubernetes.config.ConfigException: no usable kubeconfig, context or in-cluster
            configuration.
        OSError: the kubeconfig cannot be read.

    """
    configuration = client.Configuration()
    if uses_kubeconfig(kubeconfig, context):
        # $KUBECONFIG read now: the client's own default was taken when it was imported.
        file = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or None
        _config.load_kube_config(config_file=file, context=context,
                                 client_configuration=configuration)
    else:
        _config.load_incluster_config(client_configuration=configuration)
    # Connection failures are retried; a read that timed out is not sent again (a hung
    # server stays hung, and the caller's own retry loop decides what comes next).
    configuration.retries = urllib3.Retry(total=2, read=0, redirect=0)
    return _DeadlineApiClient(configuration, REQUEST_TIMEOUT if timeout is None else timeout)
