"""Scenario B, ingest speed: the agent's fetch + ingest of 1 GiB against ``ctr content fetch``.

``python -m bench.ingest --out out/bench [--quick]``. One node, an unthrottled loopback
registry (the bed's plain Debian ``docker-registry``), one image of 8 layers x 128 MiB of
seeded random bytes (`bench.ingest_image`: cached on disk, valid OCI, pushed by HTTP).

Each run gets a *fresh* containerd (new root, state and socket on the same disk) and is
timed from its trigger to every layer committed:

- **agent** — the path users get: the real agent process (`testbed.product.start_agent`, its
  ServiceAccount, default settings: 4 concurrent transfers), started and idle first; the
  clock starts when the node's ``NodeLayerCache`` spec (what the operator writes: each layer
  ``source: Upstream``) is created, and stops when containerd's content store lists every
  layer blob (polled over its content API every 50 ms). The operator is not part of this
  measurement (scenario D measures it), so the spec is written by the benchmark.
- **ctr** — ``ctr -a <socket> -n k8s.io content fetch --plain-http <ref>`` (the bed's
  containerd's own ``ctr``, v2.3.4 by default), timed from launch to exit; it fetches the
  manifest and config too.

Runs alternate (agent, ctr), (ctr, agent), (agent, ctr), … (``--rounds N``, default 3);
the figures are medians. After each run every layer's file in that containerd's content
store is hashed again and must match its digest and size. The rows: ``ingest_seconds``
(agent vs ctr, target <= 1.0x), the throughput, and the CPU seconds per GiB of layer
bytes of the client (agent process / ctr) and of that run's containerd, side by side (on a
shared machine a steadier yardstick than wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import Row, ratio, write_result
from bench.ingest_cli import scenario_main
from bench.ingest_image import Image, Pusher, file_sha256, large_image
from bench.ingest_proc import cpu_seconds
from layercache.containerd.content import ContentStore
from testbed.bed import BedState, NodeRecord, TestBed, register_nodes
from testbed.kube import Kube
from testbed.nodes import SimNode
from testbed.paths import tool
from testbed.procs import tcp_open
from testbed.product import NAMESPACE, install, start_agent

log = logging.getLogger("bench.ingest")

GROUP, VERSION = "layercache.dev", "v1alpha1"
NODE = "bench-ingest"
REPOSITORY = "bench/ingest"
TAG = "v1"
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"
TARGET_RATIO = 1.0
SEED = "ingest-20261129"
#: How often the store is asked whether the agent is done (seconds).
POLL = 0.05


@dataclass(frozen=True)
class Shape:
    """The image: ``layers`` layers of ``layer_bytes`` random bytes; ``rounds`` of runs."""

    layers: int
    layer_bytes: int
    rounds: int = 3


FULL = Shape(layers=8, layer_bytes=128 << 20)
QUICK = Shape(layers=4, layer_bytes=32 << 20, rounds=1)


@contextlib.contextmanager
def fresh_containerd(root: Path) -> Iterator[SimNode]:
    """A containerd with a new root under ``root``; stopped and removed afterwards."""
    node = SimNode(NODE, root)
    node.start(SANDBOX_IMAGE)
    try:
        node.wait()
        yield node
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def verify_store(node: SimNode, img: Image) -> int:
    """Check that ``node``'s containerd holds every layer with the right bytes; returns bytes.

    Both what containerd lists (``k8s.io`` namespace) and the blob files themselves, hashed
    again from disk.

    Raises:
        AssertionError: a layer missing, or its file of another size or digest.
    """
    listed = set(node.ctr("content", "ls", "-q").split())
    checked = 0
    for layer in img.layers:
        assert layer.digest in listed, f"{layer.digest} not in the content store"
        path = (node.workdir / "root" / "io.containerd.content.v1.content" / "blobs" /
                "sha256" / layer.digest.removeprefix("sha256:"))
        assert path.stat().st_size == layer.size, f"{path}: size {path.stat().st_size}"
        assert file_sha256(path) == layer.digest, f"{path}: digest differs"
        checked += layer.size
    return checked


def ctr_fetch(node: SimNode, ref: str) -> tuple[float, float]:
    """``ctr content fetch --plain-http ref`` into ``node``'s containerd.

    Returns (seconds from launch to exit, CPU seconds ctr used).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run([str(tool("ctr")), "-a", str(node.socket), "-n", "k8s.io", "content",
                    "fetch", "--plain-http", ref], check=True, capture_output=True,
                   timeout=600)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


