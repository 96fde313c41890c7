"""Build the image family's OCI layout from real Debian content.

The steps, for `testbed.image_recipe.RECIPE`:

1. `mmdebstrap --variant=minbase` → `base.tar`: the root filesystem, mtimes clamped to
   SOURCE_DATE_EPOCH, without /dev and without the host's resolv.conf/hostname; umoci
   stores it as the one layer of `base`. Its apt lists are kept for step 2.
2. Each package image: `umoci unpack` base to a bundle, then `mmdebstrap --variant=custom`
   rebuilds the bundle's rootfs from `base.tar` plus `apt-get install` (the refinement of
   a chroot tarball that mmdebstrap(1) documents), and `umoci repack` writes only what
   differs as a new layer over the parent's *same* layer blobs. The mmdebstrap runs wait
   mostly on the mirror and the disk, so two go in parallel; umoci runs one at a time.
3. The foreign architecture: `mmdebstrap --variant=extract` (no emulation) as one layer.
4. Each app image: `umoci raw add-layer` of the recipe's tarball, plus its command.
5. skopeo converts the Docker-flavour image's manifest (v2 schema 2, same config and
   layers); the index blobs are written here, with descriptors computed from the bytes.
6. `index.json` is rewritten to name exactly the family's images (`ref.name` = image name).

Every tool failure raises `CommandError` with the command and the tail of its stderr;
a missing tool raises `ToolMissingError` naming the Debian package that provides it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from testbed.image_recipe import (
    CREATED,
    RECIPE,
    SOURCE_DATE_EPOCH,
    SUITE,
    AttestedIndex,
    ForeignImage,
    MultiArchIndex,
    OsImage,
    Recipe,
    app_layer_tar,
)

log = logging.getLogger(__name__)

# Spelled out here rather than imported from `layercache`: the bed is the oracle the
# product is tested against, so it shares none of the product's code.
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
IN_TOTO: Final = "application/vnd.in-toto+json"
REF_NAME: Final = "org.opencontainers.image.ref.name"
#: The index-entry annotations BuildKit writes for an attestation manifest.
REFERENCE_TYPE: Final = "vnd.docker.reference.type"
REFERENCE_DIGEST: Final = "vnd.docker.reference.digest"
ATTESTATION_MANIFEST: Final = "attestation-manifest"
SLSA_PROVENANCE: Final = "https://slsa.dev/provenance/v0.2"

#: Tool → the Debian package that ships it.
TOOL_PACKAGES: Final[Mapping[str, str]] = {
    "mmdebstrap": "mmdebstrap",
    "umoci": "umoci",
    "skopeo": "skopeo",
    "tar": "tar",
    "docker-registry": "docker-registry",
}
#: What `build_layout` runs.
BUILD_TOOLS: Final = ("mmdebstrap", "umoci", "skopeo", "tar")
_STDERR_TAIL: Final = 3000  # characters of stderr quoted in a CommandError


class ToolMissingError(RuntimeError):
    """A command-line tool the image family needs is not on PATH."""


class CommandError(RuntimeError):
    """A tool exited non-zero; the message holds the command and its stderr's tail."""


def require_tools(*names: str) -> None:
    """Raise `ToolMissingError` naming the apt package of the first tool not on PATH."""
    for name in names:
        if shutil.which(name) is None:
            package = TOOL_PACKAGES.get(name, name)
            raise ToolMissingError(f"{name} not found on PATH: apt-get install {package}")


def run(argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None) -> str:
    """Run `argv` to completion and return its stdout (text).

    Raises `CommandError` on a non-zero exit, quoting the command and the last
    characters of its stderr (mmdebstrap and skopeo say what went wrong at the end).
    """
    args = [str(a) for a in argv]
    full_env = {**os.environ, **env} if env else None
    started = time.monotonic()
    done = subprocess.run(
        args, capture_output=True, text=True, errors="replace", env=full_env, check=False
    )
    log.debug("%.1f s: %s", time.monotonic() - started, shlex.join(args)[:160])
    if done.returncode != 0:
        tail = done.stderr[-_STDERR_TAIL:] or done.stdout[-_STDERR_TAIL:]
        raise CommandError(f"{shlex.join(args)} exited {done.returncode}:\n{tail}")
    return done.stdout


