"""The product image for linux/amd64 and linux/arm64 as one OCI image index, without Docker.

`make image` (`python -m testbed.cli image`) builds this. The amd64 image is
`testbed.product_image.build_image()`, unchanged (its maintainer scripts and pip run in a
chroot; the bed's nodes run it). The arm64 image cannot run anything of its own on this
amd64 machine and no emulation is used, so it is assembled from the outside:

1. Base layer (cached by `foreign_rootfs_key()`): `mmdebstrap --arch=arm64
   --variant=extract` of `FOREIGN_PACKAGES` (python3 and, for grpcio's extension,
   libstdc++6; apt resolves their dependencies). The packages are unpacked, no maintainer
   script runs: the build writes what those would have, /etc/passwd and /etc/group with
   root and `nonroot` (65532) and /home/nonroot, with extract hooks. Merged /usr, the same
   dpkg path filters as the amd64 base, no host resolv.conf/hostname, no /dev.
2. Dependency wheels: `pip download --only-binary=:all:` for CPython 3.11 on
   manylinux/aarch64 (`product_image.download_dependencies(machine="aarch64")`).
3. Application layer: the venv as `python3 -m venv --without-pip /opt/layercache` lays it
   out (pyvenv.cfg, bin/python* symlinks to /usr/bin/python3, lib64 -> lib), written on
   the host; the wheels are installed into it with `installer` (scripts with
   `#!/opt/layercache/bin/python`), and compiled to bytecode by this host's Python when it
   is 3.11 (bytecode is per Python minor version, not per architecture). The layer tarball
   is written here: sorted, root-owned, mtimes at SOURCE_DATE_EPOCH.
4. `umoci config` exactly as for amd64 (`product_image.configure_entry_point`).

Then one layout holds both images and an index blob naming each manifest with its
platform; index.json tags the index `<version>` and each image `<version>-<arch>`.

Differences from the amd64 image, by construction: no dpkg database of installed packages,
no ld.so.cache (Debian's loader searches the multiarch directories without one), the
standard library without .pyc files (compiled at import; the root file system may be
read-only, so each start pays that), no venv activate scripts, no apt or other Essential
packages (nothing in the image runs a shell).

Cache: `<cache>/product-image-arm64/` (base layer and image entries, pruned as amd64's);
the index itself is assembled in `out` from the two cached layouts in seconds.
Spec: OCI image index and image layout (image-spec v1.1), mmdebstrap(1), PEP 427/491.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

from testbed.image_build import (
    OCI_INDEX,
    REF_NAME,
    CommandError,
    _platform_entry,
    canonical_json,
    read_json_blob,
    require_tools,
    run,
    write_blob,
)
from testbed.image_recipe import CREATED, SOURCE_DATE_EPOCH, SUITE
from testbed.images import _exclusive
from testbed.paths import CACHE
from testbed.product_image import (
    BUILD_VERSION,
    IMAGE_JSON,
    LABELS,
    LAYOUT,
    MMDEBSTRAP_OPTIONS,
    PACKAGES,
    PYTHON_VERSION,
    VENV,
    BuiltImage,
    _layout_summary,
    _read_summary,
    _write_summary,
    build_image,
    build_rootfs,
    build_wheel,
    configure_entry_point,
    download_dependencies,
    prune,
    skopeo_push,
    wheel_key,
)

__all__ = [
    "FOREIGN_ARCH",
    "FOREIGN_PACKAGES",
    "PLATFORMS",
    "BuiltIndex",
    "build_foreign_image",
    "build_index",
    "push_index",
]

log = logging.getLogger(__name__)

#: The index's platforms, in its order: the one the bed runs, then the foreign one.
PLATFORMS: Final = ("amd64", "arm64")
FOREIGN_ARCH: Final = "arm64"
FOREIGN_MACHINE: Final = "aarch64"  # `uname -m`, as manylinux wheel tags spell it
#: python3 (as amd64) plus libstdc++6: grpcio's extension needs libstdc++.so.6, which the
#: amd64 base has through apt (minbase) and `--variant=extract` alone would not bring.
FOREIGN_PACKAGES: Final = (*PACKAGES, "libstdc++6")
INDEX_JSON: Final = "index.json"
_INTERPRETER: Final = f"{VENV}/bin/python"
_SITE: Final = f"{VENV}/lib/python{PYTHON_VERSION}/site-packages"
#: What the amd64 build's `useradd` and base-passwd write, for the two users the image has.
_WRITE_USERS: Final = (
    "printf 'root:x:0:0:root:/root:/usr/sbin/nologin\\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin\\n' > \"$1\"/etc/passwd && "
    "printf 'root:x:0:\\nnonroot:x:65532:\\n' > \"$1\"/etc/group && "
    "install -d -m 0700 \"$1\"/root && install -d -o 65532 -g 65532 -m 0750 \"$1\"/home/nonroot"
)
#: mmdebstrap options of the arm64 base: the amd64 base's merged-/usr hook and dpkg path
#: filters; extract hooks instead of its customize hooks (the extract variant runs none).
FOREIGN_MMDEBSTRAP_OPTIONS: Final = (
    f"--arch={FOREIGN_ARCH}",
    "--variant=extract",
    *(o for o in MMDEBSTRAP_OPTIONS if o.startswith(("--hook-dir=", "--dpkgopt="))),
    f"--extract-hook={_WRITE_USERS}",
    '--extract-hook=rm -rf "$1"/var/log/apt "$1"/var/log/dpkg.log '
    '"$1"/etc/resolv.conf "$1"/etc/hostname',
)


@dataclass(frozen=True)
class BuiltIndex:
    """The two-platform image: an OCI layout whose tag `tag` is an image index.

    `platforms` maps `amd64`/`arm64` to each platform's image (its own `<tag>-<arch>` tag
    in the same layout); `index_digest`/`index_size` describe the index blob.
    """

    layout: Path
    tag: str
    index_digest: str
    index_size: int
    platforms: Mapping[str, BuiltImage]

    @property
    def source(self) -> str:
        """The skopeo source reference of the index, `oci:<layout>:<tag>`."""
        return f"oci:{self.layout}:{self.tag}"


def foreign_rootfs_key() -> str:
    """16 hex digits over everything that decides the arm64 base layer's bytes."""
    recipe = {"v": BUILD_VERSION, "suite": SUITE, "epoch": SOURCE_DATE_EPOCH,
              "packages": FOREIGN_PACKAGES, "options": FOREIGN_MMDEBSTRAP_OPTIONS}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def build_foreign_rootfs(cache: Path) -> Path:
    """The arm64 base layer tarball, cached by `foreign_rootfs_key()`.

    Raises CommandError (mmdebstrap failed, e.g. no mirror) or ToolMissingError.
    """
    return build_rootfs(cache, foreign_rootfs_key(), FOREIGN_PACKAGES,
                        FOREIGN_MMDEBSTRAP_OPTIONS)


