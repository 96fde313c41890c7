"""Readiness of a running bed, component by component (for `testbed-status` and tests)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from testbed.bed import BedState
from testbed.paths import containerd_tool, tool
from testbed.procs import pid_alive, run


@dataclass(frozen=True)
class ComponentStatus:
    """One row of `testbed-status`: `ready` is the result of a real probe, `detail` why."""

    kind: str
    name: str
    ready: bool
    detail: str


def _probe_http(url: str, context: ssl.SSLContext | None = None) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=3) as r:
            return r.status == 200, f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        # A registry with auth answers /v2/ with 401: it is up.
        return e.code == 401, f"HTTP {e.code}"
    except OSError as e:
        return False, str(e)


def check(state: BedState) -> list[ComponentStatus]:
    """Probe every process, the apiserver, each node (containerd and Node Ready), registries."""
    rows = [ComponentStatus("process", p.name, pid_alive(p.pid),
                            f"pid {p.pid}" if pid_alive(p.pid) else f"pid {p.pid} gone")
            for p in state.processes]
    pki_dir = Path(state.ca_file).parent
    context = ssl.create_default_context(cafile=state.ca_file)
    context.load_cert_chain(pki_dir / "admin.crt", pki_dir / "admin.key")
    ok, detail = _probe_http(f"{state.server}/readyz", context)
    rows.append(ComponentStatus("apiserver", state.server, ok, detail))
    ready_nodes = _ready_nodes(state) if ok else {}
    for node in state.nodes:
        try:
            run([containerd_tool("ctr", state.containerd), "--address", node.socket, "version"],
                timeout=5)
            runtime_ok, runtime = True, "containerd answers"
        except Exception as e:  # any failure of the probe means not ready
            runtime_ok, runtime = False, str(e).splitlines()[0]
        api = ready_nodes.get(node.name, "not registered")
        rows.append(ComponentStatus("node", node.name, runtime_ok and api == "Ready",
                                    f"{runtime}; Node {api}"))
    for reg in state.registries.values():
        reg_ctx = ssl.create_default_context(cafile=reg.ca_file) if reg.ca_file else None
        ok, detail = _probe_http(f"{reg.url}/v2/", reg_ctx)
        rows.append(ComponentStatus("registry", f"{reg.flavour} {reg.host}", ok, detail))
    if state.proxy_url:
        ok, detail = _probe_http(f"{state.proxy_url}/_proxy/stats")
        rows.append(ComponentStatus("fault proxy", state.proxy_url, ok, detail))
    return rows


def _ready_nodes(state: BedState) -> dict[str, str]:
    # kubectl, not the Python client: importing the client's CoreV1Api costs seconds of CPU.
    out = run([tool("kubectl"), f"--kubeconfig={state.kubeconfig}", "get", "nodes", "-o",
               "json"], timeout=20)
    result = {}
    for node in json.loads(out)["items"]:
        ready = [c for c in node["status"].get("conditions", []) if c["type"] == "Ready"]
        result[node["metadata"]["name"]] = (
            "Ready" if ready and ready[0]["status"] == "True" else "NotReady")
    return result
