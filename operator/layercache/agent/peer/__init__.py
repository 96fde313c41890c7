"""Peers: how nodes find and read layers other nodes hold, and serve their own.

- `client`: `PeerClient` and `PeerDirectory`, reading a layer from a holder.
- `server`: the agent's HTTP server (peer blobs, metrics, health).
- `relay`: cut-through relays, serving a layer while it is still arriving.
"""
