"""The test bed's image family: real Debian images that share base layers, as data.

`build_family()` builds (or loads from the cache) an OCI layout of the images in
`testbed.image_recipe` and describes it as a `Family`: every image's manifest digest,
media type and size, its config, its layers (compressed blob size and diff ID) and, for
indexes, the per-platform manifests. Tests assert exact numbers against it; the registry
they pull from gets the same bytes through `push_family()`.

Cache: `${LAYERCACHE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/layercache}/images/<recipe-hash>/`
holds `oci/` (the layout) and `family.json` (this module's `Family`, serialised). A build
happens in `<recipe-hash>.partial/` and is renamed into place only when complete, under
an exclusive lock, so an interrupted or concurrent build is never used.

CLI: `python -m testbed.images build` prints the family table;
`python -m testbed.images push HOST:PORT` pushes it to a plain-HTTP registry.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from testbed.image_build import (
    BUILD_TOOLS,
    DOCKER_MANIFEST,
    OCI_INDEX,
    REF_NAME,
    REFERENCE_TYPE,
    CommandError,
    build_layout,
    docker_dir_view,
    read_json_blob,
    require_tools,
    run,
)
from testbed.image_recipe import REPOSITORY_PREFIX, TAG, recipe_hash

__all__ = [
    "Family",
    "ImageInfo",
    "Layer",
    "Manifest",
    "Platform",
    "build_family",
    "default_cache_dir",
    "push_family",
]

log = logging.getLogger(__name__)

FAMILY_JSON: Final = "family.json"
LAYOUT_DIR: Final = "oci"
DEFAULT_PLATFORM: Final = "linux/amd64"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Platform(_Frozen):
    """An OCI platform; `str()` gives `os/architecture[/variant]`."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        parts = [self.os, self.architecture, *([self.variant] if self.variant else [])]
        return "/".join(parts)


class Layer(_Frozen):
    """One layer blob.

    `size` is the blob's (compressed) size in bytes, as in descriptors; `diff_id` is the
    digest of the uncompressed tar, from the config's `rootfs.diff_ids`; `media_type` is
    the OCI manifests' (the Docker flavour calls the same gzip blobs
    `application/vnd.docker.image.rootfs.diff.tar.gzip`).
    """

    digest: str
    size: int
    media_type: str
    diff_id: str


class Manifest(_Frozen):
    """An image manifest: an index entry, or what a single-manifest image resolves to.

    `size` (bytes) and `media_type` are the manifest's own; `layers` are digests, base
    first; `annotations` are the index entry's (empty for a single image).
    """

    digest: str
    media_type: str
    size: int
    platform: Platform
    config_digest: str
    config_size: int
    layers: tuple[str, ...]
    annotations: dict[str, str] = Field(default_factory=dict)

    @property
    def is_attestation(self) -> bool:
        """True for a BuildKit attestation entry (unknown/unknown, in-toto layers)."""
        return self.annotations.get(REFERENCE_TYPE) == "attestation-manifest"


class ImageInfo(_Frozen):
    """One pushed image, `repository:tag` (e.g. `family/python:v1`).

    For a single-manifest image the config/layer fields describe it and `manifests` is
    empty; for an index (`manifest_media_type` = OCI index) `config_digest`/`config_size`
    are None, `layers` is empty and `manifests` holds the entries in index order.
    """

    name: str
    repository: str
    tag: str
    manifest_digest: str
    manifest_media_type: str
    manifest_size: int
    config_digest: str | None
    config_size: int | None
    platform: Platform | None
    layers: tuple[str, ...]
    manifests: tuple[Manifest, ...] = ()

    @property
    def reference(self) -> str:
        """`repository:tag`, without a registry host."""
        return f"{self.repository}:{self.tag}"

    @property
    def is_index(self) -> bool:
        """True when the manifest is an image index."""
        return self.manifest_media_type == OCI_INDEX

    def resolve(self, platform: str = DEFAULT_PLATFORM) -> Manifest:
        """The image manifest for `platform` (`os/arch[/variant]`).

        For an index: the first non-attestation entry whose platform matches exactly.
        Raises LookupError when there is none (or the single image is another platform).
        """
        if not self.is_index:
            assert self.platform and self.config_digest and self.config_size is not None
            if str(self.platform) == platform:
                return Manifest(
                    digest=self.manifest_digest,
                    media_type=self.manifest_media_type,
                    size=self.manifest_size,
                    platform=self.platform,
                    config_digest=self.config_digest,
                    config_size=self.config_size,
                    layers=self.layers,
                )
        for entry in self.manifests:
            if not entry.is_attestation and str(entry.platform) == platform:
                return entry
        raise LookupError(f"{self.name} has no manifest for {platform}")

    def runnable_manifests(self) -> list[Manifest]:
        """Every manifest a runtime could pull (attestations left out), any platform."""
        if not self.is_index:
            assert self.platform is not None
            return [self.resolve(str(self.platform))]
        return [m for m in self.manifests if not m.is_attestation]


