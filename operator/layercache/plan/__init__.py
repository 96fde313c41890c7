"""Planning: layer order, per-node plans, chains to unpack, peer distribution, savings.

Pure functions of resolved images and nodes (import contract `plan`).
"""
