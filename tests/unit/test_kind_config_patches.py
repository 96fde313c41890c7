"""kind-config.yaml as data: the nodes the docs promise and containerd patches that parse.

kind's own loader runs over the same file in tests/integration/test_kind_config.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "kind-config.yaml"
SAMPLE = REPO / "manifests" / "samples" / "layercache.yaml"
NODE_IMAGE = re.compile(r"^kindest/node:v1\.\d+\.\d+@sha256:[0-9a-f]{64}$")
CERTS_D = "/etc/containerd/certs.d"
#: Where each containerd config version keeps the two settings (containerd docs/cri/config.md).
IMAGES_SECTION = {
    2: ("io.containerd.grpc.v1.cri", "containerd"),
    3: ("io.containerd.cri.v1.images",),
}
REGISTRY_SECTION = {
    2: ("io.containerd.grpc.v1.cri", "registry"),
    3: ("io.containerd.cri.v1.images", "registry"),
}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    return loaded


def _dig(table: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        table = table[key]
    return table


def test_one_control_plane_and_three_workers(config: dict[str, Any]) -> None:
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    roles = [node["role"] for node in config["nodes"]]
    assert roles == ["control-plane", "worker", "worker", "worker"]


def test_two_workers_match_the_sample_node_selector(config: dict[str, Any]) -> None:
    # Issue 10: one warm worker meant a user never saw a peer transfer. Two do (one seeds
    # from upstream, the other fetches from it); the third worker stays unselected.
    selector = yaml.safe_load(SAMPLE.read_text())["spec"]["nodeSelector"]
    assert selector == {"layercache.dev/pool": "warm"}
    matching = [node for node in config["nodes"]
                if selector.items() <= node.get("labels", {}).items()]
    assert len(matching) == 2
    assert [node["role"] for node in matching] == ["worker", "worker"]


def test_every_node_pins_the_same_image_by_digest(config: dict[str, Any]) -> None:
    images = {node["image"] for node in config["nodes"]}
    assert len(images) == 1
    assert NODE_IMAGE.match(images.pop())


def test_containerd_patches_parse_as_toml_and_keep_layers(config: dict[str, Any]) -> None:
    patches = [tomllib.loads(text) for text in config["containerdConfigPatches"]]
    # kind applies a patch only to a node config of the same version: one patch for each
    # version a kind node image may ship (v0.33.0's is 2; containerd 2.x's native is 3).
    assert sorted(patch["version"] for patch in patches) == [2, 3]
    for patch in patches:
        version = patch["version"]
        images = _dig(patch["plugins"], IMAGES_SECTION[version])
        registry = _dig(patch["plugins"], REGISTRY_SECTION[version])
        assert images["discard_unpacked_layers"] is False
        assert registry["config_path"] == CERTS_D
        # Nothing else: a patch that also set, say, the snapshotter would surprise users.
        assert set(patch["plugins"]) == {IMAGES_SECTION[version][0]}