def _venv_skeleton(root: Path) -> None:
    """What `python3 -m venv --without-pip /opt/layercache` makes, under `root`."""
    venv = root / VENV.lstrip("/")
    for sub in ("bin", f"include/python{PYTHON_VERSION}", _SITE.removeprefix(VENV + "/")):
        (venv / sub).mkdir(parents=True, exist_ok=True)
    (venv / "lib64").symlink_to("lib")
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3")
    (venv / "bin" / "python").symlink_to("python3")
    (venv / "bin" / f"python{PYTHON_VERSION}").symlink_to("python3")
    # venv writes `version` and `command` too; nothing reads them, and no command ran here.
    (venv / "pyvenv.cfg").write_text(
        "home = /usr/bin\ninclude-system-site-packages = false\n"
        f"executable = /usr/bin/python{PYTHON_VERSION}\n")


def install_wheels(root: Path, wheels: list[Path]) -> None:
    """Install `wheels` into the venv under `root` (a staging root filesystem) with installer.

    Scripts start with `#!/opt/layercache/bin/python`; files land under `root` as if it
    were `/`. Bytecode is compiled afterwards (`_compile`), once mtimes are final.
    Raises installer's errors for a wheel that is not one.
    """
    schemes = {"purelib": _SITE, "platlib": _SITE, "headers": f"{VENV}/include",
               "scripts": f"{VENV}/bin", "data": VENV}
    destination = SchemeDictionaryDestination(
        schemes, interpreter=_INTERPRETER, script_kind="posix", destdir=str(root))
    for wheel in sorted(wheels):
        with WheelFile.open(wheel) as source:
            install(source, destination, {"INSTALLER": b"layercache-image-build\n"})


