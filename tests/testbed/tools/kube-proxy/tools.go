//go:build tools

// Package tools records the command this module builds so that `go mod tidy` keeps it:
// kube-proxy of the same pinned Kubernetes as ../kubernetes, in a module of its own so
// adding it left that module's cache key (and its 20-minute build) alone.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
