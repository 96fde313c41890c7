"""Build layercache's container image without Docker: the same image the Dockerfile describes.

Why: our machines have no Docker engine, yet the next steps (real kubelets, kind) need the
product as an image in a registry. The build mirrors the Dockerfile stage for stage:

1. Wheel: `pip wheel --no-deps` of this checkout (copied to a scratch tree first, so the
   in-tree setuptools `build/` directory never lands in the shared checkout).
2. Base layer (cached by `rootfs_key()`): `mmdebstrap --variant=minbase --include=python3`
   of Debian bookworm, i.e. Debian's Python 3.11 at /usr/bin/python3 as in the Dockerfile's
   distroless `python3-debian12` base, plus the `nonroot` user 65532; no apt lists, no
   resolv.conf/hostname of the build host, no /dev. mtimes clamped to SOURCE_DATE_EPOCH.
3. Dependency wheels: `pip download --only-binary=:all:` on the host for CPython 3.11 /
   manylinux up to glibc 2.36 (bookworm's), so the rootfs never needs network or a
   compiler, and the host's pip configuration (index, CA) applies.
4. Application layer: `umoci unpack` the base, `python3 -m venv --without-pip
   /opt/layercache` in a chroot, then pip (run from its own wheel, so no pip is left in
   the image) installs the wheel and its dependencies offline; `umoci repack` stores what
   changed (only /opt/layercache) as the second layer.
5. `umoci config`: entrypoint /opt/layercache/bin/layercache, user 65532:65532, PATH with
   the venv first (so the manifests' `command: [layercache]` resolves), OCI labels.

Cache: `<cache>/product-image/rootfs-<key>.tar` (the base layer) and
`<cache>/product-image/<key>/` (the OCI layout and `image.json`), keyed by the base recipe
and by the wheel's member contents, each renamed into place only when complete, under a
lock (one build at a time). Measured on a busy 2-core machine: cold 10.6 min (mmdebstrap
~5 min, umoci unpack/repack and the offline pip install most of the rest); a source change
with the base cached 3-4.5 min; warm ~22 s (the wheel is rebuilt to compute its key, then
the layout is copied). The image: 83.6 MB, layers 46.0 + 37.6 MB compressed.

This is the linux/amd64 image, the one the bed's nodes run; `testbed.product_index` adds
the linux/arm64 image and the index of both that `make image` writes.

Spec: OCI image layout and image config (image-spec v1.1), skopeo-copy(1), umoci(1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from testbed.image_build import CommandError, read_json_blob, require_tools, run
from testbed.image_recipe import CREATED, SOURCE_DATE_EPOCH, SUITE
from testbed.images import _exclusive  # the family cache's flock, same discipline
from testbed.paths import CACHE, REPO

__all__ = [
    "DEFAULT_REFERENCE",
    "ENTRYPOINT",
    "USER",
    "BuiltImage",
    "build_image",
    "push_image",
]

log = logging.getLogger(__name__)

#: Bump when a build step changes the bytes, so old cache entries are left alone.
BUILD_VERSION: Final = 1
#: Where the install manifests and the chart pull the product from (one image, two roles).
DEFAULT_REFERENCE: Final = "ghcr.io/layercache/layercache:0.1.0"
VENV: Final = "/opt/layercache"
ENTRYPOINT: Final = f"{VENV}/bin/layercache"
#: distroless' `nonroot` user; the agent overrides it with runAsUser 0 (containerd socket).
USER: Final = "65532:65532"
PYTHON_VERSION: Final = "3.11"  # Debian bookworm's python3
GLIBC_MINOR: Final = 36  # bookworm's glibc 2.36: newest manylinux tag its wheels may need
PACKAGES: Final = ("python3",)
ENV: Final = (
    f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONUNBUFFERED=1",  # log lines reach `kubectl logs` as they happen
    "PYTHONDONTWRITEBYTECODE=1",  # bytecode is compiled at build time; the root fs may be RO
    "HOME=/home/nonroot",
)
LABELS: Final = {
    "org.opencontainers.image.title": "layercache",
    "org.opencontainers.image.description": (
        "Kubernetes operator and node agent that pre-pull and de-duplicate shared "
        "container-image base layers"
    ),
    "org.opencontainers.image.licenses": "Apache-2.0",
    "org.opencontainers.image.source": "https://github.com/layercache/layercache",
    "org.opencontainers.image.base.name": f"debian:{SUITE} (mmdebstrap --variant=minbase)",
}
_DROP_HOST_FILES: Final = 'rm -f "$1"/etc/resolv.conf "$1"/etc/hostname'
#: distroless' `nonroot` (65532:65532, home /home/nonroot), so both builds agree on names.
_ADD_NONROOT: Final = (
    'chroot "$1" groupadd --gid 65532 nonroot && chroot "$1" useradd --uid 65532 --gid 65532 '
    '--no-create-home --home-dir /home/nonroot --shell /usr/sbin/nologin nonroot && '
    'install -d -o 65532 -g 65532 -m 0750 "$1"/home/nonroot'
)
#: mmdebstrap options that shape the base layer (all in `rootfs_key()`). The merged-usr
#: hook sets up merged /usr itself instead of installing `usrmerge`, which drags in ~45 MB
#: of perl; the dpkg path filters are what Debian's `-slim` images drop (docs, man pages,
#: translations), keeping each package's copyright file.
MMDEBSTRAP_OPTIONS: Final = (
    "--variant=minbase",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    f"--customize-hook={_ADD_NONROOT}",
    # mmdebstrap empties the apt lists and archives itself; these logs are build noise.
    '--customize-hook=rm -rf "$1"/var/log/apt "$1"/var/log/dpkg.log',
    f"--customize-hook={_DROP_HOST_FILES}",
)
_ARCH: Final = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
IMAGE_JSON: Final = "image.json"
LAYOUT: Final = "oci"


@dataclass(frozen=True)
class BuiltImage:
    """One built image: an OCI layout with a single tag, and what is in it.

    `layer_sizes` are the compressed layer blob sizes in bytes, base first; `size` is
    their sum plus the config and manifest (what a registry stores for the image).
    `build_seconds` is the time the cold build of this cache entry took; `cached` says
    whether this call reused it.
    """

    layout: Path
    tag: str
    version: str
    manifest_digest: str
    config_digest: str
    layer_sizes: tuple[int, ...]
    size: int
    build_seconds: float
    cached: bool

    @property
    def source(self) -> str:
        """The skopeo source reference, `oci:<layout>:<tag>`."""
        return f"oci:{self.layout}:{self.tag}"


def rootfs_key() -> str:
    """16 hex digits over everything that decides the base layer's bytes."""
    recipe = {
        "v": BUILD_VERSION, "suite": SUITE, "epoch": SOURCE_DATE_EPOCH, "packages": PACKAGES,
        "options": MMDEBSTRAP_OPTIONS, "arch": _ARCH,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def wheel_key(wheel: Path) -> str:
    """16 hex digits over the wheel's member names and contents (not its zip timestamps)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + archive.read(name) + b"\0")
    return digest.hexdigest()[:16]


def build_wheel(dest: Path, repo: Path = REPO) -> Path:
    """`pip wheel --no-deps` of `repo`'s project into `dest`; returns the wheel's path.

    The sources are copied to a scratch tree first: setuptools builds in-tree and would
    otherwise write `build/` into a checkout other processes use. Raises CommandError.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="layercache-wheel-") as scratch_name:
        src = Path(scratch_name) / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "tools")
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(repo / name, src / name)
        shutil.copytree(repo / "operator", src / "operator", ignore=ignore)
        run([sys.executable, "-m", "pip", "wheel",
             "--quiet", "--no-deps", "--wheel-dir", dest, src])
    wheels = sorted(dest.glob("layercache-*.whl"))
    if len(wheels) != 1:
        raise CommandError(f"expected one layercache wheel in {dest}, found {wheels}")
    return wheels[0]


