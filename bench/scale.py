"""Scenario D, scale: the real operator against 1,000 (then 5,000) Nodes and 200 images.

``python -m bench.scale --out out/bench [--quick] [--nodes N]`` brings up the bed's control
plane and registries (no containerd: `TestBed(nodes=0)`), registers 1,000 Node objects as the bed
registers its own (`testbed.bed.register_nodes`), pushes 200 small images that share a few
base layers (plus one more for the change), installs layercache and starts the operator as
its ServiceAccount (`testbed.product.start_operator`). Then, timing from the API call:

1. **apply** a LayerCache naming the 200 images on every node → until all 1,000
   NodeLayerCache specs are written (polled as metadata, then each spec checked whole);
2. **agents report**: every NodeLayerCache's status is written as an agent that holds
   everything would (simulated agents) → the LayerCache goes Ready; the operator must
   rewrite no spec;
3. **add one image** → until every spec holds it;
4. **no-op edit** (``refreshInterval``): the operator resolves and replans again, and must
   write no spec.

The apiserver's audit log (policy: the operator's user only, `bench.scale_audit`) counts
every request the operator made, by verb and resource, and the writes to each
NodeLayerCache per phase. Peak RSS is the operator's ``VmHWM`` at the end.

There is no competitor for D: each row's ``baseline`` is the target itself and ``ratio``
= value / target (≤ 1 meets it): at 1,000 nodes ≤ 20 s and ≤ 150 MB, at 5,000 nodes
(rows ``…_n5000``, a second run in a fresh bed) ≤ 60 s and ≤ 300 MB, so the table shows how
the cost grows. Everything runs under a fresh ``/tmp`` workdir that is
removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from bench.common import Row, ratio, write_result
from bench.ingest_cli import scenario_main
from bench.ingest_image import Image, Pusher, image, small_layer
from bench.ingest_proc import cpu_seconds, memory_mb
from bench.scale_audit import AuditLog, Requests, audit_args
from testbed.bed import TestBed, register_nodes
from testbed.e2e import GROUP, VERSION, get_cache, is_ready, node_caches
from testbed.kube import Kube, wait_for
from testbed.nodes import SimNode
from testbed.procs import Process
from testbed.product import NAMESPACE, install, start_operator

log = logging.getLogger("bench.scale")

OPERATOR_USER = f"system:serviceaccount:{NAMESPACE}:layercache-operator"
TARGET_WRITES = 1.0
CACHE_NAMESPACE = "default"
CACHE_NAME = "scale"
#: Seconds with no new write that count as "the operator is done with this change".
SETTLE_SECONDS = 5.0
SEED = "scale-20261129"
#: Seconds a phase may take before it counts as failed (at least; twice the target if more).
DEADLINE = 120.0


@dataclass(frozen=True)
class Shape:
    """How big the run is: Node objects, images, base layers they share."""

    nodes: int
    images: int
    runtimes: int = 4
    #: apply → all specs written (seconds) and the operator's peak RSS (MB) to meet.
    target_seconds: float = 20.0
    target_rss_mb: float = 150.0

    @property
    def deadline(self) -> float:
        """Seconds a phase may take before it counts as failed."""
        return max(DEADLINE, 2 * self.target_seconds)


FULL = Shape(nodes=1000, images=200)
#: The second row of the full run: how the cost grows with the cluster.
HUGE = Shape(nodes=5000, images=200, target_seconds=60.0, target_rss_mb=300.0)
QUICK = Shape(nodes=100, images=20, runtimes=2)


def make_images(shape: Shape) -> list[Image]:
    """``shape.images + 1`` images: one OS base all share, a runtime per group, a top each.

    The extra last image is the one the change adds. Blobs are small (tens of KiB): the
    scenario is about objects and requests, not bytes.
    """
    base = small_layer(f"{SEED}-os", 256 * 1024)
    runtimes = [small_layer(f"{SEED}-rt{i}", 96 * 1024) for i in range(shape.runtimes)]
    return [image([base, runtimes[i % shape.runtimes],
                   small_layer(f"{SEED}-top{i}", 8 * 1024 + 512 * (i % 64))])
            for i in range(shape.images + 1)]


def references(registry: str, count: int) -> list[str]:
    """``registry/scale/app-NNN:v1`` for images 0 … count-1."""
    return [f"{registry}/scale/app-{i:03d}:v1" for i in range(count)]


def register(kubeconfig: Path, workdir: Path, count: int, threads: int = 8) -> float:
    """Register ``count`` Node objects (as the bed does) from ``threads`` threads; seconds."""
    nodes = [SimNode(f"scale-node-{i:04d}", workdir / f"n{i}") for i in range(count)]
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda part: register_nodes(kubeconfig, part),
                      [nodes[i::threads] for i in range(threads)]))
    return time.monotonic() - started


class Observer:
    """Admin-side view of NodeLayerCaches: metadata only (cheap to poll), or whole."""

    def __init__(self, kube: Kube) -> None:
        conf = kube.api.configuration
        context = ssl.create_default_context(cafile=conf.ssl_ca_cert)
        context.load_cert_chain(conf.cert_file, conf.key_file)
        self.http = httpx.Client(base_url=conf.host, verify=context, timeout=60)
        self.kube = kube

    def generations(self) -> dict[str, int]:
        """NodeLayerCache name → metadata.generation (a PartialObjectMetadataList)."""
        for _ in range(5):  # an apiserver busy with 1,000s of objects may answer 504
            got = self.http.get(f"/apis/{GROUP}/{VERSION}/nodelayercaches", headers={
                "accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"})
            if got.status_code < 500:
                break
            time.sleep(1)
        got.raise_for_status()
        return {item["metadata"]["name"]: item["metadata"]["generation"]
                for item in got.json().get("items") or []}

    def wait_generations(self, names: list[str], at_least: dict[str, int], timeout: float
                         ) -> tuple[float | None, int]:
        """Poll until each of ``names`` has a NodeLayerCache newer than ``at_least``.

        ``at_least`` maps a name to the generation to exceed (absent: 0, a new object).
        Returns (monotonic time all were first seen, or None after ``timeout`` seconds;
        how many were written by then).
        """
        deadline = time.monotonic() + timeout
        written = 0
        while time.monotonic() < deadline:
            seen = self.generations()
            written = sum(1 for n in names if seen.get(n, 0) > at_least.get(n, 0))
            if written == len(names):
                return time.monotonic(), written
            time.sleep(0.25)
        return None, written

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()


def settle(audit: AuditLog, into: Requests, quiet: float = SETTLE_SECONDS,
           timeout: float = 120) -> None:
    """Gather the operator's requests into ``into`` until ``quiet`` s pass with no write.

    Waiting for quiet, not just for the expected writes, counts late rewrites too.
    """
    deadline = time.monotonic() + timeout
    last_write = time.monotonic()
    while time.monotonic() < deadline:
        got = audit.take()
        into.by_kind.update(got.by_kind)
        into.writes.update(got.writes)
        if got.writes:
            last_write = time.monotonic()
        elif time.monotonic() - last_write >= quiet:
            return
        time.sleep(0.5)


def agent_status(obj: dict[str, Any]) -> dict[str, Any]:
    """The status an agent holding every wanted layer would write (`agent.status.StatusBook`)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    layers = obj["spec"].get("layers") or []
    generation = obj["metadata"]["generation"]
    held = sum(layer["size"] for layer in layers)

    def cond(kind: str, status: str, reason: str) -> dict[str, Any]:
        return {"type": kind, "status": status, "reason": reason, "message": "",
                "lastTransitionTime": now, "observedGeneration": generation}
    return {"observedGeneration": generation,
            "layers": {"wanted": len(layers), "held": len(layers), "bytesHeld": held},
            "missing": [], "bytes": {"upstream": 0, "peer": held, "servedToPeers": 0},
            "errors": [], "diskPressure": False, "lastSync": now,
            "conditions": [cond("Ready", "True", "AllLayersHeld"),
                           cond("Progressing", "False", "Idle"),
                           cond("Degraded", "False", "NoErrors")]}


