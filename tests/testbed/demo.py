"""`make demo`: layercache on the local bed with real images, and what it saved, measured.

Brings up the bed (3 nodes, registries, fault proxy, the image family), installs the CRDs
and RBAC from `manifests/`, runs the operator and one agent per node under their own
ServiceAccounts, applies `examples/layercache.yaml` (pointed at the bed's registry, through
the byte-counting proxy), waits for Ready, then proves the point with a kubelet-style CRI
pull of an app image that was never cached. Every byte figure is measured at the proxy or
read from containerd, not computed from assumptions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from layercache.units import human_bytes
from testbed.bed import BedState, ProcessRecord, TestBed
from testbed.cri import pull
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube, wait_for
from testbed.paths import REPO
from testbed.product import install, start_agent, start_operator

EXAMPLE = REPO / "examples" / "layercache.yaml"
EXAMPLE_REGISTRY = "127.0.0.1:5000"
#: The app the demo pulls after warming: built on python, which the example caches.
APP = "app-py-b"


def run(workdir: Path, report: Path, console: Console) -> dict[str, Any]:
    """Run the demo in `workdir` (left running: `make demo-down`); write `report`; return it.

    Raises:
        ComponentError, TimeoutError: a part did not start, or the cache never got Ready.
    """
    started = time.monotonic()
    bed = TestBed(workdir, nodes=3)
    state = bed.up()
    console.print(f"test bed up in {state.ready_seconds} s: {len(state.nodes)} nodes, "
                  f"Kubernetes {state.kubernetes_version}")
    kube = Kube(Path(state.kubeconfig))
    family = Family.load(Path(state.family or "").parent)
    proxy = FaultProxy(state.proxy_url or "")
    try:
        return _run(state, kube, family, proxy, workdir, report, console, started)
    finally:
        proxy.close()
        kube.close()


def _run(state: BedState, kube: Kube, family: Family, proxy: FaultProxy, workdir: Path,
         report: Path, console: Console, started: float) -> dict[str, Any]:
    install(kube, "rbac-operator.yaml", "rbac-agent.yaml")
    operator, _ = start_operator(state, kube, workdir / "layercache")
    processes = [operator]
    wait_for(lambda: kube.core.list_namespaced_secret(
        "layercache-system", field_selector="metadata.name=layercache-peer-token").items,
        what="the peer token Secret")
    for node in state.nodes:
        processes.append(start_agent(state, kube, node, workdir / "layercache")[0])
    state.processes += [ProcessRecord(p.name, p.pid, str(p.log)) for p in processes]
    state.save()
    proxy.reset()  # from here on, every byte the registry serves is layercache's doing
    cache = yaml.safe_load(EXAMPLE.read_text().replace(EXAMPLE_REGISTRY, proxy.host))
    applied = time.monotonic()
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(cache))
    ns, name = cache["metadata"]["namespace"], cache["metadata"]["name"]

    def ready() -> dict[str, Any] | None:
        obj: dict[str, Any] = kube.custom.get_namespaced_custom_object(
            "layercache.dev", "v1alpha1", ns, "layercaches", name)
        conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
        return obj if conditions.get("Ready", {}).get("status") == "True" else None
    console.print(f"applied {EXAMPLE.relative_to(REPO)}; waiting for Ready …")
    obj = wait_for(ready, timeout=600, interval=1, what=f"LayerCache {ns}/{name} Ready")
    ready_seconds = time.monotonic() - applied
    warm = proxy.stats()
    nodes = {n["metadata"]["name"]: n for n in kube.custom.list_cluster_custom_object(
        "layercache.dev", "v1alpha1", "nodelayercaches")["items"]}
    status = obj["status"]
    app_pull = _app_pull(state, family, proxy)
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
        "seconds_total": round(time.monotonic() - started, 1),
        **app_pull,
    }
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2) + "\n")
    _print(console, result, nodes, status)
    return result


def _app_pull(state: BedState, family: Family, proxy: FaultProxy) -> dict[str, Any]:
    """CRI-pull APP on the first node; the registry's bytes for it, measured and expected."""
    image = family.images[APP]
    manifest = image.resolve()
    cached = {d for name in ("python", "curl", "nginx")
              for d in family.images[name].resolve().layers}
    own = [d for d in manifest.layers if d not in cached]
    proxy.reset()
    pull(state.nodes[0].socket, f"{proxy.host}/{image.reference}")
    stats = proxy.stats()
    return {
        "app_image": image.reference,
        "app_pull_registry_bytes": stats.total_bytes,
        "app_pull_expected_bytes": manifest.size + manifest.config_size
        + sum(family.layer(d).size for d in own),
        "app_image_bytes": sum(family.layer(d).size for d in manifest.layers),
    }


def _print(console: Console, result: dict[str, Any], nodes: dict[str, Any],
           status: dict[str, Any]) -> None:
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
    console.print(
        f"kubelet-style pull of {result['app_image']} on one node: registry served "
        f"{result['app_pull_registry_bytes']:,} bytes (expected "
        f"{result['app_pull_expected_bytes']:,}: its own layer, config and manifest) of a "
        f"{human_bytes(result['app_image_bytes'])} image.")
    console.print(f"LayerCache status: {status['nodes']['summary']} nodes, "
                  f"saved {status['bytes']['savedHuman']}")
