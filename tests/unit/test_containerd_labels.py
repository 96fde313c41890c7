"""Pure parts of the containerd clients: GC labels, WRITE payloads, secret redaction."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from layercache.containerd.cri import AuthConfig
from layercache.containerd.ingest import coalesce, write_request
from layercache.containerd.labels import (
    GC_ROOT_LABEL,
    MANAGED_BY_LABEL,
    cache_label,
    caches_of,
    is_managed,
    pin_labels,
    unpin_keys,
)
from layercache.containerd.protos import content_pb2
from layercache.redact import redact

PINNED = pin_labels(["a/one", "b/two"])


def test_pin_labels_root_the_blob_and_name_each_cache() -> None:
    assert set(PINNED) == {GC_ROOT_LABEL, MANAGED_BY_LABEL, cache_label("a/one"),
                           cache_label("b/two")}
    assert all(PINNED.values()), "containerd drops labels with empty values"
    assert is_managed(PINNED) and caches_of(PINNED) == {"a/one", "b/two"}
    with pytest.raises(ValueError, match="empty"):
        cache_label("")


@pytest.mark.parametrize(("labels", "caches", "removed"), [
    (PINNED, ["a/one"], [cache_label("a/one")]),
    (PINNED, ["a/one", "b/two"], [cache_label("a/one"), cache_label("b/two"),
                                  GC_ROOT_LABEL, MANAGED_BY_LABEL]),
    (PINNED, None, [cache_label("a/one"), cache_label("b/two"), GC_ROOT_LABEL,
                    MANAGED_BY_LABEL]),
    (PINNED, ["c/other"], []),
    # Not ours: a gc.root someone else set stays, whatever caches let go.
    ({GC_ROOT_LABEL: "x", cache_label("a/one"): "x"}, None, [cache_label("a/one")]),
    ({}, None, []),
])
def test_unpin_keys(labels: dict[str, str], caches: list[str] | None,
                    removed: list[str]) -> None:
    assert unpin_keys(labels, caches) == removed


@pytest.mark.parametrize("sizes", [[], [10], [4, 4, 4], [3, 9, 1, 7], [8], [16, 1],
                                   [5, 40, 2], [17]])
async def test_coalesce_joins_small_pieces_splits_large_and_keeps_the_bytes(
        sizes: list[int]) -> None:
    data = bytes(range(256))
    chunks, at = [], 0
    for size in sizes:
        chunks.append(data[at:at + size])
        at += size

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    pieces = [piece async for piece in coalesce(source(), 8, 16)]
    assert b"".join(pieces) == data[:at]
    assert all(8 <= len(piece) <= 16 for piece in pieces[:-1])
    assert not pieces or 0 < len(pieces[-1]) <= 16
    # A piece already in range is handed on as the very object received: no copy.
    if chunks and 8 <= len(chunks[0]) <= 16:
        assert pieces[0] is chunks[0]


@pytest.mark.parametrize(("offset", "size"), [(0, 0), (0, 5), (127, 128), (1 << 40, 300)])
def test_write_request_is_the_protobuf_wire_form(offset: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    wire = write_request(offset, data)
    parsed = content_pb2.WriteContentRequest.FromString(wire)
    assert (parsed.action, parsed.offset, parsed.data) == (content_pb2.WRITE, offset, data)
    if size:  # protobuf leaves an empty field out; containerd reads both the same
        assert wire == content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=offset,
                                                       data=data).SerializeToString()


def test_secrets_stay_out_of_reprs_and_messages() -> None:
    auth = AuthConfig(username="me", password="pw-secret", auth="bWU6cHctc2VjcmV0")
    assert "secret" not in repr(auth) and "bWU6" not in repr(auth)
    assert set(auth.secrets) == {"pw-secret", "bWU6cHctc2VjcmV0"}
    text = "401 for me with pw-secret (auth bWU6cHctc2VjcmV0)"
    assert redact(text, auth.secrets) == "401 for me with <redacted> (auth <redacted>)"
