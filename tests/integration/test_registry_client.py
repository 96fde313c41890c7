"""The registry client against the bed's real registries, token server and fault proxy.

Every resolved digest and size is compared with the image family's own description of
what was pushed (`testbed.images.Family`), exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from layercache.metrics import RegistryMetrics
from layercache.oci.digest import Digest
from layercache.oci.reference import parse_reference
from layercache.registry import (
    AuthenticationError,
    BlobNotFoundError,
    DigestMismatchError,
    DockerConfig,
    FileSink,
    Keyring,
    MemorySink,
    NoMatchingPlatformError,
    RateLimitedError,
    RegistryClient,
    RegistryConnectionError,
    RegistryHosts,
    RegistryOptions,
    RegistryStatusError,
    RetryPolicy,
    fetch_blob,
    resolve,
)
from testbed import pki
from testbed.bed import BedState, RegistryRecord
from testbed.faultproxy import FaultProxy, fault_proxy
from testbed.image_recipe import RECIPE
from testbed.images import Family

pytestmark = pytest.mark.integration

AMD64 = "linux/amd64"


def options(record: RegistryRecord) -> RegistryOptions:
    return RegistryOptions(
        insecure=record.url.startswith("http://"),
        ca_file=Path(record.ca_file) if record.ca_file else None,
    )


def keyring(record: RegistryRecord, password: str | None = None) -> Keyring:
    if record.username is None:
        return Keyring()
    auths = {record.host: {"username": record.username, "password": password or record.password}}
    return Keyring([DockerConfig.from_json({"auths": auths}, f"{record.flavour} test config")])


class Sleeps:
    """Records every retry wait (seconds) and really waits."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(seconds)


def make_client(
    bed: BedState,
    flavour: str,
    *,
    password: str | None = None,
    anonymous: bool = False,
    sleeps: Sleeps | None = None,
) -> RegistryClient:
    record = bed.registries[flavour]
    return RegistryClient(
        keyring=Keyring() if anonymous else keyring(record, password),
        registries={record.host: options(record)},
        retry=RetryPolicy(attempts=5, initial_backoff=0.1, sleep=sleeps or Sleeps()),
    )


@pytest.fixture
async def proxied(proxy: FaultProxy) -> AsyncIterator[tuple[RegistryClient, Sleeps]]:
    sleeps = Sleeps()
    client = RegistryClient(
        registries={proxy.host: RegistryOptions(insecure=True)},
        retry=RetryPolicy(attempts=5, initial_backoff=0.1, sleep=sleeps),
    )
    async with client:
        yield client, sleeps


# --- resolution, all flavours -------------------------------------------------------------

#: Every image pushed to the bed, as `family/<name>:v1`.
IMAGES = RECIPE.family_names()


@pytest.mark.parametrize("flavour", ["plain", "basic", "token"])
@pytest.mark.parametrize("name", IMAGES)
async def test_resolves_exactly_what_was_pushed(
    bed: BedState, family: Family, flavour: str, name: str
) -> None:
    host = bed.registries[flavour].host
    async with make_client(bed, flavour) as client:
        image = await resolve(client, f"{host}/family/{name}:v1", AMD64)
    info = family.images[name]
    expected = info.resolve(AMD64)
    assert image.digest == info.manifest_digest
    assert image.media_type == info.manifest_media_type
    assert image.manifest_digest == expected.digest
    assert image.manifest_media_type == expected.media_type
    assert image.manifest_size == expected.size
    assert str(image.manifest_platform) == AMD64
    assert image.config_digest == expected.config_digest
    assert image.config_size == expected.config_size
    assert [layer.digest for layer in image.layers] == list(expected.layers)
    # Media types from the pushed manifest itself: `Family.layer` keeps one per digest, and
    # python-docker carries python's layers under Docker media types.
    pushed = json.loads(family.blob_path(expected.digest).read_bytes())
    for layer, descriptor in zip(image.layers, pushed["layers"], strict=True):
        want = family.layer(layer.digest)
        assert (layer.size, layer.diff_id) == (want.size, want.diff_id)
        assert layer.media_type == descriptor["mediaType"]