def write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    """Store `data` in `layout`'s blob store; return its (digest, size in bytes)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    return digest, len(data)


def read_json_blob(layout: Path, digest: str) -> Any:
    """Parse the JSON blob `digest` (`sha256:<hex>`) of `layout`."""
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    return json.loads(path.read_bytes())


def canonical_json(obj: object) -> bytes:
    """Compact JSON with sorted keys: stable bytes, so stable digests."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_layout(layout: Path, work: Path, recipe: Recipe = RECIPE) -> None:
    """Build every image of `recipe` into a new OCI layout at `layout`.

    `work` holds the base tarball, apt lists and umoci bundles (about 1 GB at peak) and
    may be deleted afterwards. Takes a few minutes on two cores, mostly apt and disk I/O.
    Raises `ToolMissingError` or `CommandError`.
    """
    require_tools(*BUILD_TOOLS)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base_tar, lists = work / "base.tar", work / "apt-lists"
    _mmdebstrap_base(base_tar, lists, work)
    log.info("base rootfs built in %.0f s", time.monotonic() - started)
    run(["umoci", "init", "--layout", layout])
    _new_image(layout, "base", "amd64")
    _add_layer(layout, "base", base_tar, f"mmdebstrap --variant=minbase {SUITE}")

    package_images = [image for image in recipe.os_images if image.parent is not None]
    # mmdebstrap runs mostly wait on the mirror and the disk: two go at a time in the
    # pool, while this thread runs every umoci command (they rewrite index.json, so one
    # at a time), in the order that lets the mmdebstrap runs start soonest.
    with ThreadPoolExecutor(max_workers=2) as pool:
        foreign_jobs = {
            foreign.name: pool.submit(_mmdebstrap_foreign, foreign, work)
            for foreign in recipe.foreign_images
        }
        package_jobs: dict[str, Future[Path]] = {}
        for image in package_images:
            assert image.parent == "base", f"{image.name}: package images sit on base"
            bundle = work / f"{image.name}.bundle"
            run(["umoci", "unpack", "--image", f"{layout}:{image.parent}", bundle])
            package_jobs[image.name] = pool.submit(
                _install_packages, base_tar, lists, image, bundle, work
            )
        for foreign in recipe.foreign_images:
            tarball = foreign_jobs[foreign.name].result()
            _new_image(layout, foreign.name, foreign.architecture)
            _add_layer(
                layout,
                foreign.name,
                tarball,
                f"mmdebstrap --arch={foreign.architecture} --variant=extract",
            )
        for image in package_images:
            bundle = package_jobs[image.name].result()
            _repack(layout, image, bundle)
            log.info("%s packed at %.0f s", image.name, time.monotonic() - started)
            pool.submit(shutil.rmtree, bundle)  # slow on a busy disk: not on this path

    for app in recipe.app_images:
        tarball = work / f"{app.name}.tar"
        tarball.write_bytes(app_layer_tar(app))
        _add_layer(layout, app.parent, tarball, f"COPY {app.name} files", tag=app.name)
        run(
            [
                "umoci",
                "config",
                "--image",
                f"{layout}:{app.name}",
                "--no-history",
                "--created",
                CREATED,
                "--config.workingdir",
                app.workdir,
                *[arg for word in app.cmd for arg in ("--config.cmd", word)],
            ]
        )

    extra: dict[str, tuple[str, str, int]] = {}  # name -> (media type, digest, size)
    for flavour in recipe.docker_flavours:
        extra[flavour.name] = (
            DOCKER_MANIFEST,
            *_docker_manifest(layout, flavour.source, work / flavour.name),
        )
    for multi in recipe.multi_arch:
        extra[multi.name] = (OCI_INDEX, *_multi_arch_index(layout, multi))
    for attested in recipe.attested:
        extra[attested.name] = (OCI_INDEX, *_attested_index(layout, attested))
    _write_index_json(layout, recipe.family_names(), extra)
    log.info("family layout complete in %.0f s", time.monotonic() - started)


def _mmdebstrap(argv: Sequence[str | Path], work: Path) -> None:
    # TMPDIR: mmdebstrap stages the chroot there; keeping it under `work` means an
    # interrupted build leaves nothing behind outside the cache's .partial directory.
    env = {
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
        "TMPDIR": str(work),
        "DEBIAN_FRONTEND": "noninteractive",
    }
    run(["mmdebstrap", "--quiet", "--skip=output/dev", *argv], env=env)


