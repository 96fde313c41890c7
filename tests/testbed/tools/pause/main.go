// Command pause is the test bed's pod sandbox process, what registry.k8s.io/pause is in a
// cluster: it holds the pod's namespaces open and exits on SIGTERM or SIGINT. As PID 1 of
// the sandbox it also reaps orphans re-parented to it (Go's runtime ignores SIGCHLD, so
// zombies would otherwise pile up).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	child := make(chan os.Signal, 1)
	signal.Notify(child, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-child:
			for {
				var status syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
