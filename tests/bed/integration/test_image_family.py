"""The image family, built from Debian and pushed to a real `docker-registry`.

What comes back from the registry must be what `family.json` says, digest for digest
and byte for byte: later tests assert exact numbers from `Family` against agents and
containerd, so this is where those numbers are proven. The registry here is a private
plain-HTTP one for this module only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from testbed.image_build import (
    DOCKER_MANIFEST,
    IN_TOTO,
    OCI_INDEX,
    OCI_MANIFEST,
    CommandError,
    ToolMissingError,
    require_tools,
    run,
)
from testbed.image_recipe import RECIPE, app_file_bytes, recipe_hash
from testbed.images import Family, build_family, push_family

# A cold build takes minutes (mmdebstrap, umoci); everything after it takes seconds.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
APPS_ON_BASE = ["python", "curl", "nginx", "app-py-a", "app-py-b", "app-curl", "app-web"]


@pytest.fixture(scope="module")
def family() -> Family:
    return build_family()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway `docker-registry serve` on loopback: plain HTTP, filesystem storage."""
    require_tools("docker-registry")
    root = tmp_path_factory.mktemp("registry")
    host = f"127.0.0.1:{_free_port()}"
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": host},
    }
    (root / "config.yml").write_text(yaml.safe_dump(config))
    with (root / "registry.log").open("w") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(root / "config.yml")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (root / "registry.log").read_text()
            try:
                if httpx.get(f"http://{host}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "registry did not answer /v2/ in 20 s"
            time.sleep(0.1)
        yield host
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def pushed(family: Family, registry: str) -> str:
    push_family(family, registry)
    return registry


def _manifest(registry: str, repository: str, reference: str) -> httpx.Response:
    response = httpx.get(
        f"http://{registry}/v2/{repository}/manifests/{reference}",
        headers={"Accept": ACCEPT},
    )
    response.raise_for_status()
    return response


def _json_blob(registry: str, repository: str, digest: str) -> Any:
    response = httpx.get(f"http://{registry}/v2/{repository}/blobs/{digest}")
    response.raise_for_status()
    return response.json()


def test_every_pushed_manifest_has_the_digest_and_size_of_family_json(
    family: Family, pushed: str
) -> None:
    on_disk = Family.load(family.root)
    assert on_disk == family
    assert list(family.images) == RECIPE.family_names()
    for name, image in family.images.items():
        raw = subprocess.run(
            [
                "skopeo",
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"docker://{pushed}/{image.reference}",
            ],
            capture_output=True,
            check=True,
        ).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == image.manifest_digest, name
        assert len(raw) == image.manifest_size, name
        # umoci's manifests leave out the optional `mediaType` field; the registry still
        # serves each under its type.
        served = _manifest(pushed, image.repository, image.manifest_digest)
        assert served.headers["content-type"] == image.manifest_media_type, name
        assert served.content == raw, name


def test_the_base_layer_is_one_blob_under_every_debian_image(family: Family, pushed: str) -> None:
    (base_layer,) = family.images["base"].layers
    assert family.shared_layers()[base_layer] == [
        "base",
        *APPS_ON_BASE,
        "python-docker",
        "multi",
        "attested",
    ]
    for name in APPS_ON_BASE:
        image = family.images[name]
        manifest = _manifest(pushed, image.repository, image.tag).json()
        assert manifest["layers"][0]["digest"] == base_layer, name
        assert [layer["digest"] for layer in manifest["layers"]] == list(image.layers), name
        assert len(manifest["layers"]) == (2 if name in ("python", "curl", "nginx") else 3)
    head = httpx.head(f"http://{pushed}/v2/family/curl/blobs/{base_layer}")
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == family.layer(base_layer).size
    # The runtime layers sit in exactly the images built on them.
    python_layer = family.images["python"].layers[1]
    assert family.shared_layers()[python_layer] == [
        "python",
        "app-py-a",
        "app-py-b",
        "python-docker",
        "multi",
    ]


def test_multi_has_amd64_sharing_the_base_and_a_real_arm64(family: Family, pushed: str) -> None:
    index = _manifest(pushed, "family/multi", "v1")
    assert index.headers["content-type"] == OCI_INDEX
    entries = {
        f"{e['platform']['os']}/{e['platform']['architecture']}": e
        for e in index.json()["manifests"]
    }
    assert set(entries) == {"linux/amd64", "linux/arm64"}
    amd64 = _manifest(pushed, "family/multi", entries["linux/amd64"]["digest"]).json()
    assert amd64["layers"][0]["digest"] == family.images["base"].layers[0]
    arm64 = _manifest(pushed, "family/multi", entries["linux/arm64"]["digest"]).json()
    arm64_config = _json_blob(pushed, "family/multi", arm64["config"]["digest"])
    assert (arm64_config["os"], arm64_config["architecture"]) == ("linux", "arm64")
    assert [layer["digest"] for layer in arm64["layers"]] == list(
        family.images["multi"].resolve("linux/arm64").layers
    )
    assert arm64["layers"][0]["digest"] != family.images["base"].layers[0]


def test_attested_carries_a_buildkit_style_attestation(family: Family, pushed: str) -> None:
    index = _manifest(pushed, "family/attested", "v1").json()
    image_entry, attestation = index["manifests"]
    assert image_entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert image_entry["digest"] == family.images["app-curl"].manifest_digest
    assert attestation["platform"] == {"architecture": "unknown", "os": "unknown"}
    assert attestation["annotations"] == {
        "vnd.docker.reference.type": "attestation-manifest",
        "vnd.docker.reference.digest": image_entry["digest"],
    }
    manifest = _manifest(pushed, "family/attested", attestation["digest"]).json()
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == IN_TOTO
    statement = _json_blob(pushed, "family/attested", layer["digest"])
    assert statement["subject"][0]["digest"]["sha256"] == image_entry["digest"][7:]
    # The family resolves the index to the image, never to the attestation.
    assert family.images["attested"].resolve().digest == image_entry["digest"]
    assert family.layer(layer["digest"]).media_type == IN_TOTO
    assert layer["digest"] not in family.layer_users()


def test_python_docker_is_docker_v2_schema2_with_the_same_blobs(
    family: Family, pushed: str
) -> None:
    response = _manifest(pushed, "family/python-docker", "v1")
    assert response.headers["content-type"] == DOCKER_MANIFEST
    manifest = response.json()
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    python = family.images["python"]
    assert manifest["config"]["digest"] == python.config_digest
    assert [layer["digest"] for layer in manifest["layers"]] == list(python.layers)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    assert family.images["python-docker"].manifest_digest != python.manifest_digest


def test_an_app_layer_holds_the_recipe_files_byte_for_byte(family: Family, pushed: str) -> None:
    app = next(a for a in RECIPE.app_images if a.name == "app-py-a")
    top = family.image_layers("app-py-a")[-1]
    blob = httpx.get(f"http://{pushed}/v2/family/app-py-a/blobs/{top.digest}").content
    assert len(blob) == top.size
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == top.digest
    tar_bytes = gzip.decompress(blob)
    assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == top.diff_id
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for spec in app.files:
            member = tar.extractfile(spec.path.lstrip("/"))
            assert member is not None
            assert member.read() == app_file_bytes(app.name, spec), spec.path


def test_config_says_what_the_recipe_says(family: Family, pushed: str) -> None:
    image = family.images["app-py-a"]
    assert image.config_digest is not None
    config = _json_blob(pushed, image.repository, image.config_digest)
    assert config["config"]["Cmd"] == ["python3", "/app/main.py"]
    assert config["config"]["WorkingDir"] == "/app"
    assert config["rootfs"]["diff_ids"] == [
        layer.diff_id for layer in family.image_layers("app-py-a")
    ]


def test_layer_accounting(family: Family) -> None:
    base, python, app_a = family.image_layers("app-py-a")
    app_b = family.image_layers("app-py-b")[-1]
    names = ["python", "app-py-a", "app-py-b"]
    assert family.unique_layer_bytes(names) == base.size + python.size + app_a.size + app_b.size
    assert (
        family.naive_layer_bytes(names) == 3 * (base.size + python.size) + app_a.size + app_b.size
    )
    configs = sum(family.images[n].config_size or 0 for n in names)
    assert family.unique_blob_bytes(names) == family.unique_layer_bytes(names) + configs
    assert base.size > 20_000_000  # a real Debian minbase, gzip
    assert family.blob_path(base.digest).stat().st_size == base.size


def test_a_warm_build_loads_the_cache(family: Family) -> None:
    started = time.monotonic()
    again = build_family()
    assert time.monotonic() - started < 2
    assert again == family
    assert not Path(f"{family.root}.partial").exists()


def test_push_is_idempotent_and_keeps_digests(family: Family, pushed: str) -> None:
    push_family(family, pushed)  # every blob is already there; digests are re-checked
    raw = run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{pushed}/family/multi:v1"]
    )
    assert (
        "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
        == family.images["multi"].manifest_digest
    )


def test_an_interrupted_build_is_never_loaded(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A complete-looking family.json in `<hash>.partial` must not be taken for a build:
    # with the tools gone, build_family can only fail, naming the package to install.
    partial = tmp_path / "images" / f"{recipe_hash()}.partial"
    partial.mkdir(parents=True)
    (partial / "family.json").write_text((family.root / "family.json").read_text())
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(ToolMissingError, match=r"mmdebstrap not found.*apt-get install mmdebstrap"):
        build_family(tmp_path)
    assert not (tmp_path / "images" / recipe_hash()).exists()


def test_a_failing_command_reports_itself_and_its_stderr() -> None:
    with pytest.raises(CommandError, match=r"(?s)sh -c .*exited 3:\n.*no such image"):
        run(["sh", "-c", "echo starting; echo 'no such image' >&2; exit 3"])