def report_held(kube: Kube, threads: int = 8) -> int:
    """Write every NodeLayerCache's status as its agent would; returns how many."""
    objects = list(node_caches(kube).values())

    def one(obj: dict[str, Any]) -> None:
        kube.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, "nodelayercaches", obj["metadata"]["name"],
            {"status": agent_status(obj)})
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, objects))
    return len(objects)


def wait_idle(pid: int, quiet: float = 0.05, timeout: float = 300) -> float:
    """Wait until process ``pid`` used under ``quiet`` CPU seconds in each of two seconds.

    Returns the seconds waited. The operator handles one event per Node at start-up; a
    LayerCache applied before that is done would be timed against the backlog.
    """
    started = time.monotonic()
    calm, last = 0, cpu_seconds(pid)
    while calm < 2 and time.monotonic() - started < timeout:
        time.sleep(1)
        now = cpu_seconds(pid)
        calm = calm + 1 if now - last < quiet else 0
        last = now
    return time.monotonic() - started


def phase_figures(found: Requests, nodes: list[str], changed: set[str]) -> dict[str, Any]:
    """Writes per node (max over all, over changed, over unchanged) and request counts."""
    unchanged = [n for n in nodes if n not in changed]
    return {"requests_total": found.total, "requests": dict(found.by_kind.most_common()),
            "nodelayercache_writes": sum(found.writes.values()),
            "max_writes_per_node": max((found.writes[n] for n in nodes), default=0),
            "nodes_written": sum(1 for n in nodes if found.writes[n]),
            "nodes_changed": len(changed),
            "writes_to_unchanged_nodes": sum(found.writes[n] for n in unchanged)}


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A fresh directory under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="layercache-bench-scale-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timed(what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``, logging how long it took."""
    started = time.monotonic()
    result = fn()
    log.info("%s: %.1f s", what, time.monotonic() - started)
    return result


