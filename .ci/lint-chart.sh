#!/usr/bin/env bash
# make lint: `helm lint --strict` (values.schema.json applies) and `helm template` of the
# chart with its default values and with every helm/layercache/ci/*.yaml values file.
# --kube-version: our helm is built without the release ldflags, so its default
# capabilities say Kubernetes v1.20 and the chart's kubeVersion would refuse it; use the
# bed's pinned version instead.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=${HELM:-.tools/bin/helm}
CHART=helm/layercache
KUBE_VERSION=${KUBE_VERSION:-1.37.2}

run() {
  local what=$1
  shift
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" "$@" >/dev/null \
    || { "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" "$@"; exit 1; }
  "$HELM" template layercache "$CHART" --namespace layercache-system \
    --kube-version "$KUBE_VERSION" "$@" >/dev/null
  echo "chart ok: $what"
}

run "default values"
for values in "$CHART"/ci/*.yaml; do
  run "$values" --values "$values"
done
