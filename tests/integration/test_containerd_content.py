"""The containerd clients against real containerd daemons (no mocks), on each profile.

The contract tests: every test here runs once per containerd profile the agent supports
(``testbed.paths.CONTRACT_CONTAINERD``: kind's 2.x and 1.7). Two simulated nodes (one
containerd each) per profile: ``content`` for the content store and lease tests, ``cri``
for the CRI pull that must skip the layers we wrote. Blobs are real layers of
the test bed's image family (its OCI layout), or random bytes where a test needs content no
other test writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from layercache.containerd.content import ContentStore, ingest_ref
from layercache.containerd.cri import AuthConfig, CRIImages
from layercache.containerd.errors import ContainerdError, NotFound, Unavailable
from layercache.containerd.ingest import (
    CHUNK_BYTES,
    ContentDigestMismatchError,
    SourceSizeError,
)
from layercache.containerd.labels import GC_ROOT_LABEL, MANAGED_BY_LABEL, cache_label
from layercache.containerd.leases import LeaseResource, Leases
from layercache.oci.digest import Digest, DigestMismatchError
from testbed.contract import collect_garbage, memory_source, running_node
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.nodes import RegistryHost, SimNode

pytestmark = pytest.mark.integration

CACHE = "tests/content"


@pytest.fixture(scope="module")
def content_node(tmp_path_factory: pytest.TempPathFactory, profile: str) -> Iterator[SimNode]:
    yield from running_node("lc-content", tmp_path_factory.mktemp("node-content"), profile)


@pytest.fixture(scope="module")
def cri_node(tmp_path_factory: pytest.TempPathFactory, profile: str) -> Iterator[SimNode]:
    yield from running_node("lc-cri", tmp_path_factory.mktemp("node-cri"), profile)


@pytest.fixture
async def store(content_node: SimNode) -> AsyncIterator[ContentStore]:
    async with ContentStore(content_node.socket) as client:
        yield client


def human_size(size: int) -> str:
    """``ctr``'s size column: go-units ``HumanSize`` (4 significant digits, powers of 1000)."""
    value, units = float(size), ["B", "kB", "MB", "GB", "TB"]
    index = 0
    while value >= 1000 and index < len(units) - 1:
        value, index = value / 1000, index + 1
    return f"{value:.4g}{units[index]}"


def ctr_content(node: SimNode) -> dict[str, tuple[str, dict[str, str]]]:
    """``ctr content ls``: digest → (size column, labels)."""
    rows: dict[str, tuple[str, dict[str, str]]] = {}
    for line in node.ctr("content", "ls").splitlines()[1:]:
        fields = line.split("\t")
        fields = [f for f in fields if f]
        labels = dict(kv.split("=", 1) for kv in fields[-1].split(",") if "=" in kv)
        rows[fields[0]] = (fields[1], labels)
    return rows


async def test_layer_written_through_the_content_api_is_listed_by_ctr_with_our_labels(
        store: ContentStore, content_node: SimNode, oci_family: Family) -> None:
    layer = max(oci_family.layers, key=lambda item: item.size)  # the Debian base, ~60 MB
    data = oci_family.blob_path(layer.digest).read_bytes()
    started = time.monotonic()
    result = await store.write(ingest_ref(layer.digest), layer.digest, layer.size,
                               memory_source(data), caches=[CACHE])
    seconds = time.monotonic() - started
    print(f"\nwrote {layer.size / 1e6:.1f} MB in {seconds:.2f} s: "
          f"{layer.size / 1e6 / seconds:.1f} MB/s")
    assert (result.digest, result.size, result.written) == (layer.digest, layer.size, layer.size)
    assert not result.already_existed and result.resumed_from == 0

    size, labels = ctr_content(content_node)[layer.digest]
    assert size == human_size(layer.size)
    assert labels[MANAGED_BY_LABEL] == "layercache"
    assert GC_ROOT_LABEL in labels and cache_label(CACHE) in labels
    info = await store.info(layer.digest)
    assert info is not None and info.size == layer.size and info.caches == {CACHE}
    # Nothing of the write is left over: no ingest, no lease.
    assert await store.list_statuses() == []
    assert await store.leases.list() == []


