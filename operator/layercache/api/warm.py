"""Pure: the warm-node signal — which Nodes hold their set, and the Node patches that say so.

A node is *warm* when its NodeLayerCache says its agent holds every blob and every chain
its caches want there: the agent observed the current spec (``observedGeneration``), its
``Ready`` condition is True, it holds all of ``spec.layers`` (at least one: a node with
nothing to hold — a budget of 0, an image that does not resolve — is never warm), and it
has unpacked every wanted chain (``status.chains.unpacked`` ≥ the chains of ``spec.chains``
and ``status.chains.wanted``; none wanted when both are absent).

The operator then labels the Node `WARM_LABEL` ``=true`` (and removes the label when the
node stops being warm), so workloads can prefer or require warm nodes. A node may also
carry the opt-in startup taint `WARMING_TAINT` (``NoSchedule``), put there by whoever
creates it (a node pool's or cluster autoscaler's node template, the kubelet's
``--register-with-taints``): the operator removes the taint once the node is warm, or once
the node is older than the deadline (``LAYERCACHE_WARMING_DEADLINE_SECONDS``), so pods are
never blocked on layercache for ever. Planning ignores this taint (the node is tainted to
wait for us), and the agent DaemonSet tolerates every taint. docs/warm-nodes.md.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["WARMING_TAINT", "WARM_LABEL", "NodeWarmth", "is_warm", "warm_patch", "warm_status"]

#: Label the operator puts on warm Nodes (value ``true``) and removes from the others.
WARM_LABEL: Final = "layercache.dev/warm"
#: Key of the opt-in startup taint (effect ``NoSchedule``) removed once warm or at the deadline.
WARMING_TAINT: Final = "layercache.dev/warming"


def is_warm(obj: Mapping[str, Any] | None) -> bool:
    """Whether a NodeLayerCache (raw dict; None: none exists) says its node is warm.

    Never raises on a malformed object: what cannot be read is not warm.
    """
    if not obj:
        return False
    try:
        spec = obj.get("spec") or {}
        return warm_status(obj.get("metadata") or {}, obj.get("status") or {},
                           len(spec.get("layers") or ()), len(spec.get("chains") or ()))
    except (AttributeError, TypeError, ValueError):
        return False


def warm_status(metadata: Mapping[str, Any], status: Mapping[str, Any], layers_wanted: int,
                chains_wanted: int) -> bool:
    """`is_warm` of an object whose spec lists this many layers and chains.

    The operator's index keeps those counts, not the spec. Never raises on a malformed
    ``metadata`` or ``status``: what cannot be read is not warm.
    """
    try:
        if status.get("observedGeneration") != metadata.get("generation"):
            return False
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or ())
        layers = status.get("layers") or {}
        chains = status.get("chains") or {}
        chains_wanted = max(chains_wanted, int(chains.get("wanted") or 0))
        return (ready and layers_wanted > 0 and int(layers.get("held") or 0) >= layers_wanted
                and not status.get("missing")
                and int(chains.get("unpacked") or 0) >= chains_wanted)
    except (AttributeError, TypeError, ValueError):
        return False


@dataclass(frozen=True)
class NodeWarmth:
    """What the signal needs of a Node: name, labels, taints, creation time, version."""

    name: str
    labels: Mapping[str, str]
    taints: Sequence[Mapping[str, Any]]
    created: datetime.datetime | None
    resource_version: str | None = None

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> NodeWarmth:
        """From a Node as the API returns it (raw JSON dict).

        Raises:
            ValueError: no ``metadata.name``.

        """
        metadata = node.get("metadata") or {}
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("Node without metadata.name")
        created = None
        stamp = metadata.get("creationTimestamp")
        if isinstance(stamp, str):
            try:
                created = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            except ValueError:
                created = None  # unreadable: treated as past its deadline
        taints = [t for t in (node.get("spec") or {}).get("taints") or ()
                  if isinstance(t, Mapping)]
        labels = metadata.get("labels") or {}
        return cls(name, dict(labels) if isinstance(labels, Mapping) else {}, taints,
                   created, metadata.get("resourceVersion"))

    @property
    def warming(self) -> bool:
        """Whether the Node carries the startup taint `WARMING_TAINT`."""
        return any(t.get("key") == WARMING_TAINT for t in self.taints)


def warm_patch(node: NodeWarmth, warm: bool, now: datetime.datetime,
               deadline_seconds: float) -> dict[str, Any] | None:
    """The JSON merge patch (RFC 7386) that makes ``node`` say ``warm``; None: none needed.

    Sets or removes `WARM_LABEL`; removes `WARMING_TAINT` (every effect) when ``warm`` or
    when the node is ``deadline_seconds`` old (a node without a readable creation time
    counts as old). A taint change replaces ``spec.taints`` whole, so the patch carries
    ``metadata.resourceVersion``: a Node changed meanwhile fails it with 409 Conflict
    instead of losing another's taint.
    """
    patch: dict[str, Any] = {}
    labelled = node.labels.get(WARM_LABEL) == "true"
    if warm and not labelled:
        patch["metadata"] = {"labels": {WARM_LABEL: "true"}}
    elif not warm and WARM_LABEL in node.labels:
        patch["metadata"] = {"labels": {WARM_LABEL: None}}
    if node.warming:
        expired = (node.created is None
                   or (now - node.created).total_seconds() >= deadline_seconds)
        if warm or expired:
            if node.resource_version:
                patch.setdefault("metadata", {})["resourceVersion"] = node.resource_version
            patch["spec"] = {"taints": [dict(t) for t in node.taints
                                        if t.get("key") != WARMING_TAINT]}
    return patch or None
