"""The local test bed: a Kubernetes cluster built from real parts as processes on loopback.

etcd, kube-apiserver, controller-manager and scheduler from pinned Go modules; one
containerd daemon per simulated node (containerd and runc from pinned Go modules too, as
kind's node image has them); the Debian `docker-registry` in plain, basic-auth
and TLS + token-auth flavours; a fault-injecting proxy; and an image family built from
real Debian content. Every integration test, `make demo` and every benchmark uses it.
"""
