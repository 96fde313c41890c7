"""The bed's control plane behaves like a real cluster: CRDs, controllers, scheduler, RBAC."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from testbed.bed import BedState
from testbed.kube import Kube, wait_for

pytestmark = pytest.mark.integration

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.bed.layercache.dev}
spec:
  group: bed.layercache.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer}}}
          status: {type: object, properties: {phase: {type: string}}}
"""


@pytest.fixture
def namespace(kube: Kube) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube.core.create_namespace({"metadata": {"name": name}})
    # The service-account controller creates `default`; pods are refused until it exists.
    wait_for(lambda: kube.core.list_namespaced_service_account(name).items, what="default SA")
    return name


def test_crd_status_subresource_round_trip(kube: Kube, namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=CRD)
    kube.wait_established("widgets.bed.layercache.dev", timeout=30)
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "bed.layercache.dev/v1", "kind": "Widget",
         "metadata": {"name": "w1"}, "spec": {"size": 3}}))
    # A status written with the main resource is ignored once the subresource exists...
    kube.kubectl("-n", namespace, "patch", "widget", "w1", "--type=merge",
                 "-p", '{"status": {"phase": "Ignored"}}')
    # ...and written through /status it sticks.
    kube.kubectl("-n", namespace, "patch", "widget", "w1", "--subresource=status",
                 "--type=merge", "-p", '{"status": {"phase": "Ready"}}')
    obj = kube.custom.get_namespaced_custom_object_status(
        "bed.layercache.dev", "v1", namespace, "widgets", "w1")
    assert obj["status"] == {"phase": "Ready"}
    assert obj["spec"] == {"size": 3}


def test_daemonset_gets_one_bound_pod_per_node(kube: Kube, bed: BedState,
                                               namespace: str) -> None:
    labels = {"app": "bed-ds"}
    kube.apps.create_namespaced_daemon_set(namespace, {
        "metadata": {"name": "bed-ds"},
        "spec": {"selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]},
        }},
    })

    def bound() -> list[str] | None:
        pods = kube.core.list_namespaced_pod(namespace, label_selector="app=bed-ds").items
        names = [p.spec.node_name for p in pods]
        return names if len(pods) == len(bed.nodes) and all(names) else None

    placed = wait_for(bound, timeout=60, what="one bound DaemonSet pod per node")
    assert sorted(placed) == sorted(n.name for n in bed.nodes)
    ds = kube.apps.read_namespaced_daemon_set("bed-ds", namespace)
    assert ds.status.desired_number_scheduled == len(bed.nodes)


def _api_status(bed: BedState, token: str, path: str) -> int:
    context = ssl.create_default_context(cafile=bed.ca_file)
    request = urllib.request.Request(f"{bed.server}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as r:
            json.load(r)
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_rbac_denies_without_role_and_allows_with_it(kube: Kube, bed: BedState,
                                                     namespace: str) -> None:
    for sa in ("nobody", "reader"):
        kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": sa}})
    kube.rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]})
    kube.rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    # Real bound tokens from the TokenRequest API, used as the pods would use them.
    tokens = {sa: kube.kubectl("-n", namespace, "create", "token", sa).strip()
              for sa in ("nobody", "reader")}
    pods = f"/api/v1/namespaces/{namespace}/pods"
    assert _api_status(bed, tokens["nobody"], pods) == 403
    assert _api_status(bed, tokens["reader"], pods) == 200
    # The role is namespaced and read-only: no Secrets, nothing elsewhere.
    assert _api_status(bed, tokens["reader"], f"/api/v1/namespaces/{namespace}/secrets") == 403
    assert _api_status(bed, tokens["reader"], "/api/v1/namespaces/default/pods") == 403
    assert _api_status(bed, "not-a-token", pods) == 401


def test_nodes_look_like_kubelet_registered_nodes(kube: Kube, bed: BedState) -> None:
    nodes = {n.metadata.name: n for n in kube.core.list_node().items}
    assert sorted(nodes) == sorted(n.name for n in bed.nodes)
    for rec in bed.nodes:
        node = nodes[rec.name]
        assert node.metadata.labels["kubernetes.io/hostname"] == rec.name
        assert node.metadata.labels["kubernetes.io/os"] == "linux"
        assert node.status.node_info.container_runtime_version.startswith("containerd://v2.3")
        assert node.status.node_info.kubelet_version == bed.kubernetes_version
        assert Path(node.metadata.annotations["layercache.dev/containerd-socket"]).is_socket()
