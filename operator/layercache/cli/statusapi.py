"""Read-only API access for `layercache status`: LayerCaches and NodeLayerCaches.

Connects as kubectl does: ``--kubeconfig`` or ``$KUBECONFIG`` (a ``:``-separated list is
merged) or ``~/.kube/config``, with ``--context`` or the current context, whose namespace
is the default; inside a Pod with none of those, the in-cluster ServiceAccount (its own
namespace is the default). TLS verification is whatever the kubeconfig says (on unless it
sets ``insecure-skip-tls-verify``). Only ``get``/``list`` calls are made: a user who may
read LayerCaches in a namespace sees their status; per-node progress additionally needs
``list nodelayercaches`` (cluster-scoped), and its absence is reported, not fatal.

Every failure is a `StatusApiError` whose message names the object and what went wrong,
so the command prints one line and exits 1 instead of a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from layercache.api import GROUP, LC_PLURAL, NLC_PLURAL, VERSION
from layercache.kubeclient import INTERACTIVE_TIMEOUT, api_client, uses_kubeconfig

__all__ = ["StatusApi", "StatusApiError"]

#: Seconds any one read may wait: `layercache.kubeclient.INTERACTIVE_TIMEOUT` (a person is
#: waiting; the factory bounds connecting too).
REQUEST_TIMEOUT: Final = INTERACTIVE_TIMEOUT
SERVICE_ACCOUNT_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# The kubernetes client's config loaders and generated APIs carry no useful annotations.
_config: Any = config


class StatusApiError(RuntimeError):
    """The API could not be reached or refused a read; ``status`` is the HTTP code (or None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StatusApi:
    """A read-only client for LayerCache status; see the module docstring for how it connects.

    Raises:
        StatusApiError: no usable kubeconfig or in-cluster configuration, or no such context.

    """

    def __init__(self, kubeconfig: Path | None = None, context: str | None = None) -> None:
        self.default_namespace = "default"
        try:
            self.api: Any = api_client(kubeconfig, context, timeout=REQUEST_TIMEOUT)
            if uses_kubeconfig(kubeconfig, context):
                file = str(kubeconfig) if kubeconfig is not None else None
                contexts, current = _config.list_kube_config_contexts(file)
                chosen = next((c for c in contexts if c.get("name") == context), current) \
                    if context is not None else current
                namespace = ((chosen or {}).get("context") or {}).get("namespace")
                self.default_namespace = namespace or "default"
            elif SERVICE_ACCOUNT_NAMESPACE.is_file():
                self.default_namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except (ConfigException, OSError, ValueError) as error:
            where = f"kubeconfig {kubeconfig}" if kubeconfig else (
                "$KUBECONFIG" if os.environ.get("KUBECONFIG") else "the kubeconfig")
            raise StatusApiError(f"cannot load {where}"
                                 f"{f' (context {context})' if context else ''}: {error}"
                                 ) from None
        self.server = str(self.api.configuration.host)
        self.custom: Any = client.CustomObjectsApi(self.api)

    def close(self) -> None:
        """Close the connection pool."""
        self.api.close()

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = method(*args, **kwargs)
        except ApiException as error:
            raise StatusApiError(_explain(what, error), error.status) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            # MaxRetryError wraps the cause (refused, TLS, DNS): that is the news.
            cause = getattr(error, "reason", None) or error
            raise StatusApiError(f"{what}: cannot reach the API server at {self.server}: "
                                 f"{cause}") from None
        return result

    def get_cache(self, namespace: str, name: str) -> dict[str, Any]:
        """LayerCache ``namespace/name`` (the API's dict, managedFields included).

        Raises:
            StatusApiError: not found (status 404), forbidden (403), unreachable.

        """
        return self._call(f"LayerCache {namespace}/{name}",
                          self.custom.get_namespaced_custom_object,
                          GROUP, VERSION, namespace, LC_PLURAL, name)

    def list_caches(self, namespace: str | None) -> list[dict[str, Any]]:
        """LayerCaches of ``namespace`` (every namespace when None), by namespace and name.

        Raises:
            StatusApiError: forbidden, CRD not installed, unreachable.

        """
        if namespace is None:
            listed = self._call("LayerCaches in all namespaces",
                                self.custom.list_cluster_custom_object,
                                GROUP, VERSION, LC_PLURAL)
        else:
            listed = self._call(f"LayerCaches in namespace {namespace}",
                                self.custom.list_namespaced_custom_object,
                                GROUP, VERSION, namespace, LC_PLURAL)
        items: list[dict[str, Any]] = listed.get("items") or []
        return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""),
                                            o["metadata"]["name"]))

    def list_node_caches(self) -> list[dict[str, Any]]:
        """Every NodeLayerCache (cluster-scoped), by name.

        Raises:
            StatusApiError: forbidden (RBAC), CRD not installed, unreachable.

        """
        listed = self._call("NodeLayerCaches", self.custom.list_cluster_custom_object,
                            GROUP, VERSION, NLC_PLURAL)
        items: list[dict[str, Any]] = listed.get("items") or []
        return sorted(items, key=lambda o: o["metadata"]["name"])


def _explain(what: str, error: ApiException) -> str:
    """One line for an API refusal, naming the object (`what`) and the HTTP status."""
    if error.status == 404:
        # The apiserver answers 404 both for a missing object and a missing resource type.
        body = str(error.body or "")
        if "could not find the requested resource" in body or "page not found" in body:
            return (f"{what}: the API server has no LayerCache resources (are the layercache "
                    "CRDs installed? kubectl apply -f manifests/crds)")
        return f"{what} not found"
    if error.status == 403:
        return f"{what}: forbidden (HTTP 403): your credentials may not read it"
    if error.status == 401:
        return f"{what}: unauthorized (HTTP 401): the kubeconfig's credentials were refused"
    return f"{what}: HTTP {error.status} {error.reason}"
