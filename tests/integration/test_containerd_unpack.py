"""Unpacking layer chains into real containerd daemons (no mocks), on each profile.

Every test runs once per containerd profile (``testbed.paths.CONTRACT_CONTAINERD``: 2.x and
1.7), against two simulated nodes: ``warm``, where we write the image family's layer blobs
through the content API and unpack their chain with `Unpacker`, and ``cold``, where the CRI
plugin pulls the same images from scratch — containerd's own unpacker is the reference for
the snapshot names (chain IDs) and labels. The registry sits behind the counting fault proxy.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from layercache.containerd.content import ContentStore, ingest_ref
from layercache.containerd.cri import CRIImages
from layercache.containerd.labels import GC_ROOT_LABEL, cache_label
from layercache.containerd.unpack import (
    SNAPSHOT_DIFF_ID_LABEL,
    SNAPSHOT_PARENT_LABEL,
    SNAPSHOT_REF_LABEL,
    UNCOMPRESSED_LABEL,
    UNPACK_KEY_PREFIX,
    DiffIDMismatchError,
    LayerToUnpack,
    SnapshotInfo,
    Snapshots,
    Unpacker,
    UnpackResult,
)
from layercache.oci.digest import chain_ids
from layercache.registry.manifest import LayerDescriptor, parse_config
from testbed.contract import collect_garbage, memory_source, running_node
from testbed.faultproxy import FaultProxy
from testbed.images import Family, ImageInfo
from testbed.nodes import RegistryHost, SimNode

pytestmark = pytest.mark.integration

CACHE = "tests/unpack"
#: The shared base chain we unpack ahead of time, and the app image pulled on top of it.
BASE_IMAGE = "python"
APP_IMAGE = "app-py-a"


@dataclass(frozen=True)
class Pull:
    """A CRI pull: seconds it took, and the committed snapshots before and after."""

    seconds: float
    before: dict[str, SnapshotInfo]
    after: dict[str, SnapshotInfo]
    fetched: list[str]


def _node(name: str, factory: pytest.TempPathFactory, profile: str,
          proxy: FaultProxy) -> Iterator[SimNode]:
    for node in running_node(name, factory.mktemp(name), profile):
        node.configure_registries([RegistryHost(proxy.host, proxy.url)])
        yield node


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory, profile: str,
         registry_proxy: FaultProxy) -> Iterator[SimNode]:
    """The node whose base chain we unpack."""
    yield from _node("lc-warm", tmp_path_factory, profile, registry_proxy)


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory, profile: str,
         registry_proxy: FaultProxy) -> Iterator[SimNode]:
    """The node where containerd pulls and unpacks everything itself."""
    yield from _node("lc-cold", tmp_path_factory, profile, registry_proxy)


def chain_layers(family: Family, image: ImageInfo) -> list[LayerToUnpack]:
    """The image's layer descriptors with the diff IDs of its config (parsed as the agent does)."""
    manifest = image.resolve()
    config = parse_config(family.blob_path(manifest.config_digest).read_bytes(),
                          image.reference, len(manifest.layers))
    layers = []
    for digest, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        layer = family.layer(digest)
        descriptor = LayerDescriptor.model_validate(
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size})
        layers.append(LayerToUnpack(descriptor, diff_id))
    return layers


async def write_blobs(node: SimNode, family: Family, digests: list[str]) -> None:
    """Write layer blobs from the family's layout into the node's content store, pinned."""
    async with ContentStore(node.socket) as store:
        for digest in digests:
            data = family.blob_path(digest).read_bytes()
            await store.write(ingest_ref(digest), digest, len(data), memory_source(data, 1 << 20),
                              caches=[CACHE])


async def committed(node: SimNode) -> dict[str, SnapshotInfo]:
    """The node's committed overlayfs snapshots in k8s.io, by name."""
    async with Snapshots(node.socket) as snapshots:
        return {s.name: s for s in await snapshots.list() if s.committed}


async def timed_pull(node: SimNode, proxy: FaultProxy, family: Family, name: str) -> Pull:
    """CRI-pull family image ``name`` on ``node``; time it and list the snapshots around it."""
    image = family.images[name]
    before = await committed(node)
    proxy.reset()
    async with CRIImages(node.socket) as cri:
        started = time.monotonic()
        await cri.pull(f"{proxy.host}/{image.reference}")
        seconds = time.monotonic() - started
    fetched = sorted({r.path for r in proxy.stats().requests})
    return Pull(seconds, before, await committed(node), fetched)