def run(shapes: list[Shape], out: Path) -> Path:
    """Run the scenario with each of ``shapes`` in turn; writes ``out/scale.json``.

    The rows of every shape; the figures of the first at the top level, those of the
    others under ``larger``. Returns the path written.
    """
    found = [run_shape(shape) for shape in shapes]
    return write_result(out, "scale", [row for figures in found for row in rows(figures)],
                        **found[0], larger=found[1:])


def run_shape(shape: Shape) -> dict[str, Any]:
    """Run the scenario once with ``shape`` in a fresh bed; returns its figures."""
    with workdir() as work:
        audit_dir = work / "audit"
        bed = TestBed(work / "bed", nodes=0, seed_images=False,
                      apiserver_args=audit_args(audit_dir, OPERATOR_USER))
        operator: Process | None = None
        try:
            state = timed("bed up", bed.up)
            kube = Kube(Path(state.kubeconfig))
            register_seconds = timed("nodes registered", lambda: register(
                Path(state.kubeconfig), work / "nodes", shape.nodes))
            images = make_images(shape)
            registry = state.registries["plain"]
            refs = references(registry.host, shape.images + 1)

            def push() -> None:
                with Pusher(registry.url) as pusher:
                    for ref, img in zip(refs, images, strict=True):
                        repo, _, tag = ref.removeprefix(registry.host + "/").rpartition(":")
                        pusher.push(repo, tag, img)
            timed("images pushed", push)
            install(kube, "rbac-operator.yaml")
            operator, _ = start_operator(state, kube, work / "operator", name="operator")
            figures = measure(kube, operator, AuditLog(audit_dir / "audit.log",
                                                        "nodelayercaches"), shape, refs,
                              images)
            kube.close()
        finally:
            if operator is not None:
                operator.stop()
            bed.down()
    figures["register_seconds"] = round(register_seconds, 1)
    return figures


