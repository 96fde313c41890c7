"""Scenario A, fan-out: N nodes pre-warm the same images through one throttled uplink.

One bed with 12 nodes is started once and reused for N = 1, 2, 4, 6, 12 (``--quick``: 1, 2
on a 2-node bed; ``--counts`` picks others). At each N, on the same first N nodes, emptied
before each run:

- baseline: every node pulls every image itself through CRI (``crictl pull``, the call a
  kubelet makes), the nodes side by side, each pulling its images one after another (the
  kubelet's default ``serializeImagePulls: true``); timed until every pull returned;
- layercache: the operator and an agent on each of the N nodes; a ``LayerCache`` selecting
  exactly those nodes (label + ``nodeSelector``) is applied and timed until every node's
  ``NodeLayerCache`` status reports all planned layers held, for its current spec.

Each layercache run also records the layer bytes each agent sent to its peers: no node
should send more than `FANOUT` (the relay tree's children per node) times the unique bytes
(``max_node_upload_over_unique_nN``); a seeder that served every other node would send up
to N - 1 times its layers.

Both go through the fault proxy with one total byte-rate cap shared by every connection
(`testbed.faultproxy.SharedRate`, 20 MB/s): the proxy's byte counters are what "upstream"
means. Unique bytes are the distinct layer blobs of the images for linux/amd64, from the
image family's own description. The cap's accuracy is measured first (one stream and three
concurrent streams of known blobs) and written with the results.

``python -m bench.fanout --out out/bench [--quick]`` writes ``out/bench/fanout.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.bedtools import (
    RATE_20MB,
    Bench,
    bench_bed,
    cpu_by_component,
    node_status,
    rounded,
    split_bytes,
    wait_warm,
)
from bench.common import Row, ratio, write_result
from layercache.plan.distribute import FANOUT
from testbed.bed import NodeRecord
from testbed.cri import pull
from testbed.e2e import node_caches
from testbed.paths import tool

SCENARIO = "A fan-out"
#: The example cache's images (examples/layercache.yaml), pulled through the proxy.
IMAGES = ("python", "curl", "nginx")
COUNTS = (1, 2, 4, 6, 12)
QUICK_COUNTS = (1, 2)
#: First wait between an agent's peer probes (s). The product's default, 2 s growing to
#: 10 s, is made for hundreds of nodes polling one seeder; with transfers of a few seconds
#: here it would measure the poll interval, not the fetch. Recorded in the results.
PEER_POLL_SECONDS = "0.25"
UPSTREAM_TARGET = 1.02
SCALE_TARGET = 1.3
#: The node count the scaling target is for (warm time at N over N = 1).
SCALE_AT = 6


def _counters(bench: Bench, nodes: list[NodeRecord]) -> dict[str, tuple[int, int]]:
    """Each node's persisted (upstream, peer) byte counters from its status."""
    out = {}
    for node in nodes:
        counted = node_status(bench.kube, node.name).get("bytes") or {}
        out[node.name] = (int(counted.get("upstream", 0)), int(counted.get("peer", 0)))
    return out