# mmdebstrap copies the host's resolv.conf and hostname in for apt; they would make the
# layer depend on the build host, and container runtimes provide their own.
_DROP_HOST_FILES: Final = 'rm -f "$1"/etc/resolv.conf "$1"/etc/hostname'


def _mmdebstrap_base(out: Path, lists: Path, work: Path) -> None:
    # The apt lists are kept so the package images install from the very same archive
    # snapshot as the base, and need not download them again.
    lists.mkdir()
    _mmdebstrap(
        [
            "--variant=minbase",
            f"--customize-hook=sync-out /var/lib/apt/lists {shlex.quote(str(lists))}",
            f"--customize-hook={_DROP_HOST_FILES}",
            SUITE,
            out,
        ],
        work,
    )


def _install_packages(
    base_tar: Path, lists: Path, image: OsImage, bundle: Path, work: Path
) -> Path:
    """Make `bundle`'s rootfs the base tree plus `image.packages`; return `bundle`.

    mmdebstrap(1)'s way to refine an existing chroot tarball: the `custom` variant
    unpacks it and `apt-get install` runs inside, so files apt does not touch keep the
    base's bytes and timestamps and umoci's diff leaves them out.
    """
    rootfs = bundle / "rootfs"
    for child in rootfs.iterdir():  # mmdebstrap wants an empty target directory
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    install = "apt-get install --yes --no-install-recommends " + shlex.join(image.packages)
    _mmdebstrap(
        [
            "--variant=custom",
            "--skip=update",
            f"--setup-hook=tar-in {shlex.quote(str(base_tar))} /",
            f"--setup-hook=sync-in {shlex.quote(str(lists))} /var/lib/apt/lists",
            f'--customize-hook=chroot "$1" {install}',
            f"--customize-hook={_DROP_HOST_FILES}",
            SUITE,
            rootfs,
        ],
        work,
    )
    # A directory chroot gets device nodes in /dev; the base layer has no /dev at all
    # (runtimes mount their own), so leave them out of the diff too.
    shutil.rmtree(rootfs / "dev", ignore_errors=True)
    return bundle


def _mmdebstrap_foreign(foreign: ForeignImage, work: Path) -> Path:
    """Unpack `foreign.packages` for its architecture into a tarball; return its path."""
    out = work / f"{foreign.name}.tar"
    # The extract variant runs no customize hooks; extract hooks run after unpacking.
    _mmdebstrap(
        [
            f"--arch={foreign.architecture}",
            "--variant=extract",
            f"--include={','.join(foreign.packages)}",
            f"--extract-hook={_DROP_HOST_FILES}",
            SUITE,
            out,
        ],
        work,
    )
    return out


def _new_image(layout: Path, name: str, architecture: str) -> None:
    run(["umoci", "new", "--image", f"{layout}:{name}"])
    run(
        [
            "umoci",
            "config",
            "--image",
            f"{layout}:{name}",
            "--no-history",
            "--created",
            CREATED,
            "--os",
            "linux",
            "--architecture",
            architecture,
        ]
    )


def _add_layer(
    layout: Path, image: str, tarball: Path, created_by: str, *, tag: str | None = None
) -> None:
    run(
        [
            "umoci",
            "raw",
            "add-layer",
            "--image",
            f"{layout}:{image}",
            *(["--tag", tag] if tag else []),
            "--history.created",
            CREATED,
            "--history.created_by",
            created_by,
            tarball,
        ]
    )


def _repack(layout: Path, image: OsImage, bundle: Path) -> None:
    """Tag `image` = its parent plus one layer of what differs in `bundle`'s rootfs.

    umoci compares the rootfs with the mtree it recorded at unpack time, so the new layer
    holds what apt changed (new files, dpkg status, ld.so.cache ...) and whiteouts; the
    parent's layer blobs are reused as they are.
    """
    run(
        [
            "umoci",
            "repack",
            "--image",
            f"{layout}:{image.name}",
            "--history.created",
            CREATED,
            "--history.created_by",
            "apt-get install " + " ".join(image.packages),
            bundle,
        ]
    )


def _layout_refs(layout: Path) -> dict[str, dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    return {entry["annotations"][REF_NAME]: entry for entry in index["manifests"]}


def _docker_manifest(layout: Path, source: str, scratch: Path) -> tuple[str, int]:
    """Have skopeo convert `source`'s manifest to Docker v2 schema 2; store it as a blob.

    skopeo's `oci:` transport neither writes nor reads Docker manifests in a layout, so
    the conversion goes through a `dir:` copy; config and layers keep their digests.
    """
    run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--format",
            "v2s2",
            f"oci:{layout}:{source}",
            f"dir:{scratch}",
        ]
    )
    digest_size = write_blob(layout, (scratch / "manifest.json").read_bytes())
    shutil.rmtree(scratch)
    return digest_size


