"""The recipe of the test bed's image family: what each image holds, as plain data.

The family mimics a real fleet: one Debian base layer under three runtime images
(python, curl, nginx), small application layers on top of those, the python image once
more as a Docker v2 schema 2 manifest, a two-platform index and a BuildKit-style index
with an attestation entry. `testbed.image_build` turns this recipe into an OCI layout and
`testbed.images` exposes the result.

Everything that decides the bytes of the family is in here, and `recipe_hash()` covers
all of it, so the cache key changes exactly when the images would. Package versions come
from the Debian mirror on the day of the build and are *not* part of the key: a cached
family stays as it was built, which is what tests that assert exact numbers want.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Final

#: Bump when the build steps change what ends up in the layout, so old caches are left.
RECIPE_VERSION: Final = 1
SUITE: Final = "bookworm"
#: 2024-01-01T00:00:00Z. mmdebstrap clamps every mtime to it and writes reproducible
#: trees, so files the package layers do not touch are byte-identical to the base's and
#: umoci's diff leaves them out.
SOURCE_DATE_EPOCH: Final = 1_704_067_200
CREATED: Final = "2024-01-01T00:00:00Z"
TAG: Final = "v1"
REPOSITORY_PREFIX: Final = "family"


@dataclass(frozen=True)
class OsImage:
    """A Debian root filesystem image.

    With `parent` None it is `mmdebstrap --variant=minbase SUITE` as one layer; otherwise
    `parent` must be that base image and this is it plus one layer holding what
    `apt-get install packages` changed.
    """

    name: str
    parent: str | None
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class AppFile:
    """One file of an application layer.

    Content is `text` (UTF-8) followed by `filler_bytes` pseudo-random bytes derived from
    the image name and path: incompressible, so layer sizes track `filler_bytes`, and
    distinct per image, so no two app layers share a digest.
    """

    path: str
    text: str = ""
    filler_bytes: int = 0
    mode: int = 0o644


@dataclass(frozen=True)
class AppImage:
    """A parent image plus one layer of application files and a command."""

    name: str
    parent: str
    files: tuple[AppFile, ...]
    cmd: tuple[str, ...]
    workdir: str = "/"


@dataclass(frozen=True)
class ForeignImage:
    """A single-layer image for another architecture, built without emulation.

    `mmdebstrap --variant=extract` unpacks `packages` (no maintainer scripts run); it is
    not a family image of its own but an entry of a `MultiArchIndex`.
    """

    name: str
    architecture: str
    packages: tuple[str, ...]


@dataclass(frozen=True)
class DockerFlavour:
    """`source` re-expressed as a Docker v2 schema 2 manifest (same config and layers)."""

    name: str
    source: str


@dataclass(frozen=True)
class MultiArchIndex:
    """An OCI image index: `amd64` (a family image) beside `foreign` (a ForeignImage)."""

    name: str
    amd64: str
    foreign: str


@dataclass(frozen=True)
class AttestedIndex:
    """An index holding `subject` (linux/amd64) and a BuildKit provenance attestation."""

    name: str
    subject: str


@dataclass(frozen=True)
class Recipe:
    """The whole family; image names are unique across all fields."""

    os_images: tuple[OsImage, ...]
    app_images: tuple[AppImage, ...]
    foreign_images: tuple[ForeignImage, ...]
    docker_flavours: tuple[DockerFlavour, ...]
    multi_arch: tuple[MultiArchIndex, ...]
    attested: tuple[AttestedIndex, ...]

    def family_names(self) -> list[str]:
        """Names of the images pushed as `family/<name>`, in build (and push) order."""
        return [
            *(image.name for image in self.os_images),
            *(image.name for image in self.app_images),
            *(image.name for image in self.docker_flavours),
            *(image.name for image in self.multi_arch),
            *(image.name for image in self.attested),
        ]


_PY_MAIN = '''\
"""{name}: prints who it is and how big its data file is, then exits."""
import pathlib

data = pathlib.Path(__file__).with_name("data") / "{data}"
print("{name}", data.stat().st_size, "bytes of data")
'''

RECIPE: Final = Recipe(
    os_images=(
        OsImage("base", None),
        OsImage("python", "base", ("python3",)),
        OsImage("curl", "base", ("curl", "ca-certificates")),
        OsImage("nginx", "base", ("nginx-light",)),
    ),
    app_images=(
        AppImage(
            "app-py-a",
            "python",
            (
                AppFile("/app/main.py", _PY_MAIN.format(name="app-py-a", data="model.bin")),
                AppFile("/app/data/model.bin", filler_bytes=256 * 1024),
                AppFile("/app/requirements.txt", "# standard library only\n"),
            ),
            cmd=("python3", "/app/main.py"),
            workdir="/app",
        ),
        AppImage(
            "app-py-b",
            "python",
            (
                AppFile("/app/main.py", _PY_MAIN.format(name="app-py-b", data="fixtures.bin")),
                AppFile("/app/data/fixtures.bin", filler_bytes=640 * 1024),
            ),
            cmd=("python3", "/app/main.py"),
            workdir="/app",
        ),
        AppImage(
            "app-curl",
            "curl",
            (
                AppFile(
                    "/usr/local/bin/probe",
                    "#!/bin/sh\n# app-curl: fetch the URL given, quietly, failing on HTTP errors\n"
                    'exec curl --fail --silent --show-error "$@"\n',
                    mode=0o755,
                ),
                AppFile("/app/payload.bin", filler_bytes=48 * 1024),
            ),
            cmd=("/usr/local/bin/probe", "--version"),
            workdir="/app",
        ),
        AppImage(
            "app-web",
            "nginx",
            (
                AppFile(
                    "/var/www/html/index.html",
                    "<!doctype html>\n<title>app-web</title>\n"
                    '<a href="assets/bundle.bin">bundle</a>\n',
                ),
                AppFile("/var/www/html/assets/bundle.bin", filler_bytes=1000 * 1024),
            ),
            cmd=("nginx", "-g", "daemon off;"),
        ),
    ),
    foreign_images=(
        ForeignImage(
            "multi-arm64",
            "arm64",
            ("base-files", "libc6", "bash", "coreutils", "python3-minimal"),
        ),
    ),
    docker_flavours=(DockerFlavour("python-docker", "python"),),
    multi_arch=(MultiArchIndex("multi", amd64="python", foreign="multi-arm64"),),
    attested=(AttestedIndex("attested", subject="app-curl"),),
)


def recipe_hash(recipe: Recipe = RECIPE) -> str:
    """The cache key of `recipe`: 16 hex digits of a SHA-256 over all of it.

    Covers the recipe's fields (package lists, app files, commands), the suite, the
    timestamps and `RECIPE_VERSION`; app file bytes derive from those fields.
    """
    key = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "epoch": SOURCE_DATE_EPOCH,
        "created": CREATED,
        "tag": TAG,
        "recipe": asdict(recipe),
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def app_file_bytes(image: str, spec: AppFile) -> bytes:
    """The exact content of `spec` in `image`'s layer (text, then the filler)."""
    seed = f"{image}:{spec.path}".encode()
    blocks = -(-spec.filler_bytes // 32)  # ceil: SHA-256 yields 32 bytes a block
    filler = b"".join(hashlib.sha256(seed + i.to_bytes(8, "big")).digest() for i in range(blocks))
    return spec.text.encode() + filler[: spec.filler_bytes]


def app_layer_tar(image: AppImage) -> bytes:
    """An uncompressed layer tarball of `image.files`, reproducible to the byte.

    Parent directories get their own entries (mode 0755, root) as `COPY` writes them;
    every entry is owned by root and stamped with `SOURCE_DATE_EPOCH`, names are sorted.
    """
    entries: dict[str, bytes | None] = {}  # path without leading "/" -> content; None = dir
    for spec in image.files:
        path = PurePosixPath(spec.path.lstrip("/"))
        for parent in reversed(path.parents[:-1]):  # parents[-1] is "."
            entries.setdefault(str(parent), None)
        entries[str(path)] = app_file_bytes(image.name, spec)
    modes = {spec.path.lstrip("/"): spec.mode for spec in image.files}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            content = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = SOURCE_DATE_EPOCH
            info.uname = info.gname = "root"
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = modes[name]
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()