async def test_info_and_read_round_trip_the_layout_bytes(store: ContentStore,
                                                         oci_family: Family) -> None:
    layer = oci_family.image_layers("app-web")[-1]
    data = oci_family.blob_path(layer.digest).read_bytes()
    await store.write(ingest_ref(layer.digest), layer.digest, layer.size, memory_source(data))
    info = await store.info(layer.digest)
    assert info is not None and (info.digest, info.size) == (layer.digest, len(data))
    assert info.created_at is not None and info.pinned
    assert b"".join([chunk async for chunk in store.read(layer.digest)]) == data
    tail = b"".join([chunk async for chunk in store.read(layer.digest, offset=1000)])
    assert tail == data[1000:]
    listed = {blob.digest for blob in await store.list([f"digest=={layer.digest}"])}
    assert listed == {layer.digest}


async def test_wrong_expected_digest_raises_and_leaves_no_blob_and_no_ingest(
        store: ContentStore) -> None:
    data = os.urandom(3 * CHUNK_BYTES + 17)
    actual = Digest.from_bytes(data)
    wrong = Digest.from_bytes(b"something else")
    ref = ingest_ref(wrong)
    with pytest.raises(ContentDigestMismatchError) as raised:
        # keep_on_error does not keep bytes known to be wrong.
        await store.write(ref, wrong, len(data), memory_source(data), keep_on_error=True)
    assert isinstance(raised.value, DigestMismatchError)
    assert (raised.value.expected, raised.value.actual) == (wrong, actual)
    assert store.socket in str(raised.value) and ref in str(raised.value)
    assert await store.info(wrong) is None and await store.info(actual) is None
    assert await store.status(ref) is None
    assert await store.list_statuses() == []
    assert await store.leases.list() == []


async def test_interrupted_write_resumes_from_the_stat_offset(store: ContentStore) -> None:
    data = os.urandom(8 * CHUNK_BYTES)
    digest = Digest.from_bytes(data)
    ref = ingest_ref(digest)
    halfway = asyncio.Event()
    offsets: list[int] = []

    def stalling_source(offset: int) -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            offsets.append(offset)
            for start in range(offset, len(data), CHUNK_BYTES):
                if start >= len(data) // 2 and not halfway.is_set():
                    halfway.set()
                    await asyncio.Event().wait()  # stall until cancelled
                yield data[start:start + CHUNK_BYTES]
        return chunks()

    first = asyncio.create_task(store.write(ref, digest, len(data), stalling_source,
                                            keep_on_error=True))
    await halfway.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # containerd may still apply a WRITE the cancelled stream had sent (seen on 1.7 under
    # load: one more chunk after the first STAT): read the offset once it stopped moving.
    status = await store.status(ref)
    for _ in range(50):
        await asyncio.sleep(0.2)
        again = await store.status(ref)
        if again == status:
            break
        status = again
    assert status is not None and 0 < status.offset < len(data)
    assert status.total == len(data)

    result = await store.write(ref, digest, len(data), stalling_source)
    assert offsets == [0, status.offset]
    assert result.resumed_from == status.offset > 0
    assert result.written == len(data) - status.offset
    info = await store.info(digest)
    assert info is not None and info.size == len(data)
    assert hashlib.sha256(b"".join([c async for c in store.read(digest)])).hexdigest() == (
        digest.encoded)
    assert await store.status(ref) is None
    assert await store.leases.list() == []


async def test_plain_iterable_after_an_interruption_starts_over(store: ContentStore) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 5)
    digest = Digest.from_bytes(data)
    ref = ingest_ref(digest)

    async def short() -> AsyncIterator[bytes]:
        yield data[:CHUNK_BYTES]

    with pytest.raises(SourceSizeError):
        await store.write(ref, digest, len(data), short(), keep_on_error=True)
    status = await store.status(ref)
    assert status is not None and status.offset == CHUNK_BYTES

    async def whole() -> AsyncIterator[bytes]:
        yield data

    result = await store.write(ref, digest, len(data), whole())
    assert (result.resumed_from, result.written) == (0, len(data))
    assert await store.info(digest) is not None
    assert await store.list_statuses() == []


def _source(data: bytes, offsets: list[int], cut_at: int | None = None
            ) -> Callable[[int], AsyncIterator[bytes]]:
    """A resumable source of ``data`` in CHUNK_BYTES pieces, noting each offset asked for.

    With ``cut_at``, the connection is reset when that byte is reached.
    """
    def from_offset(offset: int) -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            offsets.append(offset)
            for start in range(offset, len(data), CHUNK_BYTES):
                if start == cut_at:
                    raise ConnectionResetError("the registry closed the connection")
                yield data[start:start + CHUNK_BYTES]
        return chunks()
    return from_offset