def measure(kube: Kube, operator: Process, audit: AuditLog, shape: Shape, refs: list[str],
            images: list[Image]) -> dict[str, Any]:
    """The four phases (module docstring); returns the raw figures.

    If the specs are not all written within the shape's deadline of the apply, the later
    phases are skipped and the figures say how many were written by then.
    """
    observer = Observer(kube)
    nodes = sorted(f"scale-node-{i:04d}" for i in range(shape.nodes))
    figures: dict[str, Any] = {
        "note": "D has no competitor: each row's baseline is the target and ratio = value "
                "/ target (<= 1 meets it).",
        "nodes": shape.nodes, "images": shape.images, "deadline_seconds": shape.deadline,
        "target_seconds": shape.target_seconds, "target_rss_mb": shape.target_rss_mb}
    phases: dict[str, dict[str, Any]] = {}
    figures["phases"] = phases
    figures["operator_startup_idle_seconds"] = round(wait_idle(operator.pid), 1)
    startup = Requests()
    settle(audit, startup, quiet=1)
    phases["startup"] = phase_figures(startup, nodes, set())
    try:
        _phases(kube, observer, audit, shape, refs, images, nodes, figures)
    finally:
        hwm, rss = memory_mb(operator.pid)
        figures["operator_peak_rss_mb"] = round(hwm, 1)
        figures["operator_rss_mb_at_end"] = round(rss, 1)
        observer.close()
    return figures


def _phases(kube: Kube, observer: Observer, audit: AuditLog, shape: Shape, refs: list[str],
            images: list[Image], nodes: list[str], figures: dict[str, Any]) -> None:
    phases = figures["phases"]
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LayerCache",
            "metadata": {"name": CACHE_NAME},
            "spec": {"images": refs[:shape.images], "refreshInterval": "10m"}}

    # 1. apply: time to every spec written.
    started = time.monotonic()
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, CACHE_NAMESPACE,
                                                "layercaches", body)
    written_at, written = observer.wait_generations(nodes, {}, shape.deadline)
    figures["specs_written"] = written
    figures["apply_to_specs_written_seconds"] = (
        round(written_at - started, 2) if written_at is not None else None)
    apply = Requests()
    settle(audit, apply, timeout=30 if written_at is None else 120)
    phases["apply"] = phase_figures(apply, nodes, set(nodes))
    if written_at is None:
        return
    objects = node_caches(kube)
    unique = {d for img in images[:shape.images] for d in (layer.digest for layer in img.layers)}
    figures["layers_per_node"] = sorted({len(o["spec"].get("layers") or [])
                                         for o in objects.values()})
    figures["unique_layers"] = len(unique)
    figures["specs_complete"] = all(
        {entry["digest"] for entry in o["spec"]["layers"]} == unique for o in objects.values())
    figures["spec_json_bytes_per_node"] = sum(
        len(json.dumps(o["spec"])) for o in objects.values()) // max(len(objects), 1)
    del objects

    # 2. simulated agents report everything held: Ready, and no spec rewritten.
    started = time.monotonic()
    figures["agent_reports"] = report_held(kube)
    figures["agent_report_seconds"] = round(time.monotonic() - started, 1)
    wait_for(lambda: is_ready(get_cache(kube, CACHE_NAMESPACE, CACHE_NAME)), shape.deadline, 0.5,
             "LayerCache Ready on every node")
    figures["reports_to_ready_seconds"] = round(time.monotonic() - started, 1)
    agents = Requests()
    settle(audit, agents)
    phases["agents_report"] = phase_figures(agents, nodes, set())

    # 3. add one image: every spec changes once.
    before = observer.generations()
    started = time.monotonic()
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, CACHE_NAMESPACE, "layercaches", CACHE_NAME,
        {"spec": {"images": refs[:shape.images + 1]}})
    changed_at, _ = observer.wait_generations(nodes, before, shape.deadline)
    figures["change_to_specs_written_seconds"] = (
        round(changed_at - started, 2) if changed_at is not None else None)
    change = Requests()
    settle(audit, change)
    phases["add_image"] = phase_figures(change, nodes, set(nodes))
    added = images[shape.images].layers[-1].digest
    figures["change_spec_holds_added_layer"] = all(
        any(e["digest"] == added for e in o["spec"]["layers"])
        for o in node_caches(kube).values())

    # 4. no-op edit: resolved and planned again, no node spec differs, nothing written.
    generation = (get_cache(kube, CACHE_NAMESPACE, CACHE_NAME) or {})["metadata"]["generation"]
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, CACHE_NAMESPACE, "layercaches", CACHE_NAME,
        {"spec": {"refreshInterval": "11m"}})
    wait_for(lambda: ((get_cache(kube, CACHE_NAMESPACE, CACHE_NAME) or {}).get("status") or {}
                      ).get("observedGeneration", 0) > generation, shape.deadline, 0.5,
             "the no-op edit observed")
    noop = Requests()
    settle(audit, noop)
    phases["noop_edit"] = phase_figures(noop, nodes, set())


