"""Fetching layers for the node: peer first, registry second, resumable and verified.

- `fetcher`: `LayerFetcher`, one layer from wanted to committed in the content store.
- `transfer`: the byte-rate cap and the upstream (registry) source of a layer's bytes.
"""
