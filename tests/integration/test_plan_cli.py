"""`layercache plan` as a user runs it (a subprocess), checked against skopeo's view.

The expected numbers come from `skopeo inspect --raw`, an independent client: its raw
manifests (indexes resolved to their linux/amd64 entry, attestations skipped) give each
image's layers, and from those the layers two or more images share and their bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from layercache.units import human_bytes
from testbed.bed import BedState
from testbed.image_recipe import RECIPE
from testbed.paths import tool

pytestmark = pytest.mark.integration

#: Every image pushed to the bed, as `family/<name>:v1`.
IMAGES = RECIPE.family_names()
INDEXES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
LAYERCACHE = str(Path(sys.executable).with_name("layercache"))


def skopeo_raw(host: str, image: str) -> dict[str, Any]:
    """`skopeo inspect --raw` of `host/family/<image>` (a `:tag` or `@digest` suffix)."""
    out = subprocess.run(
        [
            tool("skopeo"),
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{host}/family/{image}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    return json.loads(out)


def skopeo_layers(host: str, name: str) -> list[tuple[str, int]]:
    """(digest, size) of each layer of `name:v1` for linux/amd64, as skopeo sees them."""
    manifest = skopeo_raw(host, f"{name}:v1")
    if manifest.get("mediaType") in INDEXES or "manifests" in manifest:
        entry = next(
            m
            for m in manifest["manifests"]
            if m.get("platform", {}).get("os") == "linux"
            and m["platform"].get("architecture") == "amd64"
            and m.get("annotations", {}).get("vnd.docker.reference.type") != "attestation-manifest"
        )
        manifest = skopeo_raw(host, f"{name}@{entry['digest']}")
    return [(layer["digest"], layer["size"]) for layer in manifest["layers"]]


def run_plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LAYERCACHE, "plan", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def expected(bed: BedState) -> dict[str, Any]:
    host = bed.registries["plain"].host
    layers = {name: skopeo_layers(host, name) for name in IMAGES}
    users = Counter(digest for name in IMAGES for digest in {d for d, _ in layers[name]})
    sizes = {digest: size for name in IMAGES for digest, size in layers[name]}
    shared = {digest for digest, count in users.items() if count >= 2}
    return {
        "layers": layers,
        "shared": {digest: users[digest] for digest in shared},
        "shared_bytes": sum(sizes[digest] for digest in shared),
        "unique_bytes": sum(sizes.values()),
    }


def test_plan_json_matches_skopeo(bed: BedState, expected: dict[str, Any]) -> None:
    host = bed.registries["plain"].host
    result = run_plan(
        *(f"{host}/family/{name}:v1" for name in IMAGES),
        "--insecure-registry",
        host,
        "--nodes",
        "4",
        "--output",
        "json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["shared_bytes"] == expected["shared_bytes"]
    assert {row["digest"]: row["shared_by"] for row in report["shared_layers"]} == expected[
        "shared"
    ]
    for image, name in zip(report["images"], IMAGES, strict=True):
        assert image["reference"] == f"{host}/family/{name}:v1"
        assert [(layer["digest"], layer["size"]) for layer in image["layers"]] == (
            expected["layers"][name]
        )
    # Four identical empty nodes: each would pull every distinct layer itself; with the
    # plan each distinct layer crosses the upstream link once.
    savings = report["savings"]
    assert savings["unique_bytes"] == expected["unique_bytes"]
    assert savings["naive_bytes"] == 4 * expected["unique_bytes"]
    assert savings["expected_upstream_bytes"] == expected["unique_bytes"]
    assert savings["saved_upstream_bytes"] == 3 * expected["unique_bytes"]
    assert report["errors"] == []


def test_plan_token_registry_with_docker_config(
    bed: BedState, expected: dict[str, Any], tmp_path: Path
) -> None:
    record = bed.registries["token"]
    assert record.ca_file is not None
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"auths": {record.host: {"username": record.username, "password": record.password}}}
        )
    )
    images = tmp_path / "images.txt"
    images.write_text(
        "# the whole family\n"
        + "".join(f"{record.host}/family/{name}:v1  # {name}\n\n" for name in IMAGES)
    )
    result = run_plan(
        "--file",
        str(images),
        "--docker-config",
        str(config),
        "--ca-file",
        record.ca_file,
        "--output",
        "yaml",
    )
    assert result.returncode == 0, result.stderr
    assert f"shared_bytes: {expected['shared_bytes']}\n" in result.stdout
    assert str(record.password) not in result.stdout + result.stderr


def test_unresolvable_image_fails_but_prints_the_rest(
    bed: BedState, expected: dict[str, Any]
) -> None:
    host = bed.registries["plain"].host
    missing = f"{host}/family/no-such-image:v1"
    result = run_plan(
        f"{host}/family/base:v1",
        missing,
        f"{host}/family/python:v1",
        "--insecure-registry",
        host,
        "--output",
        "json",
    )
    assert result.returncode == 1
    assert f"error: {missing}:" in result.stderr
    assert "MANIFEST_UNKNOWN" in result.stderr or "NAME_UNKNOWN" in result.stderr
    report = json.loads(result.stdout)
    assert [image["reference"] for image in report["images"]] == [
        f"{host}/family/base:v1",
        f"{host}/family/python:v1",
    ]
    assert report["shared_bytes"] == expected["layers"]["base"][0][1]
    assert [error["reference"] for error in report["errors"]] == [missing]


def test_table_output_and_platform(bed: BedState) -> None:
    host = bed.registries["plain"].host
    result = run_plan(
        f"{host}/family/multi:v1",
        f"{host}/family/attested:v1",
        "--insecure-registry",
        host,
        "--platform",
        "linux/arm64",
    )
    assert result.returncode == 1  # attested has no arm64 manifest
    assert "Savings model: 3 empty nodes" in result.stdout
    assert "family/multi:v1" in result.stdout
    assert "no manifest for linux/arm64" in result.stderr
    assert "attestation entries ignored" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert run_plan().returncode == 2
    bad = run_plan("x.example/a:v1", "--platform", "linux")
    assert bad.returncode == 2
    assert "os/architecture" in bad.stderr


@pytest.mark.parametrize("nodes", [1, 3])
def test_min_shared_by_saves_only_what_is_held_on_other_nodes(
    bed: BedState, expected: dict[str, Any], nodes: int
) -> None:
    # Issue 10: python, curl and nginx share only the base layer. With --min-shared-by 2
    # the nodes hold just it: one node saves nothing (it would have pulled the base itself
    # anyway), three nodes save two copies of it. The runtime layers are never held, so
    # they are neither naive nor saved.
    host = bed.registries["plain"].host
    base = expected["layers"]["base"]
    assert len(base) == 1
    held = base[0][1]
    runtimes = ("python", "curl", "nginx")
    assert all(expected["layers"][name][0] == base[0] for name in runtimes)
    references = [f"{host}/family/{name}:v1" for name in runtimes]
    common = ("--insecure-registry", host, "--nodes", str(nodes), "--min-shared-by", "2")
    result = run_plan(*references, *common, "--output", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    savings = report["savings"]
    assert report["min_shared_by"] == 2
    assert savings["naive_bytes"] == nodes * held
    assert savings["unique_bytes"] == savings["expected_upstream_bytes"] == held
    assert savings["saved_upstream_bytes"] == (nodes - 1) * held
    table = run_plan(*references, *common)
    assert table.returncode == 0, table.stderr
    saved_row = next(line for line in table.stdout.splitlines() if "saved upstream" in line)
    assert human_bytes((nodes - 1) * held) in saved_row
