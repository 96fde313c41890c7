"""Blob streaming: resume, Range ignored, redirects, digest mismatch. In-memory transport."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from layercache.oci import digest as digest_module
from layercache.oci.digest import Digest
from layercache.oci.reference import parse_reference
from layercache.registry.blobs import CallbackSink, FileSink, MemorySink, fetch_blob
from layercache.registry.client import RegistryClient, RegistryOptions
from layercache.registry.credentials import DockerConfig, Keyring
from layercache.registry.errors import (
    BlobNotFoundError,
    BlobTooLargeError,
    DigestMismatchError,
    NonDistributableLayerError,
    RegistryError,
    TransientError,
)
from layercache.registry.retry import RetryPolicy

HOST = "reg.example:5000"
REF = parse_reference(f"{HOST}/family/base:v1")
BLOB = bytes(range(256)) * 4096  # 1 MiB
DIGEST = Digest("sha256:" + hashlib.sha256(BLOB).hexdigest())
PATH = f"/v2/family/base/blobs/{DIGEST}"

Handler = Callable[[httpx.Request], httpx.Response]


async def _cut(data: bytes) -> AsyncIterator[bytes]:
    yield data
    raise httpx.ReadError("connection reset by peer")


def cut_response(status: int, data: bytes, length: int, **headers: str) -> httpx.Response:
    """A response promising ``length`` bytes that dies after ``data``."""
    return httpx.Response(
        status, headers={"Content-Length": str(length), **headers}, content=_cut(data)
    )


class Server:
    """Answers from a list of handlers in turn; records every request."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handlers.pop(0)(request)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(f"sleep {seconds:.2f}")


def client(server: Server, keyring: Keyring | None = None) -> RegistryClient:
    return RegistryClient(
        keyring=keyring,
        registries={HOST: RegistryOptions(insecure=True)},
        retry=RetryPolicy(attempts=4, initial_backoff=0.01, sleep=Recorder()),
        transport=httpx.MockTransport(server),
    )


class SpySink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    async def reset(self) -> None:
        self.events.append("reset")
        await super().reset()

    async def discard(self) -> None:
        self.events.append("discard")
        await super().discard()

    async def commit(self, digest: Digest, size: int) -> None:
        self.events.append("commit")
        await super().commit(digest, size)


async def test_resumes_with_range_after_reset() -> None:
    half = len(BLOB) // 3
    server = Server(
        lambda r: cut_response(200, BLOB[:half], len(BLOB)),
        lambda r: httpx.Response(
            206,
            content=BLOB[half:],
            headers={"Content-Range": f"bytes {half}-{len(BLOB) - 1}/{len(BLOB)}"},
        ),
    )
    sink = SpySink()
    async with client(server) as c:
        assert await fetch_blob(c, REF, DIGEST, len(BLOB), sink) == len(BLOB)
    assert sink.data == BLOB
    assert sink.events == ["commit"]
    assert "range" not in server.requests[0].headers
    assert server.requests[1].headers["range"] == f"bytes={half}-"


async def test_range_ignored_restarts_from_zero() -> None:
    half = len(BLOB) // 2
    server = Server(
        lambda r: cut_response(200, BLOB[:half], len(BLOB)),
        lambda r: httpx.Response(200, content=BLOB),  # Range ignored: the whole body again
    )
    sink = SpySink()
    async with client(server) as c:
        await fetch_blob(c, REF, DIGEST, len(BLOB), sink)
    assert sink.data == BLOB  # not BLOB[:half] + BLOB
    assert sink.events == ["reset", "commit"]


async def test_wrong_content_range_restarts() -> None:
    half = len(BLOB) // 2
    server = Server(
        lambda r: cut_response(200, BLOB[:half], len(BLOB)),
        lambda r: httpx.Response(
            206,
            content=BLOB[10:],
            headers={"Content-Range": f"bytes 10-{len(BLOB) - 1}/{len(BLOB)}"},
        ),
        lambda r: httpx.Response(200, content=BLOB),
    )
    sink = SpySink()
    async with client(server) as c:
        await fetch_blob(c, REF, DIGEST, len(BLOB), sink)
    assert sink.data == BLOB
    assert "range" not in server.requests[2].headers


async def test_short_clean_body_is_resumed() -> None:
    # Chunked encoding can end "cleanly" short of the size: the byte count decides.
    server = Server(
        lambda r: httpx.Response(200, content=_chunks(BLOB[:1000])),
        lambda r: httpx.Response(
            206,
            content=BLOB[1000:],
            headers={"Content-Range": f"bytes 1000-{len(BLOB) - 1}/{len(BLOB)}"},
        ),
    )
    sink = MemorySink()
    async with client(server) as c:
        await fetch_blob(c, REF, DIGEST, len(BLOB), sink)
    assert sink.data == BLOB


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_digest_mismatch_discards() -> None:
    corrupt = bytearray(BLOB)
    corrupt[1000] ^= 0xFF
    server = Server(lambda r: httpx.Response(200, content=bytes(corrupt)))
    sink = SpySink()
    async with client(server) as c:
        with pytest.raises(DigestMismatchError) as info:
            await fetch_blob(c, REF, DIGEST, len(BLOB), sink)
    assert info.value.expected == DIGEST
    # One except clause covers every registry failure, the generic digest one still works.
    assert isinstance(info.value, RegistryError)
    assert isinstance(info.value, digest_module.DigestMismatchError)
    assert sink.events == ["discard"]
    with pytest.raises(RuntimeError):
        _ = sink.data
    assert len(server.requests) == 1  # a mismatch is not retried here: the caller decides