async def test_multi_platform_index(bed: BedState, family: Family) -> None:
    host = bed.registries["plain"].host
    async with make_client(bed, "plain") as client:
        amd64 = await resolve(client, f"{host}/family/multi:v1", AMD64)
        arm64 = await resolve(client, f"{host}/family/multi:v1", "linux/arm64")
        base = await resolve(client, f"{host}/family/base:v1", AMD64)
    assert amd64.digest == arm64.digest == family.images["multi"].manifest_digest
    assert amd64.manifest_digest != arm64.manifest_digest
    assert arm64.manifest_digest == family.images["multi"].resolve("linux/arm64").digest
    assert str(arm64.manifest_platform) == "linux/arm64"
    assert [layer.digest for layer in arm64.layers] == list(
        family.images["multi"].resolve("linux/arm64").layers
    )
    # The amd64 entry is built on the family's base; the foreign arm64 one is not.
    assert amd64.layers[0] == base.layers[0]
    assert base.layers[0].digest not in {layer.digest for layer in arm64.layers}


async def test_attestation_entry_never_chosen(bed: BedState, family: Family) -> None:
    host = bed.registries["token"].host
    attested = family.images["attested"]
    attestation = next(m for m in attested.manifests if m.is_attestation)
    async with make_client(bed, "token") as client:
        image = await resolve(client, f"{host}/family/attested:v1", AMD64)
        with pytest.raises(NoMatchingPlatformError, match="attestation entries ignored") as info:
            await resolve(client, f"{host}/family/attested:v1", "linux/arm64")
        with pytest.raises(NoMatchingPlatformError):
            await resolve(client, f"{host}/family/attested:v1", "unknown/unknown")
    assert image.manifest_digest == attested.resolve(AMD64).digest != attestation.digest
    assert "attested" in str(info.value) and "linux/amd64" in str(info.value)


async def test_pinned_by_digest(bed: BedState, family: Family) -> None:
    host = bed.registries["basic"].host
    digest = family.images["python-docker"].manifest_digest
    async with make_client(bed, "basic") as client:
        image = await resolve(client, f"{host}/family/python-docker@{digest}", AMD64)
    assert image.digest == digest
    assert image.manifest_media_type == "application/vnd.docker.distribution.manifest.v2+json"


# --- authentication -----------------------------------------------------------------------


async def test_ping_with_credentials(bed: BedState) -> None:
    for flavour in ("plain", "basic", "token"):
        ref = parse_reference(f"{bed.registries[flavour].host}/family/base:v1")
        async with make_client(bed, flavour) as client:
            await client.ping(ref)


@pytest.mark.parametrize("flavour", ["basic", "token"])
async def test_wrong_password_is_a_clear_auth_error(bed: BedState, flavour: str) -> None:
    record = bed.registries[flavour]
    wrong = "not-the-password-" + hashlib.sha256(b"x").hexdigest()[:8]
    async with make_client(bed, flavour, password=wrong) as client:
        with pytest.raises(AuthenticationError, match="credentials") as info:
            await resolve(client, f"{record.host}/family/base:v1", AMD64)
    message = str(info.value)
    assert record.host in message
    assert wrong not in message and str(record.password) not in message
    assert str(record.username) not in message


@pytest.mark.parametrize(
    ("flavour", "reason"),
    [
        ("token", "anonymous access to repository:family/base:pull refused"),
        ("basic", "requires credentials"),
    ],
)
async def test_anonymous_refused(bed: BedState, flavour: str, reason: str) -> None:
    host = bed.registries[flavour].host
    async with make_client(bed, flavour, anonymous=True) as client:
        with pytest.raises(AuthenticationError, match=re.escape(reason)):
            await resolve(client, f"{host}/family/base:v1", AMD64)