def download_dependencies(wheel: Path, dest: Path, machine: str | None = None) -> Path:
    """Download the wheel's dependencies as binary wheels for the image's Python into `dest`.

    `machine` is the image's `uname -m` (`x86_64`, `aarch64`; default: this host's): pip
    picks each wheel for that platform, whatever the host is. Also fetches pip itself (into
    `dest/pip/`): the image has no pip; the amd64 build runs pip from its wheel inside the
    chroot. Returns the pip wheel's path. Raises CommandError.
    """
    python = sys.executable  # the host's pip, with the host's index and CA settings
    machine = machine or platform.machine()
    # pip does not widen a manylinux_2_X tag to older ones: list each glibc down to 2.17.
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 16, -1)]
    platforms += [f"manylinux2014_{machine}"]
    run([python, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--python-version", PYTHON_VERSION, "--implementation", "cp",
         "--abi", f"cp{PYTHON_VERSION.replace('.', '')}",
         *[arg for tag in platforms for arg in ("--platform", tag)],
         "--dest", dest, wheel])
    run([python, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
         "--dest", dest / "pip", "pip"])
    return next((dest / "pip").glob("pip-*.whl"))


def build_rootfs(cache: Path, key: str | None = None, packages: tuple[str, ...] = PACKAGES,
                 options: tuple[str, ...] = MMDEBSTRAP_OPTIONS) -> Path:
    """The base layer tarball (Debian minbase + python3 + user nonroot), cached by its key.

    `key`, `packages` and `options` (default: this module's `rootfs_key()`, `PACKAGES`,
    `MMDEBSTRAP_OPTIONS`) make another base, e.g. another architecture's; the key must
    cover the other two. Raises CommandError (mmdebstrap failed, e.g. no mirror) or
    ToolMissingError.
    """
    key = key or rootfs_key()
    final = cache / f"rootfs-{key}.tar"
    if final.exists():
        return final
    require_tools("mmdebstrap")
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"rootfs-{key}.partial.tar"  # mmdebstrap: *.tar = tar output
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    try:
        run(["mmdebstrap", "--quiet", "--skip=output/dev", f"--include={','.join(packages)}",
             *options, SUITE, partial],
            env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "TMPDIR": str(work),
                 "DEBIAN_FRONTEND": "noninteractive"})
        partial.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return final


