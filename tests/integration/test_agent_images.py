"""``mode: Images`` and upstream credentials, with one agent on one node.

An image whose layers the agent holds is pulled through CRI, which then fetches none of
them again; a layer behind a registry that wants basic authentication is fetched with
the credentials of the agent's dockerconfigjson Secret.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_agent_harness import (
    blob_path,
    held,
    installed,  # noqa: F401 - autouse fixture: CRDs, RBAC and Secrets for the module
    layer_entry,
    one_agent,
    status,
    stored_sha256,
    wait_ready,
)

from layercache.containerd.cri import CRIImages
from testbed.bed import BedState
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube

pytestmark = pytest.mark.integration



async def _image_status(socket: str, reference: str) -> bool:
    async with CRIImages(socket) as cri:
        return await cri.status(reference) is not None


def test_images_mode_pulls_through_cri_once_the_layers_are_held(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    node = bed.nodes[1]
    image = family.images["app-curl"]
    layers = family.image_layers("app-curl")
    reference = f"{proxy.host}/{image.repository}@{image.manifest_digest}"
    entries = [layer_entry(family, proxy.host, layer, "Upstream") for layer in layers]
    env = {"LAYERCACHE_INSECURE_REGISTRIES": proxy.host}
    with one_agent(kube, node, entries, tmp_path, env, images=[reference]) as agent:
        found = wait_ready(kube, agent, 240)
        assert found["layers"]["held"] == len(layers)
        assert asyncio.run(_image_status(node.socket, reference))
        stats = proxy.stats()
        # The agent fetched each layer once; CRI's pull found them all and fetched none.
        for layer in layers:
            path = blob_path(family, layer.digest)
            assert stats.bytes_by_path[path] == layer.size
            assert stats.count(path, "GET") == 1
        manifest = image.resolve()
        config = f"/v2/{image.repository}/blobs/{manifest.config_digest}"
        assert stats.count(config, "GET", 200) >= 1  # the pull (and our resolution) read it
        assert stats.blob_bytes == (sum(layer.size for layer in layers)
                                    + stats.bytes_by_path[config])


def test_images_mode_takes_the_layers_from_the_spec_and_resolves_nothing(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    # The operator resolved the image already: spec.images[].layers names its layers (as
    # indexes into spec.layers), so the agent reads no manifest body and no config; it
    # asks the registry only which credentials it accepts (a manifest HEAD).
    node = bed.nodes[1]
    image = family.images["app-curl"]
    layers = family.image_layers("app-curl")
    reference = f"{proxy.host}/{image.repository}@{image.manifest_digest}"
    entries = [layer_entry(family, proxy.host, layer, "Upstream") for layer in layers]
    env = {"LAYERCACHE_INSECURE_REGISTRIES": proxy.host}
    item = {"reference": reference, "layers": list(range(len(layers)))}
    with one_agent(kube, node, entries, tmp_path, env, images=[item]) as agent:
        found = wait_ready(kube, agent, 240)
        assert found["layers"]["held"] == len(layers)
        assert asyncio.run(_image_status(node.socket, reference))
        stats = proxy.stats()
        config = f"/v2/{image.repository}/blobs/{image.resolve().config_digest}"
        manifest = f"/v2/{image.repository}/manifests/{image.manifest_digest}"
        assert stats.count(config, "GET", 200) == 1, stats.bytes_by_path  # CRI's pull only
        assert stats.count(manifest, "HEAD") >= 1  # our credential check, and the pull's
        for layer in layers:
            assert stats.count(blob_path(family, layer.digest), "GET") == 1


def test_upstream_credentials_come_from_the_registry_secret(
    bed: BedState, kube: Kube, family: Family, tmp_path: Path
) -> None:
    node = bed.nodes[2]
    basic = bed.registries["basic"]
    layer = family.image_layers("app-web")[-1]
    entry = layer_entry(family, basic.host, layer, "Upstream")
    env = {"LAYERCACHE_INSECURE_REGISTRIES": basic.host}
    with one_agent(kube, node, [entry], tmp_path, env) as agent:
        found = wait_ready(kube, agent, 120)
        assert found["bytes"]["upstream"] == layer.size
        assert held(node.socket)[layer.digest] == layer.size
        assert stored_sha256(node.socket, layer.digest) == layer.digest
        assert not any(e["reason"].startswith("Upstream") for e in status(kube, node.name)
                       .get("errors") or ())
