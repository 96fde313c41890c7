"""Today's baseline: the kubelet's pull (CRI PullImage) fetches every blob on every node."""

from __future__ import annotations

import pytest

from testbed.bed import BedState
from testbed.cri import images, pull
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.procs import ComponentError

pytestmark = pytest.mark.integration


def test_cri_pull_on_two_nodes_fetches_each_blob_once_per_node(
    bed: BedState, family: Family, proxy: FaultProxy
) -> None:
    image = family.images["app-py-a"]
    manifest = image.resolve()
    for node in bed.nodes[:2]:
        ref = pull(node.socket, f"{proxy.host}/{image.reference}")
        assert ref.startswith("sha256:")
        listed = {d for i in images(node.socket) for d in i["repoDigests"]}
        assert f"{proxy.host}/{image.repository}@{image.manifest_digest}" in listed
    stats = proxy.stats()
    blobs = [(d, family.layer(d).size) for d in manifest.layers]
    blobs.append((manifest.config_digest, manifest.config_size))
    for digest, size in blobs:
        path = f"/v2/{image.repository}/blobs/{digest}"
        assert stats.count(path, "GET", 200) == 2, path
        assert stats.bytes_by_path[path] == 2 * size, path
    # Nothing else was fetched: blob bytes are exactly two full copies of the image.
    assert stats.blob_bytes == 2 * family.unique_blob_bytes([image.name])
    # The third node pulled nothing.
    assert not any(
        image.repository in t for i in images(bed.nodes[2].socket) for t in i["repoTags"]
    )


def test_token_registry_refuses_anonymous_cri_pull_and_accepts_credentials(
    bed: BedState, family: Family
) -> None:
    token = bed.registries["token"]
    ref = f"{token.host}/{family.images['base'].reference}"
    node = bed.nodes[2]
    with pytest.raises(ComponentError, match=r"(?i)unauthorized|401|insufficient_scope"):
        pull(node.socket, ref)
    with pytest.raises(ComponentError, match=r"(?i)unauthorized|401"):
        pull(node.socket, ref, creds=f"{token.username}:wrong-password")
    assert pull(node.socket, ref, creds=f"{token.username}:{token.password}").startswith("sha256:")