async def test_a_source_that_fails_leaves_every_write_it_sent_in_the_ingest(
        store: ContentStore) -> None:
    # A registry's body cut short after three WRITEs (all still unanswered: the window is
    # four): containerd must hold all three before the stream ends, or a resume fetches
    # bytes it had already been sent (seen in CI under load: no resume at all).
    cut = 3 * CHUNK_BYTES
    for _ in range(5):  # the race this guards against is lost only some of the time
        data = os.urandom(8 * CHUNK_BYTES)
        digest = Digest.from_bytes(data)
        ref = ingest_ref(digest)
        offsets: list[int] = []
        with pytest.raises(ConnectionResetError):
            await store.write(ref, digest, len(data), _source(data, offsets, cut),
                              keep_on_error=True)
        status = await store.status(ref)
        assert status is not None and (status.offset, status.total) == (cut, len(data))
        result = await store.write(ref, digest, len(data), _source(data, offsets))
        assert offsets == [0, cut]
        assert (result.resumed_from, result.written) == (cut, len(data) - cut)
        info = await store.info(digest)
        assert info is not None and info.size == len(data)
    assert await store.list_statuses() == []
    assert await store.leases.list() == []


async def test_failed_write_without_keep_aborts_the_ingest(store: ContentStore) -> None:
    data = os.urandom(CHUNK_BYTES + 1)
    digest = Digest.from_bytes(data)

    async def too_long() -> AsyncIterator[bytes]:
        yield data + b"extra"

    with pytest.raises(SourceSizeError):
        await store.write(ingest_ref(digest), digest, len(data), too_long())
    assert await store.list_statuses() == []
    assert await store.leases.list() == []


async def test_existing_blob_is_success_and_gains_the_new_cache_label(
        store: ContentStore) -> None:
    data = os.urandom(1000)
    digest = Digest.from_bytes(data)
    await store.write(ingest_ref(digest), digest, len(data), memory_source(data),
                      caches=["a/one"])
    again = await store.write(ingest_ref(digest), digest, len(data), memory_source(data),
                              caches=["b/two"])
    assert again.already_existed and again.size == len(data) and again.written == 0
    info = await store.info(digest)
    assert info is not None and info.caches == {"a/one", "b/two"}


async def test_gc_keeps_pinned_blobs_and_collects_unpinned_ones(store: ContentStore) -> None:
    pinned, unpinned = os.urandom(5000), os.urandom(5000)
    pinned_digest, unpinned_digest = Digest.from_bytes(pinned), Digest.from_bytes(unpinned)
    await store.write(ingest_ref(pinned_digest), pinned_digest, len(pinned),
                      memory_source(pinned), caches=["a/one", "b/two"])
    # pin=False: held only by the write's lease, which ends with the write.
    await store.write(ingest_ref(unpinned_digest), unpinned_digest, len(unpinned),
                      memory_source(unpinned), pin=False)
    assert await store.info(unpinned_digest) is not None

    await collect_garbage(store.leases)
    assert await store.info(pinned_digest) is not None
    assert await store.info(unpinned_digest) is None

    # One cache lets go: still pinned. The last one lets go: collected at the next GC.
    assert await store.release(pinned_digest, ["a/one"]) is False
    await collect_garbage(store.leases)
    info = await store.info(pinned_digest)
    assert info is not None and info.caches == {"b/two"} and info.pinned
    assert await store.release(pinned_digest, ["b/two"]) is True
    info = await store.info(pinned_digest)
    assert info is not None and not info.pinned and not info.managed and not info.caches
    await collect_garbage(store.leases)
    assert await store.info(pinned_digest) is None
    assert await store.release(pinned_digest) is True  # gone: nothing to release


async def test_lease_context_leaves_no_lease_on_success_error_or_cancel(
        content_node: SimNode) -> None:
    async with Leases(content_node.socket) as leases:
        async with leases.lease(labels={"purpose": "test"}) as lease_id:
            listed = await leases.list()
            assert [lease.id for lease in listed] == [lease_id]
            assert listed[0].expires_at is not None and listed[0].labels["purpose"] == "test"
        assert await leases.list() == []

        with pytest.raises(RuntimeError, match="boom"):
            async with leases.lease():
                raise RuntimeError("boom")
        assert await leases.list() == []

        entered = asyncio.Event()

        async def hold() -> None:
            async with leases.lease():
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(hold())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await leases.list() == []


