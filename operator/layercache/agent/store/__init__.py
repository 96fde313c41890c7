"""Writing into the node's containerd beyond the content store's blobs.

- `unpacking`: unpacked base chains (snapshots keyed by chain ID).
- `cleanup`: stale ingests and leases left by a killed agent.
- `images`: CRI image pulls for Images-mode entries.
"""
