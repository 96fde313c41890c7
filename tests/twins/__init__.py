"""In-memory twins of the product's ports, for millisecond unit tests of its control loops.

Each twin implements a Protocol the product declares (the operator's Kubernetes port, the
agent's Kubernetes port, containerd's content store) with plain dicts and the same
observable rules as the real thing where a loop depends on them (resourceVersion and
generation bumps, 404/409 on a missing or conflicting object, commit checking the digest).
The integration tests run the same loops against the real apiserver and containerd.
"""
