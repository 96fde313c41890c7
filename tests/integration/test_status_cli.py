"""`layercache status` and `kubectl layercache status` against a cache the product warmed.

The real operator and one agent per node (`testbed.e2e.LayerCacheCluster`) warm a
LayerCache of three images in a namespace of this module's own; then the CLI runs as a
subprocess, once as `layercache` and once as a kubectl plugin found on PATH by the pinned
kubectl, and every figure it prints is checked against the status fields the apiserver
holds. Output goes to a pipe, so it is the plain (no colour) rendering.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from layercache.units import human_bytes
from testbed.bed import BedState
from testbed.e2e import (
    LayerCacheCluster,
    apply_cache,
    clear_family,
    delete_caches,
    get_cache,
    is_ready,
    node_caches,
    wait_cache,
    wait_released,
)
from testbed.images import Family
from testbed.kube import Kube
from testbed.paths import tool

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
IMAGES = ("python", "curl", "nginx")  # the demo's cache: base and python shared
NAME = "runtimes"


@dataclass
class Warm:
    """The warmed cache: its namespace, the admin kubeconfig, the running product."""

    namespace: str
    kubeconfig: str
    cluster: LayerCacheCluster


@pytest.fixture(scope="module")
def warm(bed: BedState, kube: Kube, family: Family,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warm]:
    """LayerCache `runtimes` Ready on every node, in a fresh namespace; cleaned afterwards."""
    digests = [layer.digest for layer in family.layers]
    for node in bed.nodes:  # earlier modules' blobs must not count as held
        clear_family(node.socket, digests)
    namespace = f"status-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": namespace}})
    cluster = LayerCacheCluster(bed, kube, tmp_path_factory.mktemp("status-cli"))
    try:
        cluster.start()
        host = (bed.proxy_url or "").removeprefix("http://")
        apply_cache(kube, namespace, NAME,
                    {"images": [f"{host}/{family.images[n].reference}" for n in IMAGES]})
        started = time.monotonic()
        wait_cache(kube, namespace, NAME, is_ready, "Ready", cluster, timeout=300)
        print(f"\n{namespace}/{NAME} Ready in {time.monotonic() - started:.1f} s")
        yield Warm(namespace, bed.kubeconfig, cluster)
    finally:
        try:
            delete_caches(kube, namespace)
            wait_released(kube, [n.name for n in bed.nodes])
        finally:
            cluster.stop()
            kube.kubectl("delete", "nodelayercaches", "--all", "--wait=false")
            kube.kubectl("delete", "namespace", namespace, "--wait=false")
            for node in bed.nodes:
                clear_family(node.socket, digests)


def _run(*argv: str | Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    """Run a CLI with PATH holding the venv's scripts (where kubectl finds the plugin)."""
    merged = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
              "COLUMNS": "200", **(env or {})}
    merged.pop("NO_COLOR", None)
    started = time.monotonic()
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=merged,
                          timeout=60, check=False)
    print(f"$ {' '.join(str(a) for a in argv)}  ({time.monotonic() - started:.2f} s, "
          f"exit {done.returncode})\n{done.stdout}{done.stderr}")
    return done


