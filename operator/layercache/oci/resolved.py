"""One image reference resolved for one platform: manifest, config and every layer.

What `layercache.registry.resolve.resolve` returns and the operator keeps per cache
(`layercache.controller.state.CacheState.resolved`), written to status and node specs.
Not the planner's input: `plan_input` makes that, a `layercache.oci.image.PlanImage`,
which holds only the layers to plan (foreign ones left out) and what planning needs
(node selector, the unpackable prefix). Two names for two things: a resolution is what
the registry said, a `PlanImage` what the planner is asked to place.
"""

from __future__ import annotations

from dataclasses import dataclass

from layercache.oci.digest import Digest
from layercache.oci.image import Layer, PlanImage
from layercache.oci.mediatypes import layer_type
from layercache.oci.platform import Platform
from layercache.oci.reference import Reference

__all__ = ["ResolvedImage"]


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """An image reference resolved for one platform.

    Attributes:
        reference: the reference as asked for (normalised).
        digest: what the reference points at (the index's digest for a multi-platform
            image, else the manifest's) — pin to this to get the same image again.
        media_type: that document's media type.
        platform: the (node) platform it was resolved for.
        manifest_platform: the platform the chosen manifest declares (its index entry, else
            its config; ``platform`` when the config states none). It may differ from
            ``platform`` but runs on it (``linux/386`` on ``linux/amd64``).
        manifest_digest, manifest_media_type, manifest_size: the platform's image manifest
            (size in bytes).
        config_digest, config_size, config_media_type: its config blob (size in bytes).
        layers: base layer first; each with blob digest, compressed size in bytes, media
            type and diff ID — the planner's `Layer`.

    """

    reference: Reference
    digest: Digest
    media_type: str
    platform: Platform
    manifest_platform: Platform
    manifest_digest: Digest
    manifest_media_type: str
    manifest_size: int
    config_digest: Digest
    config_size: int
    config_media_type: str
    layers: tuple[Layer, ...]

    @property
    def pinned(self) -> Reference:
        """The reference pinned to `digest`."""
        return self.reference.with_digest(self.digest)

    @property
    def layer_bytes(self) -> int:
        """Compressed bytes of all layers."""
        return sum(layer.size for layer in self.layers)

    @property
    def non_distributable(self) -> tuple[Layer, ...]:
        """Foreign / non-distributable layers: reported, never fetched by us."""
        return tuple(
            layer
            for layer in self.layers
            if (kind := layer_type(layer.media_type)) is not None and not kind.distributable
        )

    @property
    def distributable(self) -> tuple[Layer, ...]:
        """The layers we fetch and plan: all but the `non_distributable` ones, in order."""
        foreign = set(self.non_distributable)
        return tuple(layer for layer in self.layers if layer not in foreign)

    def plan_input(self, node_selector: dict[str, str] | None = None) -> PlanImage:
        """This image as the planner's input, for nodes of `platform`.

        Only the `distributable` layers: a foreign layer is the runtime's to fetch from its
        ``urls``, never planned, and its chain and those above it are not unpacked (the
        first foreign layer ends ``unpackable``). ``node_selector`` (label → value) narrows
        the nodes it targets; None: all of them.
        """
        foreign = self.non_distributable
        return PlanImage(
            reference=str(self.reference),
            platform=self.platform,
            manifest_digest=self.manifest_digest,
            layers=self.distributable,
            node_selector=node_selector or {},
            unpackable=self.layers.index(foreign[0]) if foreign else None,
        )