async def test_more_bytes_than_size_is_refused() -> None:
    server = Server(lambda r: httpx.Response(200, content=BLOB + b"extra"))
    sink = SpySink()
    async with client(server) as c:
        with pytest.raises(BlobTooLargeError, match="more than"):
            await fetch_blob(c, REF, DIGEST, len(BLOB), sink)
    assert sink.events == ["discard"]


async def test_budget_spent_on_repeated_resets() -> None:
    server = Server(*[lambda r: cut_response(200, b"", len(BLOB))] * 4)
    sink = SpySink()
    async with client(server) as c:
        with pytest.raises(TransientError):
            await fetch_blob(c, REF, DIGEST, len(BLOB), sink)
    assert len(server.requests) == 4
    assert sink.events == ["discard"]


async def test_not_found() -> None:
    server = Server(
        lambda r: httpx.Response(
            404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}
        )
    )
    async with client(server) as c:
        with pytest.raises(BlobNotFoundError, match="BLOB_UNKNOWN"):
            await fetch_blob(c, REF, DIGEST, len(BLOB), MemorySink())


async def test_non_distributable_not_fetched() -> None:
    server = Server()
    async with client(server) as c:
        with pytest.raises(NonDistributableLayerError):
            await fetch_blob(
                c,
                REF,
                DIGEST,
                len(BLOB),
                MemorySink(),
                media_type="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            )
    assert server.requests == []


@pytest.mark.parametrize("size", [-1, 1 << 50])
async def test_hostile_size_refused_up_front(size: int) -> None:
    server = Server()
    async with client(server) as c:
        with pytest.raises(BlobTooLargeError):
            await fetch_blob(c, REF, DIGEST, size, MemorySink())
    assert server.requests == []


KEYRING = Keyring(
    [DockerConfig.from_json({"auths": {HOST: {"username": "user", "password": "pw"}}}, "test")]
)


def basic_challenge(request: httpx.Request) -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})


@pytest.mark.parametrize(
    ("location", "keeps_auth"),
    [
        ("https://storage.example/blob?X-Amz-Signature=secret", False),
        (f"http://{HOST}/other/place", True),
        ("/relative/place", True),
        ("http://reg.example:5001/other-port", False),
    ],
)
async def test_redirect_drops_authorization_off_origin(location: str, keeps_auth: bool) -> None:
    server = Server(
        basic_challenge,
        lambda r: httpx.Response(307, headers={"Location": location}),
        lambda r: httpx.Response(200, content=BLOB),
    )
    sink = MemorySink()
    async with client(server, KEYRING) as c:
        await fetch_blob(c, REF, DIGEST, len(BLOB), sink)
    assert sink.data == BLOB
    assert "authorization" in server.requests[1].headers
    assert ("authorization" in server.requests[2].headers) is keeps_auth
    assert str(server.requests[2].url).endswith(location.lstrip("/").rpartition("/")[2])


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_file_sink_only_keeps_verified(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    good = Server(lambda r: httpx.Response(200, content=BLOB))
    async with client(good) as c:
        await fetch_blob(c, REF, DIGEST, len(BLOB), FileSink(target))
    assert target.read_bytes() == BLOB
    assert listing(tmp_path) == ["blob"]

    other = tmp_path / "other"
    bad = Server(lambda r: httpx.Response(200, content=bytes(len(BLOB))))
    async with client(bad) as c:
        with pytest.raises(DigestMismatchError):
            await fetch_blob(c, REF, DIGEST, len(BLOB), FileSink(other))
    assert not other.exists()
    assert listing(tmp_path) == ["blob"]


async def test_callback_sink() -> None:
    received = bytearray()
    events: list[str] = []

    async def on_data(chunk: bytes) -> None:
        received.extend(chunk)

    async def on_discard() -> None:
        events.append("discard")
        received.clear()

    async def on_commit(digest: Digest, size: int) -> None:
        events.append(f"commit {digest.short} {size}")

    half = len(BLOB) // 2
    server = Server(
        lambda r: cut_response(200, BLOB[:half], len(BLOB)),
        lambda r: httpx.Response(200, content=BLOB),
    )
    async with client(server) as c:
        await fetch_blob(c, REF, DIGEST, len(BLOB), CallbackSink(on_data, on_discard, on_commit))
    assert bytes(received) == BLOB
    assert events == ["discard", f"commit {DIGEST.short} {len(BLOB)}"]