def rows(figures: dict[str, Any]) -> list[Row]:
    """The summary rows: spec time, writes per node per change, peak RSS.

    A time past the deadline is reported as the deadline, not met.
    """
    phases = figures["phases"]
    measured = figures.get("apply_to_specs_written_seconds")
    seconds = float(measured if measured is not None else figures["deadline_seconds"])
    target_seconds, target_rss = figures["target_seconds"], figures["target_rss_mb"]
    # The 1,000-node rows keep their names; another size's carry it (``_n5000``).
    suffix = "" if figures["nodes"] == FULL.nodes else f"_n{figures['nodes']}"
    writes = float(max(p["max_writes_per_node"] for p in phases.values()))
    unchanged = sum(p["writes_to_unchanged_nodes"] for p in phases.values())
    rss = float(figures["operator_peak_rss_mb"])
    complete = (measured is not None and bool(figures.get("specs_complete"))
                and bool(figures.get("change_spec_holds_added_layer")))
    every_change = "noop_edit" in phases  # all four phases ran
    return [
        Row("D", f"apply_to_all_specs_seconds{suffix}", seconds, target_seconds,
            ratio(seconds, target_seconds), f"<= {target_seconds:g} s",
            seconds <= target_seconds and complete),
        Row("D", f"writes_per_node_per_change{suffix}", writes, TARGET_WRITES,
            ratio(writes, TARGET_WRITES), "<= 1, 0 to unchanged",
            writes <= TARGET_WRITES and unchanged == 0 and every_change),
        Row("D", f"operator_peak_rss_mb{suffix}", rss, target_rss, ratio(rss, target_rss),
            f"<= {target_rss:g} MB", rss <= target_rss),
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--out DIR`` (default out/bench), ``--quick`` (100 nodes and 20 images).

    ``--nodes N`` runs one size only (1000 or 5000 with their targets; any other N with
    200 images and the 5,000-node targets); without it the full run is 1,000 then 5,000.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nodes", type=int)
    known, rest = parser.parse_known_args(argv)
    sizes = {shape.nodes: shape for shape in (FULL, HUGE)}
    full = ([sizes.get(known.nodes, replace(HUGE, nodes=known.nodes))] if known.nodes
            else [FULL, HUGE])
    return scenario_main(rest, __doc__ or "", "100 nodes and 20 images",
                         lambda quick, out: run([QUICK] if quick else full, out))


if __name__ == "__main__":
    sys.exit(main())
