"""The operator on the real bed: plans, node specs, status, bad input, nodes joining."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from testbed.bed import BedState
from testbed.images import Family
from testbed.kube import Kube, wait_for
from testbed.procs import ComponentError, Process
from testbed.product import NAMESPACE, install, start_operator

pytestmark = pytest.mark.integration
GROUP, VERSION = "layercache.dev", "v1alpha1"


@pytest.fixture(scope="module")
def operator_metrics(operator: Process) -> int:
    return operator.metrics_port  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
def operator(bed: BedState, kube: Kube, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Process]:
    install(kube, "rbac-operator.yaml")
    proc, metrics = start_operator(bed, kube, tmp_path_factory.mktemp("operator"))
    proc.metrics_port = metrics  # type: ignore[attr-defined]
    yield proc
    proc.stop()
    kube.kubectl("delete", "layercaches", "--all", "--all-namespaces", "--wait=false")
    kube.kubectl("delete", "nodelayercaches", "--all", "--wait=false")


@pytest.fixture
def namespace(kube: Kube) -> str:
    name = f"lc-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": name}})
    return name


def _apply(kube: Kube, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LayerCache",
         "metadata": {"name": name}, "spec": spec}))


def _cache(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kube.custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "layercaches", name)
    return obj


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == kind), None)


def _node_caches(kube: Kube) -> dict[str, dict[str, Any]]:
    items = kube.custom.list_cluster_custom_object(GROUP, VERSION, "nodelayercaches")["items"]
    return {i["metadata"]["name"]: i for i in items}


def _images(bed: BedState, family: Family, *names: str) -> list[str]:
    host = (bed.proxy_url or "").removeprefix("http://")
    return [f"{host}/{family.images[n].reference}" for n in names]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_plan_reaches_every_node_with_one_seeder_per_layer(
        operator: Process, operator_metrics: int, bed: BedState, kube: Kube, family: Family,
        namespace: str) -> None:
    apps = ("app-py-a", "app-py-b", "app-curl")
    _apply(kube, namespace, "apps", {"images": _images(bed, family, *apps)})

    def planned() -> dict[str, dict[str, Any]] | None:
        caches = _node_caches(kube)
        ok = all(len((caches.get(n.name) or {}).get("spec", {}).get("layers", [])) > 0
                 for n in bed.nodes)
        return caches if ok else None
    caches = wait_for(planned, timeout=90, what="a NodeLayerCache spec on every node")
    wanted = {d for name in apps for d in family.images[name].resolve().layers}
    for node in bed.nodes:
        layers = caches[node.name]["spec"]["layers"]
        assert {entry["digest"] for entry in layers} == wanted
        assert caches[node.name]["spec"]["caches"] == [f"{namespace}/apps"]
    for digest in wanted:
        sources = [e["source"] for n in bed.nodes for e in caches[n.name]["spec"]["layers"]
                   if e["digest"] == digest]
        assert sources.count("Upstream") == 1, digest
    status = wait_for(lambda: (_cache(kube, namespace, "apps").get("status") or {})
                      .get("bytes", {}).get("unique"), what="status bytes")
    assert status == family.unique_layer_bytes(apps)
    obj = _cache(kube, namespace, "apps")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert {i["digest"] for i in obj["status"]["images"]} == {
        family.images[n].manifest_digest for n in apps}
    # Naive: every node pulls every image itself; containerd de-duplicates within a node,
    # so each node costs the apps' distinct layers once — and we never claim that saving.
    assert obj["status"]["bytes"]["naive"] == len(bed.nodes) * family.unique_layer_bytes(apps)
    # No agents report yet: progressing, not ready.
    assert (_condition(obj, "Ready") or {}).get("status") == "False"
    # The operator exports what the status says, per cache, at scrape time.
    cache = (("cache", f"{namespace}/apps"),)
    metrics = wait_for(lambda: (m := _scrape(operator_metrics)).get(
        ("layercache_cache_unique_bytes", cache)) and m, what="cache metrics")
    assert metrics[("layercache_cache_unique_bytes", cache)] == family.unique_layer_bytes(apps)
    assert metrics[("layercache_cache_nodes", (*cache, ("state", "desired")))] == len(bed.nodes)
    assert metrics[("layercache_cache_ready", cache)] == 0
    assert metrics[("layercache_operator_replans_total", (("result", "ok"),))] >= 1


def test_bad_inputs_are_reported_not_fatal(operator: Process, bed: BedState, kube: Kube,
                                           family: Family, namespace: str) -> None:
    # The schema rejects what it can, before the operator sees it.
    with pytest.raises(ComponentError, match=r"spec\.mode"):
        _apply(kube, namespace, "bad-mode", {"images": ["x"], "mode": "Blobs"})
    cases = {
        "missing-image": ({"images": [*_images(bed, family, "base"),
                                      f"{bed.registries['plain'].host}/family/missing:v1"]},
            "ManifestNotFound", "family/missing"),
        "missing-secret": ({"images": _images(bed, family, "base"),
                            "pullSecrets": [{"name": "nope"}]}, "PullSecretMissing", "nope"),
        "no-nodes": ({"images": _images(bed, family, "base"),
                      "nodeSelector": {"pool": "does-not-exist"}}, "NoMatchingNodes",
                     "nodeSelector"),
        "tiny-budget": ({"images": _images(bed, family, "base"), "maxBytesPerNode": "1Mi"},
                        "BudgetExceeded", "maxBytesPerNode"),
        "bad-reference": ({"images": ["registry.example/Upper/Case:v1"]}, "InvalidSpec",
                          r"spec.images\[0\]"),
    }
    for name, (spec, _, _) in cases.items():
        _apply(kube, namespace, name, spec)
    for name, (_, reason, fragment) in cases.items():
        degraded = wait_for(lambda n=name: (c := _condition(_cache(kube, namespace, n),
                                                            "Degraded"))
                            and c["status"] == "True" and c, timeout=60, what=f"{name} Degraded")
        assert degraded["reason"] == reason, (name, degraded)
        assert re.search(fragment, degraded["message"]), degraded
    # One bad cache stops nothing: the operator is alive and a good cache still plans.
    assert operator.popen is not None and operator.popen.poll() is None
    _apply(kube, namespace, "good", {"images": _images(bed, family, "curl")})
    wait_for(lambda: (_cache(kube, namespace, "good").get("status") or {}).get(
        "bytes", {}).get("unique") == family.unique_layer_bytes(["curl"]), what="good planned")


def test_agent_status_makes_the_cache_ready_and_a_new_node_is_planned(
        operator: Process, bed: BedState, kube: Kube, family: Family, namespace: str,
        tmp_path: Path) -> None:
    _apply(kube, namespace, "ready", {"images": _images(bed, family, "nginx")})
    wait_for(lambda: all("ready" in str(_node_caches(kube).get(n.name, {}).get("spec", {})
                                         .get("caches")) for n in bed.nodes),
             what="nginx planned everywhere")
    # Stand in for the agents: report every node as holding its layers.
    for name, obj in _node_caches(kube).items():
        kube.custom.patch_cluster_custom_object_status(GROUP, VERSION, "nodelayercaches", name, {
            "status": {"observedGeneration": obj["metadata"]["generation"], "missing": [],
                       "layers": {"wanted": len(obj["spec"]["layers"]),
                                  "held": len(obj["spec"]["layers"])},
                       "bytes": {"upstream": 0, "peer": 0},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "AllHeld",
                                       "message": "", "lastTransitionTime":
                                       "2026-01-01T00:00:00Z"}]}})
    ready = wait_for(lambda: (c := _condition(_cache(kube, namespace, "ready"), "Ready"))
                     and c["status"] == "True" and c, timeout=60, what="cache Ready")
    assert ready["reason"] == "AllNodesReady"
    status = _cache(kube, namespace, "ready")["status"]
    assert status["nodes"]["summary"] == f"{len(bed.nodes)}/{len(bed.nodes)}"
    # A fourth node joins: it gets a spec whose layers all come from peers that hold them.
    kube.core.create_node({"metadata": {"name": "late-node", "labels": {
        "kubernetes.io/hostname": "late-node", "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux"}}})
    try:
        # Admission taints a new Node not-ready:NoSchedule; a cache that does not tolerate it
        # must skip it (asserted here), until the node is Ready and the taint lifted.
        time.sleep(3)
        assert "late-node" not in _node_caches(kube)
        kube.core.patch_node("late-node", {"spec": {"taints": None}})
        late = wait_for(lambda: _node_caches(kube).get("late-node"), what="late node planned")
        nginx = set(family.images["nginx"].resolve().layers)
        layers = [e for e in late["spec"]["layers"] if e["digest"] in nginx]
        assert {e["digest"] for e in layers} == nginx
        # Held by the three nodes already: fetched from them, never from upstream.
        assert all(e["source"] == "Peer" and e["peers"] for e in layers)
    finally:
        kube.core.delete_node("late-node")
    wait_for(lambda: "late-node" not in _node_caches(kube), what="late node's cache removed")


def _pod(kube: Kube, namespace: str, name: str, labels: dict[str, str], image: str,
         account: str, pull_secrets: tuple[str, ...] = ()) -> None:
    """A Pod with a spec and no kubelet to run it: it stays Pending, which is enough."""
    kube.core.create_namespaced_pod(namespace, {  # type: ignore[arg-type]
        "metadata": {"name": name, "labels": labels},
        "spec": {"serviceAccountName": account, "automountServiceAccountToken": False,
                 "imagePullSecrets": [{"name": s} for s in pull_secrets],
                 "containers": [{"name": "c", "image": image}]}})


def _resolved(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    """The cache's status.images once it has resolved its current generation."""
    def probe() -> list[dict[str, Any]] | None:
        status = _cache(kube, namespace, name).get("status") or {}
        images = status.get("images")
        return images if images is not None and status.get("bytes") else None
    return wait_for(probe, timeout=60, what=f"{name} resolved")