async def _wait_all(socket: Path, digests: set[str], limit: float) -> float:
    async with ContentStore(str(socket)) as store:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            held = {str(info.digest) for info in await store.list()}
            if digests <= held:
                return time.monotonic()
            await asyncio.sleep(POLL)
    raise TimeoutError(f"the agent did not hold {len(digests)} layers in {limit:.0f} s")


def node_spec(img: Image, registry: str) -> dict[str, Any]:
    """The NodeLayerCache the operator would write: every layer seeded from upstream."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NodeLayerCache",
            "metadata": {"name": NODE},
            "spec": {"nodeName": NODE, "caches": ["default/bench-ingest"], "images": [],
                     "paused": False, "layers": [
                         {"digest": layer.digest, "size": layer.size,
                          "mediaType": layer.media_type, "repository": f"{registry}/{REPOSITORY}",
                          "source": "Upstream", "peers": []} for layer in img.layers]}}


def agent_fetch(state: BedState, kube: Kube, node: SimNode, img: Image, work: Path
                ) -> tuple[float, float]:
    """The real agent: (seconds from the spec written to every layer committed, agent CPU s)."""
    record = NodeRecord(NODE, str(node.socket), str(node.workdir))
    agent, peer_port, _ = start_agent(state, kube, record, work)
    try:
        deadline = time.monotonic() + 120
        while not tcp_open(peer_port):  # started and serving: idle, waiting for a spec
            if agent.popen is not None and agent.popen.poll() is not None:
                raise RuntimeError(f"the agent exited; log {agent.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agent did not start; log {agent.log}")
            time.sleep(0.1)
        time.sleep(1.0)  # its watch on the NodeLayerCache is open by now
        cpu = cpu_seconds(agent.pid)
        started = time.monotonic()
        kube.custom.create_cluster_custom_object(GROUP, VERSION, "nodelayercaches",
                                                 node_spec(img, state.registries["plain"].host))
        done = asyncio.run(_wait_all(node.socket, {b.digest for b in img.layers}, 600))
        return done - started, cpu_seconds(agent.pid) - cpu
    finally:
        agent.stop()
        with contextlib.suppress(Exception):
            kube.custom.delete_cluster_custom_object(GROUP, VERSION, "nodelayercaches", NODE)


def prepare(bed: TestBed, shape: Shape) -> tuple[BedState, Kube, Image, str]:
    """Bed up, layercache's CRDs and RBAC, the Node, the image pushed; returns what runs need."""
    state = bed.up()
    kube = Kube(Path(state.kubeconfig))
    install(kube, "rbac-agent.yaml")
    # The peer token the operator would create (the agent reads it at start-up).
    kube.core.create_namespaced_secret(NAMESPACE, {
        "metadata": {"name": "layercache-peer-token"}, "stringData": {"token": "bench-ingest"}})
    register_nodes(Path(state.kubeconfig), [SimNode(NODE, bed.workdir / "node-object")])
    started = time.monotonic()
    img = large_image(SEED, shape.layers, shape.layer_bytes)
    log.info("image ready (%d x %d MiB): %.1f s", shape.layers, shape.layer_bytes >> 20,
             time.monotonic() - started)
    registry = state.registries["plain"]
    started = time.monotonic()
    with Pusher(registry.url) as pusher:
        pusher.push(REPOSITORY, TAG, img)
    log.info("image pushed: %.1f s", time.monotonic() - started)
    return state, kube, img, f"{registry.host}/{REPOSITORY}:{TAG}"


