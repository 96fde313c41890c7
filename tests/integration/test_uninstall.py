"""Uninstalling leaves no layercache content pinned on any node.

Both ways: the chart's pre-delete hook, and the documented kubectl sequence for the plain
manifests.

The operator and the agents run as bed processes under their ServiceAccounts (the Pods of
the chart do not run on the bed yet). The hook's *Job as a Pod* waits for the pod network;
here the hook's own command, taken from the rendered Job, runs as a process under the hook's
own ServiceAccount and RBAC (rendered from the chart and applied), against the real
apiserver. Every node's containerd is then read through its content API: no blob carries
any label of ours (`containerd.io/gc.root` set by us, `layercache.dev/*`).
"""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from layercache.containerd.content import ContentStore
from layercache.containerd.labels import CACHE_LABEL_PREFIX, MANAGED_BY_LABEL
from testbed.bed import BedState
from testbed.e2e import LayerCacheCluster, apply_cache, clear_family, is_ready, wait_cache
from testbed.images import Family
from testbed.install import is_hook, render_chart
from testbed.kube import Kube, service_account_kubeconfig
from testbed.paths import REPO, tool
from testbed.product import NAMESPACE, install

pytestmark = pytest.mark.integration

HOOK_NAMESPACE = "layercache-hook"


def _labelled_blobs(socket: str) -> list[str]:
    """Digests of blobs in the node's `k8s.io` content store carrying a label of ours."""
    async def main() -> list[str]:
        async with ContentStore(socket) as store:
            return [str(i.digest) for i in await store.list()
                    if MANAGED_BY_LABEL in i.labels
                    or any(k.startswith(CACHE_LABEL_PREFIX) for k in i.labels)]
    return asyncio.run(main())


def _pinned_everywhere(bed: BedState) -> dict[str, int]:
    return {n.name: len(_labelled_blobs(n.socket)) for n in bed.nodes}


@pytest.fixture
def product(bed: BedState, kube: Kube, family: Family, tmp_path: Path
            ) -> Iterator[tuple[LayerCacheCluster, str]]:
    """The operator and an agent per node, and one Ready cache pinning layers on every node."""
    digests = [layer.digest for layer in family.layers]
    for node in bed.nodes:
        clear_family(node.socket, digests)
    cluster = LayerCacheCluster(bed, kube, tmp_path / "product").start()
    namespace = f"uninstall-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": namespace}})
    host = (bed.proxy_url or "").removeprefix("http://")
    try:
        apply_cache(kube, namespace, "all", {"images": [
            f"{host}/{family.images['app-curl'].reference}"]})
        wait_cache(kube, namespace, "all", is_ready, "Ready", cluster)
        pinned = _pinned_everywhere(bed)
        assert all(pinned.values()), pinned  # something to release on every node
        yield cluster, namespace
    finally:
        cluster.stop()
        kube.kubectl("delete", "layercaches", "--all", "-A", "--wait=false")
        kube.kubectl("delete", "namespace", namespace, "--wait=false")
        kube.kubectl("delete", "nodelayercaches", "--all", "--wait=false")
        for node in bed.nodes:
            clear_family(node.socket, digests)


def _hook_command(kube: Kube, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """The rendered pre-delete Job's command, and env to run it as the hook's ServiceAccount.

    The hook's ServiceAccount, ClusterRole and ClusterRoleBinding are applied as rendered.
    """
    hooks = [o for o in render_chart("hook", HOOK_NAMESPACE) if is_hook(o)
             and o["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"]
    assert sorted(o["kind"] for o in hooks) == [
        "ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"]
    if not kube.core.list_namespace(field_selector=f"metadata.name={HOOK_NAMESPACE}").items:
        kube.core.create_namespace({"metadata": {"name": HOOK_NAMESPACE}})
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(
        [o for o in hooks if o["kind"] != "Job"]))
    [job] = [o for o in hooks if o["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    kubeconfig = service_account_kubeconfig(kube, HOOK_NAMESPACE, pod["serviceAccountName"],
                                            workdir / "hook.kubeconfig")
    # The image's `layercache` is this checkout's, installed in the venv.
    argv = [str(Path(sys.executable).with_name(container["command"][0])), *container["args"]]
    return argv, {"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"}


def test_the_chart_pre_delete_hook_leaves_no_layer_pinned(
        bed: BedState, kube: Kube, product: tuple[LayerCacheCluster, str],
        tmp_path: Path) -> None:
    cluster, _ = product
    argv, env = _hook_command(kube, tmp_path)
    assert argv[1:] == ["cleanup", "--timeout", "240"]
    # An agent that does not run: the hook fails at its (here: shortened) deadline, naming
    # the node, instead of letting the uninstall strand that node's layers.
    stopped = bed.nodes[0]
    cluster.stop_agent(stopped.name)
    failed = subprocess.run([*argv[:-1], "8"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert failed.returncode == 1, failed
    assert f"node {stopped.name}: no agent report on generation" in failed.stderr
    assert "is its agent running?" in failed.stderr
    assert _pinned_everywhere(bed)[stopped.name] > 0
    cluster.start_agent(stopped)

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done
    assert "every node released its layers" in done.stdout
    assert _pinned_everywhere(bed) == {n.name: 0 for n in bed.nodes}
    assert not kube.custom.list_cluster_custom_object(
        "layercache.dev", "v1alpha1", "layercaches")["items"]


def _documented_sequence() -> list[str]:
    """The plain-manifests uninstall commands of docs/kind.md (its second console block)."""
    text = (REPO / "docs" / "kind.md").read_text()
    section = text.split("## Uninstall", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```console\n(.*?)```", section, re.DOTALL)
    [block] = [b for b in blocks if "kubectl delete -k manifests/" in b]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_documented_kubectl_sequence_leaves_no_layer_pinned(
        bed: BedState, kube: Kube, product: tuple[LayerCacheCluster, str]) -> None:
    cluster, _ = product
    commands = _documented_sequence()
    assert commands[-1] == "kubectl delete -k manifests/ --ignore-not-found"
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "kubectl", command
        done = subprocess.run([str(tool("kubectl")), "--kubeconfig", str(kube.kubeconfig),
                               *words[1:]], cwd=REPO, capture_output=True, text=True,
                              timeout=700)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    cluster.stop()
    assert _pinned_everywhere(bed) == {n.name: 0 for n in bed.nodes}
    # The shared install is gone with the manifests: give it back to the next tests.
    install(kube)
    assert kube.core.read_namespace(NAMESPACE).status.phase == "Active"