def test_images_from_honours_match_expressions(operator: Process, bed: BedState, kube: Kube,
                                               family: Family, namespace: str) -> None:
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": "runner"}})
    pods = {  # name: (labels, image); only "chosen" satisfies every expression
        "chosen": ({"tier": "a", "team": "x"}, "app-py-a"),
        "canary": ({"tier": "b", "team": "x", "track": "canary"}, "app-py-b"),  # NotIn
        "other-tier": ({"tier": "c", "team": "x"}, "curl"),                     # In
        "no-team": ({"tier": "a"}, "app-curl"),                                 # Exists
        "legacy": ({"tier": "a", "team": "x", "legacy": "yes"}, "app-web"),     # DoesNotExist
    }
    for name, (labels, image) in pods.items():
        _pod(kube, namespace, name, labels, _images(bed, family, image)[0], "runner")
    _apply(kube, namespace, "selected", {"imagesFrom": {"podSelector": {"matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["a", "b"]},
        {"key": "track", "operator": "NotIn", "values": ["canary"]},
        {"key": "team", "operator": "Exists"},
        {"key": "legacy", "operator": "DoesNotExist"}]}}})
    images = _resolved(kube, namespace, "selected")
    assert [(i["reference"], i.get("digest")) for i in images] == [
        (_images(bed, family, "app-py-a")[0], family.images["app-py-a"].manifest_digest)]
    # matchLabels and matchExpressions together, ANDed.
    _apply(kube, namespace, "both", {"imagesFrom": {"podSelector": {
        "matchLabels": {"team": "x"},
        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}}})
    assert sorted(i["reference"] for i in _resolved(kube, namespace, "both")) == sorted(
        _images(bed, family, "app-py-b", "curl"))