@pytest.fixture(scope="module")
def unpacked_base(warm: SimNode, oci_family: Family) -> UnpackResult:
    """The base chain (the python image's layers) written and unpacked on ``warm``."""
    layers = chain_layers(oci_family, oci_family.images[BASE_IMAGE])

    async def run() -> UnpackResult:
        await write_blobs(warm, oci_family, [layer.descriptor.digest for layer in layers])
        async with Unpacker(warm.socket) as unpacker:
            started = time.monotonic()
            result = await unpacker.unpack_chain(layers, caches=[CACHE])
            print(f"\nunpacked {len(result.committed)} layers in "
                  f"{time.monotonic() - started:.2f} s")
            return result

    return asyncio.run(run())


@pytest.fixture(scope="module")
def cold_pull(cold: SimNode, registry_proxy: FaultProxy, oci_family: Family) -> Pull:
    """A cold CRI pull of the app image on ``cold``: containerd fetches and unpacks it all."""
    return asyncio.run(timed_pull(cold, registry_proxy, oci_family, APP_IMAGE))


def test_unpacked_snapshot_names_are_the_chain_ids_of_a_cri_pull(
        unpacked_base: UnpackResult, cold_pull: Pull, warm: SimNode, profile: str,
        oci_family: Family) -> None:
    layers = chain_layers(oci_family, oci_family.images[BASE_IMAGE])
    expected = chain_ids(layer.diff_id for layer in layers)
    assert list(unpacked_base.chain_ids) == expected
    assert list(unpacked_base.committed) == expected and unpacked_base.existing == ()

    ours = asyncio.run(committed(warm))
    # containerd's own unpacker (the cold node's CRI pull of an image on this base) named
    # the base's prefixes exactly as we did, with the same parent links.
    pulled = {name: info for name, info in cold_pull.after.items()
              if name not in cold_pull.before}
    for index, chain_id in enumerate(expected):
        assert chain_id in pulled, f"{profile}: CRI pull made no snapshot {chain_id}"
        assert chain_id in ours
        parent = expected[index - 1] if index else ""
        assert pulled[chain_id].parent == ours[chain_id].parent == parent
        labels = ours[chain_id].labels
        assert labels[SNAPSHOT_REF_LABEL] == chain_id
        assert labels[SNAPSHOT_DIFF_ID_LABEL] == layers[index].diff_id
        assert labels.get(SNAPSHOT_PARENT_LABEL, "") == parent
        assert GC_ROOT_LABEL in labels and cache_label(CACHE) in labels
        # containerd's unpacker sets the ref label too (2.x: and the diff-ID label).
        assert pulled[chain_id].labels.get(SNAPSHOT_REF_LABEL) == chain_id

    async def blob_labels() -> list[dict[str, str]]:
        async with ContentStore(warm.socket) as store:
            infos = [await store.info(layer.descriptor.digest) for layer in layers]
        return [dict(info.labels) if info else {} for info in infos]

    for layer, labels in zip(layers, asyncio.run(blob_labels()), strict=True):
        assert labels[UNCOMPRESSED_LABEL] == layer.diff_id


def test_cri_pull_on_an_unpacked_base_fetches_and_unpacks_only_the_app_layer(
        unpacked_base: UnpackResult, cold_pull: Pull, warm: SimNode,
        registry_proxy: FaultProxy, oci_family: Family, profile: str) -> None:
    app = oci_family.images[APP_IMAGE]
    manifest = app.resolve()
    app_chain = chain_ids(layer.diff_id for layer in chain_layers(oci_family, app))
    assert app_chain[:len(unpacked_base.chain_ids)] == list(unpacked_base.chain_ids)

    warm_pull = asyncio.run(timed_pull(warm, registry_proxy, oci_family, APP_IMAGE))

    # The base chain was there before the pull; the pull committed only the app layer's.
    assert set(unpacked_base.chain_ids) <= set(warm_pull.before)
    assert set(warm_pull.after) - set(warm_pull.before) == {app_chain[-1]}
    # The registry served the manifest, the config and the app layer, no base layer.
    blob_path = f"/v2/{app.repository}/blobs/"
    assert {p for p in warm_pull.fetched if "/blobs/" in p} == {
        blob_path + manifest.config_digest, blob_path + manifest.layers[-1]}
    assert all("/manifests/" in p or "/blobs/" in p for p in warm_pull.fetched)
    # The cold pull fetched every layer.
    for digest in manifest.layers:
        assert blob_path + digest in cold_pull.fetched
    # Timing is recorded, not asserted (a shared 2-core machine).
    print(f"\ncontainerd profile {profile}: cold CRI pull of {APP_IMAGE} "
          f"{cold_pull.seconds:.2f} s; on the unpacked base {warm_pull.seconds:.2f} s")


