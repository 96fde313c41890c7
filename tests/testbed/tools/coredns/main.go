// Command coredns is the bed's cluster DNS (testbed.podnet): CoreDNS v1.14.6, the version
// kubeadm v1.37 deploys, built with only the plugins a kind cluster's Corefile uses for
// cluster names (kubernetes, cache, errors, health, ready, log; bind, since it listens on the
// bed bridge's address only; no forward: the bed has no upstream), not CoreDNS's full
// plugin set: the same program, a fraction of the build.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugins' order in a server block: CoreDNS's plugin.cfg order, restricted to ours.
func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}
}

func main() { coremain.Run() }