def _platform_entry(entry: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    platform = {"architecture": config["architecture"], "os": config["os"]}
    return {
        "mediaType": entry["mediaType"],
        "digest": entry["digest"],
        "size": entry["size"],
        "platform": platform,
    }


def _multi_arch_index(layout: Path, multi: MultiArchIndex) -> tuple[str, int]:
    refs = _layout_refs(layout)
    entries = []
    for name in (multi.amd64, multi.foreign):
        manifest = read_json_blob(layout, refs[name]["digest"])
        config = read_json_blob(layout, manifest["config"]["digest"])
        entries.append(_platform_entry(refs[name], config))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return write_blob(layout, canonical_json(index))


def _attested_index(layout: Path, attested: AttestedIndex) -> tuple[str, int]:
    """An index as `docker buildx build --provenance` pushes it: image + attestation.

    The attestation manifest carries an in-toto statement whose subject is the image
    manifest; its config says unknown/unknown, as BuildKit's do.
    """
    subject = _layout_refs(layout)[attested.subject]
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": SLSA_PROVENANCE,
        "subject": [
            {
                "name": f"pkg:docker/{attested.name}?platform=linux%2Famd64",
                "digest": {"sha256": subject["digest"].removeprefix("sha256:")},
            }
        ],
        "predicate": {
            "builder": {"id": "layercache-testbed"},
            "buildType": "https://mobyproject.org/buildkit@v1",
            "metadata": {"buildStartedOn": CREATED, "buildFinishedOn": CREATED},
        },
    }
    layer_digest, layer_size = write_blob(layout, canonical_json(statement))
    config = {
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_digest, config_size = write_blob(layout, canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {
                "mediaType": IN_TOTO,
                "digest": layer_digest,
                "size": layer_size,
                "annotations": {"in-toto.io/predicate-type": SLSA_PROVENANCE},
            }
        ],
    }
    manifest_digest, manifest_size = write_blob(layout, canonical_json(manifest))
    subject_manifest = read_json_blob(layout, subject["digest"])
    subject_config = read_json_blob(layout, subject_manifest["config"]["digest"])
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            _platform_entry(subject, subject_config),
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": "unknown", "os": "unknown"},
                "annotations": {
                    REFERENCE_DIGEST: subject["digest"],
                    REFERENCE_TYPE: ATTESTATION_MANIFEST,
                },
            },
        ],
    }
    return write_blob(layout, canonical_json(index))


def _write_index_json(
    layout: Path, names: Sequence[str], extra: Mapping[str, tuple[str, str, int]]
) -> None:
    """List exactly `names` in index.json, in order; intermediate refs go.

    The blobs of dropped refs (the foreign image) stay: the indexes reference them.
    """
    refs = _layout_refs(layout)
    entries = []
    for name in names:
        if name in extra:
            media_type, digest, size = extra[name]
        else:
            media_type, digest, size = (refs[name][k] for k in ("mediaType", "digest", "size"))
        entries.append(
            {
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {REF_NAME: name},
            }
        )
    index = {"schemaVersion": 2, "manifests": entries}
    (layout / "index.json").write_bytes(canonical_json(index))


def docker_dir_view(layout: Path, manifest_digest: str, dest: Path) -> Path:
    """Lay out a Docker-flavour manifest of `layout` as skopeo's `dir:` transport reads it.

    `dest` gets `manifest.json`, `version` and symlinks to the config and layer blobs (no
    copies). Returns `dest`. This is how such an image is pushed, since skopeo's `oci:`
    transport ignores Docker manifests in a layout.
    """
    blobs = layout / "blobs" / "sha256"
    dest.mkdir(parents=True, exist_ok=True)
    raw = (blobs / manifest_digest.removeprefix("sha256:")).read_bytes()
    (dest / "manifest.json").write_bytes(raw)
    (dest / "version").write_text("Directory Transport Version: 1.1\n")
    manifest = json.loads(raw)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        hex_digest = descriptor["digest"].removeprefix("sha256:")
        link = dest / hex_digest
        if not link.exists():
            link.symlink_to(blobs / hex_digest)
    return dest