async def test_write_under_a_callers_lease_is_held_by_it_until_it_ends(
        store: ContentStore) -> None:
    data = os.urandom(4000)
    digest = Digest.from_bytes(data)
    async with store.leases.lease(sync=True) as lease_id:
        await store.write(ingest_ref(digest), digest, len(data), memory_source(data),
                          pin=False, lease=lease_id)
        resources = await store.leases.list_resources(lease_id)
        assert LeaseResource(digest, "content") in resources
        await collect_garbage(store.leases)
        assert await store.info(digest) is not None  # the lease holds it
    assert await store.info(digest) is None  # lease deleted with sync: collected
    assert await store.leases.list() == []


async def test_errors_name_the_socket_and_the_subject(store: ContentStore,
                                                      tmp_path: Path) -> None:
    absent = Digest.from_bytes(b"never written")
    with pytest.raises(NotFound) as raised:
        await store.delete(absent)
    assert store.socket in str(raised.value) and absent in str(raised.value)
    assert not raised.value.retryable
    assert await store.abort("no-such-ref") is False

    async with ContentStore(tmp_path / "missing.sock", timeout=5) as nowhere:
        with pytest.raises(Unavailable) as unreachable:
            await nowhere.info(absent)
    assert unreachable.value.retryable
    assert str(tmp_path / "missing.sock") in str(unreachable.value)


async def test_cri_pull_after_writing_the_layers_fetches_only_manifest_and_config(
        cri_node: SimNode, registry_proxy: FaultProxy, oci_family: Family) -> None:
    cri_node.configure_registries([RegistryHost(registry_proxy.host, registry_proxy.url)])
    image = oci_family.images["app-py-a"]
    manifest = image.resolve()
    reference = f"{registry_proxy.host}/{image.reference}"
    async with ContentStore(cri_node.socket) as store, CRIImages(cri_node.socket) as cri:
        for digest in manifest.layers:
            size = oci_family.layer(digest).size
            data = oci_family.blob_path(digest).read_bytes()
            await store.write(ingest_ref(digest), digest, size, memory_source(data),
                              caches=["tests/cri"])
        registry_proxy.reset()

        image_ref = await cri.pull(reference)

        stats = registry_proxy.stats()
        blob_path = f"/v2/{image.repository}/blobs/"
        for digest in manifest.layers:
            assert stats.count(blob_path + digest) == 0, f"layer {digest} was fetched"
        assert stats.count(blob_path + manifest.config_digest, "GET", 200) == 1
        assert stats.blob_bytes == manifest.config_size
        fetched = sorted({r.path for r in stats.requests})
        print(f"\npull fetched {stats.total_bytes} bytes in {stats.total_requests} "
              f"requests: {fetched}; layers held locally: "
              f"{sum(oci_family.layer(d).size for d in manifest.layers)} bytes")
        assert all("/manifests/" in p or p == blob_path + manifest.config_digest
                   for p in fetched)

        found = await cri.status(reference)
        assert found is not None and found.id == image_ref and reference in found.repo_tags
        assert image_ref in {listed.id for listed in await cri.list()}
        assert [i.id for i in await cri.list(reference)] == [image_ref]
        # containerd 2.x's CRI reports image-filesystem usage from a snapshot-usage sync
        # that runs every `stats_collect_period` (10 s): right after a pull it may still be 0.
        deadline = asyncio.get_running_loop().time() + 30
        usage = await cri.fs_info()
        while usage.used_bytes == 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(1)
            usage = await cri.fs_info()
        assert usage.used_bytes > 0 and usage.inodes_used > 0
        assert usage.mountpoint == str(cri_node.workdir / "root"
                                       / "io.containerd.snapshotter.v1.overlayfs")

        # Removing the image leaves our pinned layers through GC; its config goes.
        await cri.remove(reference)
        await cri.remove(reference)  # idempotent
        assert await cri.status(reference) is None
        await collect_garbage(store.leases)
        for digest in manifest.layers:
            assert await store.info(digest) is not None
        assert await store.info(manifest.config_digest) is None


async def test_cri_pull_errors_never_carry_credentials(
        cri_node: SimNode, registry_proxy: FaultProxy) -> None:
    cri_node.configure_registries([RegistryHost(registry_proxy.host, registry_proxy.url)])
    auth = AuthConfig(username="someone", password="hunter2-very-secret",
                      registry_token="tok-very-secret")
    assert "secret" not in repr(auth)
    reference = f"{registry_proxy.host}/family/absent:v1"
    async with CRIImages(cri_node.socket) as cri:
        with pytest.raises(ContainerdError) as raised:
            await cri.pull(reference, auth)
        assert await cri.status(reference) is None
    assert reference in str(raised.value) and cri_node.socket.as_posix() in str(raised.value)
    assert "secret" not in str(raised.value) and raised.value.__cause__ is None
