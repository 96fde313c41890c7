"""Two operator replicas: one active (kopf peering, highest priority), the other takes over."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.bed import BedState
from testbed.images import Family
from testbed.kube import Kube, wait_for
from testbed.product import install, start_operator

pytestmark = pytest.mark.integration


def _caches_on_nodes(kube: Kube) -> set[str]:
    items: list[dict[str, Any]] = kube.custom.list_cluster_custom_object(
        "layercache.dev", "v1alpha1", "nodelayercaches")["items"]
    return {c for i in items for c in (i.get("spec") or {}).get("caches") or []}


def _apply(kube: Kube, namespace: str, name: str, image: str) -> None:
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "layercache.dev/v1alpha1", "kind": "LayerCache",
         "metadata": {"name": name}, "spec": {"images": [image]}}))


def _handled(log: Path, namespace: str, name: str) -> bool:
    return f"[{namespace}/{name}] Handler 'reconcile' succeeded" in log.read_text()


def test_one_replica_is_active_and_the_other_takes_over(
        bed: BedState, kube: Kube, family: Family, tmp_path: Path) -> None:
    install(kube, "rbac-operator.yaml")
    namespace = f"peer-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": namespace}})
    image = f"{(bed.proxy_url or '').removeprefix('http://')}/{family.images['curl'].reference}"
    active, _ = start_operator(bed, kube, tmp_path, standalone=False, name="op-a", priority=200)
    standby, _ = start_operator(bed, kube, tmp_path, standalone=False, name="op-b", priority=100)
    try:
        _apply(kube, namespace, "first", image)
        wait_for(lambda: f"{namespace}/first" in _caches_on_nodes(kube), timeout=90,
                 what="the first cache planned")
        assert _handled(active.log, namespace, "first")
        assert not _handled(standby.log, namespace, "first")
        active.stop()  # a clean exit leaves the peering object: the standby resumes
        _apply(kube, namespace, "second", image)
        wait_for(lambda: f"{namespace}/second" in _caches_on_nodes(kube), timeout=120,
                 what="the second cache planned by the standby")
        assert _handled(standby.log, namespace, "second")
        # With no operator running, deleting a cache must not hang on a finalizer.
        standby.stop()
        kube.kubectl("-n", namespace, "delete", "layercaches", "--all", "--timeout=30s")
        assert not kube.custom.list_namespaced_custom_object(
            "layercache.dev", "v1alpha1", namespace, "layercaches")["items"]
    finally:
        active.stop()
        standby.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false")
        kube.kubectl("delete", "nodelayercaches", "--all", "--wait=false")
