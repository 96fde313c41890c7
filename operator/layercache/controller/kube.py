"""The operator's Kubernetes API calls (everything outside kopf's own watches).

Blocking calls on the official client; the operator runs them in threads
(`asyncio.to_thread`). `NodeLayerCache.spec` is written only when it differs from what is
stored, so an unchanged plan costs one list and no writes.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from layercache.api import API_VERSION, GROUP, LC_KIND, LC_PLURAL, NLC_KIND, NLC_PLURAL, VERSION
from layercache.api.spec import LabelSelector
from layercache.api.warm import NodeWarmth
from layercache.controller.ports import ClusterNode, PodImages, SecretMissingError
from layercache.oci.platform import Platform

__all__ = ["ClusterNode", "KubeApi", "PodImages", "SecretMissingError"]

#: Label on objects the operator creates, for cleanup and RBAC-friendly selection.
MANAGED_BY = {"app.kubernetes.io/managed-by": "layercache"}
#: Seconds the apiserver keeps one NodeLayerCache watch open before the next one starts.
WATCH_TIMEOUT_SECONDS = 60


class KubeApi:
    """The operator's `KubePort` (layercache.controller.ports) on one `ApiClient`."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _dict(self, obj: object) -> Any:
        # The client's models as the API's own camelCase JSON: plain data, simply typed.
        return self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]

    def nodes(self) -> list[ClusterNode]:
        """Every Node, as `ClusterNode`."""
        result = []
        # The raw JSON: building the client's V1Node models for 1,000 nodes (and turning
        # them back into dicts) cost seconds of CPU per replan.
        response: Any = self.core.list_node(_preload_content=False)
        for node in json.loads(response.data)["items"]:
            labels = node["metadata"].get("labels") or {}
            spec, status = node.get("spec") or {}, node.get("status") or {}
            conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
            platform = Platform(labels.get("kubernetes.io/os", "linux"),
                                labels.get("kubernetes.io/arch", "amd64"))
            result.append(ClusterNode(node["metadata"]["name"], labels, spec.get("taints") or [],
                                   platform, conditions.get("DiskPressure") == "True",
                                   bool(spec.get("unschedulable"))))
        return result

    def node_warmth(self) -> list[NodeWarmth | str]:
        """Every Node as `NodeWarmth`; the name (or "?") of one that cannot be read as such."""
        response: Any = self.core.list_node(_preload_content=False)
        found: list[NodeWarmth | str] = []
        for node in json.loads(response.data)["items"]:
            try:
                found.append(NodeWarmth.from_node(node))
            except (ValueError, TypeError, AttributeError):
                found.append(str(((node or {}).get("metadata") or {}).get("name") or "?"))
        return found

    def patch_node(self, name: str, patch: dict[str, Any]) -> None:
        """JSON merge patch (RFC 7386) Node `name`; 409 when its resourceVersion moved on."""
        self.core.patch_node(name, patch, _content_type="application/merge-patch+json")

    def layer_cache_keys(self) -> set[str]:
        """"namespace/name" of every LayerCache in the cluster."""
        return {f"{item['metadata']['namespace']}/{item['metadata']['name']}"
                for item in self.layer_caches()}

    def layer_caches(self) -> list[dict[str, Any]]:
        """Every LayerCache in the cluster (raw dicts: metadata, spec, status)."""
        listed: Any = self.custom.list_cluster_custom_object(GROUP, VERSION, LC_PLURAL)
        return list(listed["items"])

    def node_layer_caches(self) -> dict[str, dict[str, Any]]:
        """Every NodeLayerCache by name (raw dicts)."""
        listed: Any = self.custom.list_cluster_custom_object(GROUP, VERSION, NLC_PLURAL)
        return {item["metadata"]["name"]: item for item in listed["items"]}

    def list_node_caches(self) -> tuple[list[dict[str, Any]], str]:
        """Every NodeLayerCache (raw dicts) and the list's resourceVersion."""
        response: Any = self.custom.list_cluster_custom_object(
            GROUP, VERSION, NLC_PLURAL, _preload_content=False)
        listed = json.loads(response.data)
        return list(listed.get("items") or []), str(listed["metadata"]["resourceVersion"])

    def watch_node_caches(self, resource_version: str) -> Iterator[tuple[str, Any]]:
        """NodeLayerCache events after ``resource_version``, bookmarks included.

        Until the server ends the watch (`WATCH_TIMEOUT_SECONDS`); 410 Gone raises
        `ApiException`. Events are parsed as plain JSON, not the client's models (no deep copies, no
        round trip through `sanitize_for_serialization`).
        """
        stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
            self.custom.list_cluster_custom_object, GROUP, VERSION, NLC_PLURAL,
            resource_version=resource_version, allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_SECONDS, deserialize=False)
        for event in stream:
            if isinstance(event, dict):
                yield str(event.get("type")), event.get("object")

    def write_node_spec(self, exists: bool, name: str, spec: dict[str, Any]) -> int:
        """Create NodeLayerCache `name` with `spec` (``exists`` False), or patch its spec.

        Returns the object's ``metadata.generation`` as the apiserver answered the write.
        """
        written: Any
        if not exists:
            written = self.custom.create_cluster_custom_object(GROUP, VERSION, NLC_PLURAL, {
                "apiVersion": API_VERSION, "kind": NLC_KIND,
                "metadata": {"name": name, "labels": MANAGED_BY}, "spec": spec})
        else:
            # A JSON merge patch (RFC 7386) replaces arrays whole, and `spec` always carries
            # every key, so patching with the full spec leaves exactly `spec`.
            written = self.custom.patch_cluster_custom_object(GROUP, VERSION, NLC_PLURAL, name,
                                                              {"spec": spec})
        return int((written.get("metadata") or {}).get("generation") or 1)

    def delete_node_cache(self, name: str) -> None:
        """Delete NodeLayerCache `name` (gone already is fine)."""
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, NLC_PLURAL, name)
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_layer_cache(self, namespace: str, name: str) -> None:
        """Delete LayerCache `namespace/name` (gone already is fine); its finalizer waits."""
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, LC_PLURAL,
                                                        name)
        except ApiException as e:
            if e.status != 404:
                raise

    def patch_cache_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch LayerCache `namespace/name`'s status subresource."""
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, LC_PLURAL, name, {"status": status})

    def post_event(self, namespace: str, name: str, uid: str, reason: str, message: str,
                   event_type: str = "Normal") -> None:
        """Post a core/v1 Event about LayerCache `namespace/name` (outside kopf handlers)."""
        from layercache.api.conditions import now_iso

        now = now_iso()
        self.core.create_namespaced_event(namespace, {  # type: ignore[arg-type]
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": {"apiVersion": API_VERSION, "kind": LC_KIND,
                               "name": name, "namespace": namespace, "uid": uid},
            "reason": reason, "message": message[:1024], "type": event_type,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": "layercache-operator"}})

    def docker_config(self, namespace: str, name: str) -> str:
        """The `.dockerconfigjson` of Secret `namespace/name` (JSON text).

        Raises:
            SecretMissingError: no such Secret, or not of type kubernetes.io/dockerconfigjson.
        """
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                raise SecretMissingError(f"Secret {namespace}/{name} not found") from None
            raise
        raw = self._dict(secret)
        data = (raw.get("data") or {}).get(".dockerconfigjson")
        if data is None:
            raise SecretMissingError(
                f"Secret {namespace}/{name} has no .dockerconfigjson (type {raw.get('type')})")
        return base64.b64decode(data).decode()

    @staticmethod
    def _secret_body(namespace: str, name: str, data: Mapping[str, str],
                     secret_type: str) -> Any:
        return {"metadata": {"name": name, "namespace": namespace, "labels": MANAGED_BY},
                "type": secret_type,
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}

    def write_secret(self, namespace: str, name: str, data: Mapping[str, str],
                     secret_type: str = "Opaque") -> None:  # noqa: S107 - a type, not a password
        """Create or replace Secret `namespace/name` with string `data` (values are secret).

        A Secret's type cannot change: one of another type (a credentials Secret written
        by an older operator as kubernetes.io/dockerconfigjson) is deleted and recreated.
        """
        body = self._secret_body(namespace, name, data, secret_type)
        try:
            self.core.replace_namespaced_secret(name, namespace, body)
            return
        except ApiException as e:
            if e.status == 422:
                existing: Any = self.core.read_namespaced_secret(name, namespace)
                if existing.type == secret_type:
                    raise
                self.core.delete_namespaced_secret(name, namespace)
            elif e.status != 404:
                raise
        self.core.create_namespaced_secret(namespace, body)

    def ensure_peer_token(self, namespace: str, name: str) -> None:
        """Create the agents' shared peer token Secret unless it exists (never rotates it)."""
        try:
            self.core.read_namespaced_secret(name, namespace)
            return
        except ApiException as e:
            if e.status != 404:
                raise
        # Create only, never replace: two replicas starting together both see 404, and the
        # loser must keep the winner's token (409) rather than overwrite what agents read.
        body = self._secret_body(namespace, name, {"token": secrets.token_urlsafe(32)}, "Opaque")
        try:
            self.core.create_namespaced_secret(namespace, body)
        except ApiException as e:
            if e.status != 409:
                raise

    def pods(self, namespaces: list[str], selector: LabelSelector) -> list[PodImages]:
        """The Pods in `namespaces` that `selector` selects (evaluated by the apiserver).

        Images are those of init and regular containers, in spec order.
        """
        found = []
        for namespace in namespaces:
            response: Any = self.core.list_namespaced_pod(
                namespace, label_selector=selector.query(), _preload_content=False)
            for pod in json.loads(response.data)["items"]:
                spec = pod.get("spec") or {}
                containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
                found.append(PodImages(
                    namespace, pod["metadata"]["name"],
                    tuple(c["image"] for c in containers if c.get("image")),
                    tuple(s["name"] for s in spec.get("imagePullSecrets") or [] if s.get("name")),
                    spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"))
        return found

    def service_account_pull_secrets(self, namespace: str, name: str) -> list[str]:
        """The ``imagePullSecrets`` names of ServiceAccount `namespace/name` ([] if absent)."""
        try:
            account: Any = self.core.read_namespaced_service_account(
                name, namespace, _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return []
            raise
        raw = json.loads(account.data)
        return [s["name"] for s in raw.get("imagePullSecrets") or [] if s.get("name")]

