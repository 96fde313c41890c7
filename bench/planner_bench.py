"""Planner benchmark: 10,000 images x 20 layers, 1,000 nodes; time and peak memory of a plan.

Not a test. Run ``.venv/bin/python bench/planner_bench.py``; it prints the figures against
the targets (plan <= 2 s, peak <= 500 MB) and writes ``out/bench/planner.json``.

The input imitates a real cluster's images (seeded, so every run plans the same input):

- two platforms, 3/4 of images linux/amd64 and 1/4 linux/arm64, each with its own blobs;
- a few OS bases (1-3 layers, ~30 MB) that most images rest on, chosen Zipf-like;
- 150 language runtimes per platform (2-5 layers, ~40 MB) on those bases, shared by groups;
- top layers mostly unique to one image (log-normal, median 2 MB, a long tail to 1 GB+);
- 3% CUDA images (2-4 GB layers) with node selector ``gpu=true``;
- 2% extra tags for an existing manifest (same layers, another reference);
- 5% of images carry the gzip empty layer once, and 0.5% twice, as old Docker builds do;
  the repeat makes a cycle in the requirement graph, so the slow path is measured too.

Nodes: 80% amd64 (a tenth of all nodes labelled ``gpu=true``), 20% arm64; budgets from node pools
(none, 50, 100, 200, 400 GB) and for a fifth of nodes a per-node value (free disk, 20-300 GB);
inventories of 0-3 bases, 0-4 runtimes, up to 300 random layers and 50 non-layer blobs.

Memory is measured twice: ``tracemalloc`` peak of the ``plan()`` call alone (allocations
the planner makes), and the max RSS of a child process that builds the input and plans
once (everything: interpreter, input, plan) — the latter is held to the target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from layercache.oci.digest import Digest
from layercache.oci.platform import Platform
from layercache.plan.planner import Layer, Node, Plan, PlanImage, PlanOptions, plan

SEED = 20261129
IMAGES = 10_000
LAYERS_PER_IMAGE = 20
NODES = 1_000
TARGET_SECONDS = 2.0
TARGET_MB = 500.0
MB = 1_000_000
GB = 1_000_000_000
MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY = Layer(
    Digest("sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"),
    32,
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    Digest("sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"),
)
PLATFORMS = (Platform("linux", "amd64"), Platform("linux", "arm64"))
Stock = dict[str, list[tuple[Layer, ...]]]  # "bases", "runtimes", "cuda" → layer stacks


class Generator:
    """Seeded source of layers and images."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.counter = 0

    def layer(self, median: float, sigma: float, cap: float = 8 * GB) -> Layer:
        """A new layer, size log-normal around ``median`` bytes, at most ``cap``."""
        self.counter += 1
        raw = self.counter.to_bytes(8, "big")
        size = int(min(cap, max(32, self.rng.lognormvariate(math.log(median), sigma))))
        return Layer(
            Digest("sha256:" + hashlib.sha256(b"blob" + raw).hexdigest()),
            size,
            MEDIA,
            Digest("sha256:" + hashlib.sha256(b"diff" + raw).hexdigest()),
        )

    def zipf(self, items: list[tuple[Layer, ...]]) -> tuple[Layer, ...]:
        """One of ``items``, the first ones far more often."""
        # Popularity falls off as 1/rank: a few bases and runtimes carry most images.
        weights = [1 / (rank + 1) for rank in range(len(items))]
        return self.rng.choices(items, weights)[0]

    def images(self) -> tuple[list[PlanImage], dict[Platform, Stock]]:
        """The images, and per platform the bases, runtimes and CUDA stacks they rest on."""
        rng = self.rng
        per_platform: dict[Platform, Stock] = {}
        for platform in PLATFORMS:
            bases = [
                tuple(self.layer(30 * MB, 0.6) for _ in range(rng.randint(1, 3))) for _ in range(12)
            ]
            runtimes = [
                self.zipf(bases) + tuple(self.layer(40 * MB, 0.9) for _ in range(rng.randint(2, 5)))
                for _ in range(150)
            ]
            cuda = [
                self.zipf(bases) + tuple(self.layer(3 * GB, 0.2) for _ in range(2))
                for _ in range(4)
            ]
            per_platform[platform] = {"bases": bases, "runtimes": runtimes, "cuda": cuda}
        images: list[PlanImage] = []
        while len(images) < IMAGES:
            platform = PLATFORMS[0] if rng.random() < 0.75 else PLATFORMS[1]
            stock = per_platform[platform]
            roll = rng.random()
            selector = {}
            if roll < 0.03:
                below, selector = self.zipf(stock["cuda"]), {"gpu": "true"}
            elif roll < 0.13:
                below = self.zipf(stock["bases"])
            else:
                below = self.zipf(stock["runtimes"])
            top = [
                self.layer(2 * MB, 1.6, cap=2 * GB) for _ in range(LAYERS_PER_IMAGE - len(below))
            ]
            if rng.random() < 0.05:
                top[rng.randrange(len(top))] = EMPTY
            if rng.random() < 0.005:
                top[0] = top[-1] = EMPTY
            layers = below + tuple(top)
            manifest = Digest.from_bytes(b"".join(layer.digest.encode() for layer in layers))
            number = len(images)
            image = PlanImage(
                f"registry.example/team{number % 97}/app{number}:v1",
                platform,
                manifest,
                layers,
                selector,
            )
            images.append(image)
            if rng.random() < 0.02 and len(images) < IMAGES:
                images.append(
                    PlanImage(
                        image.reference.replace(":v1", ":stable"),
                        platform,
                        manifest,
                        layers,
                        selector,
                    )
                )
        return images, per_platform

    def nodes(self, images: list[PlanImage], stock: dict[Platform, Stock]) -> list[Node]:
        """The nodes, with inventories drawn from the same stock as the images."""
        rng = self.rng
        layers_of = {
            p: sorted({la.digest for im in images if im.platform == p for la in im.layers})
            for p in PLATFORMS
        }
        nodes = []
        for number in range(NODES):
            platform = PLATFORMS[0] if number % 5 else PLATFORMS[1]
            labels = {"pool": f"pool-{number % 7}"}
            if platform == PLATFORMS[0] and number % 10 == 1:
                labels["gpu"] = "true"
            present: set[Digest] = set()
            for base in rng.sample(stock[platform]["bases"], rng.randint(0, 3)):
                present.update(layer.digest for layer in base)
            for runtime in rng.sample(stock[platform]["runtimes"], rng.randint(0, 4)):
                present.update(layer.digest for layer in runtime)
            present.update(rng.sample(layers_of[platform], rng.randint(0, 300)))
            present.update(Digest.from_bytes(f"cfg{number}-{i}".encode()) for i in range(50))
            budget: int | None
            if rng.random() < 0.2:
                budget = rng.randint(20, 300) * GB  # free disk on this node
            else:
                budget = rng.choice([None, 50 * GB, 100 * GB, 200 * GB, 400 * GB])
            nodes.append(Node(f"node-{number:04d}", platform, labels, frozenset(present), budget))
        return nodes