def test_layer_with_a_wrong_diff_id_raises_and_commits_nothing(
        unpacked_base: UnpackResult, warm: SimNode, oci_family: Family) -> None:
    base = chain_layers(oci_family, oci_family.images["base"])
    curl = chain_layers(oci_family, oci_family.images["curl"])
    nginx = chain_layers(oci_family, oci_family.images["nginx"])
    # The curl layer's bytes, announced with the nginx layer's diff ID.
    wrong = LayerToUnpack(curl[1].descriptor, nginx[1].diff_id)
    bad_chain = chain_ids([base[0].diff_id, wrong.diff_id])[1]

    async def run() -> tuple[DiffIDMismatchError, SnapshotInfo | None, list[SnapshotInfo]]:
        await write_blobs(warm, oci_family, [wrong.descriptor.digest])
        async with Unpacker(warm.socket) as unpacker:
            with pytest.raises(DiffIDMismatchError) as raised:
                await unpacker.unpack_chain([base[0], wrong], caches=[CACHE])
            return (raised.value, await unpacker.snapshots.stat(bad_chain),
                    await unpacker.snapshots.list())

    error, found, listed = asyncio.run(run())
    assert (error.expected, error.actual) == (nginx[1].diff_id, curl[1].diff_id)
    assert error.layer == curl[1].descriptor.digest and error.chain_id == bad_chain
    assert curl[1].descriptor.digest in str(error) and nginx[1].diff_id in str(error)
    assert found is None
    assert not [s.name for s in listed if s.name.startswith(UNPACK_KEY_PREFIX)]
    assert not [s.name for s in listed if s.labels.get(SNAPSHOT_REF_LABEL) == bad_chain]


def test_remove_stale_removes_only_our_active_extract_snapshots(
        unpacked_base: UnpackResult, warm: SimNode) -> None:
    base_chain = unpacked_base.chain_ids[0]
    ours = [f"{UNPACK_KEY_PREFIX}dead1 {base_chain}", f"{UNPACK_KEY_PREFIX}dead2"]
    theirs = "extract-someone-else"

    async def run() -> tuple[set[str], list[str], set[str]]:
        async with Unpacker(warm.socket) as unpacker:
            # As a killed unpack leaves them: active, under a lease that outlives it (an
            # active snapshot without a lease is fair game for containerd's GC).
            lease = (await unpacker.leases.create(expire=600)).id
            try:
                for key, parent in ((ours[0], base_chain), (ours[1], ""),
                                    (theirs, base_chain)):
                    await unpacker.snapshots.prepare(key, parent, lease=lease)
                before = {s.name for s in await unpacker.snapshots.list()}
                removed = await unpacker.remove_stale()
                left = {s.name for s in await unpacker.snapshots.list()}
            finally:
                await unpacker.snapshots.remove(theirs)
                await unpacker.leases.delete(lease)
            return before, removed, left

    before, removed, left = asyncio.run(run())
    assert set(ours) | {theirs} <= before
    assert sorted(removed) == sorted(ours)
    assert theirs in left and not set(ours) & left
    assert set(unpacked_base.chain_ids) <= left  # committed chains are never touched


def test_unpack_is_idempotent_and_pins_an_existing_chain_for_another_cache(
        unpacked_base: UnpackResult, warm: SimNode, oci_family: Family) -> None:
    layers = chain_layers(oci_family, oci_family.images[BASE_IMAGE])

    async def run() -> tuple[UnpackResult, dict[str, SnapshotInfo]]:
        async with Unpacker(warm.socket) as unpacker:
            result = await unpacker.unpack_chain(layers, caches=["tests/other"])
        return result, await committed(warm)

    again, snapshots = asyncio.run(run())
    assert again.committed == () and again.existing == unpacked_base.chain_ids
    for chain_id in again.existing:
        assert cache_label("tests/other") in snapshots[chain_id].labels
        assert cache_label(CACHE) in snapshots[chain_id].labels