def timeline(bench: Bench, applied: float) -> dict[str, list[dict[str, Any]]]:
    """When each running agent held each layer, and from where, from the agents' logs.

    Node name → ``[{"seconds": after apply, "digest": short, "source": upstream|peer}]``:
    the profile of a run (which layer waited for which) without touching the agents.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for name, agent in bench.cluster.agents.items():
        events = []
        for line in agent.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["time"]).timestamp()
                # The log file is appended to by every run's agent on this node: this run only.
                if " held (" in entry["message"] and at >= applied - 1:
                    events.append({"seconds": round(at - applied, 2),
                                   "digest": entry["digest"][:19], "source": entry["source"]}
                                  | ({"from": entry["peer"]} if "peer" in entry else {}))
        out[name] = sorted(events, key=lambda e: e["seconds"])
    return out


def run_layercache(bench: Bench, nodes: list[NodeRecord], layers: int,
                   logs: Path | None = None) -> dict[str, Any]:
    """Warm `nodes` with layercache; seconds from apply to all warm and the proxy's bytes.

    ``logs``: a directory to copy each agent's log into (``n<N>/<node>.log``), for a
    profile; the bed's own directory is removed at the end.
    """
    bench.select(nodes)
    starting = time.monotonic()
    bench.start_agents(nodes)
    try:
        agents_seconds = time.monotonic() - starting
        # The agents' first status write (their start-up) must not be mistaken for progress.
        before = _counters(bench, nodes)
        bench.proxy.reset()
        cpu_before = cpu_by_component(bench)
        applied, applied_wall = time.monotonic(), time.time()
        bench.apply("fanout", bench.image_refs(IMAGES))
        done = wait_warm(bench.kube, [n.name for n in nodes], layers)
        cpu = {k: round(v - cpu_before.get(k, 0.0), 2)
               for k, v in cpu_by_component(bench).items()}
        load = os.getloadavg()[0]
        stats = bench.proxy.stats()
        after = _counters(bench, nodes)
        split = split_bytes(stats, bench.family)
        held = timeline(bench, applied_wall)
        served = served_bytes(bench, nodes)
        planned = first_peers(bench, nodes)
        if logs is not None:
            (logs / f"n{len(nodes)}").mkdir(parents=True, exist_ok=True)
            for name, agent in bench.cluster.agents.items():
                shutil.copyfile(agent.log, logs / f"n{len(nodes)}" / f"{name}.log")
        bench.release()
    finally:
        bench.stop_agents()
        bench.clear(nodes)
    return {
        "seconds": round(done - applied, 2),
        "agents_start_seconds": round(agents_seconds, 2),  # not part of "seconds"
        "bytes": asdict(split) | {"total": split.total},
        "per_node": {name: {"upstream": after[name][0] - before[name][0],
                            "peer": after[name][1] - before[name][1]} for name in after},
        "held_timeline": held,
        "served_to_peers": served,
        "first_peer": planned,
        "cpu_seconds_by_component": cpu,
        "load_average_1m_at_end": round(load, 2),
    }


def served_bytes(bench: Bench, nodes: list[NodeRecord]) -> dict[str, int]:
    """Layer bytes each node's agent sent to peers (``layercache_agent_served_bytes_total``).

    Read from each agent's metrics port; an agent starts at 0, and each run starts new
    agents. The most any node sent is what the relay tree bounds: `FANOUT` times the layers.
    """
    out = {}
    for node in nodes:
        port = bench.cluster.metrics_ports[node.name]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        out[node.name] = int(sum(
            sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "layercache_agent_served_bytes_total"))
    return out


def first_peers(bench: Bench, nodes: list[NodeRecord]) -> dict[str, dict[str, str]]:
    """Each node's planned first peer (its relay-tree parent) per layer, from its spec.

    Node → short digest → the first of the layer's ``peers`` (``"Upstream"`` where the
    node seeds it): what the ``held_timeline``'s ``from`` is compared with.
    """
    caches = node_caches(bench.kube)
    out: dict[str, dict[str, str]] = {}
    for node in nodes:
        layers = ((caches.get(node.name) or {}).get("spec") or {}).get("layers") or []
        out[node.name] = {
            entry["digest"][:19]: "Upstream" if entry.get("source") == "Upstream"
            else (entry.get("peers") or ["-"])[0] for entry in layers}
    return out


def holdings(bench: Bench, node: NodeRecord) -> dict[str, int]:
    """What ``node``'s containerd holds of the family: layer blobs, snapshots, images.

    Recorded before each baseline run: a node that still held layers or their unpacked
    snapshots would fetch less than its share (containerd's unpacker skips fetching a
    layer whose chain is already unpacked), and the baseline's upstream ratio would drop.
    """
    def ctr(*args: str) -> list[str]:
        out = subprocess.run([str(tool("ctr")), "--address", node.socket, "--namespace",
                              "k8s.io", *args], check=True, capture_output=True, text=True)
        return out.stdout.splitlines()
    layers = {layer.digest for layer in bench.family.layers}
    return {"layer_blobs": len(layers.intersection(ctr("content", "ls", "-q"))),
            "snapshots": len(ctr("snapshots", "ls")[1:]),  # below a header line
            "family_images": sum(1 for name in ctr("images", "ls", "-q") if "/family/" in name)}


def run_baseline(bench: Bench, nodes: list[NodeRecord]) -> dict[str, Any]:
    """Every node CRI-pulls every image itself, side by side; seconds and the proxy's bytes."""
    refs = bench.image_refs(IMAGES)
    held_before = {node.name: holdings(bench, node) for node in nodes}
    bench.proxy.reset()
    started = time.monotonic()

    def node_pulls(node: NodeRecord) -> float:
        for ref in refs:  # one after another, as a kubelet with serialized pulls does
            pull(node.socket, ref)
        return time.monotonic() - started
    try:
        with ThreadPoolExecutor(len(nodes)) as pool:
            per_node = list(pool.map(node_pulls, nodes))
        seconds = time.monotonic() - started
        split = split_bytes(bench.proxy.stats(), bench.family)
    finally:
        bench.clear(nodes)
    return {"seconds": round(seconds, 2),
            "bytes": asdict(split) | {"total": split.total},
            "held_before": held_before,
            "per_node_seconds": dict(zip([n.name for n in nodes], [round(s, 2) for s in per_node],
                                         strict=True))}


