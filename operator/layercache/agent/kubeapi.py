"""The agent's only door into the Kubernetes API: its NodeLayerCache, peers, Node, Secrets.

Least privilege (the agent's ClusterRole and Role, see ``manifests/``): ``get``/``list``/
``watch`` on ``nodelayercaches`` (its own, by a ``metadata.name`` field selector; others
by name, for their ``status.peerEndpoint``), ``patch`` on ``nodelayercaches/status``
(its own), ``get`` on its ``nodes``, and ``get`` on two Secrets of its namespace, by name.

The kubernetes client is blocking: every call runs in a worker thread (`asyncio.to_thread`),
and the watch of the agent's own object runs in a daemon thread of its own, handing each
new version to the event loop (`OwnObjectWatch`). It re-lists after a ``410 Gone`` (the
resource version expired) and after any other failure, with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any, Final

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from layercache import kubeclient
from layercache.agent.nodespec import GROUP, PLURAL, VERSION
from layercache.agent.ports import Obj, OnObject
from layercache.agent.settings import AgentSettings
from layercache.backoff import Backoff
from layercache.kubeclient import api_client

__all__ = ["KUBE_BACKOFF", "AgentKube", "Obj", "OwnObjectWatch"]

log = logging.getLogger(__name__)

#: Seconds the apiserver keeps one watch request open before we start the next.
WATCH_SECONDS: Final = kubeclient.WATCH_SECONDS
#: Waits before retrying a failed watch, or a start-up call (`layercache.agent.app`):
#: 1 s doubling to 30 s, started over after a success.
KUBE_BACKOFF: Final = Backoff(1.0, 30.0)
_MERGE_PATCH: Final = "application/merge-patch+json"


# The kubernetes client's watch helpers carry no annotations, and its generated APIs return
# ``object`` for custom objects: they are held as Any here, and what they return is checked
# where it is used.
_watch: Any = watch


class AgentKube:
    """Blocking API calls of one agent, wrapped as coroutines; ``node`` is its node's name."""

    def __init__(self, settings: AgentSettings) -> None:
        self.node = settings.node_name
        self.namespace = settings.namespace
        # Deadlines on every request (a watch: its timeoutSeconds and then some).
        self.api: Any = api_client(settings.kubeconfig)
        self.custom: Any = client.CustomObjectsApi(self.api)
        self.core: Any = client.CoreV1Api(self.api)

    def close(self) -> None:
        """Close the connection pool."""
        self.api.close()

    def watch_own(self, loop: asyncio.AbstractEventLoop, on_change: OnObject) -> OwnObjectWatch:
        """An `OwnObjectWatch` (not started) of this node's NodeLayerCache."""
        return OwnObjectWatch(self, loop, on_change)

    def list_own(self) -> tuple[Obj | None, str]:
        """Blocking: this node's NodeLayerCache (None when absent) and the list's version."""
        listing: Obj = self.custom.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, field_selector=f"metadata.name={self.node}")
        items = listing.get("items") or []
        return (items[0] if items else None), str(listing["metadata"]["resourceVersion"])

    async def get_cache(self, node: str) -> Obj | None:
        """The NodeLayerCache of ``node``, or None when there is none.

        Raises:
            ApiException: any answer but 200 and 404.

        """
        def get() -> Obj | None:
            try:
                found: Obj = self.custom.get_cluster_custom_object(
                    GROUP, VERSION, PLURAL, node)
            except ApiException as error:
                if error.status == 404:
                    return None
                raise
            return found

        return await asyncio.to_thread(get)

    async def patch_status(self, status: Mapping[str, Any]) -> None:
        """Merge-patch ``status`` into this node's NodeLayerCache (status subresource).

        Raises:
            ApiException: refused (404 when the object is gone).

        """
        await asyncio.to_thread(
            self.custom.patch_cluster_custom_object_status, GROUP, VERSION, PLURAL, self.node,
            {"status": dict(status)}, _content_type=_MERGE_PATCH)

    async def get_node(self) -> Obj | None:
        """This node's Node object as a dict, or None when absent.

        Raises:
            ApiException: any answer but 200 and 404.

        """
        def get() -> Obj | None:
            try:
                node = self.core.read_node(self.node)
            except ApiException as error:
                if error.status == 404:
                    return None
                raise
            found: Obj = self.api.sanitize_for_serialization(node)
            return found

        return await asyncio.to_thread(get)

    async def read_secret(self, name: str) -> dict[str, str] | None:
        """The ``data`` (base64 values) of Secret ``name`` in the agent's namespace.

        None when the Secret does not exist.

        Raises:
            ApiException: any answer but 200 and 404 (403: RBAC does not allow it).

        """
        def get() -> dict[str, str] | None:
            try:
                secret = self.core.read_namespaced_secret(name, self.namespace)
            except ApiException as error:
                if error.status == 404:
                    return None
                raise
            return dict(secret.data or {})

        return await asyncio.to_thread(get)


class OwnObjectWatch:
    """Follows this node's NodeLayerCache from a thread; ``on_change`` runs in the loop.

    ``on_change`` gets the object (a dict) after each change, or None once it is deleted
    or when a re-list finds none. Start with `start`, stop with `stop` (the thread is a
    daemon: a watch request blocked in a read does not hold the process up).
    """

    def __init__(self, kube: AgentKube, loop: asyncio.AbstractEventLoop,
                 on_change: OnObject) -> None:
        self.kube = kube
        self.loop = loop
        self.on_change = on_change
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name="nlc-watch", daemon=True)

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following (returns at once; the thread ends with its current request)."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _deliver(self, obj: Obj | None) -> None:
        if not self._stop.is_set():
            self.loop.call_soon_threadsafe(self.on_change, obj)

    def _run(self) -> None:
        delays = KUBE_BACKOFF.delays()
        version: str | None = None
        while not self._stop.is_set():
            # A watch that ended normally (its timeout) is followed again after the first
            # step; failures wait longer each time.
            backoff = KUBE_BACKOFF.initial
            try:
                if version is None:
                    obj, version = self.kube.list_own()
                    self._deliver(obj)
                version = self._follow(version)
                delays = KUBE_BACKOFF.delays()
            except ApiException as error:
                if self._stop.is_set():
                    return
                if error.status == 410:  # expired: list again, then watch from there
                    log.info("watch of own NodeLayerCache expired; listing again")
                    version = None
                    continue
                backoff = next(delays)
                log.warning("watch of own NodeLayerCache failed (HTTP %s); retrying in %.0f s",
                            error.status, backoff)
                version = None
            except Exception as error:
                backoff = next(delays)
                log.warning("watch of own NodeLayerCache failed: %s; retrying in %.0f s",
                            error, backoff)
                version = None
            self._stop.wait(backoff)

    def _follow(self, version: str) -> str | None:
        """One watch request from ``version``; returns the version to go on from."""
        self._watch = _watch.Watch()
        for event in self._watch.stream(
                self.kube.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                field_selector=f"metadata.name={self.kube.node}", resource_version=version,
                allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS):
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                status = obj.get("code") if isinstance(obj, dict) else None
                raise ApiException(status=status or 500, reason=str(obj))
            version = obj["metadata"]["resourceVersion"]
            if kind != "BOOKMARK":
                self._deliver(None if kind == "DELETED" else obj)
            if self._stop.is_set():
                break
        return version