def test_images_from_uses_the_pods_service_account_pull_secrets(
        operator: Process, bed: BedState, kube: Kube, family: Family, namespace: str) -> None:
    token = bed.registries["token"]
    reference = f"{token.host}/{family.images['app-curl'].reference}"
    auth = base64.b64encode(f"{token.username}:{token.password}".encode()).decode()
    # The agents' Secret as an older operator wrote it (merged, kubernetes.io/dockerconfigjson):
    # its type cannot change in place, so the operator must recreate it.
    kube.kubectl("-n", NAMESPACE, "delete", "secret", "layercache-registry-credentials",
                 "--ignore-not-found")
    kube.core.create_namespaced_secret(NAMESPACE, {  # type: ignore[arg-type]
        "metadata": {"name": "layercache-registry-credentials"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": json.dumps({"auths": {}})}})
    kube.core.create_namespaced_secret(namespace, {  # type: ignore[arg-type]
        "metadata": {"name": "token-pull"}, "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": json.dumps({"auths": {token.host: {"auth": auth}}})}})
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": "builder"}})
    _pod(kube, namespace, "build", {"app": "builder"}, reference, "builder")
    # Given to the ServiceAccount after the Pod exists, so admission did not copy it into
    # the Pod: only the ServiceAccount names it, and no LayerCache does.
    kube.core.patch_namespaced_service_account(
        "builder", namespace, {"imagePullSecrets": [{"name": "token-pull"}]})
    pod = kube.core.read_namespaced_pod("build", namespace)
    assert not pod.spec.image_pull_secrets
    _apply(kube, namespace, "from-sa", {"imagesFrom": {"podSelector": {
        "matchLabels": {"app": "builder"}}}})
    images = _resolved(kube, namespace, "from-sa")
    assert [(i["reference"], i.get("digest"), i.get("error")) for i in images] == [
        (reference, family.images["app-curl"].manifest_digest, None)]
    degraded = _condition(_cache(kube, namespace, "from-sa"), "Degraded") or {}
    assert degraded.get("status") == "False", degraded
    # The credentials were copied for the agents under this cache's key, and nowhere else.
    def copied() -> dict[str, Any] | None:
        try:
            secret = kube.core.read_namespaced_secret("layercache-registry-credentials",
                                                      NAMESPACE)
        except ApiException as e:  # between the operator's delete and its re-create
            if e.status == 404:
                return None
            raise
        if secret.type != "Opaque":
            return None
        found: dict[str, Any] = json.loads(base64.b64decode(secret.data["caches.json"]))
        return found if f"{namespace}/from-sa" in found else None
    by_cache = wait_for(copied, timeout=30, what="the cache's credentials for the agents")
    assert by_cache[f"{namespace}/from-sa"] == [{"auths": {token.host: {"auth": auth}}}]
    assert not any(token.password in json.dumps(v) for k, v in by_cache.items()
                   if k != f"{namespace}/from-sa")
    # ... and never into the cache's status or Events.
    assert token.password not in json.dumps(_cache(kube, namespace, "from-sa"))
    assert token.password not in json.dumps(kube.api.sanitize_for_serialization(
        kube.core.list_namespaced_event(namespace)))