def build() -> tuple[list[PlanImage], list[Node]]:
    generator = Generator(SEED)
    images, stock = generator.images()
    return images, generator.nodes(images, stock)


def calibrate() -> float:
    """CPU seconds of a fixed pure-Python loop, to read the plan's figures against.

    The plan's time scales with it, so a run on a busy or slow machine records how busy or
    slow. (A typical idle modern core takes about 0.5 s; that figure is not measured here.)
    """
    started = time.process_time()
    sum(i * i for i in range(10_000_000))
    return time.process_time() - started


def child() -> None:
    """Build the input and plan once; print max RSS (KiB) for the parent to read."""
    images, nodes = build()
    plan(images, nodes, PlanOptions())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("out/bench/planner.json"))
    args = parser.parse_args()
    if args.child:
        child()
        return

    started = time.perf_counter()
    images, nodes = build()
    build_seconds = time.perf_counter() - started
    timings, cpu = [], []
    result: Plan | None = None
    for _ in range(3):
        result = None  # free the last plan outside the timed section
        started, cpu_started = time.perf_counter(), time.process_time()
        result = plan(images, nodes)
        timings.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    assert result is not None
    calibration = calibrate()
    tracemalloc.start()
    plan(images, nodes)
    plan_peak_mb = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    rss = subprocess.run(
        [sys.executable, __file__, "--child"], check=True, capture_output=True, text=True
    )
    process_peak_mb = float(rss.stdout.split()[-1]) * 1024 / MB

    savings = result.savings
    saved = {
        "unique": savings.unique_bytes,
        "naive": savings.naive_bytes,
        "planned": savings.planned_bytes,
        "already_present": savings.already_present_bytes,
        "expected_upstream": savings.expected_upstream_bytes,
        "expected_peer": savings.expected_peer_bytes,
    }
    assignments = sum(len(p.layers) for p in result.nodes.values())
    figures = {
        "seed": SEED,
        "images": len(images),
        "layers_per_image": LAYERS_PER_IMAGE,
        "distinct_layers": len(result.shared_by),
        "nodes": len(nodes),
        "input_build_seconds": round(build_seconds, 3),
        "plan_seconds_runs": [round(t, 4) for t in timings],
        "plan_seconds_best": round(min(timings), 4),
        "plan_cpu_seconds_runs": [round(t, 4) for t in cpu],
        "calibration_cpu_seconds": round(calibration, 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "plan_tracemalloc_peak_mb": round(plan_peak_mb, 1),
        "process_max_rss_mb": round(process_peak_mb, 1),
        "node_layer_assignments": assignments,
        "nodes_skipping_for_budget": sum(1 for p in result.nodes.values() if p.skipped),
        "untargeted_images": len(result.untargeted),
        "savings_bytes": saved,
        "targets": {
            "plan_seconds": TARGET_SECONDS,
            "peak_mb": TARGET_MB,
            "plan_seconds_met": min(timings) <= TARGET_SECONDS,
            "peak_mb_met": process_peak_mb <= TARGET_MB,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    print(
        f"input: {len(images)} images x {LAYERS_PER_IMAGE} layers "
        f"({figures['distinct_layers']} distinct), {len(nodes)} nodes; built in "
        f"{build_seconds:.1f} s"
    )
    print(
        f"plan: best {min(timings):.3f} s of {', '.join(f'{t:.3f}' for t in timings)} "
        f"(target <= {TARGET_SECONDS} s: {met(min(timings) <= TARGET_SECONDS)})"
    )
    print(
        f"      CPU {', '.join(f'{t:.3f}' for t in cpu)} s; calibration loop "
        f"{calibration:.2f} s CPU (typical idle core: ~0.5 s); load average "
        f"{figures['load_average_1m']}"
    )
    print(
        f"memory: plan() tracemalloc peak {plan_peak_mb:.0f} MB; whole process max RSS "
        f"{process_peak_mb:.0f} MB (target <= {TARGET_MB:.0f} MB: "
        f"{met(process_peak_mb <= TARGET_MB)})"
    )
    print(
        f"plan: {assignments} node-layer assignments, "
        f"{figures['nodes_skipping_for_budget']} nodes skip layers for budget"
    )
    gigabytes = {key: round(value / GB) for key, value in saved.items()}
    print(f"savings (GB): {gigabytes}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