def _clamp_mtimes(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.utime(Path(dirpath) / name, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH),
                     follow_symlinks=False)


def _compile(root: Path) -> bool:
    """Compile the venv's modules to bytecode if this Python is the image's minor version.

    Called after `_clamp_mtimes`: the .pyc files record the source mtime the image has.
    Returns whether it compiled.
    """
    if f"{sys.version_info.major}.{sys.version_info.minor}" != PYTHON_VERSION:
        log.warning("python %s cannot write bytecode for the image's %s: none compiled",
                    sys.version.split()[0], PYTHON_VERSION)
        return False
    site = root / _SITE.lstrip("/")
    if not compileall.compile_dir(site, ddir=_SITE, quiet=1, workers=1):
        raise CommandError(f"compileall of {site} failed")
    return True


def layer_tar(root: Path, dest: Path) -> Path:
    """Write the tree under `root` as an uncompressed layer tarball `dest`; return `dest`.

    Reproducible: names sorted, relative (`opt/...`), owner root:root, mtimes
    SOURCE_DATE_EPOCH, symlinks kept as links (a link to a directory is not descended).
    """
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / name for name in [*dirnames, *filenames]]
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(paths):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.mtime = SOURCE_DATE_EPOCH
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    return dest


def build_foreign_image(*, cache_dir: Path | None = None, rebuild: bool = False) -> BuiltImage:
    """Build (or take from the cache) the arm64 product image as an OCI layout.

    Returns the image (one tag, the version); `cached` says whether the layout came from
    `<cache>/product-image-arm64/`. Raises CommandError (mmdebstrap, pip, umoci failed)
    or ToolMissingError (mmdebstrap or umoci missing).
    """
    require_tools("umoci", "mmdebstrap")
    root = (cache_dir or CACHE) / f"product-image-{FOREIGN_ARCH}"
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / "build.lock"):
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
        try:
            wheel = build_wheel(work / "wheel")
            version = wheel.name.split("-")[1]
            key = hashlib.sha256(
                f"{foreign_rootfs_key()}:{wheel_key(wheel)}:{BUILD_VERSION}".encode())
            final = root / key.hexdigest()[:16]
            cached = (final / IMAGE_JSON).exists() and not rebuild
            if cached:
                os.utime(final)
            else:
                rootfs_tar = build_foreign_rootfs(root)
                wheels = work / "wheels"
                download_dependencies(wheel, wheels, machine=FOREIGN_MACHINE)
                staging = work / "staging"
                _venv_skeleton(staging)
                # `pip download` of the wheel copies it beside its dependencies: once each.
                install_wheels(staging, list({w.name: w for w in [
                    wheel, *wheels.glob("*.whl")]}.values()))
                _clamp_mtimes(staging)
                _compile(staging)
                app_tar = layer_tar(staging, work / "app.tar")
                partial = work / "result"
                partial.mkdir()
                _assemble_foreign(partial / LAYOUT, rootfs_tar, app_tar, wheel.name, version)
                digest, config, layers, size = _layout_summary(partial / LAYOUT, version)
                _write_summary(partial, BuiltImage(
                    partial / LAYOUT, version, version, digest, config, layers, size,
                    round(time.monotonic() - started, 1), cached=False))
                shutil.rmtree(final, ignore_errors=True)
                partial.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        prune(root, final, rootfs=f"rootfs-{foreign_rootfs_key()}.tar")
        return _read_summary(final, cached=cached)


def _assemble_foreign(layout: Path, rootfs_tar: Path, app_tar: Path, wheel_name: str,
                      version: str) -> None:
    image = f"{layout}:{version}"
    run(["umoci", "init", "--layout", layout])
    run(["umoci", "new", "--image", image])
    run(["umoci", "config", "--image", image, "--no-history", "--created", CREATED,
         "--os", "linux", "--architecture", FOREIGN_ARCH])
    for tarball, created_by in (
        (rootfs_tar, f"mmdebstrap --arch={FOREIGN_ARCH} --variant=extract "
                     f"--include={','.join(FOREIGN_PACKAGES)} {SUITE}"),
        (app_tar, f"venv {VENV} written by the build && installer {wheel_name} "
                  f"(wheels for {FOREIGN_MACHINE})"),
    ):
        run(["umoci", "raw", "add-layer", "--image", image, "--history.created", CREATED,
             "--history.created_by", created_by, tarball])
    labels = {**LABELS, "org.opencontainers.image.base.name":
              f"debian:{SUITE} (mmdebstrap --arch={FOREIGN_ARCH} --variant=extract)"}
    configure_entry_point(image, version, labels)
    run(["umoci", "gc", "--layout", layout])


