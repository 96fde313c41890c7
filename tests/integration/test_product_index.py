"""`make image`: layercache's image for linux/amd64 and linux/arm64 as one OCI index.

Built by `testbed.product_index.build_index()` (each platform cached; a cold arm64 build
costs minutes: mmdebstrap's download and the aarch64 wheels). The arm64 image cannot run
on this amd64 machine (no emulation), so it is checked by reading it: its config, its file
list, the entry-point scripts, and every ELF file in it (built for AArch64, each library
it needs present in the image). The index is also pushed to the bed's registry and pulled
through a node's CRI: containerd takes the amd64 image, the one the bed runs.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from testbed import cri
from testbed.bed import BedState
from testbed.image_build import OCI_INDEX, OCI_MANIFEST, REF_NAME, read_json_blob
from testbed.nodes import SimNode
from testbed.product_image import DEFAULT_REFERENCE, ENTRYPOINT, ENV, LABELS, USER, VENV
from testbed.product_index import BuiltIndex, build_index, push_index

pytestmark = pytest.mark.integration

SITE = f"{VENV.lstrip('/')}/lib/python3.11/site-packages"
#: Where Debian's arm64 dynamic loader looks without an ld.so.cache (merged /usr).
LIBRARY_DIRS = ("usr/lib/aarch64-linux-gnu", "usr/lib", "usr/local/lib")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltIndex:
    return build_index(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def images(built: BuiltIndex) -> dict[str, Image]:
    """Each platform's image, read once (decompressing the layers is most of the time)."""
    return {arch: _image(built, arch) for arch in built.platforms}


@dataclass(frozen=True)
class Image:
    """One platform's manifest and config, and its layers' members merged (path -> entry)."""

    descriptor: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[list[tarfile.TarInfo]]


def _index(built: BuiltIndex) -> tuple[dict[str, Any], dict[str, Any]]:
    top = json.loads((built.layout / "index.json").read_text())
    refs = {entry["annotations"][REF_NAME]: entry for entry in top["manifests"]}
    return refs, read_json_blob(built.layout, refs[built.tag]["digest"])


def _blob(built: BuiltIndex, digest: str) -> Path:
    return built.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _image(built: BuiltIndex, arch: str) -> Image:
    _, index = _index(built)
    (descriptor,) = [m for m in index["manifests"] if m["platform"]["architecture"] == arch]
    manifest = read_json_blob(built.layout, descriptor["digest"])
    config = read_json_blob(built.layout, manifest["config"]["digest"])
    layers = []
    for layer in manifest["layers"]:
        with tarfile.open(_blob(built, layer["digest"])) as archive:
            layers.append(archive.getmembers())
    return Image(descriptor, manifest, config, layers)


def _members(image: Image) -> dict[str, tarfile.TarInfo]:
    merged: dict[str, tarfile.TarInfo] = {}
    for layer in image.layers:  # no whiteouts in these images: later layers only add
        merged.update({m.name.removeprefix("./").rstrip("/"): m for m in layer})
    return merged


def _files(built: BuiltIndex, image: Image) -> Iterator[tuple[str, bytes]]:
    """(path, content) of every regular file of every layer."""
    for layer in image.manifest["layers"]:
        with tarfile.open(_blob(built, layer["digest"])) as archive:
            for member in archive:
                handle = archive.extractfile(member) if member.isreg() else None
                if handle is not None:
                    yield member.name.removeprefix("./"), handle.read()


def _resolve(members: dict[str, tarfile.TarInfo], path: str) -> str:
    """`path` with every symlink along it followed inside the image (absolute or relative)."""
    parts = path.split("/")
    resolved = ""
    for depth in range(40):  # a bound on links followed, as the kernel has
        for i in range(1, len(parts) + 1):
            head = "/".join(parts[:i])
            member = members.get(head)
            if member is not None and member.issym():
                base = "" if member.linkname.startswith("/") else posixpath.dirname(head)
                target = posixpath.normpath(posixpath.join(base, member.linkname)).lstrip("/")
                parts = [*target.split("/"), *parts[i:]]
                break
        else:
            resolved = "/".join(parts)
            break
        assert depth < 39, f"symlink loop at {path}"
    return resolved


