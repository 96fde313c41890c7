"""`make deps` (.ci/deps.sh) is safe on a developer's laptop that runs Docker.

Read from the script itself and from this machine's Debian package index (`apt-cache`, no
network): the script never stops, disables or restarts a system service, and neither
its packages nor anything they depend on replaces or conflicts with Docker Engine's
packages (containerd and runc come from `make tools` instead, as our own processes).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

from testbed.paths import REPO

pytestmark = pytest.mark.integration

SCRIPT = REPO / ".ci" / "deps.sh"
#: Commands that stop, restart or reconfigure services, or end other processes.
SERVICE_COMMANDS = {"systemctl", "service", "invoke-rc.d", "update-rc.d", "kill", "pkill",
                    "killall", "start-stop-daemon", "deb-systemd-invoke"}
#: Docker Engine's packages, and the distribution packages Docker's install guide says to
#: remove first because they conflict with them (its containerd.io declares
#: Conflicts/Replaces: containerd, runc).
DOCKER = {"docker-ce", "docker-ce-cli", "containerd.io", "docker-buildx-plugin",
          "docker-compose-plugin"}
CONFLICTS_WITH_DOCKER = {"docker.io", "docker-compose", "docker-compose-v2", "docker-doc",
                         "podman-docker", "containerd", "runc"}


def _words() -> list[str]:
    """Every shell word of the script, comments dropped."""
    return shlex.split(SCRIPT.read_text(), comments=True)


def packages() -> list[str]:
    """The script's `packages=(...)` list."""
    words = _words()
    start = next(i for i, w in enumerate(words) if w.startswith("packages=("))
    listed = [words[start].removeprefix("packages=(")]
    for word in words[start + 1:]:
        listed.append(word.removesuffix(")"))
        if word.endswith(")"):
            break
    return [p for p in listed if p]


def test_deps_stops_no_system_service() -> None:
    words = _words()
    named = sorted({w for w in words if w.rsplit("/", 1)[-1] in SERVICE_COMMANDS})
    assert named == [], f"{SCRIPT} runs {named}"
    assert not any(re.fullmatch(r"stop|restart|disable|mask", w) for w in words)


def test_deps_lists_no_package_that_conflicts_with_dockers() -> None:
    listed = packages()
    assert "docker-registry" in listed and "libseccomp-dev" in listed  # the parse found it
    assert sorted(set(listed) & (DOCKER | CONFLICTS_WITH_DOCKER)) == []


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="not a Debian machine")
def test_nothing_the_packages_pull_in_conflicts_with_dockers() -> None:
    listed = packages()
    depends = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *listed],
        capture_output=True, text=True, check=True, timeout=120).stdout
    # Package names start a line; their dependencies are indented; <virtual> ones skipped.
    closure = {line.split(":")[0] for line in depends.splitlines()
               if line and not line[0].isspace() and not line.startswith("<")}
    assert set(listed) <= closure
    assert sorted(closure & (DOCKER | CONFLICTS_WITH_DOCKER)) == []
    shown = subprocess.run(["apt-cache", "show", "--no-all-versions", *sorted(closure)],
                           capture_output=True, text=True, check=True, timeout=120).stdout
    clashes = [line for line in shown.splitlines()
               if re.match(r"(Conflicts|Breaks|Replaces):", line)
               and set(re.findall(r"[a-z0-9][a-z0-9.+-]+", line.split(":", 1)[1])) & DOCKER]
    assert clashes == []
