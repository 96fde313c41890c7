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
    "kubelet", "helm", "crictl", "kind",
}
#: Debian commands and the package that provides each.
_DEBIAN = {
    "containerd": "containerd", "runc": "runc", "docker-registry": "docker-registry",
    "skopeo": "skopeo", "umoci": "umoci", "mmdebstrap": "mmdebstrap",
    "prometheus": "prometheus", "promtool": "prometheus", "htpasswd": "apache2-utils",
    "ctr": "containerd",
}


class MissingToolError(RuntimeError):
    """A command the test bed needs is not installed; the message says how to install it."""


def tool(name: str) -> Path:
    """Return the absolute path of command `name`, preferring the pinned build in `.tools/bin`.

    Raises:
        MissingToolError: naming `make tools` for pinned Go tools, or the apt package.

    """
    if name in _GO_TOOLS:
        pinned = TOOLS_BIN / name
        if pinned.exists():
            return pinned
        raise MissingToolError(f"{name} is not built: run `make tools` (builds {pinned})")
    found = shutil.which(name)
    if found:
        return Path(found)
    package = _DEBIAN.get(name, name)
    raise MissingToolError(f"{name} is not installed: run `make deps` (apt-get install {package})")
