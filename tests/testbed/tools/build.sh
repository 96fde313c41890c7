#!/usr/bin/env bash
# Builds the test bed's pinned tools (one Go module per tool, so their dependency graphs
# never have to agree) into a cache outside the work tree, keyed by everything that can
# change the binary, and links them into <repo>/.tools/bin. A tool whose key is already
# built is skipped, so a warm run takes seconds; GOMODCACHE/GOCACHE are Go's own caches.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=${LAYERCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/layercache}
bin="$repo/.tools/bin"
mkdir -p "$bin" "$cache/tools"
command -v go >/dev/null || { echo "tools: go not found; install Go >= 1.26 (apt-get install golang-go is too old)" >&2; exit 1; }

k8s=v1.37.2
k8s_minor=${k8s#v1.}; k8s_minor=${k8s_minor%%.*}
k8s_flags="-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/component-base/version.gitMajor=1 \
-X k8s.io/component-base/version.gitMinor=$k8s_minor -X k8s.io/component-base/version.gitTreeState=clean \
-X k8s.io/client-go/pkg/version.gitVersion=$k8s -X k8s.io/client-go/pkg/version.gitMajor=1 \
-X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor"

# build MODULE LDFLAGS PACKAGE... : build PACKAGEs of tools/MODULE unless already cached.
build() {
  local module=$1 ldflags=$2; shift 2
  local dir="$here/$module" key out
  key=$( { cat "$dir/go.mod" "$dir/go.sum"; find "$dir" -name '*.go' | sort | xargs cat; go version; echo "$ldflags $*"; } | sha256sum | cut -c1-16)
  out="$cache/tools/$module-$key"
  if [ -f "$out/.complete" ]; then
    echo "tools: $module up to date ($out)"
  else
    echo "tools: building $module ($*)"
    local start=$SECONDS
    rm -rf "$out.partial"
    (cd "$dir" && GOFLAGS=-buildvcs=false go build -trimpath -ldflags "-s -w $ldflags" -o "$out.partial/" "$@")
    touch "$out.partial/.complete"
    rm -rf "$out" && mv "$out.partial" "$out"
    echo "tools: built $module in $((SECONDS - start)) s"
  fi
  local f
  for f in "$out"/*; do ln -sfn "$f" "$bin/$(basename "$f")"; done
}

build kubernetes "$k8s_flags" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet
build etcd "" ./cmd/etcd
build helm "" helm.sh/helm/v3/cmd/helm
build cri-tools "-X sigs.k8s.io/cri-tools/pkg/version.Version=1.37.0" sigs.k8s.io/cri-tools/cmd/crictl
build kind "" sigs.k8s.io/kind
