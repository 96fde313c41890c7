"""The operator's ports: what the controller needs of Kubernetes and of image registries.

`KubePort` is everything the controller (layercache.controller.controller) and its parts
ask of the apiserver besides kopf's own watches; `layercache.controller.kube.KubeApi`
implements it on the official client, and the in-memory twin of the unit tests
(tests/twins/operator_kube.py) with dicts. `ImageRegistry` resolves one image for one
platform with the cache's credentials; `layercache.controller.resolver.RegistryImages`
implements it over `layercache.registry`. The calls are blocking (the controller runs
them in threads); `ImageRegistry`'s are async.

The values crossing the ports (`ClusterNode`, `PodImages`) are declared here, with them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from layercache.api.spec import LabelSelector
from layercache.api.warm import NodeWarmth
from layercache.oci.platform import Platform, parse_platform
from layercache.oci.reference import Reference
from layercache.oci.resolved import ResolvedImage
from layercache.registry.credentials import DockerConfig

__all__ = ["ClusterNode", "ImageLookup", "ImageRegistry", "KubePort", "PodImages",
           "SecretMissingError"]


class SecretMissingError(LookupError):
    """A referenced pull Secret does not exist or has no `.dockerconfigjson`."""


@dataclass(frozen=True)
class ClusterNode:
    """What planning needs of a Node: labels, scheduling taints, platform, conditions.

    Not the agent's `layercache.agent.nodeinfo.NodeInfo` (the agent's own node's facts,
    updated as it watches it): this is one Node of the cluster as the operator lists it.
    """

    name: str
    labels: Mapping[str, str]
    taints: list[Mapping[str, Any]] = field(default_factory=list)
    platform: Platform = field(default_factory=lambda: Platform("linux", "amd64"))
    disk_pressure: bool = False
    unschedulable: bool = False

    @property
    def os_arch(self) -> Platform:
        """The node's platform as images are resolved and planned for it: OS/architecture."""
        return parse_platform(f"{self.platform.os}/{self.platform.architecture}")


@dataclass(frozen=True)
class PodImages:
    """The images of one Pod and where the kubelet would find credentials for them.

    ``pull_secrets`` are the Pod's ``spec.imagePullSecrets`` names, ``service_account`` its
    ``spec.serviceAccountName`` (whose ``imagePullSecrets`` count too), all in ``namespace``.
    """

    namespace: str
    name: str
    images: tuple[str, ...]
    pull_secrets: tuple[str, ...]
    service_account: str


class KubePort(Protocol):
    """The operator's Kubernetes calls (blocking). Objects are the API's camelCase dicts.

    Errors are the client's (`kubernetes.client.exceptions.ApiException`) unless a method
    says otherwise; a twin raises the same for the same cases (404 on a missing object).
    """

    def nodes(self) -> list[ClusterNode]:
        """Every Node."""
        ...

    def node_warmth(self) -> list[NodeWarmth | str]:
        """Every Node as `NodeWarmth`; the name (or "?") of one that cannot be read as such."""
        ...

    def patch_node(self, name: str, patch: dict[str, Any]) -> None:
        """JSON merge patch (RFC 7386) Node `name`."""
        ...

    def layer_cache_keys(self) -> set[str]:
        """"namespace/name" of every LayerCache in the cluster."""
        ...

    def node_layer_caches(self) -> dict[str, dict[str, Any]]:
        """Every NodeLayerCache by name (with metadata.generation, spec, status)."""
        ...

    def list_node_caches(self) -> tuple[list[dict[str, Any]], str]:
        """Every NodeLayerCache and the list's resourceVersion (where a watch starts)."""
        ...

    def watch_node_caches(self, resource_version: str) -> Iterator[tuple[str, Any]]:
        """NodeLayerCache events after ``resource_version``: (type, object), blocking.

        Types are ADDED, MODIFIED, DELETED and BOOKMARK (an object with only
        ``metadata.resourceVersion``); the iterator ends when the server ends the watch.
        Raises `ApiException` with status 410 when ``resource_version`` is too old.
        """
        ...

    def write_node_spec(self, exists: bool, name: str, spec: dict[str, Any]) -> int:
        """Create NodeLayerCache `name` with `spec` (``exists`` False), or patch its spec.

        Returns the object's ``metadata.generation`` after the write (what an agent must
        observe before its status speaks for `spec`). The caller writes only a spec that
        differs from the stored one (the replanner compares spec records).
        """
        ...

    def delete_node_cache(self, name: str) -> None:
        """Delete NodeLayerCache `name` (gone already is fine)."""
        ...

    def patch_cache_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch LayerCache `namespace/name`'s status (404 when it is gone)."""
        ...

    def post_event(self, namespace: str, name: str, uid: str, reason: str, message: str,
                   event_type: str = "Normal") -> None:
        """Post a core/v1 Event about LayerCache `namespace/name`."""
        ...

    def docker_config(self, namespace: str, name: str) -> str:
        """The `.dockerconfigjson` of Secret `namespace/name` (JSON text).

        Raises:
            SecretMissingError: no such Secret, or none of that type.
        """
        ...

    def write_secret(self, namespace: str, name: str, data: Mapping[str, str],
                     secret_type: str = "Opaque") -> None:  # noqa: S107 - a type
        """Create or replace Secret `namespace/name` with string `data`."""
        ...

    def ensure_peer_token(self, namespace: str, name: str) -> None:
        """Create the agents' shared peer token Secret unless it exists."""
        ...

    def pods(self, namespaces: list[str], selector: LabelSelector) -> list[PodImages]:
        """The Pods in `namespaces` that `selector` selects."""
        ...

    def service_account_pull_secrets(self, namespace: str, name: str) -> list[str]:
        """The ``imagePullSecrets`` names of ServiceAccount `namespace/name` ([] if absent)."""
        ...


#: Resolve one image: (reference, platform, Docker configs to try in order, the previous
#: resolution of the same reference and platform or None) → the image. Raises
#: `layercache.registry.errors.RegistryError` (`TransientError` for a retryable failure).
ImageLookup = Callable[[Reference, Platform, Sequence[DockerConfig], ResolvedImage | None],
                       Awaitable[ResolvedImage]]


class ImageRegistry(Protocol):
    """Where images are resolved: one session (`lookups`) per resolution of a cache."""

    def lookups(self) -> AbstractAsyncContextManager[ImageLookup]:
        """A session whose `ImageLookup` resolves images until it is closed."""
        ...