def _copy_blobs(source: Path, dest: Path) -> None:
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for blob in (source / "blobs" / "sha256").iterdir():
        if not (blobs / blob.name).exists():
            shutil.copy2(blob, blobs / blob.name)


def build_index(out: Path, *, cache_dir: Path | None = None, rebuild: bool = False) -> BuiltIndex:
    """Build both platforms' images (cached) and write the index layout to `out/oci`.

    `out/oci`'s index.json tags the index `<version>` and each image `<version>-<arch>`;
    `out/index.json` summarises it (digests, layer sizes, build times, per platform).
    Raises what `build_image` and `build_foreign_image` raise.
    """
    images = {"amd64": build_image(cache_dir=cache_dir, rebuild=rebuild),
              FOREIGN_ARCH: build_foreign_image(cache_dir=cache_dir, rebuild=rebuild)}
    tags = {image.tag for image in images.values()}
    if len(tags) != 1:
        raise CommandError(f"the platform images disagree on the version: {sorted(tags)}")
    (tag,) = tags
    layout = out / LAYOUT
    shutil.rmtree(layout, ignore_errors=True)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entries: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    for arch in PLATFORMS:
        image = images[arch]
        _copy_blobs(image.layout, layout)
        (ref,) = json.loads((image.layout / "index.json").read_text())["manifests"]
        manifest = read_json_blob(layout, ref["digest"])
        config = read_json_blob(layout, manifest["config"]["digest"])
        if config["architecture"] != arch or config["os"] != "linux":
            raise CommandError(f"the {arch} image's config says "
                               f"{config['os']}/{config['architecture']}")
        entries.append(_platform_entry(ref, config))
        refs.append({"mediaType": ref["mediaType"], "digest": ref["digest"],
                     "size": ref["size"], "annotations": {REF_NAME: f"{tag}-{arch}"}})
    index_digest, index_size = write_blob(layout, canonical_json(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))
    top = {"mediaType": OCI_INDEX, "digest": index_digest, "size": index_size,
           "annotations": {REF_NAME: tag}}
    (layout / "index.json").write_bytes(canonical_json(
        {"schemaVersion": 2, "manifests": [top, *refs]}))
    built = BuiltIndex(layout, tag, index_digest, index_size,
                       {arch: images[arch] for arch in PLATFORMS})
    summary = {"layout": LAYOUT, "tag": tag, "index_digest": index_digest,
               "index_size": index_size,
               "platforms": {arch: {**asdict(image), "layout": LAYOUT, "tag": f"{tag}-{arch}"}
                             for arch, image in built.platforms.items()}}
    (out / INDEX_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return built


def push_index(built: BuiltIndex, reference: str, *, tls_verify: bool = True) -> str:
    """`skopeo copy --all` the index and both images to `reference`; return the index digest.

    Digests are preserved and the pushed one checked against the built one. Credentials
    come from skopeo's auth file (`skopeo login`, REGISTRY_AUTH_FILE). Raises CommandError.
    """
    return skopeo_push(built.source, built.index_digest, reference, tls_verify=tls_verify,
                       every_platform=True)


def describe_index(built: BuiltIndex) -> str:
    """Lines for people: the index digest, then each platform's digest, sizes and build."""
    lines = [f"index {built.index_digest} ({', '.join(f'linux/{a}' for a in built.platforms)})"]
    for arch, image in built.platforms.items():
        layers = " + ".join(f"{size / 1e6:.1f}" for size in image.layer_sizes)
        source = "cache" if image.cached else f"built in {image.build_seconds:.0f} s"
        lines.append(f"  linux/{arch}: {image.manifest_digest} ({image.size / 1e6:.1f} MB: "
                     f"layers {layers} MB compressed; {source})")
    return "\n".join(lines)
