"""Size of one node's NodeLayerCache spec at 1,000 nodes and 200 images (issue 14).

``python -m bench.specsize`` builds bench D's images (`bench.scale.make_images`: one OS base,
four runtimes, a top layer each) as planner input, plans them with the real planner over
1,000 nodes that hold nothing yet, distributes (`layercache.plan.distribute`) and prints the
JSON size of each node's spec as the operator writes it (``json.dumps`` of the dict, as
``bench.scale`` measures it): smallest, median, largest. No cluster, no I/O.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from bench.scale import FULL, SEED, Shape
from layercache.oci.digest import Digest
from layercache.oci.image import Layer, PlanImage
from layercache.oci.platform import Platform
from layercache.plan.distribute import CachePlan, distribute, node_spec
from layercache.plan.planner import Node, plan

AMD64 = Platform("linux", "amd64")
MEDIA = "application/vnd.oci.image.layer.v1.tar"
REGISTRY = "127.0.0.1:5000"


def _layer(name: str, size: int) -> Layer:
    digest = Digest.from_bytes(f"{SEED}-{name}".encode())
    return Layer(digest, size, MEDIA, digest)  # uncompressed: the diff ID is the digest


def images(shape: Shape) -> list[PlanImage]:
    """``shape.images`` images shaped as bench D's (`bench.scale.make_images`)."""
    base = _layer("os", 256 * 1024)
    runtimes = [_layer(f"rt{i}", 96 * 1024) for i in range(shape.runtimes)]
    found = []
    for i in range(shape.images):
        layers = (base, runtimes[i % shape.runtimes], _layer(f"top{i}", 8 * 1024 + 512 * (i % 64)))
        manifest = Digest.from_bytes(b"".join(la.digest.encode() for la in layers))
        found.append(PlanImage(f"{REGISTRY}/scale/app-{i:03d}:v1", AMD64, manifest, layers))
    return found


def specs(shape: Shape) -> dict[str, dict[str, Any]]:
    """Every node's spec dict for one LayerCache of ``shape.images`` images on every node."""
    resolved = images(shape)
    names = [f"scale-node-{i:04d}" for i in range(shape.nodes)]
    result = plan(resolved, [Node(name, AMD64) for name in names])
    repositories = {la.digest: f"{REGISTRY}/scale/app-{i:03d}"
                    for i, im in enumerate(resolved) for la in im.layers}
    lists = tuple(sorted({tuple(la.digest for la in im.layers) for im in resolved}))
    cache = CachePlan("default/scale", result, repositories, image_layers={AMD64: lists})
    per_node = distribute([cache], dict.fromkeys(names, frozenset()))
    return {name: node_spec(name, per_node.get(name, []), [cache]) for name in names}


def sizes(shape: Shape = FULL) -> list[int]:
    """JSON bytes of each node's spec, sorted."""
    return sorted(len(json.dumps(spec)) for spec in specs(shape).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=FULL.nodes)
    parser.add_argument("--images", type=int, default=FULL.images)
    args = parser.parse_args()
    found = sizes(Shape(args.nodes, args.images))
    print(f"NodeLayerCache spec at {args.nodes} nodes x {args.images} images: "
          f"min {found[0]:,} B, median {int(statistics.median(found)):,} B, "
          f"max {found[-1]:,} B")


if __name__ == "__main__":
    main()
