"""What the planner is given: one image resolved for one platform, and its layers.

The shared vocabulary of the resolver (`layercache.oci.resolved.ResolvedImage.plan_input`
builds these from what `layercache.registry.resolve` validated) and of the pure core
(`layercache.plan.planner`, `layercache.plan.layerorder`, `layercache.plan.chains` read
them). It sits below both, so neither imports the other for its data types. Frozen
dataclasses, not pydantic models: a plan has ~200,000 layers, where per-object validation
would cost more than the planning does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from layercache.oci.digest import Digest
from layercache.oci.platform import Platform

__all__ = ["Layer", "PlanImage"]


@dataclass(frozen=True, slots=True)
class Layer:
    """A layer descriptor from an image manifest.

    ``digest`` names the compressed blob; ``size`` is its compressed size in bytes (what a
    pull transfers and the content store keeps); ``diff_id`` is the digest of the
    uncompressed tar (from the image config), the input to chain IDs.
    """

    digest: Digest
    size: int
    media_type: str
    diff_id: Digest


@dataclass(frozen=True, slots=True)
class PlanImage:
    """The planner's input: one image resolved for one platform, its layers base first.

    Made by `layercache.oci.resolved.ResolvedImage.plan_input` (the full resolution, with
    every layer and the manifest's details): only the layers to plan, and what planning
    needs besides.

    ``platform`` is the node platform it was resolved for (the kubelet may run a compatible
    one, e.g. 386 on amd64). ``node_selector`` (label → value, all must match; empty = every
    node of the platform) lets caches with different node selectors share one plan.
    ``unpackable``: how many of ``layers``, from the base, form chains that can be unpacked
    (None: all); a foreign layer left out of ``layers`` ends the image's chains there.
    """

    reference: str
    platform: Platform
    manifest_digest: Digest
    layers: tuple[Layer, ...]
    node_selector: Mapping[str, str] = field(default_factory=dict)
    unpackable: int | None = None
