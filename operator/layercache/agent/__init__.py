"""The node agent: holds the layers its node's NodeLayerCache wants, and serves them to peers.

One agent runs per node (a DaemonSet). It watches only its own NodeLayerCache, works from
what the node's containerd actually holds, fetches each missing layer from a peer agent
that holds it or else from the upstream registry (verified, resumable, under a lease,
pinned against GC), serves the blobs it holds to other agents, and reports inventory, byte
counts and conditions in the object's status and as Prometheus metrics.

Modules, one concern each: `settings`, `logs`, `cli`/`app` (process and wiring),
`kubeapi` (the Kubernetes API), `nodespec` (the object parsed), `nodeinfo` (the Node),
`secrets` (peer token, registry credentials), `reconcile` (the control loop), `backoff`,
`fetch` (one layer, peer first), `transfer` (rate cap, verification, the registry source),
`peers` (peer endpoints and client), `server` (peer and metrics HTTP), `disk` (free
space), `images` (CRI pulls), `cleanup` (stale leases and ingests), `status`.
"""