def _cells(text: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").strip().strip("│").split("│")]
        if len(cells) > 1 and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def _status(kube: Kube, warm: Warm) -> dict[str, Any]:
    obj = get_cache(kube, warm.namespace, NAME)
    assert obj is not None and is_ready(obj)
    return obj


def test_list_row_matches_the_status(warm: Warm, kube: Kube) -> None:
    status = _status(kube, warm)["status"]
    done = _run(BIN / "layercache", "status", "-n", warm.namespace,
                env={"KUBECONFIG": warm.kubeconfig})
    assert done.returncode == 0, done.stderr
    header = _cells(done.stdout, "NAMESPACE")
    row = dict(zip(header, _cells(done.stdout, warm.namespace), strict=True))
    b, nodes, layers = status["bytes"], status["nodes"], status["layers"]
    assert row["NAME"] == NAME and row["READY"] == "True"
    assert row["NODES"] == f"{nodes['ready']}/{nodes['desired']}" == "3/3"
    assert row["LAYERS"] == f"{layers['total']} ({layers['shared']})"
    assert row["UNIQUE"] == human_bytes(b["unique"])
    assert row["UPSTREAM"] == human_bytes(b["upstream"])
    assert b["saved"] == b["naive"] - b["upstream"] > 0
    assert row["SAVED"] == f"{100 * b['saved'] / b['naive']:.0f}%"
    assert row["REASON"] == "AllNodesReady"
    assert "!" not in done.stdout  # fresh status: no staleness note
    every = _run(BIN / "layercache", "status", "-A", env={"KUBECONFIG": warm.kubeconfig})
    assert every.returncode == 0 and _cells(every.stdout, warm.namespace)[1] == NAME


def test_kubectl_plugin_detail_matches_node_status(warm: Warm, kube: Kube) -> None:
    status = _status(kube, warm)["status"]
    # kubectl finds kubectl-layercache on PATH and passes it the arguments after
    # `layercache`; its own flags must come after the plugin name, so the plugin parses
    # --kubeconfig itself (and inherits $KUBECONFIG, tested below).
    done = _run(tool("kubectl"), "layercache", "status", NAME, "-n", warm.namespace,
                "--kubeconfig", warm.kubeconfig, env={"KUBECONFIG": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"LayerCache {warm.namespace}/{NAME}" in out
    generation = _status(kube, warm)["metadata"]["generation"]
    assert f"generation {generation}, status for generation {generation}" in out
    assert f"Nodes: {status['nodes']['ready']}/{status['nodes']['desired']} ready" in out
    for name, obj in node_caches(kube).items():
        if f"{warm.namespace}/{NAME}" not in obj["spec"].get("caches", []):
            continue
        layers, fetched = obj["status"]["layers"], obj["status"]["bytes"]
        cells = _cells(out, name)
        assert cells[1] == "━" * 20  # every wanted layer held: a full bar
        assert cells[2] == f"{layers['held']}/{layers['wanted']}"
        assert layers["held"] == layers["wanted"] > 0 and cells[3] == "100%"
        assert cells[4:7] == [human_bytes(layers["bytesHeld"]),
                              human_bytes(fetched["upstream"]), human_bytes(fetched["peer"])]
        assert cells[7] == "AllLayersHeld"
    b = status["bytes"]
    assert _cells(out, "unique layer bytes")[1] == human_bytes(b["unique"])
    assert _cells(out, "naive upstream")[1] == human_bytes(b["naive"])
    assert _cells(out, "from upstream, measured")[1] == human_bytes(b["upstream"])
    assert _cells(out, "from upstream, measured")[2].endswith(
        f"{b['upstream'] / b['unique']:.3f} x unique")
    assert _cells(out, "from peers, measured")[1] == human_bytes(b["peer"])
    saved = _cells(out, "saved upstream")
    assert saved[1:] == [human_bytes(b["saved"]), f"{100 * b['saved'] / b['naive']:.0f}% of naive"]
    assert _cells(out, "Ready")[1:3] == ["True", "AllNodesReady"]
    for image in status["images"]:
        assert _cells(out, image["reference"])[2] == image["digest"][:19] + "…"

    by_env = _run(tool("kubectl"), "layercache", "status", NAME, "-n", warm.namespace,
                  "-o", "json", env={"KUBECONFIG": warm.kubeconfig})
    assert by_env.returncode == 0, by_env.stderr
    data = json.loads(by_env.stdout)
    assert data["status"] == _status(kube, warm)["status"]
    assert {n: v["status"]["layers"] for n, v in data["nodes"].items()} == {
        n: o["status"]["layers"] for n, o in node_caches(kube).items()
        if f"{warm.namespace}/{NAME}" in o["spec"].get("caches", [])}


def test_context_namespace_and_staleness(warm: Warm, tmp_path: Path) -> None:
    """The context's namespace is the default; --stale-after flags an older status."""
    config = yaml.safe_load(Path(warm.kubeconfig).read_text())
    for context in config["contexts"]:
        context["context"]["namespace"] = warm.namespace
    scoped = tmp_path / "scoped.kubeconfig"
    scoped.write_text(yaml.safe_dump(config))
    done = _run(BIN / "layercache", "status", NAME, "--kubeconfig", scoped)
    assert done.returncode == 0, done.stderr
    assert "! " not in done.stdout
    time.sleep(1.1)  # the status is at least this old now
    stale = _run(BIN / "layercache", "status", NAME, "--kubeconfig", scoped,
                 "--stale-after", "1")
    assert stale.returncode == 0
    assert "! status last written" in stale.stdout and "is it running?" in stale.stdout


def test_errors_exit_1_with_a_message(warm: Warm, tmp_path: Path) -> None:
    env = {"KUBECONFIG": warm.kubeconfig}
    for argv in ([BIN / "layercache"], [tool("kubectl"), "layercache"]):
        done = _run(*argv, "status", "nope", "-n", warm.namespace, env=env)
        assert done.returncode == 1
        assert f"error: LayerCache {warm.namespace}/nope not found" in done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    done = _run(BIN / "layercache", "status", "-n", warm.namespace, "--context", "nope",
                env=env)
    assert done.returncode == 1 and "cannot load $KUBECONFIG (context nope)" in done.stderr
    config = yaml.safe_load(Path(warm.kubeconfig).read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:9"  # discard: refused
    down = tmp_path / "down.kubeconfig"
    down.write_text(yaml.safe_dump(config))
    done = _run(BIN / "layercache", "status", NAME, "-n", warm.namespace, "--kubeconfig", down)
    assert done.returncode == 1
    assert (f"error: LayerCache {warm.namespace}/{NAME}: cannot reach the API server at "
            "https://127.0.0.1:9") in done.stderr
    assert "Traceback" not in done.stderr


# --- kubectl itself, on the warm cache (issue 10: what a first user hits) --------------------

def _kubectl_table(out: str) -> list[dict[str, str]]:
    """The table kubectl prints, as rows of header → cell (cells are 2+ spaces apart)."""
    lines = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_kubectl_get_layercache_by_its_singular_name(warm: Warm, kube: Kube) -> None:
    # The CRDs' category was "layercache", which kubectl expands before it looks for a
    # resource: `kubectl get layercache NAME` failed "you must specify only one resource".
    status = _status(kube, warm)["status"]
    ns = warm.namespace
    (row,) = _kubectl_table(kube.kubectl("-n", ns, "get", "layercache", NAME))
    assert list(row) == ["NAME", "READY", "NODES", "SHARED", "SAVED", "REASON", "AGE"]
    assert (row["NAME"], row["READY"], row["NODES"]) == (NAME, "True", "3/3")
    assert row["SAVED"] == status["bytes"]["savedHuman"] == human_bytes(status["bytes"]["saved"])
    assert row["REASON"] == status["reason"] == "AllNodesReady"
    as_yaml = yaml.safe_load(kube.kubectl("-n", ns, "get", "layercache", NAME, "-o", "yaml"))
    assert (as_yaml["kind"], as_yaml["metadata"]["name"]) == ("LayerCache", NAME)
    described = kube.kubectl("-n", ns, "describe", "layercache", NAME)
    assert re.search(rf"^Name:\s+{NAME}$", described, re.M), described
    assert re.search(r"^Kind:\s+LayerCache$", described, re.M), described
    nodes = sorted(node_caches(kube))
    both = kube.kubectl("-n", ns, "get", "lc,nlc", "-o", "name").split()
    assert both == [f"layercache.layercache.dev/{NAME}",
                    *(f"nodelayercache.layercache.dev/{n}" for n in nodes)]
    # The category still lists both kinds, under a name that is no resource's.
    assert kube.kubectl("-n", ns, "get", "layercache-all", "-o", "name").split() == both


def _node_names(kube: Kube, warm: Warm) -> list[str]:
    return [name for name, obj in node_caches(kube).items()
            if f"{warm.namespace}/{NAME}" in obj["spec"].get("caches", [])]


def test_kubectl_get_nlc_shows_bytes_in_si_units(warm: Warm, kube: Kube) -> None:
    objects = node_caches(kube)
    rows = {row["NAME"]: row for row in _kubectl_table(kube.kubectl("get", "nlc"))}
    wide = {row["NAME"]: row for row in _kubectl_table(kube.kubectl("get", "nlc", "-o", "wide"))}
    assert list(next(iter(rows.values()))) == [
        "NAME", "READY", "HELD", "WANTED", "SIZE", "UPSTREAM", "PEER", "AGE"]
    for name in _node_names(kube, warm):
        status = objects[name]["status"]
        layers, fetched = status["layers"], status["bytes"]
        assert rows[name]["SIZE"] == human_bytes(layers["bytesHeld"])
        assert rows[name]["UPSTREAM"] == human_bytes(fetched["upstream"])
        assert rows[name]["PEER"] == human_bytes(fetched["peer"])
        assert wide[name]["UPSTREAM BYTES"] == str(fetched["upstream"])
        assert wide[name]["PEER BYTES"] == str(fetched["peer"])


@pytest.mark.parametrize(("field", "words"), [
    ("layercache.status.bytes.saved", "from a peer instead of upstream"),
    ("layercache.status.bytes.naive", "layers this cache holds there"),
    ("layercache.status.reason", "Degraded condition's reason"),
    ("layercache.spec.tolerations.key", "Taint key"),
    ("layercache.status.nodes.desired", "Nodes the cache selects"),
    ("nodelayercache.status.layers.held", "content store"),
    ("nodelayercache.status.human.peer", "bytes.peer"),
    ("nodelayercache.spec.paused", "fetches nothing"),
])
def test_kubectl_explain_describes_fields(warm: Warm, kube: Kube, field: str,
                                          words: str) -> None:
    out = kube.kubectl("explain", field)
    description = out.partition("DESCRIPTION:")[2]
    assert words in " ".join(description.split()), out


def test_a_cache_on_one_node_saves_nothing(warm: Warm, kube: Kube, bed: BedState,
                                           family: Family) -> None:
    # Issue 10: the same three images on one node with minSharedBy 2 hold only the base,
    # which `runtimes` already put there: nothing is fetched, from upstream or a peer, so
    # nothing is saved. Before, naive counted every layer of every image and saved was
    # naive - upstream: the whole of it.
    ns, name, node = warm.namespace, "one-node", bed.nodes[0].name
    host = (bed.proxy_url or "").removeprefix("http://")
    base = family.image_layers("base")
    assert len(base) == 1
    apply_cache(kube, ns, name, {
        "images": [f"{host}/{family.images[n].reference}" for n in IMAGES],
        "minSharedBy": 2, "nodeSelector": {"kubernetes.io/hostname": node}})
    try:
        obj = wait_cache(kube, ns, name, is_ready, "Ready", warm.cluster, timeout=120)
        b = obj["status"]["bytes"]
        assert (b["naive"], b["unique"]) == (base[0].size, base[0].size)
        assert (b["upstream"], b["peer"], b["saved"], b["savedHuman"]) == (0, 0, 0, "0 B")
        (row,) = _kubectl_table(kube.kubectl("-n", ns, "get", "layercache", name))
        assert row["SAVED"] == "0 B"
        port = warm.cluster.metrics_ports["operator"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = {(s.name, s.labels.get("cache")): s.value
                   for family_ in text_string_to_metric_families(text) for s in family_.samples}
        assert samples[("layercache_cache_saved_bytes", f"{ns}/{name}")] == 0
        assert samples[("layercache_cache_naive_bytes", f"{ns}/{name}")] == base[0].size
    finally:
        kube.kubectl("-n", ns, "delete", "layercache", name, "--wait=true", timeout=120)