def _chroot(rootfs: Path, *argv: str) -> str:
    # A clean environment: the host's PIP_* settings (CA file, find-links) name host paths.
    return run(["chroot", rootfs, *argv],
               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
                    "PIP_CONFIG_FILE": "/dev/null", "PIP_CERT": "", "PIP_FIND_LINKS": "",
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _layout_summary(layout: Path, tag: str) -> tuple[str, str, tuple[int, ...], int]:
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = read_json_blob(layout, entry["digest"])
    layers = tuple(int(layer["size"]) for layer in manifest["layers"])
    size = sum(layers) + int(manifest["config"]["size"]) + int(entry["size"])
    return entry["digest"], manifest["config"]["digest"], layers, size


def _assemble(layout: Path, rootfs_tar: Path, wheel: Path, wheels: Path, pip_wheel: Path,
              version: str, work: Path) -> None:
    """Write the two-layer image into a new OCI layout `layout` tagged `version`."""
    image = f"{layout}:{version}"
    run(["umoci", "init", "--layout", layout])
    run(["umoci", "new", "--image", image])
    run(["umoci", "config", "--image", image, "--no-history", "--created", CREATED,
         "--os", "linux", "--architecture", _ARCH])
    run(["umoci", "raw", "add-layer", "--image", image, "--history.created", CREATED,
         "--history.created_by", f"mmdebstrap --variant=minbase --include={','.join(PACKAGES)} "
         f"{SUITE}", rootfs_tar])
    bundle = work / "bundle"
    run(["umoci", "unpack", "--image", image, bundle])
    rootfs = bundle / "rootfs"
    staged = rootfs / "tmp" / "layercache-build"
    shutil.copytree(wheels, staged)
    shutil.copy2(wheel, staged / wheel.name)
    inside = Path("/tmp/layercache-build")
    _chroot(rootfs, "/usr/bin/python3", "-m", "venv", "--without-pip", VENV)
    _chroot(rootfs, f"{VENV}/bin/python", str(inside / "pip" / pip_wheel.name / "pip"),
            "install", "--quiet", "--no-index", "--no-cache-dir",
            "--find-links", str(inside), str(inside / wheel.name))
    shutil.rmtree(staged)
    run(["umoci", "repack", "--image", image, "--history.created", CREATED,
         "--history.created_by", f"python3 -m venv {VENV} && pip install {wheel.name}",
         bundle])
    configure_entry_point(image, version)
    run(["umoci", "gc", "--layout", layout])


def configure_entry_point(image: str, version: str, labels: dict[str, str] | None = None) -> None:
    """`umoci config` of `image` (`<layout>:<tag>`): entry point, user, env and OCI labels.

    `labels` replaces `LABELS` (the version and revision labels are always added). The
    same settings for every platform's image. Raises CommandError.
    """
    labels = {**(labels or LABELS), "org.opencontainers.image.version": version,
              "org.opencontainers.image.revision": _revision()}
    run(["umoci", "config", "--image", image, "--no-history", "--created", CREATED,
         "--config.entrypoint", ENTRYPOINT, "--config.user", USER,
         "--config.workingdir", "/home/nonroot",
         *[arg for env in ENV for arg in ("--config.env", env)],
         *[arg for k, v in labels.items() for arg in ("--config.label", f"{k}={v}")]])


def _revision() -> str:
    head = REPO / ".git" / "HEAD"
    try:
        return run(["git", "-C", REPO, "rev-parse", "HEAD"]).strip() if head.exists() else ""
    except CommandError:
        return ""


def build_image(out: Path | None = None, *, cache_dir: Path | None = None,
                rebuild: bool = False) -> BuiltImage:
    """Build (or take from the cache) the product image; optionally copy its layout to `out`.

    Args:
        out: when given, the OCI layout is copied to `out/oci` and the summary written to
            `out/image.json`; the returned `layout` is then the copy.
        cache_dir: the layercache cache root (default `testbed.paths.CACHE`).
        rebuild: ignore a cached layout for this wheel (the base layer stays cached).

    Returns:
        The built image; `cached` tells whether the layout came from the cache.

    Raises:
        CommandError: pip, mmdebstrap, umoci or chroot failed (the message has stderr).
        ToolMissingError: mmdebstrap or umoci is not installed.

    """
    require_tools("umoci", "mmdebstrap")
    root = (cache_dir or CACHE) / "product-image"
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / "build.lock"):  # one build at a time; waiters then find it cached
        built = _build_locked(root, rebuild)
    if out is None:
        return built
    shutil.rmtree(out / LAYOUT, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(built.layout, out / LAYOUT)
    copied = BuiltImage(**{**asdict(built), "layout": out / LAYOUT})
    _write_summary(out, copied)
    return copied


def prune(root: Path, current: Path, rootfs: str | None = None) -> None:
    """Drop what interrupted builds left, old base layers and all but 3 image entries.

    `rootfs` is the file name of the base layer to keep (default: this module's,
    `rootfs-<rootfs_key()>.tar`). Each source change makes a new ~120 MB entry; clones
    sharing the cache keep theirs as long as they are among the newest. Callers hold the
    build lock, so nothing is in use.
    """
    entries = sorted((p for p in root.iterdir() if p.is_dir() and (p / IMAGE_JSON).exists()
                      and p != current), key=lambda p: p.stat().st_mtime, reverse=True)
    keep = {current.name, rootfs or f"rootfs-{rootfs_key()}.tar", "build.lock",
            *(p.name for p in entries[:2])}
    for child in root.iterdir():
        if child.name not in keep:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _build_locked(root: Path, rebuild: bool) -> BuiltImage:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        wheel = build_wheel(work / "wheel")
        version = wheel.name.split("-")[1]
        key = hashlib.sha256(f"{rootfs_key()}:{wheel_key(wheel)}:{BUILD_VERSION}".encode())
        final = root / key.hexdigest()[:16]
        cached = (final / IMAGE_JSON).exists() and not rebuild
        if cached:
            os.utime(final)  # recently used: `prune` keeps the newest entries
        else:
            rootfs_tar = build_rootfs(root)
            pip_wheel = download_dependencies(wheel, work / "wheels")
            partial = work / "result"
            partial.mkdir()
            _assemble(partial / LAYOUT, rootfs_tar, wheel, work / "wheels", pip_wheel, version,
                      work)
            digest, config, layers, size = _layout_summary(partial / LAYOUT, version)
            summary = BuiltImage(partial / LAYOUT, version, version, digest, config, layers,
                                 size, round(time.monotonic() - started, 1), cached=False)
            _write_summary(partial, summary)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prune(root, final)
    return _read_summary(final, cached=cached)


def _write_summary(directory: Path, image: BuiltImage) -> None:
    data = {**asdict(image), "layout": LAYOUT}
    data.pop("cached")
    (directory / IMAGE_JSON).write_text(json.dumps(data, indent=2) + "\n")


def _read_summary(directory: Path, *, cached: bool) -> BuiltImage:
    data = json.loads((directory / IMAGE_JSON).read_text())
    data["layout"] = directory / data["layout"]
    data["layer_sizes"] = tuple(data["layer_sizes"])
    return BuiltImage(**data, cached=cached)


def push_image(image: BuiltImage, reference: str, *, tls_verify: bool = True,
               authfile: Path | None = None) -> str:
    """`skopeo copy` the image to `reference` (`host[:port]/repo:tag`); returns the digest.

    The manifest keeps its digest (`--preserve-digests`); the pushed digest is checked
    against the built one. `tls_verify=False` is for the test bed's plain-HTTP registry
    only. Raises CommandError (skopeo failed, or the registry stored another digest).
    """
    return skopeo_push(image.source, image.manifest_digest, reference, tls_verify=tls_verify,
                       authfile=authfile)


def skopeo_push(source: str, built_digest: str, reference: str, *, tls_verify: bool = True,
                authfile: Path | None = None, every_platform: bool = False) -> str:
    """`skopeo copy` ``source`` to ``reference`` with its digest kept; the pushed digest.

    ``every_platform``: an index with all its images (``--all``). The digest skopeo reports
    must equal ``built_digest``. Raises CommandError (skopeo failed, or another digest).
    """
    require_tools("skopeo")
    with tempfile.TemporaryDirectory(prefix="layercache-push-") as scratch:
        digest_file = Path(scratch) / "digest"
        run(["skopeo", "--insecure-policy", "copy", "--quiet",
             *(["--all"] if every_platform else []), "--preserve-digests",
             "--retry-times", "3", f"--dest-tls-verify={str(tls_verify).lower()}",
             *(["--dest-authfile", str(authfile)] if authfile else []),
             "--digestfile", str(digest_file), source, f"docker://{reference}"])
        pushed = digest_file.read_text().strip()
    if pushed != built_digest:
        raise CommandError(f"{reference} was pushed as {pushed}, built {built_digest}")
    log.info("pushed %s %s", reference, pushed)
    return pushed


def describe(image: BuiltImage) -> str:
    """One line for people: digest, layer sizes and total in MB, build time."""
    layers = " + ".join(f"{size / 1e6:.1f}" for size in image.layer_sizes)
    source = "cache" if image.cached else f"built in {image.build_seconds:.0f} s"
    return (f"{image.manifest_digest} ({image.size / 1e6:.1f} MB: layers {layers} MB "
            f"compressed; {source})")