def test_released_chain_stays_while_an_image_refers_to_it_and_goes_with_gc_after(
        unpacked_base: UnpackResult, warm: SimNode, registry_proxy: FaultProxy,
        oci_family: Family) -> None:
    chains = list(unpacked_base.chain_ids)
    layers = chain_layers(oci_family, oci_family.images[BASE_IMAGE])
    reference = f"{registry_proxy.host}/{oci_family.images[APP_IMAGE].reference}"

    async def present() -> list[bool]:
        async with Snapshots(warm.socket) as snapshots:
            return [await snapshots.stat(chain) is not None for chain in chains]

    async def run() -> dict[str, object]:
        seen: dict[str, object] = {}
        async with Unpacker(warm.socket) as unpacker, CRIImages(warm.socket) as cri:
            if await cri.status(reference) is None:
                await cri.pull(reference)
            # Released while the kubelet's image refers to the chain: GC keeps it.
            seen["unpinned"] = await unpacker.release(chains)
            seen["labels"] = (await unpacker.snapshots.stat(chains[0])).labels
            await collect_garbage(unpacker.leases)
            seen["with image"] = await present()
            # Pinned again, the image removed: our gc.root keeps it.
            await unpacker.unpack_chain(layers, caches=[CACHE])
            await cri.remove(reference)
            await collect_garbage(unpacker.leases)
            seen["pinned, no image"] = await present()
            # Released with no image left: containerd's GC removes it.
            seen["unpinned again"] = await unpacker.release(chains, caches=[CACHE, "tests/other"])
            await collect_garbage(unpacker.leases)
            seen["released, no image"] = await present()
        return seen

    seen = asyncio.run(run())
    assert seen["unpinned"] == chains
    assert GC_ROOT_LABEL not in seen["labels"]
    assert cache_label(CACHE) not in seen["labels"]
    assert seen["labels"][SNAPSHOT_REF_LABEL] == chains[0]
    assert seen["with image"] == [True] * len(chains)
    assert seen["pinned, no image"] == [True] * len(chains)
    assert seen["unpinned again"] == chains
    assert seen["released, no image"] == [False] * len(chains)


_UNPACK_SCRIPT = """
import asyncio, sys
from layercache.containerd.unpack import Unpacker
from layercache.registry.manifest import LayerDescriptor

async def main() -> None:
    async with Unpacker(sys.argv[1]) as unpacker:
        layer = LayerDescriptor.model_validate_json(sys.argv[2])
        await unpacker.unpack_chain([(layer, sys.argv[3])])

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory, profile: str,
          registry_proxy: FaultProxy) -> Iterator[SimNode]:
    """A node with nothing unpacked, for the agent killed mid-unpack."""
    yield from _node("lc-crash", tmp_path_factory, profile, registry_proxy)


def test_unpack_killed_mid_extraction_leaves_only_a_stale_active_snapshot(
        crash: SimNode, oci_family: Family) -> None:
    base = chain_layers(oci_family, oci_family.images["base"])[0]  # ~60 MB: seconds to apply
    chain_id = chain_ids([base.diff_id])[0]
    asyncio.run(write_blobs(crash, oci_family, [base.descriptor.digest]))
    before = set(asyncio.run(committed(crash)))

    async def active_extracts() -> list[str]:
        async with Snapshots(crash.socket) as snapshots:
            return [s.name for s in await snapshots.list()
                    if s.kind == "ACTIVE" and s.name.startswith(UNPACK_KEY_PREFIX)]

    agent = subprocess.Popen([sys.executable, "-c", _UNPACK_SCRIPT, str(crash.socket),
                              base.descriptor.model_dump_json(by_alias=True), base.diff_id])
    try:
        deadline = time.monotonic() + 60
        while not (seen := asyncio.run(active_extracts())) and time.monotonic() < deadline:
            assert agent.poll() is None, "the unpack ended before it could be killed"
            time.sleep(0.02)
        agent.send_signal(signal.SIGKILL)
    finally:
        agent.kill()
        agent.wait()
    assert len(seen) == 1 and seen[0].endswith(f" {chain_id}")

    async def restart() -> tuple[set[str], list[str], UnpackResult, set[str]]:
        after_kill = set(await committed(crash))
        async with Unpacker(crash.socket) as unpacker:
            removed = await unpacker.remove_stale()
            result = await unpacker.unpack_chain([base])
        return after_kill, removed, result, set(await committed(crash))

    after_kill, removed, result, final = asyncio.run(restart())
    # Killed mid-Apply: nothing committed; the restarted agent removes its active snapshot
    # and unpacks the chain from scratch.
    assert after_kill == before
    assert removed == seen
    assert result.committed == (chain_id,)
    assert final == before | {chain_id}
    assert not asyncio.run(active_extracts())
