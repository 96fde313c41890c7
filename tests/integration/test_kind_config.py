"""kind-config.yaml through kind's own loader and validation (the pinned kind v0.33.0 binary).

kind cannot create clusters here (no Docker), so `kind create cluster --config` runs with a
stand-in `docker` on PATH that answers the provider's health checks (`-v`, `info`, `ps`,
image `inspect`) and refuses the first call that would create something. Everything before
that is kind's real code: strict YAML decoding into v1alpha4 (unknown fields rejected),
defaulting, conversion, then `Config.Validate()` — only a config that passes all of it
makes kind print `Creating cluster` and ask the provider for its network. Broken copies
of the file show the same run rejects what it should.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.paths import REPO, tool

pytestmark = pytest.mark.integration

CONFIG = REPO / "kind-config.yaml"
TOOLS_MODULE = REPO / "tests" / "testbed" / "tools" / "kind"
#: The first provider call after validation (docker provider's ensureNetwork).
FIRST_PROVISIONING_CALL = "network ls"
_STUB = """#!/bin/sh
# Stand-in for the docker CLI: answers kind's provider checks, refuses to create anything.
printf '%s\\n' "$*" >> "$STUB_LOG"
case "$1" in
  -v) echo "Docker version 0.0.0, build layercache-stub"; exit 0 ;;
  info) echo '{INFO}'; exit 0 ;;
  ps) exit 0 ;;        # no node containers: the cluster does not exist yet
  inspect) exit 0 ;;   # the node image is "present", so kind does not try to pull it
esac
echo "layercache stub provider: refusing: docker $*" >&2
exit 125
""".replace("{INFO}", json.dumps({"CgroupDriver": "systemd", "CgroupVersion": "2",
                                  "MemoryLimit": True, "PidsLimit": True,
                                  "CPUShares": True, "SecurityOptions": []}))


@dataclass
class KindRun:
    returncode: int
    output: str
    provider_calls: list[str]


def kind_create(config: Path, workdir: Path) -> KindRun:
    """`kind create cluster --config CONFIG` against the stub provider; never a real cluster."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "docker"
    stub.write_text(_STUB)
    stub.chmod(0o755)
    log = workdir / "provider.log"
    log.write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(workdir), "STUB_LOG": str(log)}
    done = subprocess.run(
        [tool("kind"), "create", "cluster", "--config", config,
         "--kubeconfig", workdir / "kubeconfig"],
        capture_output=True, text=True, env=env, timeout=120, check=False)
    return KindRun(done.returncode, done.stdout + done.stderr, log.read_text().splitlines())


def broken_copy(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = CONFIG.read_text()
    assert text.count(old) >= 1, f"{old!r} not in kind-config.yaml"
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1))
    return path


def test_kind_loads_validates_and_starts_provisioning_ours(tmp_path: Path) -> None:
    run = kind_create(CONFIG, tmp_path)
    assert run.returncode != 0  # the stub refuses to provision: expected, nothing was created
    assert 'Creating cluster "layercache" ...' in run.output, run.output
    assert "layercache stub provider: refusing: docker network ls" in run.output
    # kind asked the provider for exactly the pinned node image (every node uses it).
    image = re.search(r"image: (kindest/node:\S+)", CONFIG.read_text())
    assert image is not None
    assert f"inspect --type=image {image.group(1)}" in run.provider_calls
    assert any(call.startswith(FIRST_PROVISIONING_CALL) for call in run.provider_calls)


@pytest.mark.parametrize(
    ("name", "old", "new", "error"),
    [
        # A typo'd field: kind decodes strictly, so it is an error, not silently ignored.
        ("typo-field.yaml", "  labels:\n", "  labls:\n",
         "field labls not found in type v1alpha4.Node"),
        ("typo-top-level.yaml", "containerdConfigPatches:", "containerdConfigPatch:",
         "field containerdConfigPatch not found in type v1alpha4.Cluster"),
        # Well-formed YAML that kind's Validate() rejects.
        ("bad-role.yaml", "- role: worker\n", "- role: workr\n",
         '"workr" is not a valid node role'),
        ("no-control-plane.yaml", "- role: control-plane\n", "- role: worker\n",
         "must have at least one control-plane node"),
        ("bad-name.yaml", "name: layercache\n", "name: LayerCache\n",
         "'LayerCache' is not a valid cluster name"),
    ],
)
def test_kind_rejects_a_broken_copy(tmp_path: Path, name: str, old: str, new: str,
                                    error: str) -> None:
    run = kind_create(broken_copy(tmp_path, name, old, new), tmp_path)
    assert run.returncode != 0
    assert error in run.output, run.output
    assert "Creating cluster" not in run.output
    assert not any(call.startswith(FIRST_PROVISIONING_CALL) for call in run.provider_calls)


def _kind_module_dir() -> Path:
    """Where `make tools` left kind's sources: the module cache of the Go that built it."""
    pinned = re.search(r"sigs\.k8s\.io/kind (v\S+)", (TOOLS_MODULE / "go.mod").read_text())
    assert pinned is not None
    gomodcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True,
                                check=True).stdout.strip()
    return Path(gomodcache) / "sigs.k8s.io" / f"kind@{pinned.group(1)}"


def test_node_image_is_the_pinned_kind_default_and_its_containerd_config_is_v2() -> None:
    source = _kind_module_dir()
    default = re.search(r'const Image = "([^"]+)"',
                        (source / "pkg/apis/config/defaults/image.go").read_text())
    assert default is not None
    assert f"image: {default.group(1)}\n" in CONFIG.read_text()
    # The node image's containerd config version decides which of our patches kind applies.
    node_config = tomllib.loads(
        (source / "images/base/files/etc/containerd/config.toml").read_text())
    assert node_config["version"] == 2
    cri = node_config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"]["discard_unpacked_layers"] is True  # what our patch turns off
