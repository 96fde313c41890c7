"""Foreign / non-distributable layers: never planned, listed once in status, never block Ready."""

from __future__ import annotations

from typing import Any

from layercache.controller.state import CacheState
from layercache.controller.status import cache_status
from layercache.oci.digest import Digest
from layercache.oci.platform import Platform
from layercache.oci.reference import parse_reference
from layercache.plan.planner import Layer, Node, plan
from layercache.registry.resolve import ResolvedImage

FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
AMD64 = Platform("linux", "amd64")


def _layer(name: str, media_type: str = GZIP) -> Layer:
    return Layer(Digest.from_bytes(name.encode()), 100, media_type,
                 Digest.from_bytes(f"diff {name}".encode()))


BASE = _layer("windows base", FOREIGN)
APP = _layer("app")


def _image() -> ResolvedImage:
    manifest = Digest.from_bytes(b"manifest")
    return ResolvedImage(
        reference=parse_reference("reg.example/win/app:1"), digest=manifest,
        media_type="application/vnd.docker.distribution.manifest.v2+json",
        platform=AMD64, manifest_platform=AMD64, manifest_digest=manifest,
        manifest_media_type="application/vnd.docker.distribution.manifest.v2+json",
        manifest_size=500, config_digest=Digest.from_bytes(b"config"), config_size=50,
        config_media_type="application/vnd.docker.container.image.v1+json",
        layers=(BASE, APP))


def test_foreign_layers_are_not_planned() -> None:
    image = _image()
    assert image.non_distributable == (BASE,)
    assert image.distributable == (APP,)
    result = plan([image.plan_input()], [Node("n", AMD64)])
    assert list(result.nodes["n"].layers) == [APP]
    assert BASE.digest not in result.shared_by


def _ready_node() -> dict[str, Any]:
    return {"metadata": {"generation": 1},
            "status": {"observedGeneration": 1,
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def test_status_lists_foreign_layers_and_stays_ready() -> None:
    state = CacheState(namespace="ns", name="c", generation=1, desired_nodes=("n",),
                       planned=True, resolved=[_image(), _image()])
    status = cache_status(state, {"n": _ready_node()})
    assert status["nonDistributableLayers"] == [
        {"image": "reg.example/win/app:1", "digest": str(BASE.digest), "mediaType": FOREIGN}]
    kinds = {c["type"]: c for c in status["conditions"]}
    assert (kinds["Ready"]["status"], kinds["Degraded"]["status"]) == ("True", "False")
