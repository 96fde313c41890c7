"""What a first user hits (issue 10), against the bed's real parts.

- ``LAYERCACHE_INSECURE_REGISTRIES`` written with upper case and a padded port reaches the
  plain-HTTP registry from all three entry points: ``layercache plan``, the operator's
  settings and the agent's own wiring;
- a real agent fetches through the mirror that its node's containerd ``hosts.toml`` names
  when the registry itself does not answer, as containerd's own pull does;
- a real agent keeps the kubelet's image-filesystem eviction threshold (read from a
  KubeletConfiguration file) untouched: it refuses a fetch that would cross it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_agent_harness import (
    held,
    installed,  # noqa: F401 - autouse fixture: CRDs, RBAC and Secrets for the module
    layer_entry,
    one_agent,
    runnable_layers,
    status,
    wait_ready,
)

from layercache.agent.app import Agent
from layercache.agent.settings import AgentSettings
from layercache.containerd.cri import CRIImages
from layercache.controller.settings import OperatorSettings
from layercache.oci.platform import Platform
from layercache.oci.reference import parse_reference
from layercache.registry import RegistryClient, resolve
from testbed.bed import BedState
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube, wait_for
from testbed.procs import free_port

pytestmark = pytest.mark.integration

LAYERCACHE = str(Path(sys.executable).parent / "layercache")


def _mixed_case(host: str) -> tuple[str, str]:
    """(``LocalHost:0PORT`` as a user might write it, the image registry ``localhost:PORT``)."""
    port = host.rpartition(":")[2]
    return f"LocalHost:0{port}", f"localhost:{port}"


def _image(bed: BedState, family: Family) -> tuple[str, str, str]:
    """(insecure entry as written, image reference on the plain registry, its digest)."""
    written, registry = _mixed_case(bed.registries["plain"].host)
    image = next(iter(family.images.values()))
    return written, f"{registry}/{image.repository}:{image.tag}", image.manifest_digest


def _resolve(client: RegistryClient, reference: str) -> str:
    async def run() -> str:
        async with client:
            found = await resolve(client, parse_reference(reference), Platform("linux", "amd64"))
        return str(found.digest)
    return asyncio.run(run())


def test_insecure_registries_written_in_mixed_case_reach_the_registry_from_plan(
    bed: BedState, family: Family
) -> None:
    written, reference, _ = _image(bed, family)
    env = {**os.environ, "LAYERCACHE_INSECURE_REGISTRIES": written}
    result = subprocess.run([LAYERCACHE, "plan", reference, "--output", "json"], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert reference in result.stdout


def test_insecure_registries_written_in_mixed_case_reach_the_registry_from_the_operator(
    bed: BedState, family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    written, reference, digest = _image(bed, family)
    monkeypatch.setenv("LAYERCACHE_INSECURE_REGISTRIES", written)
    settings = OperatorSettings()
    registries, default = settings.registry_options()  # what the reconciler's client gets
    assert list(registries) == [reference.partition("/")[0]]
    assert _resolve(RegistryClient(registries=registries, default=default),
                    reference) == digest


def test_insecure_registries_written_in_mixed_case_reach_the_registry_from_the_agent(
    bed: BedState, family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    written, reference, digest = _image(bed, family)
    node = bed.nodes[0]
    for name, value in {"LAYERCACHE_INSECURE_REGISTRIES": written, "NODE_NAME": node.name,
                        "LAYERCACHE_KUBECONFIG": bed.kubeconfig,
                        "LAYERCACHE_CONTAINERD_SOCKET": node.socket}.items():
        monkeypatch.setenv(name, value)

    async def through_the_agent() -> str:
        agent = Agent(AgentSettings())  # the agent's own wiring of its registry client
        try:
            found = await resolve(agent.registry, parse_reference(reference),
                                  Platform("linux", "amd64"))
        finally:
            await agent.close()
        return str(found.digest)
    assert asyncio.run(through_the_agent()) == digest


def _hosts_toml(server: str, mirrors: list[str]) -> str:
    lines = [f'server = "{server}"', ""]
    for mirror in mirrors:
        lines += [f'[host."{mirror}"]', '  capabilities = ["pull", "resolve"]', ""]
    return "\n".join(lines)


def test_agent_fetches_through_the_nodes_hosts_toml_mirror_when_the_registry_is_unreachable(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    # A registry host nothing answers on (an egress-restricted node's view of the internet),
    # mirrored first by another dead host, then by the bed's registry (through the proxy).
    node = bed.nodes[2]
    dead, dead_mirror = f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    hosts_dir = Path(node.workdir) / "certs.d" / dead
    hosts_dir.mkdir(parents=True)
    (hosts_dir / "hosts.toml").write_text(
        _hosts_toml(f"http://{dead}", [dead_mirror, proxy.url]))
    layer = runnable_layers(family)[3]
    users = family.layer_users()[layer.digest]
    image = family.images[users[0]]
    path = f"/v2/{image.repository}/blobs/{layer.digest}"
    entry: dict[str, Any] = layer_entry(family, dead, layer, "Upstream")
    assert entry["repository"].startswith(dead + "/")
    env = {"LAYERCACHE_REGISTRY_CONFIG_PATH": str(Path(node.workdir) / "certs.d")}
    try:
        # The node's own containerd takes the same way (the file is valid for it).
        pulled = asyncio.run(CRIImages(node.socket).pull(
            f"{dead}/{image.repository}@{image.manifest_digest}"))
        assert pulled
        proxy.reset()
        with one_agent(kube, node, [entry], tmp_path, env) as agent:
            found = wait_ready(kube, agent, 180)
            assert held(node.socket)[layer.digest] == layer.size
            assert found["bytes"]["upstream"] == layer.size
            assert proxy.stats().bytes_by_path.get(path) == layer.size
    finally:
        (hosts_dir / "hosts.toml").unlink()
        hosts_dir.rmdir()
        asyncio.run(CRIImages(node.socket).remove(
            f"{dead}/{image.repository}@{image.manifest_digest}"))


def test_agent_keeps_the_kubelets_imagefs_eviction_threshold(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    node = bed.nodes[1]
    stat = os.statvfs(node.workdir)  # the node's containerd root is under it
    free = 100 * stat.f_bavail / stat.f_blocks
    # Just under today's free share: any fetch would leave the node within 5 points of
    # the kubelet's eviction (and the kubelet evicts at its own threshold).
    threshold = int(free) - 2
    if threshold < 11:
        pytest.skip(f"only {free:.0f} % free here: the old 10 % floor would refuse too")
    config = tmp_path / "kubelet-config.yaml"
    config.write_text("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
                      f"evictionHard:\n  imagefs.available: \"{threshold}%\"\n"
                      "  nodefs.available: \"10%\"\nimageGCHighThresholdPercent: 95\n")
    layer = runnable_layers(family)[4]
    entry = layer_entry(family, proxy.host, layer, "Upstream")
    env = {"LAYERCACHE_INSECURE_REGISTRIES": proxy.host,
           "LAYERCACHE_KUBELET_CONFIG": str(config)}
    with one_agent(kube, node, [entry], tmp_path, env) as agent:
        def refused() -> dict[str, Any] | None:
            assert agent.alive(), agent.tail()
            found = status(kube, node.name)
            return found if found.get("diskPressure") is True else None
        found = wait_for(refused, 120, 0.5, "diskPressure in status")
        [error] = [e for e in found["errors"] if e["reason"] == "DiskPressure"]
        assert f"evictionHard imagefs.available={threshold}%" in error["message"]
        assert layer.digest not in held(node.socket)
        assert proxy.stats().bytes_by_path.get(
            f"/v2/{family.images[family.layer_users()[layer.digest][0]].repository}"
            f"/blobs/{layer.digest}", 0) == 0
