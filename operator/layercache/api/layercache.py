"""``LayerCache`` status, written by the operator (`layercache.controller.status.cache_status`).

The spec is the user's and is parsed and checked by `layercache.api.spec.parse_spec` into a
`layercache.api.spec.CacheSpec` (re-exported here); the status is read back by the operator
after a restart (byte counters, reported foreign layers), by its metrics at scrape time
and by ``layercache status``. Field meanings: manifests/crds/layercache.dev_layercaches.yaml.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from layercache.api.model import Condition, InvalidObjectError, WireModel
from layercache.api.nodelayercache import ChainCounts, DiskFigures
from layercache.api.spec import CacheSpec, InvalidSpecError, parse_spec

log = logging.getLogger(__name__)

__all__ = [
    "CacheBytes",
    "CacheChains",
    "CacheSpec",
    "FailingNode",
    "ForeignLayer",
    "ImageStatus",
    "InvalidSpecError",
    "LayerCacheStatus",
    "LayerTotals",
    "NodeCounts",
    "parse_spec",
]


class ImageStatus(WireModel):
    """``status.images[]``: an image, and the digest it resolved to or why it did not."""

    reference: str
    digest: str | None = None
    platform: str = ""
    layers: int | None = None
    error: str | None = None


class LayerTotals(WireModel):
    """``status.layers``: layer counts of the plan."""

    total: int = 0
    shared: int = 0
    skipped_for_budget: int = 0


class CacheChains(ChainCounts):
    """``status.chains``: chains planned and skipped, and the nodes' counts summed."""

    planned: int = 0
    skipped_for_budget: int = 0


class CacheBytes(WireModel):
    """``status.bytes``: the savings figures (compressed blob bytes)."""

    unique: int = 0
    naive: int = 0
    expected_upstream: int = 0
    upstream: int = 0
    peer: int = 0
    saved: int = 0
    saved_human: str = ""


class FailingNode(WireModel):
    """``status.nodes.failing[]``: a node not ready, and why."""

    name: str
    reason: str
    message: str = ""


class NodeCounts(WireModel):
    """``status.nodes``: nodes selected, ready, and up to 20 failing."""

    desired: int = 0
    ready: int = 0
    summary: str = ""
    failing: list[FailingNode] = Field(default_factory=list)


class ForeignLayer(WireModel):
    """``status.nonDistributableLayers[]``: a layer left to the runtime."""

    image: str
    digest: str
    media_type: str = ""


class LayerCacheStatus(WireModel):
    """``status`` of a LayerCache. An invalid spec's status has only the first three."""

    observed_generation: int | None = None
    reason: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    images: list[ImageStatus] = Field(default_factory=list)
    layers: LayerTotals = LayerTotals()
    chains: CacheChains = CacheChains()
    bytes: CacheBytes = CacheBytes()
    nodes: NodeCounts = NodeCounts()
    disk: DiskFigures = DiskFigures()
    last_resolved: str | None = None
    non_distributable_layers: list[ForeignLayer] = Field(default_factory=list)

    @classmethod
    def of(cls, obj: Mapping[str, Any] | None) -> LayerCacheStatus:
        """The status of LayerCache ``obj`` (a dict as listed), leniently.

        For readers of many objects (``layercache status``): an unreadable status
        (`InvalidObjectError`, logged with the object and the field) reads as empty.
        """
        if not obj:
            return cls()
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        try:
            return cls.from_dict(obj.get("status"), "LayerCache", key, "status")
        except InvalidObjectError as error:
            log.warning("%s; read as no status", error)
            return cls()

    def condition(self, kind: str) -> Condition | None:
        """The condition of type ``kind``, if any."""
        return next((c for c in self.conditions if c.type == kind), None)
