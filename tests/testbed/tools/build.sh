#!/usr/bin/env bash
# Builds the test bed's and the linters' pinned tools (one Go module per tool, so their dependency graphs
# never have to agree) into a cache outside the work tree, keyed by everything that can
# change the binary, and links them into <repo>/.tools/bin. A tool whose key is already
# built is skipped, so a warm run takes seconds; GOMODCACHE/GOCACHE are Go's own caches.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=${LAYERCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/layercache}
bin="$repo/.tools/bin"
mkdir -p "$bin" "$cache/tools"
# One build at a time per cache: two at once (make lint beside make setup on a fresh
# clone) removed and recreated each other's $out.partial and failed. The second waits,
# then finds every tool up to date.
exec 9>"$cache/tools/.lock"
if ! flock -n 9; then
  echo "tools: another build holds $cache/tools/.lock; waiting for it"
  flock 9
fi
command -v go >/dev/null || { echo "tools: go not found; install Go >= 1.26 (apt-get install golang-go is too old)" >&2; exit 1; }

k8s=v1.37.2
k8s_minor=${k8s#v1.}; k8s_minor=${k8s_minor%%.*}
k8s_flags="-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/component-base/version.gitMajor=1 \
-X k8s.io/component-base/version.gitMinor=$k8s_minor -X k8s.io/component-base/version.gitTreeState=clean \
-X k8s.io/client-go/pkg/version.gitVersion=$k8s -X k8s.io/client-go/pkg/version.gitMajor=1 \
-X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor"

# build [-t TAGS] [-c CGO] [-o LINKDIR] MODULE LDFLAGS PACKAGE... : build PACKAGEs of tools/MODULE
# with build tags TAGS and CGO_ENABLED=CGO (default: Go's) unless already cached, and link them
# into LINKDIR (default .tools/bin).
build() {
  local tags="" cgo="" link="$bin" opt
  OPTIND=1
  while getopts "t:c:o:" opt; do
    case $opt in t) tags=$OPTARG ;; c) cgo=$OPTARG ;; o) link=$OPTARG ;; *) return 2 ;; esac
  done
  shift $((OPTIND - 1))
  local module=$1 ldflags=$2; shift 2
  local dir="$here/$module" key out
  key=$( { cat "$dir/go.mod" "$dir/go.sum"; find "$dir" -name '*.go' | sort | xargs cat; go version
           echo "$ldflags $*"
           # Only options that were given join the key, so the keys of builds without them
           # stay what they were. A cgo build also depends on the C compiler and libraries.
           if [ -n "$tags$cgo" ]; then echo "tags=$tags cgo=$cgo"; fi
           if [ "$cgo" = 1 ]; then "$(go env CC)" --version | head -1; pkg-config --modversion libseccomp; fi
         } | sha256sum | cut -c1-16)
  out="$cache/tools/$module-$key"
  if [ -f "$out/.complete" ]; then
    echo "tools: $module up to date ($out)"
  else
    echo "tools: building $module ($*)"
    local start=$SECONDS
    rm -rf "$out.partial"
    (cd "$dir" && if [ -n "$cgo" ]; then export CGO_ENABLED=$cgo; fi
     GOFLAGS=-buildvcs=false go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" \
       -o "$out.partial/" "$@")
    touch "$out.partial/.complete"
    rm -rf "$out" && mv "$out.partial" "$out"
    echo "tools: built $module in $((SECONDS - start)) s"
  fi
  mkdir -p "$link"
  local f
  for f in "$out"/*; do ln -sfn "$f" "$link/$(basename "$f")"; done
}

build kubernetes "$k8s_flags" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet
# kube-proxy of the same release, one per kubelet node (testbed.podnet): a module of its own
# (kube-proxy/, same requirements plus the proxy's), so ../kubernetes keeps its cache key;
# the packages both share come from GOCACHE.
build kube-proxy "$k8s_flags" k8s.io/kubernetes/cmd/kube-proxy
# The cluster DNS of kubelet beds: CoreDNS v1.14.6 (kubeadm v1.37's) with only the plugins
# a cluster zone needs (coredns/main.go).
build -c 0 coredns "" .
build etcd "" ./cmd/etcd
build helm "" helm.sh/helm/v3/cmd/helm
build cri-tools "-X sigs.k8s.io/cri-tools/pkg/version.Version=1.37.0" sigs.k8s.io/cri-tools/cmd/crictl
build kind "" sigs.k8s.io/kind
# Chart and CI checks for `make lint`: helm-docs writes helm/layercache/README.md from the
# values.yaml comments (`make chart-docs`); actionlint checks .github/workflows/. Both set their
# version the way their releases do, so `--version` and helm-docs' README footer name it.
build helm-docs "-X main.version=1.14.2" github.com/norwoodj/helm-docs/cmd/helm-docs
build actionlint "-X github.com/rhysd/actionlint.version=v1.7.12" github.com/rhysd/actionlint/cmd/actionlint
# The pod sandbox binary the bed's kubelet nodes run as their pause image (testbed.kubelet):
# static, so a one-layer image of just this file is a complete root filesystem.
build -c 0 pause "" .
# The in-cluster probe pods of kubelet beds run (testbed.podnet; static, a one-layer image too).
build -c 0 probe "" .

# Node runtimes, as kind v0.33.0's base image builds them (images/base/Dockerfile):
# containerd v2.3.4 with its build tags (no aufs, zfs, btrfs or devmapper snapshotters) and
# runc v1.4.3 with runc's default tags (seccomp, so libseccomp-dev). kind builds containerd
# with cgo; nothing left after those tags needs it, so it is off here (no C toolchain in the
# key); runc cannot go without cgo (its nsenter is C).
containerd_tags="urfave_cli_no_docs no_aufs no_zfs no_btrfs no_devmapper"
build -c 0 -t "$containerd_tags" containerd \
  "-X github.com/containerd/containerd/v2/version.Version=v2.3.4" \
  github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
build -c 1 -t "seccomp urfave_cli_no_docs" runc "" github.com/opencontainers/runc
# The second profile, containerd 1.7 (its latest patch release), built the same way into its
# own directory (LAYERCACHE_BED_CONTAINERD=1.7 selects it; it shares runc).
build -c 0 -t "$containerd_tags" -o "$repo/.tools/containerd-1.7/bin" containerd-1.7 \
  "-X github.com/containerd/containerd/version.Version=v1.7.35" \
  github.com/containerd/containerd/cmd/containerd github.com/containerd/containerd/cmd/ctr \
  github.com/containerd/containerd/cmd/containerd-shim-runc-v2
