"""`make demo`: layercache installed by Helm on a kubelet bed, with real images, measured.

Brings up the bed with a kubelet on each of 4 nodes (registries, fault proxy, the image
family), imports the product image into every node (`testbed.chart.load_image`, as `kind
load`), labels 3 nodes `layercache.dev/pool=warm`, `helm install`s helm/layercache (image
values, plus the bed's plain-HTTP registry proxy as insecure), waits for the operator and
an agent Pod Ready on every node and runs `helm test`, then applies
`examples/layercache.yaml` (pointed at the bed's registry through the byte-counting proxy,
its nodes the warm pool) and waits for Ready. Then the point: an app Deployment pinned to
a warmed node and one to the cold node; the kubelet pulls the app image on each, and its
`Pulled` event says how long that took. Every byte figure is measured at the proxy or read
from containerd and the apiserver, not computed from assumptions.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from layercache.units import human_bytes
from testbed.bed import BedState, TestBed
from testbed.chart import (
    POD_COLUMNS,
    app_deployment,
    helm_install,
    helm_test,
    load_image,
    pod_rows,
    pulled_seconds,
)
from testbed.e2e import blob_infos, pinned_chain_usage
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube, wait_for
from testbed.paths import REPO
from testbed.product_image import build_image

EXAMPLE = REPO / "examples" / "layercache.yaml"
EXAMPLE_REGISTRY = "127.0.0.1:5000"
#: The app the demo runs after warming: built on python, which the example caches.
APP = "app-py-b"
#: Nodes the cache warms (kind-config.yaml's pool label) and the one it leaves cold.
WARM_NODES, NODES = 3, 4
POOL_LABEL, POOL = "layercache.dev/pool", "warm"
#: The family's apps print a line and exit; a Deployment's Pod must keep running.
APP_COMMAND = ("sh", "-c", "python3 /app/main.py && exec sleep infinity")


def run(workdir: Path, report: Path, console: Console) -> dict[str, Any]:
    """Run the demo in `workdir` (left running: `make demo-down`); write `report`; return it.

    Raises:
        ComponentError, TimeoutError: a part did not start, or the cache never got Ready.
    """
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        image = pool.submit(build_image)  # cached: seconds; beside the bed's start-up
        bed = TestBed(workdir, nodes=NODES, kubelets=True)
        state = bed.up()
        built = image.result()
    console.print(f"test bed up in {state.ready_seconds} s: {len(state.nodes)} nodes with "
                  f"kubelets, Kubernetes {state.kubernetes_version}")
    kube = Kube(Path(state.kubeconfig))
    family = Family.load(Path(state.family or "").parent)
    proxy = FaultProxy(state.proxy_url or "")
    try:
        return _run(state, kube, family, proxy, built, report, console, started)
    finally:
        proxy.close()
        kube.close()


def _run(state: BedState, kube: Kube, family: Family, proxy: FaultProxy, built: Any,
         report: Path, console: Console, started: float) -> dict[str, Any]:
    loaded = load_image(state, built)
    console.print(f"loaded {loaded.reference} ({built.manifest_digest[:19]}…) into "
                  f"{len(loaded.nodes)} nodes")
    warm_nodes = [n.name for n in state.nodes[:WARM_NODES]]
    cold_node = state.nodes[WARM_NODES].name
    for name in warm_nodes:
        kube.kubectl("label", "node", name, f"{POOL_LABEL}={POOL}")
    release = helm_install(kube, loaded, insecure_registries=[proxy.host])
    console.print(f"helm install {release.name} -n {release.namespace}: operator and "
                  f"{len(state.nodes)} agents Ready")
    helm_test(kube, release)
    console.print(f"helm test {release.name}: passed")
    proxy.reset()  # from here on, every byte the registry serves is layercache's doing
    cache = yaml.safe_load(EXAMPLE.read_text().replace(EXAMPLE_REGISTRY, proxy.host))
    cache["spec"]["nodeSelector"] = {POOL_LABEL: POOL}
    applied = time.monotonic()
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(cache))
    ns, name = cache["metadata"]["namespace"], cache["metadata"]["name"]

    def ready() -> dict[str, Any] | None:
        obj: dict[str, Any] = kube.custom.get_namespaced_custom_object(
            "layercache.dev", "v1alpha1", ns, "layercaches", name)
        conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
        return obj if conditions.get("Ready", {}).get("status") == "True" else None
    console.print(f"applied {EXAMPLE.relative_to(REPO)} (nodes: {POOL_LABEL}={POOL}); "
                  "waiting for Ready …")
    obj = wait_for(ready, timeout=600, interval=1, what=f"LayerCache {ns}/{name} Ready")
    ready_seconds = time.monotonic() - applied
    warm = proxy.stats()
    nodes = {n["metadata"]["name"]: n for n in kube.custom.list_cluster_custom_object(
        "layercache.dev", "v1alpha1", "nodelayercaches")["items"]}
    status = obj["status"]
    disk = _disk(kube, state, warm_nodes)
    app = _app_pods(kube, family, proxy, warm_nodes[0], cold_node)
    rows = pod_rows(kube, release.namespace) + pod_rows(kube, "default")
    node_info = kube.core.read_node(warm_nodes[0]).status.node_info
    result = {
        "unique_bytes": status["bytes"]["unique"],
        "naive_upstream_bytes": status["bytes"]["naive"],
        "upstream_bytes": warm.total_bytes,
        "upstream_blob_bytes": warm.blob_bytes,
        "peer_bytes": sum(int((n.get("status") or {}).get("bytes", {}).get("peer", 0))
                          for n in nodes.values()),
        "nodes": status["nodes"]["desired"],
        "nodes_ready": status["nodes"]["ready"],
        "shared_layers": status["layers"]["shared"],
        "seconds_to_ready": round(ready_seconds, 1),
        "disk": disk,
        **app,
        "pods_running": [{"namespace": r[0], "name": r[1], "node": r[6]}
                         for r in rows if r[3] == "Running"],
        "containerd_version": node_info.container_runtime_version.removeprefix(
            "containerd://"),
        "seconds_total": round(time.monotonic() - started, 1),
    }
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2) + "\n")
    _print(console, result, nodes, status, rows)
    return result


def _disk(kube: Kube, state: BedState, warm_nodes: list[str]) -> list[dict[str, Any]]:
    """Each warm node's disk figures as its agent reports them, beside containerd's own.

    The agent's ``status.disk`` (blobs, snapshots, separate, saved: bytes) and what
    containerd's API says of the same objects: the content sizes of the node's wanted
    blobs, and ``Snapshots.Usage`` of the chains a cache pins. Waits up to 60 s for the
    agents' figures to follow the last unpack; a difference left after that is reported
    (and fails test_demo), not hidden.
    """
    sockets = {n.name: n.socket for n in state.nodes}

    def measure() -> list[dict[str, Any]]:
        rows = []
        for name in warm_nodes:
            obj = kube.custom.get_cluster_custom_object(
                "layercache.dev", "v1alpha1", "nodelayercaches", name)
            wanted = [layer["digest"] for layer in (obj.get("spec") or {}).get("layers", [])]
            infos = blob_infos(sockets[name], wanted)
            reported = (obj.get("status") or {}).get("disk") or {}
            rows.append({"node": name, **{k: reported.get(k) for k in (
                "blobs", "snapshots", "separate", "saved")},
                "containerd_blobs": sum(i.size for i in infos.values() if i is not None),
                "containerd_snapshots": sum(pinned_chain_usage(sockets[name]).values())})
        return rows

    def agreed() -> list[dict[str, Any]] | None:
        rows = measure()
        return rows if all(r["blobs"] == r["containerd_blobs"]
                           and r["snapshots"] == r["containerd_snapshots"]
                           for r in rows) else None
    try:
        return wait_for(agreed, timeout=60, interval=2, what="disk figures as containerd's")
    except TimeoutError:
        return measure()


def _app_pods(kube: Kube, family: Family, proxy: FaultProxy, warm_node: str,
              cold_node: str) -> dict[str, Any]:
    """Run APP on `warm_node`, then on `cold_node`; bytes of the warm pull, both pull times.

    One after the other, so the proxy's count of the first pull is that pull's alone.
    """
    image = family.images[APP]
    manifest = image.resolve()
    cached = {d for name in ("python", "curl", "nginx")
              for d in family.images[name].resolve().layers}
    own = [d for d in manifest.layers if d not in cached]
    reference = f"{proxy.host}/{image.reference}"
    seconds = {}
    proxy.reset()
    for role, node in (("warm", warm_node), ("cold", cold_node)):
        deployment = f"app-{role}"
        kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(
            app_deployment(deployment, reference, node, command=APP_COMMAND)))
        kube.kubectl("rollout", "status", f"deployment/{deployment}", "--timeout=300s",
                     timeout=330)
        [pod] = kube.core.list_namespaced_pod(
            "default", label_selector=f"app.kubernetes.io/name={deployment}").items
        seconds[role] = wait_for(
            lambda pod=pod.metadata.name: pulled_seconds(kube, "default", pod), timeout=30,
            what=f"the Pulled event of pod {pod.metadata.name}")
        if role == "warm":
            stats = proxy.stats()
    return {
        "app_image": image.reference,
        "app_pull_registry_bytes": stats.total_bytes,
        "app_pull_expected_bytes": manifest.size + manifest.config_size
        + sum(family.layer(d).size for d in own),
        "app_image_bytes": sum(family.layer(d).size for d in manifest.layers),
        "app_pod_node_warm": warm_node,
        "app_pod_node_cold": cold_node,
        "app_pod_pull_seconds_warm": round(seconds["warm"], 3),
        "app_pod_pull_seconds_cold": round(seconds["cold"], 3),
    }


def _print(console: Console, result: dict[str, Any], nodes: dict[str, Any],
           status: dict[str, Any], rows: list[tuple[str, ...]]) -> None:
    pods = Table(*POD_COLUMNS, title="pods (kubectl get pods -o wide)")
    for row in rows:
        pods.add_row(*row)
    console.print(pods)
    table = Table("node", "layers held", "from upstream", "from peers", title="per node")
    for name, obj in sorted(nodes.items()):
        st = obj.get("status") or {}
        table.add_row(name, f"{st.get('layers', {}).get('held', 0)}"
                      f"/{st.get('layers', {}).get('wanted', 0)}",
                      human_bytes(st.get("bytes", {}).get("upstream", 0)),
                      human_bytes(st.get("bytes", {}).get("peer", 0)))
    console.print(table)
    totals = Table("measure", "bytes", "note", title="cluster")
    unique, naive, up = (result["unique_bytes"], result["naive_upstream_bytes"],
                         result["upstream_bytes"])
    shared = result["shared_layers"]
    totals.add_row("unique layer bytes", human_bytes(unique),
                   f"{shared} layer{'s' if shared != 1 else ''} shared by several images")
    totals.add_row("naive upstream", human_bytes(naive), "every node pulls every image itself")
    totals.add_row("upstream, measured", human_bytes(up),
                   f"{up / unique:.3f} x unique, at the registry proxy")
    totals.add_row("from peers", human_bytes(result["peer_bytes"]), "agent to agent")
    totals.add_row("saved upstream", human_bytes(naive - up),
                   f"{(naive - up) / naive:.0%} of naive")
    totals.add_row("ready after", f"{result['seconds_to_ready']} s",
                   f"{result['nodes_ready']}/{result['nodes']} nodes Ready")
    console.print(totals)
    disk = Table("node", "blobs", "snapshots", "stored separately", "saved by sharing",
                 "containerd: blobs / snapshots", title="disk per warm node (status.disk)")
    for row in result["disk"]:
        disk.add_row(row["node"], *(human_bytes(row[k] or 0) for k in (
            "blobs", "snapshots", "separate", "saved")),
            f"{human_bytes(row['containerd_blobs'])} / "
            f"{human_bytes(row['containerd_snapshots'])}")
    console.print(disk)
    console.print(
        f"kubelet pull of {result['app_image']} on warmed node {result['app_pod_node_warm']}: "
        f"registry served {result['app_pull_registry_bytes']:,} bytes (expected "
        f"{result['app_pull_expected_bytes']:,}: its own layer, config and manifest) of a "
        f"{human_bytes(result['app_image_bytes'])} image.")
    console.print(
        f"kubelet pull time (Pulled event): {result['app_pod_pull_seconds_warm']} s on warmed "
        f"node {result['app_pod_node_warm']}, {result['app_pod_pull_seconds_cold']} s on cold "
        f"node {result['app_pod_node_cold']}; containerd {result['containerd_version']}.")
    console.print(f"LayerCache status: {status['nodes']['summary']} nodes, "
                  f"saved {status['bytes']['savedHuman']}")