class Family(_Frozen):
    """The built family: an OCI layout at `layout` and what is in it.

    `images` is in build and push order (base first). `layers` lists every layer blob
    once, runnable layers in first-use order, then attestation (in-toto) blobs.
    """

    root: Path = Field(exclude=True)
    recipe_hash: str
    build_seconds: float
    images: dict[str, ImageInfo]
    layers: tuple[Layer, ...]

    @property
    def layout(self) -> Path:
        """The OCI image layout directory (`index.json`, `blobs/sha256/`)."""
        return self.root / LAYOUT_DIR

    def blob_path(self, digest: str) -> Path:
        """Where blob `digest` (`sha256:<hex>`) lives in the layout."""
        return self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def layer(self, digest: str) -> Layer:
        """The layer `digest`; KeyError when the family has no such layer."""
        for layer in self.layers:
            if layer.digest == digest:
                return layer
        raise KeyError(digest)

    def image_layers(self, name: str, platform: str = DEFAULT_PLATFORM) -> list[Layer]:
        """Layers of image `name` for `platform`, base first."""
        return [self.layer(d) for d in self.images[name].resolve(platform).layers]

    def layer_users(self) -> dict[str, list[str]]:
        """Layer digest → names of the images using it on any runnable platform."""
        users: dict[str, list[str]] = {}
        for name, image in self.images.items():
            for digest in {d for m in image.runnable_manifests() for d in m.layers}:
                users.setdefault(digest, []).append(name)
        return users

    def shared_layers(self) -> dict[str, list[str]]:
        """Layer digest → names of the images using it, for layers used by two or more."""
        return {d: names for d, names in self.layer_users().items() if len(names) > 1}

    def unique_layer_bytes(self, names: Iterable[str], platform: str = DEFAULT_PLATFORM) -> int:
        """Bytes of the distinct layer blobs of `names` on `platform`.

        Each layer counts once, as on a node that holds all of them.
        """
        digests = {d for n in names for d in self.images[n].resolve(platform).layers}
        return sum(self.layer(d).size for d in digests)

    def naive_layer_bytes(self, names: Iterable[str], platform: str = DEFAULT_PLATFORM) -> int:
        """Bytes of layer blobs summed image by image, as if no layer were shared."""
        return sum(layer.size for n in names for layer in self.image_layers(n, platform))

    def unique_blob_bytes(self, names: Iterable[str], platform: str = DEFAULT_PLATFORM) -> int:
        """Bytes of the distinct layer and config blobs of `names` on `platform`.

        That is what pulling all of them fetches, manifests aside.
        """
        manifests = [self.images[n].resolve(platform) for n in names]
        layers = {d for m in manifests for d in m.layers}
        configs = {(m.config_digest, m.config_size) for m in manifests}
        return sum(self.layer(d).size for d in layers) + sum(size for _, size in configs)

    @classmethod
    def load(cls, root: Path) -> Family:
        """Read `root/family.json`. Raises OSError or pydantic.ValidationError."""
        data = json.loads((root / FAMILY_JSON).read_text())
        return cls.model_validate({**data, "root": root})

    def save(self) -> None:
        """Write `family.json` into `root`."""
        (self.root / FAMILY_JSON).write_text(self.model_dump_json(indent=2) + "\n")


