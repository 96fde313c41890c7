"""Synthetic OCI images for the ingest (B) and scale (D) benchmarks: seeded, valid, pushed by HTTP.

Each layer is an *uncompressed* tar (``application/vnd.oci.image.layer.v1.tar``) holding one
file of seeded pseudo-random bytes. That keeps the image valid OCI at no cost: the diff ID
of an uncompressed layer is the digest of the blob itself, so the config's
``rootfs.diff_ids`` match the layers exactly, and nothing has to compress 1 GB of
incompressible bytes. Agents and ``ctr content fetch`` copy blobs without unpacking them,
so the media type changes nothing about what is measured.

Large layers are written once to ``~/.cache/layercache/bench/`` (keyed by seed and size)
and reused by later runs. Images are pushed with the OCI distribution-spec's monolithic
upload (``POST /v2/<name>/blobs/uploads/`` then ``PUT <location>?digest=``) and
``PUT /v2/<name>/manifests/<tag>``; a blob already in the repository (``HEAD`` 200) is
skipped, and one held by another repository of the same registry is cross-mounted
(``POST …/uploads/?mount=<digest>&from=<repo>``). Not skopeo: containers/image would gzip
uncompressed layers on the way to a registry and change every digest.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

import httpx

from testbed.paths import CACHE

#: Where generated layers are kept between runs.
BENCH_CACHE: Final = CACHE / "bench"
LAYER_TYPE: Final = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE: Final = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE: Final = "application/vnd.oci.image.manifest.v1+json"
_CHUNK: Final = 1 << 20


@dataclass(frozen=True)
class Blob:
    """A blob: its ``digest`` ("sha256:…"), ``size`` in bytes, ``media_type`` and bytes.

    ``path`` names the file holding it (large layers); otherwise ``data`` holds it.
    """

    digest: str
    size: int
    media_type: str
    path: Path | None = None
    data: bytes | None = None

    def descriptor(self) -> dict[str, object]:
        """The OCI descriptor (image-spec ``descriptor.md``)."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def chunks(self) -> Iterator[bytes]:
        """The blob's bytes, in pieces of at most 1 MiB."""
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with self.path.open("rb") as handle:
            while piece := handle.read(_CHUNK):
                yield piece


@dataclass(frozen=True)
class Image:
    """An image manifest with its ``config`` and ``layers`` (base first)."""

    config: Blob
    layers: tuple[Blob, ...]
    manifest: bytes

    @property
    def digest(self) -> str:
        """The manifest's digest."""
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def layer_bytes(self) -> int:
        """Bytes of all layers."""
        return sum(layer.size for layer in self.layers)


def _random_stream(seed: str, size: int) -> Iterator[bytes]:
    rng = random.Random(seed)  # reproducible filler, not a secret
    left = size
    while left:
        n = min(left, _CHUNK)
        yield rng.randbytes(n)
        left -= n


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # mtime 0: the same bytes every run
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _tar_trailer(size: int) -> bytes:
    # Pad the file to a 512-byte record, then the two zero records that end an archive.
    return b"\0" * (-size % 512) + b"\0" * 1024


def small_layer(seed: str, size: int) -> Blob:
    """An in-memory layer: a tar with one file ``data`` of ``size`` seeded random bytes."""
    body = b"".join([_tar_header("data", size), *_random_stream(seed, size), _tar_trailer(size)])
    return Blob("sha256:" + hashlib.sha256(body).hexdigest(), len(body), LAYER_TYPE, data=body)


def large_layer(seed: str, size: int, cache: Path = BENCH_CACHE) -> Blob:
    """A layer of ``size`` random bytes kept on disk under ``cache`` (made once per seed/size).

    The digest is stored beside the file; a file without its digest is made again.
    """
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"layer-{seed}-{size}.tar"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        known = json.loads(meta.read_text())
        if known["size"] == path.stat().st_size:
            return Blob(known["digest"], known["size"], LAYER_TYPE, path=path)
    partial = path.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for piece in (_tar_header("data", size), *_random_stream(seed, size),
                      _tar_trailer(size)):
            digest.update(piece)
            out.write(piece)
    partial.replace(path)
    blob = Blob("sha256:" + digest.hexdigest(), path.stat().st_size, LAYER_TYPE, path=path)
    meta.write_text(json.dumps({"digest": blob.digest, "size": blob.size}))
    return blob


def image(layers: list[Blob], arch: str = "amd64") -> Image:
    """A valid OCI image of ``layers``: config with matching diff IDs, then the manifest.

    Uncompressed layers: each diff ID is the layer's own digest.
    """
    config_doc = {"architecture": arch, "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layers]}}
    raw = json.dumps(config_doc, sort_keys=True, separators=(",", ":")).encode()
    config = Blob("sha256:" + hashlib.sha256(raw).hexdigest(), len(raw), CONFIG_TYPE, data=raw)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                           "config": config.descriptor(),
                           "layers": [b.descriptor() for b in layers]},
                          sort_keys=True, separators=(",", ":")).encode()
    return Image(config, tuple(layers), manifest)


def large_image(seed: str, count: int, layer_bytes: int, cache: Path = BENCH_CACHE) -> Image:
    """``count`` layers of ``layer_bytes`` random bytes each (cached on disk)."""
    return image([large_layer(f"{seed}-{i}", layer_bytes, cache) for i in range(count)])


class Pusher:
    """Pushes images to one plain-HTTP registry (``url``: "http://host:port").

    Raises (from `push`): httpx.HTTPStatusError for any refusal.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=120)
        self._where: dict[str, str] = {}  # digest -> a repository that holds it

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def blob(self, repository: str, blob: Blob) -> None:
        """Make ``blob`` present in ``repository`` (skip, mount or upload)."""
        head = self.http.head(f"/v2/{repository}/blobs/{blob.digest}")
        if head.status_code == 200:
            return
        start = f"/v2/{repository}/blobs/uploads/"
        source = self._where.get(blob.digest)
        params = {"mount": blob.digest, "from": source} if source else {}
        started = self.http.post(start, params=params)
        if started.status_code != 201:  # 202: no mount, upload the bytes
            started.raise_for_status()
            location = started.headers["location"]
            # The location carries the upload's state in its query: add to it, not replace.
            joiner = "&" if "?" in location else "?"
            put = self.http.put(f"{location}{joiner}digest={quote(blob.digest)}",
                                content=blob.chunks(),
                                headers={"content-type": "application/octet-stream",
                                         "content-length": str(blob.size)})
            put.raise_for_status()
        self._where.setdefault(blob.digest, repository)

    def push(self, repository: str, tag: str, img: Image) -> str:
        """Push ``img`` as ``repository:tag``; returns the manifest digest."""
        for blob in (*img.layers, img.config):
            self.blob(repository, blob)
        put = self.http.put(f"/v2/{repository}/manifests/{tag}", content=img.manifest,
                            headers={"content-type": MANIFEST_TYPE})
        put.raise_for_status()
        return img.digest


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        for piece in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(piece)
    return "sha256:" + digest.hexdigest()


__all__ = ["BENCH_CACHE", "Blob", "Image", "Pusher", "file_sha256", "image", "large_image",
           "large_layer", "small_layer"]
