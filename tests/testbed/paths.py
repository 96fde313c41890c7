"""Where the test bed finds its tools and keeps its caches, and how it names missing ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Pinned Go tools, linked here by `make tools` (tests/testbed/tools/build.sh).
TOOLS_BIN = REPO / ".tools" / "bin"
#: Builds that outlive a clone (tools, image family): keyed by recipe, shared by clones.
CACHE = Path(
    os.environ.get("LAYERCACHE_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "layercache"
)

#: Pinned tools and the command that provides them.
_GO_TOOLS = {
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
    "kubelet", "kube-proxy", "coredns", "helm", "crictl", "kind", "pause", "probe",
}

#: Environment variable choosing the containerd the bed's nodes run (a key of
#: `CONTAINERD_PROFILES`); unset means `DEFAULT_CONTAINERD`.
CONTAINERD_ENV = "LAYERCACHE_BED_CONTAINERD"
#: containerd profiles: where `make tools` links each one's `containerd`, `ctr` and
#: `containerd-shim-runc-v2` (pinned builds; tests/testbed/tools/build.sh).
CONTAINERD_PROFILES: dict[str, Path] = {
    "2": TOOLS_BIN,
    "1.7": REPO / ".tools" / "containerd-1.7" / "bin",
}
#: The profile the bed, the demo, e2e and the benchmarks run unless told otherwise: kind's.
DEFAULT_CONTAINERD = "2"
#: The profiles the agent's containerd contract tests run on: kind's 2.x and 1.7 (users on
#: older nodes).
CONTRACT_CONTAINERD = ("2", "1.7")
#: The node runtime's commands: containerd's own from the profile's build, runc (shared by
#: the pinned profiles) from `.tools/bin`.
CONTAINERD_COMMANDS = ("containerd", "ctr", "containerd-shim-runc-v2", "runc")
#: Debian commands and the package that provides each.
_DEBIAN = {
    "docker-registry": "docker-registry", "skopeo": "skopeo", "umoci": "umoci",
    "mmdebstrap": "mmdebstrap", "prometheus": "prometheus", "promtool": "prometheus",
    "htpasswd": "apache2-utils",
}


class MissingToolError(RuntimeError):
    """A command the test bed needs is not installed; the message says how to install it."""


def containerd_profile(profile: str | None = None) -> str:
    """Return `profile`, or the one `LAYERCACHE_BED_CONTAINERD` names, or the default.

    Raises:
        ValueError: the profile is not one of `CONTAINERD_PROFILES` (names the variable).

    """
    chosen = profile or os.environ.get(CONTAINERD_ENV) or DEFAULT_CONTAINERD
    if chosen not in CONTAINERD_PROFILES:
        raise ValueError(f"containerd profile {chosen!r} (from {CONTAINERD_ENV} or the caller) "
                         f"is not one of {sorted(CONTAINERD_PROFILES)}")
    return chosen


def containerd_tool(name: str, profile: str | None = None) -> Path:
    """Return command `name` (one of `CONTAINERD_COMMANDS`) of containerd profile `profile`.

    Raises:
        MissingToolError: the profile's build is missing (`make tools`).
        ValueError: unknown profile.

    """
    bin_dir = CONTAINERD_PROFILES[containerd_profile(profile)]
    return _pinned(TOOLS_BIN if name == "runc" else bin_dir, name)


def tool(name: str) -> Path:
    """Return the absolute path of command `name`, preferring the pinned build in `.tools/bin`.

    containerd's own commands come from the chosen profile (`containerd_tool`).

    Raises:
        MissingToolError: naming `make tools` for pinned Go tools, or the apt package.

    """
    if name in CONTAINERD_COMMANDS:
        return containerd_tool(name)
    if name in _GO_TOOLS:
        return _pinned(TOOLS_BIN, name)
    return _debian(name)


def _pinned(bin_dir: Path, name: str) -> Path:
    pinned = bin_dir / name
    if pinned.exists():
        return pinned
    raise MissingToolError(f"{name} is not built: run `make tools` (builds {pinned})")


def _debian(name: str) -> Path:
    found = shutil.which(name)
    if found:
        return Path(found)
    package = _DEBIAN.get(name, name)
    raise MissingToolError(f"{name} is not installed: run `make deps` (apt-get install {package})")
