"""The product on the kubelet bed's nodes: the image loaded as `kind load` does, run in Pods.

`testbed load-image` imports `make image`'s build (cached) into every node's containerd,
namespace `k8s.io`, under the chart's default reference; a Pod on each node then runs it
with `imagePullPolicy: Never` (nothing is pulled), as the chart's Pods do with the image
values the bed sets. The kubelet's pull time is read back from its `Pulled` event, as
`make demo` reports it.

The chart itself, installed on these nodes, is tested in test_chart_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from kubernetes import client

from testbed.bed import BedState
from testbed.chart import ARCHIVE, pulled_seconds
from testbed.cri import crictl
from testbed.kube import Kube, wait_for
from testbed.product_image import DEFAULT_REFERENCE, BuiltImage, push_image

pytestmark = pytest.mark.integration


def _version_pod(name: str, node: str, image: str, pull_policy: str) -> dict[str, Any]:
    """A Pod on `node` that runs `layercache --version` from `image` once."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never",
                     "nodeSelector": {"kubernetes.io/hostname": node},
                     "containers": [{"name": "layercache", "image": image,
                                     "imagePullPolicy": pull_policy,
                                     "command": ["layercache", "--version"]}]}}


def _finished(kube: Kube, name: str) -> client.V1Pod:
    try:
        return wait_for(lambda: (p := kube.core.read_namespaced_pod(name, "default"))
                        .status.phase in ("Succeeded", "Failed") and p, timeout=300,
                        what=f"pod {name} finished")
    except TimeoutError as e:
        pod = kube.core.read_namespaced_pod(name, "default")
        raise AssertionError(f"{e}: {pod.status}") from None


def test_load_image_puts_the_product_on_every_node_and_pods_run_it(
        kubelet_bed: BedState, kubelet_kube: Kube, built: BuiltImage) -> None:
    cli = [sys.executable, "-m", "testbed.cli", "load-image", "--dir", kubelet_bed.workdir]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "COLUMNS": "300"})  # one line, unwrapped
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{DEFAULT_REFERENCE}@{built.manifest_digest}" in done.stdout
    assert (built.layout.parent / ARCHIVE).is_file()  # cached beside the build
    for i, node in enumerate(kubelet_bed.nodes):
        # CRI sees it under the chart's default name; its image ID is the config digest.
        [found] = [image for image in json.loads(crictl(node.socket, "images", "-o", "json",
                                                        timeout=30))["images"]
                   if DEFAULT_REFERENCE in image["repoTags"]]
        assert found["id"] == built.config_digest
        name = f"version-{i}"
        kubelet_kube.core.create_namespaced_pod(
            "default", _version_pod(name, node.name, DEFAULT_REFERENCE, "Never"))
        pod = _finished(kubelet_kube, name)
        assert (pod.status.phase, pod.spec.node_name) == ("Succeeded", node.name)
        assert kubelet_kube.kubectl("logs", name).strip() == f"layercache {built.version}"
        # Nothing was pulled: the kubelet found the image on the node.
        assert pulled_seconds(kubelet_kube, "default", name) is None
        kubelet_kube.core.delete_namespaced_pod(name, "default")


def test_the_kubelets_pull_time_is_read_from_its_pulled_event(
        kubelet_bed: BedState, kubelet_kube: Kube, built: BuiltImage) -> None:
    plain = kubelet_bed.registries["plain"].host
    reference = f"{plain}/layercache/layercache:{built.tag}"
    push_image(built, reference, tls_verify=False)
    # After the load (as on kind: load first, pull later). Seen the other way round: a node
    # whose kubelet had pulled this image ID under the registry's name then refused the
    # loaded name with ErrImageNeverPull. Here the pull finds the layers present.
    node = kubelet_bed.nodes[-1].name
    kubelet_kube.core.create_namespaced_pod("default", _version_pod("pulled", node, reference,
                                                            "Always"))
    pod = _finished(kubelet_kube, "pulled")
    assert pod.status.phase == "Succeeded"
    [event] = kubelet_kube.core.list_namespaced_event(
        "default", field_selector="involvedObject.name=pulled,reason=Pulled").items
    assert event.message.startswith(f'Successfully pulled image "{reference}" in ')
    seconds = pulled_seconds(kubelet_kube, "default", "pulled")
    # The kubelet's own figure, converted (Go prints "412.3ms" or "2.345678901s").
    took = event.message.split(" in ", 1)[1].split(" ", 1)[0]
    expected = float(took[:-2]) / 1000 if took.endswith("ms") else float(took[:-1])
    assert took.endswith("s") and seconds == pytest.approx(expected)
    assert 0 < seconds < 60
    kubelet_kube.core.delete_namespaced_pod("pulled", "default")
