"""The agent's only door into containerd: its content store, leases and CRI image service.

gRPC clients over the node's containerd socket; the generated protobuf/gRPC modules they
use live in `layercache.containerd.protos`.
"""