async def test_tls_verified_by_default(bed: BedState) -> None:
    # The token registry's certificate comes from the bed's CA: without --ca-file, refused.
    record = bed.registries["token"]
    client = RegistryClient(keyring=keyring(record), retry=RetryPolicy(attempts=1))
    async with client:
        with pytest.raises(RegistryConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await resolve(client, f"{record.host}/family/base:v1", AMD64)


# --- faults, through the proxy in front of the plain registry -------------------------------


def blob_path(name: str, digest: str) -> str:
    return f"/v2/family/{name}/blobs/{digest}"


async def test_429_retry_after_honoured(
    proxy: FaultProxy, proxied: tuple[RegistryClient, Sleeps], family: Family
) -> None:
    client, sleeps = proxied
    proxy.add_fault(r"^/v2/family/base/manifests/", "status", status=429, retry_after=2)
    started = time.monotonic()
    image = await resolve(client, f"{proxy.host}/family/base:v1", AMD64)
    elapsed = time.monotonic() - started
    assert image.manifest_digest == family.images["base"].manifest_digest
    assert sleeps.waits and sleeps.waits[0] >= 2.0
    assert elapsed >= 2.0
    assert proxy.stats().faults_fired == {"status": 1}


async def test_503_then_success(
    proxy: FaultProxy, proxied: tuple[RegistryClient, Sleeps], family: Family
) -> None:
    client, sleeps = proxied
    digest = family.images["app-curl"].layers[-1]
    size = family.layer(digest).size
    path = blob_path("app-curl", digest)
    proxy.add_fault(re.escape(path), "status", status=503, times=2)
    sink = MemorySink()
    assert (
        await fetch_blob(
            client, parse_reference(f"{proxy.host}/family/app-curl:v1"), Digest(digest), size, sink
        )
        == size
    )
    assert hashlib.sha256(sink.data).hexdigest() == digest.removeprefix("sha256:")
    stats = proxy.stats()
    assert stats.count(path, "GET", 503) == 2
    assert stats.count(path, "GET", 200) == 1
    assert len(sleeps.waits) == 2


@pytest.mark.parametrize("kind", ["reset", "truncate"])
async def test_cut_body_resumed_with_range(
    proxy: FaultProxy,
    proxied: tuple[RegistryClient, Sleeps],
    family: Family,
    tmp_path: Path,
    kind: str,
) -> None:
    client, _ = proxied
    digest = family.images["python"].layers[1]  # the 17 MB python3 layer
    size = family.layer(digest).size
    path = blob_path("python", digest)
    proxy.add_fault(re.escape(path), kind)  # cuts after half the body
    target = tmp_path / "blob"
    await fetch_blob(
        client,
        parse_reference(f"{proxy.host}/family/python:v1"),
        Digest(digest),
        size,
        FileSink(target),
    )
    assert await asyncio.to_thread(_sha256, target) == digest
    stats = proxy.stats()
    assert stats.faults_fired == {kind: 1}
    # Resumed, not restarted: one full-length start, one partial answer for the rest.
    assert stats.count(path, "GET", 200) == 1
    assert stats.count(path, "GET", 206) == 1
    assert size <= stats.bytes_by_path[path] < 2 * size


async def test_wrong_digest_body_discarded(
    proxy: FaultProxy, proxied: tuple[RegistryClient, Sleeps], family: Family, tmp_path: Path
) -> None:
    client, _ = proxied
    digest = family.images["app-web"].layers[-1]
    size = family.layer(digest).size
    ref = parse_reference(f"{proxy.host}/family/app-web:v1")
    proxy.add_fault(
        re.escape(blob_path("app-web", digest)), "corrupt", after_bytes=size // 3, times=2
    )
    target = tmp_path / "blob"
    with pytest.raises(DigestMismatchError) as info:
        await fetch_blob(client, ref, Digest(digest), size, FileSink(target))
    assert info.value.expected == digest and info.value.size == size
    assert await asyncio.to_thread(_listing, tmp_path) == []  # nothing kept, no partial file
    memory = MemorySink()
    with pytest.raises(DigestMismatchError):
        await fetch_blob(client, ref, Digest(digest), size, memory)
    with pytest.raises(RuntimeError):
        _ = memory.data


async def test_head_refused_falls_back_to_get(
    proxy: FaultProxy, proxied: tuple[RegistryClient, Sleeps], family: Family
) -> None:
    client, _ = proxied
    proxy.add_fault(r"^/v2/family/nginx/manifests/v1$", "status", method="HEAD", status=405)
    image = await resolve(client, f"{proxy.host}/family/nginx:v1", AMD64)
    assert image.manifest_digest == family.images["nginx"].manifest_digest
    assert proxy.stats().count("/v2/family/nginx/manifests/v1", "GET", 200) == 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- what real registries do: HEAD refused, rate-limit windows, redirects -----------------


@pytest.mark.parametrize("status", [501, 405, 400])
async def test_head_refused_falls_back_to_get_once_and_is_remembered(
    proxy: FaultProxy, proxied: tuple[RegistryClient, Sleeps], family: Family, status: int
) -> None:
    # Registries that serve GET but answer HEAD on manifests with 501 (or 405, 400 …).
    client, _ = proxied
    tag_path = "/v2/family/nginx/manifests/v1"
    proxy.add_fault(r"/manifests/", "status", method="HEAD", status=status, times=None)
    image = await resolve(client, f"{proxy.host}/family/nginx:v1", AMD64)
    assert image.manifest_digest == family.images["nginx"].resolve(AMD64).digest
    stats = proxy.stats()
    assert stats.count(tag_path, "HEAD") == 1  # not retried as a server error
    assert stats.count(tag_path, "GET", 200) == 1
    # The next resolution on that host: GET only, no HEAD.
    again = await resolve(client, f"{proxy.host}/family/base:v1", AMD64)
    assert again.manifest_digest == family.images["base"].resolve(AMD64).digest
    stats = proxy.stats()
    assert stats.count("/v2/family/base/manifests/v1", "HEAD") == 0
    assert stats.count("/v2/family/base/manifests/v1", "GET", 200) == 1
    assert stats.faults_fired == {"status": 1}


async def test_head_server_error_falls_back_to_get_once_and_is_not_remembered(
    proxy: FaultProxy, proxied: tuple[RegistryClient, Sleeps], family: Family
) -> None:
    # A passing 503 on HEAD: GET once instead, but the host keeps HEAD (manifest GETs count
    # against pull quotas, so one blip must not cost an hour of them).
    client, _ = proxied
    tag_path = "/v2/family/nginx/manifests/v1"
    proxy.add_fault(r"/manifests/", "status", method="HEAD", status=503, times=1)
    image = await resolve(client, f"{proxy.host}/family/nginx:v1", AMD64)
    assert image.manifest_digest == family.images["nginx"].resolve(AMD64).digest
    stats = proxy.stats()
    assert stats.count(tag_path, "HEAD") == 1
    assert stats.count(tag_path, "GET", 200) == 1
    again = await resolve(client, f"{proxy.host}/family/base:v1", AMD64)
    assert again.manifest_digest == family.images["base"].resolve(AMD64).digest
    stats = proxy.stats()
    assert stats.count("/v2/family/base/manifests/v1", "HEAD", 200) == 1


async def test_rate_limit_window_gets_one_waiting_client(
    proxy: FaultProxy, proxied: tuple[RegistryClient, Sleeps], family: Family
) -> None:
    # A registry refuses every manifest request for 3 s once its limit is hit and says
    # Retry-After: 3. Eight concurrent resolutions share one per-host limiter: after the
    # first 429 nobody else asks until it has passed, then one probe goes first.
    client, _ = proxied
    proxy.add_fault(r"/manifests/", "status", status=429, retry_after=3, window_seconds=3)
    names = IMAGES[:8]
    first = asyncio.create_task(resolve(client, f"{proxy.host}/family/{names[0]}:v1", AMD64))
    await _until(lambda: proxy.stats().faults_fired.get("status", 0) >= 1)
    refused_at = time.monotonic()
    others = [resolve(client, f"{proxy.host}/family/{n}:v1", AMD64) for n in names[1:]]
    images = await asyncio.gather(first, *others)
    assert time.monotonic() - refused_at >= 2.5  # nobody got through before Retry-After
    for name, image in zip(names, images, strict=True):
        assert image.digest == family.images[name].manifest_digest
    assert [(r.method, r.path) for r in proxy.stats().requests if r.status == 429] == [
        ("HEAD", f"/v2/family/{names[0]}/manifests/v1")]


async def test_long_retry_after_is_handed_to_the_caller_and_shared(
    proxy: FaultProxy, family: Family
) -> None:
    # Retry-After: 600 is longer than a request waits (max_retry_after): the error carries
    # it to the caller, and every other request to that host fails at once, unsent.
    proxy.add_fault(r"/manifests/", "status", status=429, retry_after=600, window_seconds=600)
    client = RegistryClient(registries={proxy.host: RegistryOptions(insecure=True)},
                            retry=RetryPolicy(initial_backoff=0.1, max_retry_after=10))
    async with client:
        with pytest.raises(RateLimitedError) as first:
            await resolve(client, f"{proxy.host}/family/base:v1", AMD64)
        started = time.monotonic()
        with pytest.raises(RateLimitedError) as second:
            await resolve(client, f"{proxy.host}/family/nginx:v1", AMD64)
    assert first.value.retry_after == 600
    assert time.monotonic() - started < 1.0
    assert second.value.retry_after is not None and 590 < second.value.retry_after <= 600
    assert proxy.stats().total_requests == 1


async def test_https_to_http_redirect_is_refused(
    bed: BedState, proxy: FaultProxy, family: Family, tmp_path: Path
) -> None:
    # An https registry whose blob store answers with a redirect to plain http.
    ca = pki.CA.create(tmp_path / "pki")
    pair = ca.issue("registry", "127.0.0.1", hosts=("127.0.0.1",))
    digest = family.images["app-curl"].layers[-1]
    size = family.layer(digest).size
    path = blob_path("app-curl", digest)
    assert bed.registries["plain"].url.startswith("http://")
    with fault_proxy(tmp_path / "tls", bed.registries["plain"].url,
                     tls=(pair.cert, pair.key, ca.cert)) as tls:
        tls.add_fault(re.escape(path), "redirect", location=f"http://{proxy.host}{{path}}",
                      times=None)
        client = RegistryClient(registries={tls.host: RegistryOptions(ca_file=ca.cert)},
                                retry=RetryPolicy(attempts=2, initial_backoff=0.1))
        async with client:
            with pytest.raises(RegistryStatusError, match="downgrade") as info:
                await fetch_blob(client, parse_reference(f"{tls.host}/family/app-curl:v1"),
                                 Digest(digest), size, MemorySink())
        assert info.value.status == 307
        assert tls.stats().count(path, "GET", 307) == 1  # final: not retried
    assert proxy.stats().total_requests == 0  # nothing went out in clear


#: A pre-signed storage URL's query: credentials.
SIGNED = "X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature=0123456789abcdef"


async def test_presigned_query_never_logged_or_in_errors(
    proxy: FaultProxy, proxied: tuple[RegistryClient, Sleeps], family: Family,
    caplog: pytest.LogCaptureFixture
) -> None:
    # Blob stores answer with a redirect to a pre-signed URL, credentials in its query.
    client, _ = proxied
    caplog.set_level(logging.DEBUG)
    digest = family.images["app-curl"].layers[-1]
    size = family.layer(digest).size
    path = blob_path("app-curl", digest)
    ref = parse_reference(f"{proxy.host}/family/app-curl:v1")
    only = f"^{re.escape(path)}$"
    proxy.add_fault(only, "redirect", location=f"http://{proxy.host}{{path}}?{SIGNED}")
    sink = MemorySink()
    assert await fetch_blob(client, ref, Digest(digest), size, sink) == size
    assert hashlib.sha256(sink.data).hexdigest() == digest.removeprefix("sha256:")
    assert proxy.stats().count(path, "GET", 200) == 1  # the signed URL was fetched
    # A redirect whose target fails: the error names the request, not the query.
    proxy.add_fault(only, "redirect", times=None,
                    location=f"http://{proxy.host}/storage{{path}}?{SIGNED}")
    with pytest.raises(BlobNotFoundError) as info:
        await fetch_blob(client, ref, Digest(digest), size, MemorySink())
    assert "X-Amz" not in str(info.value)
    logged = [record.getMessage() for record in caplog.records]
    # httpx logged its requests and the client the redirects' targets, without the query
    # (aiohttp moves the bytes since issue 15: no httpcore header logging any more).
    assert any("HTTP Request" in line for line in logged)
    assert any("redirected to" in line and "/storage/" in line for line in logged)
    assert [line for line in logged if "X-Amz" in line] == []


async def test_requests_counted_by_registry_and_code(
    proxy: FaultProxy, family: Family
) -> None:
    # One limiter and one counter per host for every client of a process (the operator
    # opens a client per resolution): codes as the registry answered, nothing else.
    proxy.add_fault(r"/manifests/", "status", method="HEAD", status=429, retry_after=1)
    proxy.add_fault(r"/blobs/", "redirect", location=f"http://{proxy.host}{{path}}?{SIGNED}")
    registry = CollectorRegistry()
    hosts = RegistryHosts(RegistryMetrics(registry).request)
    for name in ("base", "nginx"):
        client = RegistryClient(registries={proxy.host: RegistryOptions(insecure=True)},
                                retry=RetryPolicy(initial_backoff=0.1), hosts=hosts)
        async with client:
            image = await resolve(client, f"{proxy.host}/family/{name}:v1", AMD64)
        assert image.digest == family.images[name].manifest_digest
    seen: dict[str, int] = {}
    for r in proxy.stats().requests:
        seen[str(r.status)] = seen.get(str(r.status), 0) + r.count
    # Per image: HEAD, manifest GET, config GET; base's first HEAD refused, its config
    # redirected once.
    assert seen == {"429": 1, "307": 1, "200": 2 * 3}
    for code, count in seen.items():
        assert registry.get_sample_value(
            "layercache_registry_requests_total", {"registry": proxy.host, "code": code}
        ) == count
    exported = generate_latest(registry).decode()
    assert "X-Amz" not in exported and "/v2/" not in exported and "sha256" not in exported


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not await asyncio.to_thread(check):  # noqa: ASYNC110 - polls the proxy
            await asyncio.sleep(0.05)