def run(shape: Shape, out: Path) -> Path:
    """Run the scenario; writes ``out/ingest.json`` and returns its path."""
    work = Path(tempfile.mkdtemp(prefix="layercache-bench-ingest-"))
    bed = TestBed(work / "bed", nodes=0, seed_images=False)
    runs: dict[str, list[float]] = {"agent": [], "ctr": []}
    cpu: dict[str, list[float]] = {"agent": [], "ctr": [], "containerd_agent": [],
                                   "containerd_ctr": []}
    order: list[str] = []
    try:
        state, kube, img, ref = prepare(bed, shape)
        for i in range(shape.rounds):
            for kind in (("agent", "ctr") if i % 2 == 0 else ("ctr", "agent")):
                with fresh_containerd(work / f"run{i}-{kind}") as node:
                    assert node.process is not None
                    daemon = cpu_seconds(node.process.pid)
                    seconds, used = (agent_fetch(state, kube, node, img, work / "agent")
                                     if kind == "agent" else ctr_fetch(node, ref))
                    cpu[f"containerd_{kind}"].append(cpu_seconds(node.process.pid) - daemon)
                    verify_store(node, img)
                runs[kind].append(seconds)
                cpu[kind].append(used)
                order.append(kind)
                log.info("%s run %d: %.2f s (%.0f MB/s)", kind, i + 1, seconds,
                         img.layer_bytes / seconds / 1e6)
        kube.close()
    finally:
        bed.down()
        shutil.rmtree(work, ignore_errors=True)
    agent, ctr = statistics.median(runs["agent"]), statistics.median(runs["ctr"])
    megabytes = img.layer_bytes / 1e6
    gib = img.layer_bytes / 2**30
    per_gib = {k: statistics.median(vs) / gib for k, vs in cpu.items()}
    rows = [
        Row("B", "ingest_seconds", round(agent, 3), round(ctr, 3), ratio(agent, ctr),
            f"<= {TARGET_RATIO:g}", agent <= TARGET_RATIO * ctr),
        Row("B", "ingest_throughput_MBps", round(megabytes / agent, 1),
            round(megabytes / ctr, 1), ratio(ctr, agent), f">= {1 / TARGET_RATIO:g}",
            agent <= TARGET_RATIO * ctr),
        Row("B", "client_cpu_s_per_GiB (agent | ctr)", round(per_gib["agent"], 2),
            round(per_gib["ctr"], 2), ratio(per_gib["agent"], per_gib["ctr"]), "info", True),
        Row("B", "containerd_cpu_s_per_GiB (agent's | ctr's)",
            round(per_gib["containerd_agent"], 2), round(per_gib["containerd_ctr"], 2),
            ratio(per_gib["containerd_agent"], per_gib["containerd_ctr"]), "info", True),
    ]
    return write_result(
        out, "ingest", rows, layers=shape.layers, layer_bytes=shape.layer_bytes,
        total_layer_bytes=img.layer_bytes, image=ref.rsplit("/", 2)[-2:],
        agent_seconds=[round(s, 3) for s in runs["agent"]],
        ctr_seconds=[round(s, 3) for s in runs["ctr"]], order=order,
        cpu_seconds={k: [round(v, 2) for v in vs] for k, vs in cpu.items()},
        cpu_seconds_per_GiB={k: round(v, 3) for k, v in per_gib.items()},
        cpu_note="CPU seconds of the client (agent process from spec write to done, which "
                 "also covers its status reports; ctr from launch to exit) and of that run's "
                 "containerd: on a shared machine, a fairer yardstick than wall time",
        agent_concurrency=4, verified="every layer file re-hashed from each store after each run",
        method="agent: real agent process, NodeLayerCache created -> every layer listed by "
               "containerd (50 ms polls); ctr: `ctr content fetch --plain-http` launch to exit; "
               "fresh containerd root per run; medians")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--out DIR``, ``--quick`` (4 x 32 MiB layers, one round), ``--rounds N``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rounds", type=int, default=None,
                        help="runs of each (agent, ctr); the figures are medians")
    known, rest = parser.parse_known_args(argv)

    def shape(quick: bool) -> Shape:
        chosen = QUICK if quick else FULL
        return chosen if known.rounds is None else replace(chosen, rounds=known.rounds)

    return scenario_main(rest, __doc__ or "", "4 x 32 MiB layers, one round",
                         lambda quick, out: run(shape(quick), out))


if __name__ == "__main__":
    sys.exit(main())
