"""In-memory twins of the operator's ports and time.

`KubeTwin` implements `KubePort`, `RegistryTwin` `ImageRegistry`
(layercache.controller.ports); `ManualClock` is the controller's clock and sleep, and
`InlineExecutor` runs its blocking calls at once.

`KubeTwin` keeps objects as the API's camelCase dicts in plain dicts and follows the rules
the controller's loops depend on: every change bumps the object's ``resourceVersion``
(one counter for the whole twin, as etcd's revision); a NodeLayerCache's
``metadata.generation`` grows only when its spec changes (status does not move it, as for
any CRD with a status subresource); patching or reading a missing object is a 404, creating
an existing one a 409 (`kubernetes.client.exceptions.ApiException`); status patches are
JSON merge patches (RFC 7386). Every write is counted (`writes`), so a test sees that an
unchanged plan writes nothing.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from kubernetes.client.exceptions import ApiException

from layercache.api import API_VERSION, NLC_KIND
from layercache.api.spec import LabelSelector
from layercache.api.warm import NodeWarmth
from layercache.controller.ports import (
    ClusterNode,
    ImageLookup,
    KubePort,
    PodImages,
    SecretMissingError,
)
from layercache.oci.platform import Platform
from layercache.oci.reference import Reference
from layercache.oci.resolved import ResolvedImage
from layercache.registry.credentials import DockerConfig
from layercache.registry.errors import ManifestNotFoundError

__all__ = ["InlineExecutor", "KubeTwin", "ManualClock", "RegistryTwin", "merge_patch", "settle"]

T = TypeVar("T")


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with JSON merge patch ``patch`` applied (RFC 7386): a new value."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _not_found(what: str) -> ApiException:
    return ApiException(status=404, reason=f"Not Found: {what}")


class KubeTwin:
    """The operator's `KubePort` over dicts; see the module docstring for its rules.

    Tests arrange the cluster with `add_node`, `remove_node`, `add_cache`, `delete_cache`,
    `report` (an agent writing its NodeLayerCache status) and the public dicts; they observe
    `writes` (a `Counter` by kind: ``node_spec``, ``node_delete``, ``cache_status``,
    ``secret``, ``event``, ``node_patch``), `events` and the objects.
    """

    def __init__(self) -> None:
        self.cluster_nodes: dict[str, ClusterNode] = {}
        #: LayerCaches by "namespace/name": {"metadata", "spec", "status"}.
        self.caches: dict[str, dict[str, Any]] = {}
        #: NodeLayerCaches by name.
        self.node_caches: dict[str, dict[str, Any]] = {}
        #: Secrets by (namespace, name): {"type", "data"} with string (not base64) values.
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.pod_images: list[PodImages] = []
        self.service_accounts: dict[tuple[str, str], list[str]] = {}
        #: Events posted: (namespace, name, reason, message).
        self.events: list[tuple[str, str, str, str]] = []
        self.node_patches: list[tuple[str, dict[str, Any]]] = []
        self.writes: Counter[str] = Counter()
        #: Reads by kind: ``node_caches`` (a list of every NodeLayerCache), ``watch``.
        self.reads: Counter[str] = Counter()
        #: NodeLayerCache watch events as (resourceVersion, type, object copy), oldest first;
        #: a watch from a version older than `watch_horizon` is 410 Gone (etcd compacted).
        self.node_cache_events: list[tuple[int, str, dict[str, Any]]] = []
        self.watch_horizon = 0
        self._revision = itertools.count(1)
        self._last_revision = 0

    def _bump(self, obj: dict[str, Any]) -> None:
        self._last_revision = next(self._revision)
        obj["metadata"]["resourceVersion"] = str(self._last_revision)

    def _node_cache_event(self, event_type: str, obj: dict[str, Any]) -> None:
        self.node_cache_events.append(
            (int(obj["metadata"]["resourceVersion"]), event_type, copy.deepcopy(obj)))

    def compact(self) -> None:
        """Compact as etcd does: a watch from any version before now is 410 Gone."""
        self.watch_horizon = self._last_revision

    def put_node_cache(self, obj: dict[str, Any]) -> None:
        """Store a NodeLayerCache as someone else would (any shape: a watch event of it)."""
        obj.setdefault("metadata", {})
        self._bump(obj)
        name = obj["metadata"].get("name")
        if isinstance(name, str):
            self.node_caches[name] = obj
        self._node_cache_event("ADDED", obj)

    # -- arranging the cluster ----------------------------------------------------------
    def add_node(self, name: str, labels: Mapping[str, str] | None = None,
                 platform: Platform | None = None, **facts: Any) -> None:
        """Node ``name`` joins (or changes); ``facts``: `ClusterNode`'s other fields."""
        self.cluster_nodes[name] = ClusterNode(
            name, dict(labels or {}), platform=platform or Platform("linux", "amd64"), **facts)

    def remove_node(self, name: str) -> None:
        """Node ``name`` leaves (its NodeLayerCache stays until the operator deletes it)."""
        del self.cluster_nodes[name]

    def add_cache(self, namespace: str, name: str, spec: Mapping[str, Any],
                  status: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create LayerCache ``namespace/name`` (generation 1); returns the object."""
        obj = {"metadata": {"namespace": namespace, "name": name, "generation": 1,
                            "uid": f"uid-{namespace}-{name}"},
               "spec": dict(spec), "status": dict(status or {})}
        self._bump(obj)
        self.caches[f"{namespace}/{name}"] = obj
        return obj

    def delete_cache(self, namespace: str, name: str) -> None:
        """Delete LayerCache ``namespace/name`` (no finalizer: gone at once)."""
        del self.caches[f"{namespace}/{name}"]

    def report(self, node: str, status: Mapping[str, Any]) -> None:
        """The agent on ``node`` merge-patches its NodeLayerCache's status (404 if none)."""
        obj = self.node_caches.get(node)
        if obj is None:
            raise _not_found(f"NodeLayerCache {node}")
        obj["status"] = merge_patch(obj.get("status") or {}, dict(status))
        self._bump(obj)
        self._node_cache_event("MODIFIED", obj)

    # -- the port ---------------------------------------------------------------------
    def nodes(self) -> list[ClusterNode]:
        return list(self.cluster_nodes.values())

    def node_warmth(self) -> list[NodeWarmth | str]:
        # The warm signal has tests of its own (tests/unit/test_warm_signal.py): here no
        # Node reads as one to label.
        return []

    def patch_node(self, name: str, patch: dict[str, Any]) -> None:
        if name not in self.cluster_nodes:
            raise _not_found(f"Node {name}")
        self.node_patches.append((name, patch))
        self.writes["node_patch"] += 1

    def layer_cache_keys(self) -> set[str]:
        return set(self.caches)

    def node_layer_caches(self) -> dict[str, dict[str, Any]]:
        # Copies, as a list from the apiserver: the caller cannot change what is stored.
        self.reads["node_caches"] += 1
        return copy.deepcopy(self.node_caches)

    def list_node_caches(self) -> tuple[list[dict[str, Any]], str]:
        self.reads["node_caches"] += 1
        return list(copy.deepcopy(self.node_caches).values()), str(self._last_revision)

    def watch_node_caches(self, resource_version: str) -> Iterator[tuple[str, Any]]:
        # The events stored so far, then the watch ends (as at the server's timeout).
        self.reads["watch"] += 1
        since = int(resource_version or 0)
        if since < self.watch_horizon:
            raise ApiException(status=410, reason="Expired: too old resource version")
        found = [(kind, copy.deepcopy(obj)) for version, kind, obj in self.node_cache_events
                 if version > since]
        return iter(found)

    def write_node_spec(self, exists: bool, name: str, spec: dict[str, Any]) -> int:
        if not exists:
            if name in self.node_caches:
                raise ApiException(status=409, reason=f"AlreadyExists: NodeLayerCache {name}")
            obj = {"apiVersion": API_VERSION, "kind": NLC_KIND,
                   "metadata": {"name": name, "generation": 1}, "spec": copy.deepcopy(spec)}
            self._bump(obj)
            self.node_caches[name] = obj
            self._node_cache_event("ADDED", obj)
            self.writes["node_spec"] += 1
            return 1
        stored = self.node_caches.get(name)
        if stored is None:
            raise _not_found(f"NodeLayerCache {name}")
        patched = merge_patch(stored.get("spec") or {}, spec)
        if patched != stored.get("spec"):
            stored["spec"] = patched
            stored["metadata"]["generation"] += 1
            self._bump(stored)
            self._node_cache_event("MODIFIED", stored)
        self.writes["node_spec"] += 1
        return int(stored["metadata"]["generation"])

    def delete_node_cache(self, name: str) -> None:
        gone = self.node_caches.pop(name, None)
        if gone is not None:
            self._bump(gone)
            self._node_cache_event("DELETED", gone)
            self.writes["node_delete"] += 1

    def patch_cache_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        obj = self.caches.get(f"{namespace}/{name}")
        if obj is None:
            raise _not_found(f"LayerCache {namespace}/{name}")
        obj["status"] = merge_patch(obj.get("status") or {}, status)
        self._bump(obj)
        self.writes["cache_status"] += 1

    def post_event(self, namespace: str, name: str, uid: str, reason: str, message: str,
                   event_type: str = "Normal") -> None:
        self.events.append((namespace, name, reason, message))
        self.writes["event"] += 1

    def docker_config(self, namespace: str, name: str) -> str:
        secret = self.secrets.get((namespace, name))
        if secret is None:
            raise SecretMissingError(f"Secret {namespace}/{name} not found")
        data = secret["data"].get(".dockerconfigjson")
        if data is None:
            raise SecretMissingError(
                f"Secret {namespace}/{name} has no .dockerconfigjson (type {secret['type']})")
        return str(data)

    def write_secret(self, namespace: str, name: str, data: Mapping[str, str],
                     secret_type: str = "Opaque") -> None:  # noqa: S107 - a type
        self.secrets[(namespace, name)] = {"type": secret_type, "data": dict(data)}
        self.writes["secret"] += 1

    def ensure_peer_token(self, namespace: str, name: str) -> None:
        if (namespace, name) not in self.secrets:
            self.write_secret(namespace, name, {"token": "twin-token"})

    def pods(self, namespaces: list[str], selector: LabelSelector) -> list[PodImages]:
        # Label selection is the apiserver's: here every Pod in the namespaces is selected.
        return [p for p in self.pod_images if p.namespace in namespaces]

    def service_account_pull_secrets(self, namespace: str, name: str) -> list[str]:
        return list(self.service_accounts.get((namespace, name), []))

    def dockerconfig_secret(self, namespace: str, name: str, auths: Mapping[str, Any]) -> None:
        """Arrange a kubernetes.io/dockerconfigjson Secret with ``auths``."""
        self.secrets[(namespace, name)] = {
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": json.dumps({"auths": dict(auths)})}}


class RegistryTwin:
    """An `ImageRegistry` over a dict: (reference, platform) text → image or error to raise.

    A reference it does not know is a `ManifestNotFoundError`, as a registry's 404.
    `lookups_made` counts lookups by (reference, platform); `configs_seen` keeps the Docker
    configs each lookup was given.
    """

    def __init__(self, images: Mapping[tuple[str, str], ResolvedImage | Exception]
                 | None = None) -> None:
        self.images: dict[tuple[str, str], ResolvedImage | Exception] = dict(images or {})
        self.lookups_made: Counter[tuple[str, str]] = Counter()
        self.configs_seen: dict[tuple[str, str], list[DockerConfig]] = {}

    @asynccontextmanager
    async def lookups(self) -> AsyncIterator[ImageLookup]:
        async def lookup(ref: Reference, platform: Platform, configs: Sequence[DockerConfig],
                         previous: ResolvedImage | None) -> ResolvedImage:
            key = (str(ref), str(platform))
            self.lookups_made[key] += 1
            self.configs_seen[key] = list(configs)
            found = self.images.get(key)
            if found is None:
                raise ManifestNotFoundError(404, f"GET {ref.registry}/v2/{ref.repository}"
                                                 f"/manifests/{ref.tag or ref.digest}")
            if isinstance(found, Exception):
                raise found
            return found
        yield lookup


class ManualClock:
    """Monotonic seconds that move only when a test calls `advance`; `sleep` waits for it.

    ``now()`` is the controller's ``clock``, ``sleep`` its ``sleep``: a loop sleeping 15 s
    wakes when the test advances 15 s, after one event-loop turn.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.time = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.time + seconds, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time on by ``seconds`` and run the sleepers it wakes.

        Tasks first run until they sleep (a sleep asked for after the move would be
        measured from the new time), then those due wake and run.
        """
        await settle()
        self.time += seconds
        while self._sleepers and self._sleepers[0][0] <= self.time:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        await settle()


async def settle(turns: int = 20) -> None:
    """Let other tasks run for ``turns`` event-loop turns.

    With `InlineExecutor`, enough for the blocking port calls the controller makes through
    ``asyncio.to_thread``.
    """
    for _ in range(turns):
        await asyncio.sleep(0)


class InlineExecutor(ThreadPoolExecutor):
    """An executor that runs each call at once in the calling thread.

    Installed as the event loop's default executor, it makes ``asyncio.to_thread`` calls on
    a twin complete within event-loop turns, with no thread and no waiting: the loops'
    histories are then deterministic.
    """

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future


_: type[KubePort] = KubeTwin  # the twin implements the port (checked by mypy)