def check_rate(bench: Bench, cap: int) -> dict[str, Any]:
    """Measure the proxy's cap: one stream of the base layer, then three streams at once.

    Returns the set rate and each measured rate (bytes/s) with its ratio to the set rate.
    """
    base = bench.family.image_layers("base")[0]
    tops = [bench.family.image_layers(n)[-1] for n in IMAGES]

    def fetch(repository: str, digest: str) -> int:
        with httpx.Client(base_url=bench.proxy.url, timeout=120) as http, http.stream(
                "GET", f"/v2/{repository}/blobs/{digest}") as reply:
            reply.raise_for_status()
            return sum(len(chunk) for chunk in reply.iter_raw())

    started = time.monotonic()
    single = fetch("family/base", base.digest)
    single_seconds = time.monotonic() - started
    started = time.monotonic()
    with ThreadPoolExecutor(len(tops)) as pool:
        many = sum(pool.map(fetch, [f"family/{n}" for n in IMAGES], [t.digest for t in tops]))
    many_seconds = time.monotonic() - started
    return {
        "set_bytes_per_second": cap,
        "one_stream": rounded({"bytes": single, "seconds": single_seconds,
                               "bytes_per_second": single / single_seconds,
                               "of_set": single / single_seconds / cap}),
        "three_streams": rounded({"bytes": many, "seconds": many_seconds,
                                  "bytes_per_second": many / many_seconds,
                                  "of_set": many / many_seconds / cap}),
    }


def rows(runs: dict[int, dict[str, Any]], unique: int) -> list[Row]:
    """The summary rows: upstream ratio and warm seconds at each N, and the scaling ratio."""
    out = []
    for n, run in runs.items():
        value = run["layercache"]["bytes"]["layers"] / unique
        base = run["baseline"]["bytes"]["layers"] / unique
        out.append(Row(SCENARIO, f"upstream_ratio_n{n}", round(value, 4), round(base, 4),
                       ratio(value, base), f"<= {UPSTREAM_TARGET}", value <= UPSTREAM_TARGET))
    for n, run in runs.items():
        value, base = run["layercache"]["seconds"], run["baseline"]["seconds"]
        out.append(Row(SCENARIO, f"warm_seconds_n{n}", value, base, ratio(value, base),
                       "info", True))
    for n, run in runs.items():
        if n == 1 or "served_to_peers" not in run["layercache"]:
            continue
        value = max(run["layercache"]["served_to_peers"].values()) / unique
        out.append(Row(SCENARIO, f"max_node_upload_over_unique_n{n}", round(value, 3), None,
                       None, f"<= {FANOUT} (relay tree)", value <= FANOUT))
    first = min(runs)
    for n in sorted(runs):
        if n == first:
            continue
        value = runs[n]["layercache"]["seconds"] / runs[first]["layercache"]["seconds"]
        base = runs[n]["baseline"]["seconds"] / runs[first]["baseline"]["seconds"]
        target = n == SCALE_AT or (SCALE_AT not in runs and n == max(runs))
        out.append(Row(SCENARIO, f"warm_time_n{n}_over_n{first}", round(value, 3),
                       round(base, 3), ratio(value, base),
                       f"<= {SCALE_TARGET}" if target else "info",
                       value <= SCALE_TARGET if target else True))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--quick", action="store_true", help="N = 1, 2 on a 2-node bed")
    parser.add_argument("--rate", type=int, default=RATE_20MB, help="uplink cap, bytes/s")
    parser.add_argument("--counts", help="node counts instead of 1,2,4,6,12, e.g. 1,6")
    parser.add_argument("--logs", type=Path, help="copy each run's agent logs here")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="layercache only (for profiling a run; no rows)")
    args = parser.parse_args(argv)
    counts = QUICK_COUNTS if args.quick else COUNTS
    if args.counts:
        counts = tuple(int(n) for n in args.counts.split(","))
    started = time.monotonic()
    with bench_bed("fanout", max(counts)) as bench:
        bed_seconds = time.monotonic() - started
        bench.agent_env = {"LAYERCACHE_PEER_POLL_SECONDS": PEER_POLL_SECONDS}
        unique = bench.family.unique_layer_bytes(IMAGES)
        layers = len({d for n in IMAGES for d in bench.family.images[n].resolve().layers})
        bench.start_product()
        bench.proxy.set_rate(args.rate)
        rate_check = check_rate(bench, args.rate)
        print(f"rate cap check: {rate_check}", flush=True)
        runs: dict[int, dict[str, Any]] = {}
        for n in counts:
            nodes = bench.nodes[:n]
            bench.clear(nodes)
            if not args.skip_baseline:
                runs[n] = {"baseline": run_baseline(bench, nodes)}
                print(f"N={n}: baseline {runs[n]['baseline']['seconds']} s "
                      f"{runs[n]['baseline']['bytes']['layers']:,} layer bytes", flush=True)
            runs.setdefault(n, {})["layercache"] = run_layercache(bench, nodes, layers,
                                                                  args.logs)
            print(f"N={n}: layercache {runs[n]['layercache']['seconds']} s "
                  f"{runs[n]['layercache']['bytes']['layers']:,} layer bytes", flush=True)
    result = [] if args.skip_baseline else rows(runs, unique)
    path = write_result(
        args.out, "fanout", result, quick=args.quick, images=list(IMAGES),
        unique_layer_bytes=unique, planned_layers=layers, rate_cap=rate_check,
        agent_settings=bench.agent_env, bed_seconds=round(bed_seconds, 1),
        seconds=round(time.monotonic() - started, 1),
        runs={str(n): run for n, run in runs.items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
