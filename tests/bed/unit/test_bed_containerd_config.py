"""The bed nodes' containerd config per profile, as data: kind's settings plus our patch.

Pure: the TOML `testbed.nodes.containerd_config` writes is parsed and compared with the
containerd patch of kind-config.yaml (the one for the profile's config version) and with
the bed's own rules (every path under the node's directory). The daemons themselves run
in tests/integration/test_containerd_content.py, on each profile.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from layercache.registry.mirrors import parse_hosts_toml
from testbed.nodes import RegistryHost, SimNode, containerd_config
from testbed.paths import CONTAINERD_ENV, CONTAINERD_PROFILES, REPO, containerd_profile

WORKDIR = Path("/tmp/bed/nodes/n0")
REGISTRY_DIR = WORKDIR / "certs.d"
RUNC = Path("/opt/tools/bin/runc")
SANDBOX = "registry.k8s.io/pause:3.10"
#: containerd 2.x reads config version 3 natively; 1.x reads version 2.
CONFIG_VERSION = {"2": 3, "1.7": 2}
#: Where each version keeps the CRI image and runtime settings (containerd docs/cri/config.md).
IMAGES = {3: ("io.containerd.cri.v1.images",), 2: ("io.containerd.grpc.v1.cri", "containerd")}
REGISTRY = {3: ("io.containerd.cri.v1.images", "registry"),
            2: ("io.containerd.grpc.v1.cri", "registry")}
RUNTIME = {3: ("io.containerd.cri.v1.runtime",), 2: ("io.containerd.grpc.v1.cri",)}
RUNTIMES = {3: ("io.containerd.cri.v1.runtime", "containerd", "runtimes"),
            2: ("io.containerd.grpc.v1.cri", "containerd", "runtimes")}


def _config(profile: str) -> dict[str, Any]:
    return tomllib.loads(containerd_config(WORKDIR, REGISTRY_DIR, SANDBOX, profile=profile,
                                           runc=RUNC))


def _dig(table: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        table = table[key]
    return table


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _subset(patch: dict[str, Any], config: dict[str, Any], where: str = "") -> list[str]:
    """Keys of `patch` whose value `config` does not have (dotted paths)."""
    missing = []
    for key, value in patch.items():
        if isinstance(value, dict):
            missing += _subset(value, config.get(key) or {}, f"{where}{key}.")
        elif config.get(key) != value:
            missing.append(f"{where}{key}")
    return missing


@pytest.mark.parametrize("profile", ["2", "1.7"])
def test_config_has_kinds_settings_and_our_patch(profile: str) -> None:
    config = _config(profile)
    version = CONFIG_VERSION[profile]
    assert config["version"] == version
    plugins = config["plugins"]
    images = _dig(plugins, IMAGES[version])
    assert images["snapshotter"] == "overlayfs"
    assert images["discard_unpacked_layers"] is False  # kind: true; our patch: false
    assert _dig(plugins, REGISTRY[version])["config_path"] == str(REGISTRY_DIR)
    runc = _dig(plugins, RUNTIMES[version])["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"] == {"BinaryName": str(RUNC), "SystemdCgroup": False}
    # The bed runs without CAP_SYS_RESOURCE: runc may not lower oom_score_adj.
    assert _dig(plugins, RUNTIME[version])["restrict_oom_score_adj"] is True
    sandbox = (images["pinned_images"]["sandbox"] if version == 3
               else plugins["io.containerd.grpc.v1.cri"]["sandbox_image"])
    assert sandbox == SANDBOX


@pytest.mark.parametrize("profile", ["2", "1.7"])
def test_kind_config_patch_for_the_profiles_config_version_holds(profile: str) -> None:
    # The node's own certs.d stands where a kind node has /etc/containerd/certs.d.
    texts = yaml.safe_load((REPO / "kind-config.yaml").read_text())["containerdConfigPatches"]
    patches = [tomllib.loads(text.replace("/etc/containerd/certs.d", str(REGISTRY_DIR)))
               for text in texts]
    config = _config(profile)
    [patch] = [p for p in patches if p["version"] == config["version"]]
    assert _subset(patch, config) == []


@pytest.mark.parametrize("profile", ["2", "1.7"])
def test_every_path_the_daemon_writes_is_under_the_node_directory(profile: str) -> None:
    config = _config(profile)
    paths = [s for s in _strings(config) if s.startswith("/")]
    # Read-only inputs: the runc binary and CNI plugins; everything else is the node's own.
    own = [p for p in paths if p not in (str(RUNC), "/usr/lib/cni")]
    assert own and all(Path(p).is_relative_to(WORKDIR) for p in own), own
    assert config["grpc"]["address"] == str(WORKDIR / "containerd.sock")
    if CONFIG_VERSION[profile] == 3:
        # containerd 2.x starts NRI by default, on /var/run/nri/nri.sock unless told.
        assert config["plugins"]["io.containerd.nri.v1.nri"]["socket_path"] == str(
            WORKDIR / "nri.sock")


def test_profile_comes_from_the_caller_then_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONTAINERD_ENV, "1.7")
    assert containerd_profile() == "1.7"
    assert containerd_profile("2") == "2"
    monkeypatch.setenv(CONTAINERD_ENV, "1.5")
    with pytest.raises(ValueError, match=f"'1.5'.*{CONTAINERD_ENV}"):
        containerd_profile()
    assert {"2", "1.7"} <= set(CONTAINERD_PROFILES)


@pytest.mark.parametrize("profile", ["2", "1.7"])
def test_a_node_in_its_own_namespaces_uses_kinds_paths(profile: str) -> None:
    # Kubelet nodes (testbed.podnet): the node's mount namespace maps kind's paths to the
    # node's directory, so the chart's hostPaths find this containerd.
    config = tomllib.loads(containerd_config(
        WORKDIR, Path("/etc/containerd/certs.d"), SANDBOX, profile=profile, runc=RUNC,
        standard_paths=True))
    version = CONFIG_VERSION[profile]
    assert (config["root"], config["state"]) == ("/var/lib/containerd", "/run/containerd")
    assert config["grpc"]["address"] == "/run/containerd/containerd.sock"
    assert config["ttrpc"]["address"] == "/run/containerd/containerd.sock.ttrpc"
    assert _dig(config["plugins"], REGISTRY[version])["config_path"] == \
        "/etc/containerd/certs.d"
    cni = _dig(config["plugins"], RUNTIME[version])["cni"]
    assert cni["conf_dir"] == "/etc/cni/net.d"
    # The rest of kind's settings and our patch are the same as on a host node.
    assert _subset({k: v for k, v in _config(profile).items()
                    if k not in ("root", "state", "grpc", "ttrpc", "plugins")}, config) == []


def test_a_registry_ca_is_in_its_host_directory_named_relative_to_it(tmp_path: Path) -> None:
    # An agent Pod mounts the node's config_path only: a CA path into the bed's own
    # directory would not exist inside it, one relative to the host directory does.
    ca = tmp_path / "pki" / "ca.crt"
    ca.parent.mkdir()
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    node = SimNode("n0", tmp_path / "node")
    node.configure_registries([RegistryHost("10.250.0.1:5000", "https://10.250.0.1:5000", ca)])
    directory = tmp_path / "node" / "certs.d" / "10.250.0.1:5000"
    assert (directory / "ca.crt").read_text() == ca.read_text()
    (host,) = parse_hosts_toml((directory / "hosts.toml").read_text(), directory).hosts
    assert host.ca == (directory / "ca.crt",)
