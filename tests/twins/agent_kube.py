"""An in-memory twin of the agent's Kubernetes port (`layercache.agent.ports.AgentKubePort`).

NodeLayerCaches by name, the Node and the Secrets in dicts, with the apiserver's rules the
agent depends on: every write bumps ``metadata.resourceVersion``; a spec change bumps
``metadata.generation`` and a status patch does not; a status patch is a JSON merge patch
(RFC 7386) of the status subresource and raises ``ApiException(404)`` when the object is
gone; a watch of the own object delivers its current version when started and every change
after (status patches included, as the apiserver's watch does), None when it is deleted.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from layercache.agent.ports import Obj, OnObject

__all__ = ["AgentKubeTwin", "merge_patch"]


def merge_patch(target: Any, patch: Any) -> Any:
    """``patch`` applied to ``target`` as a JSON merge patch (RFC 7386); a new value."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


class _Watch:
    """One watch of the own object: deliveries go through the event loop, as the real one's."""

    def __init__(self, twin: AgentKubeTwin, loop: asyncio.AbstractEventLoop,
                 on_change: OnObject) -> None:
        self.twin = twin
        self.loop = loop
        self.on_change = on_change
        self.running = False

    def start(self) -> None:
        self.running = True
        self.twin.watches.append(self)
        self.deliver(self.twin.objects.get(self.twin.node))

    def stop(self) -> None:
        self.running = False
        if self in self.twin.watches:
            self.twin.watches.remove(self)

    def deliver(self, obj: Obj | None) -> None:
        if self.running:
            self.loop.call_soon(self.on_change, copy.deepcopy(obj))


class AgentKubeTwin:
    """The agent's Kubernetes API for node ``node`` (see the module docstring).

    ``patches`` records every status body patched, in order; ``objects`` holds the
    NodeLayerCaches by name, ``node_object`` the Node, ``secrets`` each Secret's data.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.objects: dict[str, Obj] = {}
        self.node_object: Obj | None = {"metadata": {"name": node}, "status": {}}
        self.secrets: dict[str, dict[str, str]] = {}
        self.patches: list[dict[str, Any]] = []
        self.watches: list[_Watch] = []
        self.closed = False
        self._version = 0

    def _bump(self) -> str:
        self._version += 1
        return str(self._version)

    def put(self, obj: Obj) -> Obj:
        """Create or replace a NodeLayerCache (its status kept unless ``obj`` has one)."""
        name = obj["metadata"]["name"]
        before = self.objects.get(name)
        stored = copy.deepcopy(obj)
        meta = stored["metadata"]
        generation = (before or {}).get("metadata", {}).get("generation", 0)
        if before is None or before.get("spec") != stored.get("spec"):
            generation += 1
        meta["generation"] = generation
        meta["resourceVersion"] = self._bump()
        if "status" not in stored and before is not None and "status" in before:
            stored["status"] = before["status"]
        self.objects[name] = stored
        self._changed(name)
        return copy.deepcopy(stored)

    def delete(self, name: str) -> None:
        """Delete a NodeLayerCache (watchers of it get None)."""
        self.objects.pop(name)
        self._bump()
        self._changed(name)

    def status(self, name: str | None = None) -> dict[str, Any]:
        """The status of NodeLayerCache ``name`` (default: the own one); {} when none."""
        found: dict[str, Any] = self.objects.get(name or self.node, {}).get("status") or {}
        return found

    def _changed(self, name: str) -> None:
        if name == self.node:
            for watch in list(self.watches):
                watch.deliver(self.objects.get(name))

    def list_own(self) -> tuple[Obj | None, str]:
        """This node's NodeLayerCache (a copy) and the list's resourceVersion."""
        return copy.deepcopy(self.objects.get(self.node)), str(self._version)

    def watch_own(self, loop: asyncio.AbstractEventLoop, on_change: OnObject) -> _Watch:
        """A watch (not started) of this node's NodeLayerCache."""
        return _Watch(self, loop, on_change)

    async def get_cache(self, node: str) -> Obj | None:
        """The NodeLayerCache of ``node`` (a copy), or None."""
        return copy.deepcopy(self.objects.get(node))

    async def patch_status(self, status: Mapping[str, Any]) -> None:
        """Merge-patch the own status; `ApiException` 404 when the object is gone."""
        obj = self.objects.get(self.node)
        if obj is None:
            raise ApiException(status=404, reason="Not Found")
        self.patches.append(copy.deepcopy(dict(status)))
        obj["status"] = merge_patch(obj.get("status") or {}, dict(status))
        obj["metadata"]["resourceVersion"] = self._bump()
        self._changed(self.node)

    async def get_node(self) -> Obj | None:
        """The Node object (a copy), or None."""
        return copy.deepcopy(self.node_object)

    async def read_secret(self, name: str) -> dict[str, str] | None:
        """Secret ``name``'s data, or None when absent."""
        data = self.secrets.get(name)
        return dict(data) if data is not None else None

    def close(self) -> None:
        """Mark closed."""
        self.closed = True
