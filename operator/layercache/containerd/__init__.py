"""The agent's only door into containerd: its content store, leases and CRI image service.

gRPC clients over the node's containerd socket (`channel`), with errors mapped to
`errors`' classes: `content.ContentStore` (blobs, labels, ingests, and writes by the Write
protocol of `ingest`), `leases.Leases`, `cri.CRIImages`; `labels` holds the GC labels that
pin our blobs. The generated protobuf/gRPC modules live in `layercache.containerd.protos`.

Import from the modules, not from here: this package imports nothing, so that
``python -m layercache.containerd.protos.generate`` runs even when the generated modules
are stale or missing.
"""