def default_cache_dir() -> Path:
    """`$LAYERCACHE_CACHE`, else `$XDG_CACHE_HOME/layercache`, else `~/.cache/layercache`."""
    if explicit := os.environ.get("LAYERCACHE_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "layercache"


def build_family(cache_dir: Path | None = None) -> Family:
    """Build the image family, or load it when this recipe is already in the cache.

    `cache_dir` is the layercache cache root (default `default_cache_dir()`); the family
    goes to `<cache_dir>/images/<recipe-hash>/`. A cold build takes a few minutes and
    needs mmdebstrap, umoci, skopeo and the Debian mirror; a warm call reads one JSON
    file. Raises `ToolMissingError` (names the apt package) or `CommandError`.
    """
    images_dir = (cache_dir or default_cache_dir()) / "images"
    key = recipe_hash()
    final = images_dir / key
    if (final / FAMILY_JSON).exists():
        return Family.load(final)
    require_tools(*BUILD_TOOLS)  # before anything is written: fail fast, leave no trace
    images_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(images_dir / f"{key}.lock"):
        if (final / FAMILY_JSON).exists():  # another process finished it while we waited
            return Family.load(final)
        partial = images_dir / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # what an interrupted build left
        partial.mkdir()
        started = time.monotonic()
        build_layout(partial / LAYOUT_DIR, partial / "work")
        shutil.rmtree(partial / "work")
        family = describe_layout(partial, key, time.monotonic() - started)
        family.save()
        partial.rename(final)
    return Family.load(final)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def describe_layout(root: Path, key: str, build_seconds: float) -> Family:
    """Read `root/oci`'s index.json, manifests and configs into a `Family`.

    Every number comes from the blobs themselves; a layer whose diff ID differs between
    two configs is an AssertionError (the layout would be corrupt).
    """
    layout = root / LAYOUT_DIR
    index = json.loads((layout / "index.json").read_text())
    images: dict[str, ImageInfo] = {}
    layers: dict[str, Layer] = {}
    for entry in index["manifests"]:
        name = entry["annotations"][REF_NAME]
        common = {
            "name": name,
            "repository": f"{REPOSITORY_PREFIX}/{name}",
            "tag": TAG,
            "manifest_digest": entry["digest"],
            "manifest_media_type": entry["mediaType"],
            "manifest_size": entry["size"],
        }
        if entry["mediaType"] == OCI_INDEX:
            entries = tuple(
                _describe_manifest(layout, item, layers)
                for item in read_json_blob(layout, entry["digest"])["manifests"]
            )
            images[name] = ImageInfo(
                **common,
                config_digest=None,
                config_size=None,
                platform=None,
                layers=(),
                manifests=entries,
            )
        else:
            manifest = _describe_manifest(layout, entry, layers)
            images[name] = ImageInfo(
                **common,
                config_digest=manifest.config_digest,
                config_size=manifest.config_size,
                platform=manifest.platform,
                layers=manifest.layers,
            )
    # Attestation blobs last, so `layers` starts with what runtimes pull.
    ordered = sorted(layers.values(), key=lambda layer: layer.media_type.endswith("+json"))
    return Family(
        root=root,
        recipe_hash=key,
        build_seconds=round(build_seconds, 1),
        images=images,
        layers=tuple(ordered),
    )


def _describe_manifest(
    layout: Path, descriptor: Mapping[str, Any], layers: dict[str, Layer]
) -> Manifest:
    digest = str(descriptor["digest"])
    manifest = read_json_blob(layout, digest)
    config = read_json_blob(layout, manifest["config"]["digest"])
    platform = descriptor.get("platform") or {
        key: config[key] for key in ("os", "architecture", "variant") if key in config
    }
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"]), f"{digest}: diff_ids/layers mismatch"
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        found = Layer(
            digest=layer["digest"],
            size=layer["size"],
            media_type=layer["mediaType"],
            diff_id=diff_id,
        )
        # The Docker flavour names the same blobs with Docker media types: the first
        # (OCI) description is kept, and only digest, size and diff ID must agree.
        known = layers.setdefault(found.digest, found)
        assert (known.size, known.diff_id) == (found.size, found.diff_id), found.digest
    return Manifest(
        digest=digest,
        media_type=descriptor["mediaType"],
        size=descriptor["size"],
        platform=Platform.model_validate(platform),
        config_digest=manifest["config"]["digest"],
        config_size=manifest["config"]["size"],
        layers=tuple(layer["digest"] for layer in manifest["layers"]),
        annotations=descriptor.get("annotations") or {},
    )


def push_family(
    family: Family,
    registry: str,
    *,
    tls_verify: bool = False,
    cert_dir: Path | None = None,
    username: str | None = None,
    password: str | None = None,
) -> None:
    """Push every image of `family` to `registry` (`host:port`) as `family/<name>:<tag>`.

    Manifests keep their digests (`skopeo copy --preserve-digests`; `--all` for indexes);
    skopeo's digest file is checked against `family` after each copy. Blobs the
    registry already has are not sent again. `cert_dir` holds the CA certificate for TLS;
    `username`/`password` go to skopeo through a private auth file, not the command line.
    Raises `CommandError` (skopeo failed, or a pushed digest differs) or `ToolMissingError`.
    """
    require_tools("skopeo")
    with tempfile.TemporaryDirectory(prefix="layercache-push-") as scratch_name:
        scratch = Path(scratch_name)
        options = ["--retry-times", "3", f"--dest-tls-verify={str(tls_verify).lower()}"]
        if cert_dir is not None:
            options += ["--dest-cert-dir", str(cert_dir)]
        if username is not None:
            options += ["--dest-authfile", str(_auth_file(scratch, registry, username, password))]
        for name, image in family.images.items():
            if image.manifest_media_type == DOCKER_MANIFEST:
                view = docker_dir_view(family.layout, image.manifest_digest, scratch / name)
                source = f"dir:{view}"
            else:
                source = f"oci:{family.layout}:{name}"
            digest_file = scratch / f"{name}.digest"
            run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--quiet",
                    "--preserve-digests",
                    *(["--all"] if image.is_index else []),
                    *options,
                    "--digestfile",
                    str(digest_file),
                    source,
                    f"docker://{registry}/{image.reference}",
                ]
            )
            pushed = digest_file.read_text().strip()
            if pushed != image.manifest_digest:
                raise CommandError(
                    f"{registry}/{image.reference} was pushed as {pushed}, "
                    f"family.json says {image.manifest_digest}"
                )
            log.info("pushed %s/%s %s", registry, image.reference, pushed)


