"""The Docker-less product image: built (cached), pushed to the bed, pulled and run on a node.

The build is `testbed.product_image.build_image()`: a cold cache costs minutes (mmdebstrap
and the downloads, see that module), a warm one seconds. The run is a real container:
`crictl pull` through a bed node's CRI, then `ctr run` of that image with runc on the same
containerd, as the image's own user (65532).
"""

from __future__ import annotations

import json
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import cri
from testbed.bed import BedState
from testbed.image_build import read_json_blob
from testbed.nodes import SimNode
from testbed.product_image import (
    DEFAULT_REFERENCE,
    ENTRYPOINT,
    ENV,
    LABELS,
    USER,
    VENV,
    BuiltImage,
    push_image,
)

pytestmark = pytest.mark.integration


def manifest_and_config(image: BuiltImage) -> tuple[dict[str, Any], dict[str, Any]]:
    index = json.loads((image.layout / "index.json").read_text())
    (entry,) = index["manifests"]
    manifest = read_json_blob(image.layout, entry["digest"])
    return manifest, read_json_blob(image.layout, manifest["config"]["digest"])


def layer_members(image: BuiltImage) -> Iterator[list[str]]:
    manifest, _ = manifest_and_config(image)
    for layer in manifest["layers"]:
        path = image.layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        with tarfile.open(path) as archive:
            yield [name.removeprefix("./") for name in archive.getnames()]


def test_config_names_the_entry_point_user_env_and_labels(built: BuiltImage) -> None:
    manifest, config = manifest_and_config(built)
    assert built.tag == DEFAULT_REFERENCE.rsplit(":", 1)[1]
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["config"]["Entrypoint"] == [ENTRYPOINT]
    assert config["config"]["User"] == USER
    assert config["config"]["Env"] == list(ENV)
    labels = config["config"]["Labels"]
    assert LABELS.items() <= labels.items()
    assert labels["org.opencontainers.image.version"] == built.tag
    # Two layers: Debian + python3 (cached base), then only the venv.
    sizes = [layer["size"] for layer in manifest["layers"]]
    assert tuple(sizes) == built.layer_sizes
    assert len(sizes) == 2


def test_layers_hold_no_build_tools_or_caches(built: BuiltImage) -> None:
    base, app = layer_members(built)
    assert "usr/bin/python3.11" in base
    assert not [n for n in base if n.startswith("var/lib/apt/lists/") and n.endswith("Packages")]
    assert not [n for n in base if n.startswith(("usr/bin/gcc", "usr/bin/cc", "usr/share/man/"))]
    site = f"{VENV.lstrip('/')}/lib/python3.11/site-packages"
    assert f"{VENV.lstrip('/')}/bin/layercache" in app
    assert f"{site}/layercache/cli/main.py" in app
    # No pip, no caches, no wheels left from the install; only the venv changed.
    assert not [n for n in app if n.startswith((f"{site}/pip/", f"{site}/setuptools/"))]
    assert not [n for n in app if "/.cache/" in n or n.endswith(".whl")]
    assert {n.split("/")[0] for n in app} <= {"opt", "tmp"}
    # The test bed (tests/pyproject.toml: testbed, twins) belongs to the dev venv only.
    bed = (f"{site}/testbed/", f"{site}/twins/", f"{site}/layercache_testbed")
    assert not [n for n in app if n.startswith(bed)]


@pytest.fixture
def node(bed: BedState) -> SimNode:
    record = bed.nodes[0]
    return SimNode(record.name, Path(record.workdir))


def test_pushed_image_pulls_and_runs_on_a_node(bed: BedState, built: BuiltImage,
                                               node: SimNode) -> None:
    repository = DEFAULT_REFERENCE.split("/", 1)[1]
    reference = f"{bed.registries['plain'].host}/{repository}"
    digest = push_image(built, reference, tls_verify=False)
    assert digest == built.manifest_digest

    image_id = cri.pull(node.socket, reference)
    _, config = manifest_and_config(built)
    listed = {image["id"]: image for image in cri.images(node.socket)}
    assert image_id == built.config_digest
    assert f"{reference.rsplit(':', 1)[0]}@{digest}" in listed[image_id]["repoDigests"]
    assert config["config"]["User"] == USER

    # A real container of that image (runc through the node's containerd), as 65532.
    container = f"layercache-image-{uuid.uuid4().hex[:8]}"
    output = node.ctr("run", "--rm", reference, container, ENTRYPOINT, "--help")
    assert "operator" in output
    assert "agent" in output
    whoami = node.ctr("run", "--rm", reference, container, f"{VENV}/bin/python", "-c",
                      "import os, layercache; print(os.getuid(), os.getgid(), layercache.__file__)")
    uid, gid, module = whoami.split()
    assert f"{uid}:{gid}" == USER
    assert module.startswith(f"{VENV}/lib/python3.11/site-packages/layercache/")
