"""Two operator replicas: one active (kopf peering, highest priority), the other takes over."""

from __future__ import annotations

import re
import urllib.request
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


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def _replans(port: int) -> float:
    match = re.search(r'^layercache_operator_replans_total\{result="ok"\} (\S+)$', _metrics(port),
                      re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_demoted_replica_stops_writing_and_forgets_its_caches(
        bed: BedState, kube: Kube, family: Family, tmp_path: Path) -> None:
    # kopf pauses only its watchers on a standby; our replan, status and refresh loops must
    # stop too, or a replica outranked by a newcomer keeps writing from a frozen view.
    install(kube, "rbac-operator.yaml")
    namespace = f"demote-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": namespace}})
    image = f"{(bed.proxy_url or '').removeprefix('http://')}/{family.images['curl'].reference}"
    first = f'cache="{namespace}/first"'
    old, old_port = start_operator(bed, kube, tmp_path, standalone=False, name="op-old",
                                   priority=100)
    new = None
    try:
        _apply(kube, namespace, "first", image)
        wait_for(lambda: f"{namespace}/first" in _caches_on_nodes(kube), timeout=90,
                 what="the first cache planned by the only replica")
        wait_for(lambda: first in _metrics(old_port), timeout=30,
                 what="the active replica exporting the cache's gauges")
        new, new_port = start_operator(bed, kube, tmp_path, standalone=False, name="op-new",
                                       priority=200)
        wait_for(lambda: first not in _metrics(old_port), timeout=60,
                 what="the outranked replica forgetting its caches")
        assert "standby (" in old.log.read_text()
        replans_after_demotion = _replans(old_port)
        # The newcomer adopts what exists (its kopf never saw it change) and plans the next.
        wait_for(lambda: first in _metrics(new_port), timeout=60,
                 what="the new active replica adopting the existing cache")
        _apply(kube, namespace, "second", image)
        wait_for(lambda: f"{namespace}/second" in _caches_on_nodes(kube), timeout=90,
                 what="the second cache planned by the new active replica")
        assert _replans(old_port) == replans_after_demotion
        assert f'cache="{namespace}/second"' not in _metrics(old_port)
    finally:
        old.stop()
        if new is not None:
            new.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false")
        kube.kubectl("delete", "nodelayercaches", "--all", "--wait=false")