def _auth_file(scratch: Path, registry: str, username: str, password: str | None) -> Path:
    # containers-auth.json(5): {"auths": {"host:port": {"auth": base64("user:password")}}}
    token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
    path = scratch / "auth.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    return path


def _human(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB" if size >= 100_000 else f"{size / 1000:.1f} kB"


def format_family(family: Family) -> str:
    """The family as a text table: images, their layers and sizes, then shared layers."""
    short = {layer.digest: layer.digest[7:19] for layer in family.layers}
    users = family.layer_users()
    lines = [
        f"family {family.recipe_hash} at {family.layout} (built in {family.build_seconds:.0f} s)",
        "",
    ]
    lines.append(f"{'IMAGE':<14} {'MANIFEST':<14} {'TYPE':<12} LAYERS (digest size)")
    for name, image in family.images.items():
        kind = {OCI_INDEX: "oci-index", DOCKER_MANIFEST: "docker-v2s2"}.get(
            image.manifest_media_type, "oci"
        )
        for number, manifest in enumerate(image.manifests or [image.resolve()]):
            label = f" {manifest.platform}" if image.is_index else ""
            layer_text = " ".join(
                f"{short[d]} {_human(family.layer(d).size)}" for d in manifest.layers
            )
            first = number == 0
            lines.append(
                f"{name if first else '':<14} "
                f"{image.manifest_digest[7:19] if first else '':<14} "
                f"{kind if first else '':<12}{label} {layer_text}".rstrip()
            )
    lines += ["", f"{'LAYER':<14} {'SIZE':>10}  USED BY"]
    for layer in family.layers:
        lines.append(
            f"{short[layer.digest]:<14} {_human(layer.size):>10}  "
            f"{', '.join(users.get(layer.digest, ['(attestation)']))}"
        )
    runnable = list(family.images)
    lines += [
        "",
        f"linux/amd64, all images: {_human(family.unique_layer_bytes(runnable))} "
        f"of distinct layers vs {_human(family.naive_layer_bytes(runnable))} "
        "counted image by image",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m testbed.images build|push HOST:PORT`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m testbed.images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build (or load) the family and print its table")
    push = commands.add_parser("push", help="push the family to a plain-HTTP registry")
    push.add_argument("registry", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    level = logging.DEBUG if os.environ.get("LAYERCACHE_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s")
    try:
        family = build_family()
        if args.command == "push":
            push_family(family, args.registry)
        else:
            print(format_family(family))
    except (OSError, RuntimeError) as error:  # CommandError, ToolMissingError too
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
