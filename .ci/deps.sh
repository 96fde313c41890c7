#!/usr/bin/env bash
# Installs the Debian packages the test bed runs (idempotent: apt only runs when one is missing).
# Safe on a developer's machine that runs Docker: nothing it installs replaces or conflicts
# with Docker's packages (containerd and runc are built from pinned Go modules by
# `make tools` instead), and it stops no system service (tests/bed/integration/test_deps.py
# reads this script and the package index).
set -euo pipefail
packages=(docker-registry skopeo umoci mmdebstrap prometheus apache2-utils
          shellcheck  # make lint: actionlint checks the workflows' run: scripts with it
          iproute2 psmisc ca-certificates rsync
          # kubelet beds (tests/testbed/podnet.py): CNI plugins (bridge, host-local, portmap,
          # loopback in /usr/lib/cni) and iptables for kube-proxy and the bed's FORWARD rule.
          containernetworking-plugins iptables
          # runc's build (tests/testbed/tools/build.sh): cgo, with seccomp as kind's is.
          gcc libc6-dev pkg-config libseccomp-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all Debian packages present"
  exit 0
fi
echo "deps: installing ${missing[*]}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# No system service is stopped or changed: a package's own daemon may start, and the bed
# never uses it (its daemons are processes of its own, on free ports and its own paths).