def test_index_holds_both_platforms_and_their_manifests(built: BuiltIndex,
                                                        images: dict[str, Image]) -> None:
    refs, index = _index(built)
    assert built.tag == DEFAULT_REFERENCE.rsplit(":", 1)[1]
    assert refs[built.tag]["mediaType"] == OCI_INDEX
    assert refs[built.tag]["digest"] == built.index_digest
    assert index["mediaType"] == OCI_INDEX
    platforms = [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    for arch in ("amd64", "arm64"):
        image = images[arch]
        assert image.descriptor["mediaType"] == OCI_MANIFEST
        assert image.descriptor["digest"] == built.platforms[arch].manifest_digest
        assert refs[f"{built.tag}-{arch}"]["digest"] == image.descriptor["digest"]
        assert (image.config["os"], image.config["architecture"]) == ("linux", arch)
        assert len(image.manifest["layers"]) == 2  # the Debian base, then only the venv
        for layer in image.manifest["layers"]:
            assert _blob(built, layer["digest"]).stat().st_size == layer["size"]
    summary = json.loads((built.layout.parent / "index.json").read_text())
    assert summary["index_digest"] == built.index_digest
    assert summary["platforms"]["arm64"]["manifest_digest"] == (
        built.platforms["arm64"].manifest_digest)


def test_arm64_config_runs_the_same_entry_point_as_user_65532(
        built: BuiltIndex, images: dict[str, Image]) -> None:
    amd64, arm64 = images["amd64"].config, images["arm64"].config
    assert arm64["config"]["Entrypoint"] == amd64["config"]["Entrypoint"] == [ENTRYPOINT]
    assert arm64["config"]["User"] == USER
    assert arm64["config"]["Env"] == list(ENV)
    assert arm64["config"]["WorkingDir"] == "/home/nonroot"
    labels = arm64["config"]["Labels"]
    assert {k: v for k, v in LABELS.items() if k != "org.opencontainers.image.base.name"}.items() \
        <= labels.items()
    assert labels["org.opencontainers.image.version"] == built.tag
    assert "--variant=extract" in labels["org.opencontainers.image.base.name"]


def test_arm64_file_list_holds_the_operator_and_agent_entry_points(
        built: BuiltIndex, images: dict[str, Image]) -> None:
    image = images["arm64"]
    members = _members(image)
    files = dict(_files(built, image))
    # `layercache operator|agent` and the kubectl plugin: scripts run by the venv's python,
    # which resolves inside the image to Debian's arm64 /usr/bin/python3.11.
    for script in ("layercache", "kubectl-layercache"):
        path = f"{VENV.lstrip('/')}/bin/{script}"
        assert members[path].isreg() and members[path].mode & 0o111, path
        text = files[path].decode()
        assert text.startswith(f"#!{VENV}/bin/python\n")
        assert "from layercache.cli.main import app" in text
    python = _resolve(members, f"{VENV.lstrip('/')}/bin/python")
    assert python == "usr/bin/python3.11"
    assert members[python].isreg()
    # The product's modules are the amd64 image's, byte for byte.
    amd64_files = dict(_files(built, images["amd64"]))
    product = {p for p in files if p.startswith(f"{SITE}/layercache/") and p.endswith(".py")}
    assert f"{SITE}/layercache/cli/main.py" in product
    assert {p for p in amd64_files if p.startswith(f"{SITE}/layercache/") and p.endswith(".py")
            } == product
    assert all(files[p] == amd64_files[p] for p in product)
    assert b'@app.command("operator")' in files[f"{SITE}/layercache/cli/main.py"]
    assert b'@app.command("agent")' in files[f"{SITE}/layercache/cli/main.py"]
    # The same distributions as amd64 (versions may differ by the day each was built).
    def distributions(paths: Any) -> set[str]:
        return {p.split("/")[5].split("-")[0].lower() for p in paths
                if p.startswith(SITE) and p.count("/") >= 6 and ".dist-info/" in p}
    assert distributions(files) == distributions(amd64_files)
    # Bytecode compiled at build time, as pip does for amd64 (the root fs may be read-only).
    assert f"{SITE}/layercache/cli/__pycache__/main.cpython-311.pyc" in files
    # Users as on amd64: 65532 is `nonroot` with its home.
    assert "nonroot:x:65532:65532:" in files["etc/passwd"].decode()
    home = members["home/nonroot"]
    assert (home.uid, home.gid, home.mode & 0o777) == (65532, 65532, 0o750)


def test_arm64_elf_files_are_aarch64_and_find_their_libraries(
        built: BuiltIndex, images: dict[str, Image]) -> None:
    image = images["arm64"]
    members = _members(image)
    checked, missing, foreign = 0, [], []
    for path, data in _files(built, image):
        if not data.startswith(b"\x7fELF"):
            continue
        elf = ELFFile(io.BytesIO(data))
        checked += 1
        if elf["e_machine"] != "EM_AARCH64":
            foreign.append((path, elf["e_machine"]))
        for segment in elf.iter_segments():
            if isinstance(segment, InterpSegment):  # the loader named by an executable
                interp = segment.get_interp_name()
                if _resolve(members, interp.lstrip("/")) not in members:
                    missing.append((path, interp))
        dynamic = next((s for s in elf.iter_sections() if isinstance(s, DynamicSection)), None)
        if dynamic is None:
            continue
        # pyelftools sets the string of a DT_NEEDED/DT_RPATH/DT_RUNPATH tag as an attribute
        # named after it (`needed`, `rpath`, `runpath`).
        tags = [(t.entry.d_tag, vars(t)) for t in dynamic.iter_tags()]
        needed = [attrs["needed"] for tag, attrs in tags if tag == "DT_NEEDED"]
        search = [d for tag, attrs in tags if tag in ("DT_RPATH", "DT_RUNPATH")
                  for d in attrs[tag[3:].lower()].split(":")]
        dirs = [posixpath.normpath(d.replace("$ORIGIN", posixpath.dirname(path))
                                   .replace("${ORIGIN}", posixpath.dirname(path))).lstrip("/")
                for d in search if d] + list(LIBRARY_DIRS)
        for library in needed:
            if not any(_resolve(members, f"{d}/{library}") in members for d in dirs):
                missing.append((path, library))
    assert checked > 50  # python3.11, the C libraries, lib-dynload, the wheels' extensions
    assert foreign == []
    assert missing == []


def test_arm64_image_holds_no_host_files_or_build_leftovers(images: dict[str, Image]) -> None:
    base, app = (
        [m.name.removeprefix("./").rstrip("/") for m in layer] for layer in images["arm64"].layers)
    assert not {"etc/resolv.conf", "etc/hostname"} & set(base)
    assert not [n for n in base if n.startswith("dev/")]
    assert {n.split("/")[0] for n in app} == {"opt"}
    assert not [n for n in app if n.startswith((f"{SITE}/pip/", f"{SITE}/setuptools/"))]
    assert not [n for n in app if n.endswith(".whl") or "/.cache/" in n]


@pytest.fixture
def node(bed: BedState) -> SimNode:
    record = bed.nodes[0]
    return SimNode(record.name, Path(record.workdir))


def test_index_pushed_to_the_bed_pulls_the_amd64_image_on_a_node(
        bed: BedState, built: BuiltIndex, node: SimNode) -> None:
    repository = DEFAULT_REFERENCE.split("/", 1)[1].replace(":", "-index:")
    reference = f"{bed.registries['plain'].host}/{repository}"
    assert push_index(built, reference, tls_verify=False) == built.index_digest

    image_id = cri.pull(node.socket, reference)
    listed = {image["id"]: image for image in cri.images(node.socket)}
    # containerd resolved the index to this node's platform: the amd64 config.
    assert image_id == built.platforms["amd64"].config_digest
    assert f"{reference.rsplit(':', 1)[0]}@{built.index_digest}" in listed[image_id]["repoDigests"]
