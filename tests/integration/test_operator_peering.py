"""Two operator replicas elect one leader with a coordination.k8s.io Lease in their namespace.

The replicas run as bed processes against the real apiserver, under the operator's
ServiceAccount and the RBAC of manifests/, so that a test can read each one's log, stop
it cleanly and see a deposed leader exit. The chart's operator Pods on the kubelet nodes
are killed the same way in tests/integration/test_chart_e2e.py (the leader's container
SIGKILLed through its node's CRI). Measured here: a killed leader (SIGKILL: no release) is
replaced within 60 s (the standby holds the Lease; it then plans a cache created meanwhile,
its own kopf start and the plan taking the rest); a clean stop hands the Lease over at
once; a leader whose Lease was taken stops writing and exits.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from testbed.bed import BedState
from testbed.images import Family
from testbed.kube import Kube, wait_for
from testbed.procs import Process
from testbed.product import NAMESPACE, install, start_operator

pytestmark = pytest.mark.integration

#: The issue's bound for a replacement after the leader's crash.
FAILOVER_SECONDS = 60
#: The Lease manifests/ name (the operator's Role may read and renew only this one).
LEASE = "layercache-operator"


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


def _leading(port: int) -> float | None:
    """The replica's ``layercache_operator_leader`` as its metrics port serves it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return next((s.value for family in text_string_to_metric_families(text)
                 for s in family.samples if s.name == "layercache_operator_leader"), None)


def _holder(kube: Kube, lease: str) -> str | None:
    spec = kube.kubectl("-n", NAMESPACE, "get", "lease", lease, "-o",
                        "jsonpath={.spec.holderIdentity}", "--ignore-not-found")
    return spec.strip() or None


def _leader(kube: Kube, lease: str, replicas: list[Process]) -> Process:
    """The replica whose log says it holds the Lease, checked against the Lease itself."""
    def which() -> Process | None:
        holder = _holder(kube, lease)
        leading = [p for p in replicas if holder and f"leader {holder}" in p.log.read_text()]
        return leading[0] if len(leading) == 1 else None
    found: Process = wait_for(which, timeout=60, what=f"one replica holding Lease {lease}")
    return found


@pytest.fixture
def namespace(kube: Kube) -> Any:
    install(kube, "rbac-operator.yaml")
    name = f"lease-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": name}})
    kube.kubectl("-n", NAMESPACE, "delete", "lease", LEASE, "--ignore-not-found")
    yield name
    kube.kubectl("-n", NAMESPACE, "delete", "lease", LEASE, "--ignore-not-found")
    kube.kubectl("delete", "namespace", name, "--wait=false")
    kube.kubectl("delete", "nodelayercaches", "--all", "--wait=false")


def test_a_killed_leader_is_replaced_within_60_seconds(
        bed: BedState, kube: Kube, family: Family, tmp_path: Path, namespace: str) -> None:
    lease = LEASE
    image = f"{(bed.proxy_url or '').removeprefix('http://')}/{family.images['curl'].reference}"
    started = [start_operator(bed, kube, tmp_path, standalone=False, name=n, lease=lease)
               for n in ("op-a", "op-b")]
    replicas = [p for p, _ in started]
    ports = {p.pid: port for p, port in started}
    try:
        leader = _leader(kube, lease, replicas)
        [standby] = [p for p in replicas if p is not leader]
        # Every replica answers a scrape with the operator's leader gauge (what `helm test`
        # reads through the metrics Service, which reaches either replica).
        assert wait_for(lambda: _leading(ports[leader.pid]) == 1.0, timeout=30,
                        what="the leader's layercache_operator_leader 1")
        assert _leading(ports[standby.pid]) == 0.0
        _apply(kube, namespace, "first", image)
        wait_for(lambda: f"{namespace}/first" in _caches_on_nodes(kube), timeout=90,
                 what="the first cache planned")
        assert _handled(leader.log, namespace, "first")
        assert not _handled(standby.log, namespace, "first")  # kopf never ran there
        lease_obj = kube.kubectl("-n", NAMESPACE, "get", "lease", lease, "-o", "yaml")
        assert yaml.safe_load(lease_obj)["spec"]["leaseDurationSeconds"] == 15
        # A crash: SIGKILL, so the Lease is not released and must expire.
        os.killpg(leader.pid, signal.SIGKILL)
        killed = time.monotonic()
        _apply(kube, namespace, "second", image)
        # Failover: the standby holds the Lease (and says so) once the killed leader's
        # renewal is 15 s overdue as it observed it.
        assert _leader(kube, lease, [standby]) is standby
        failover = time.monotonic() - killed
        wait_for(lambda: f"{namespace}/second" in _caches_on_nodes(kube), timeout=90,
                 what="the second cache planned by the new leader")
        planned = time.monotonic() - killed
        print(f"SIGKILL of the leader: the standby leads after {failover:.1f} s, "
              f"has planned the new cache after {planned:.1f} s")
        assert failover <= FAILOVER_SECONDS
        assert _handled(standby.log, namespace, "second")
        assert _leading(ports[standby.pid]) == 1.0
        # With no operator running, deleting a cache must not hang on a finalizer.
        standby.stop()
        kube.kubectl("-n", namespace, "delete", "layercaches", "--all", "--timeout=30s")
        assert not kube.custom.list_namespaced_custom_object(
            "layercache.dev", "v1alpha1", namespace, "layercaches")["items"]
    finally:
        for p in replicas:
            p.stop()


def test_a_clean_stop_hands_the_lease_over_at_once(
        bed: BedState, kube: Kube, tmp_path: Path, namespace: str) -> None:
    lease = LEASE
    started = [start_operator(bed, kube, tmp_path, standalone=False, name=n, lease=lease)
               for n in ("op-a", "op-b")]
    replicas = [p for p, _ in started]
    ports = {p.pid: port for p, port in started}
    try:
        leader = _leader(kube, lease, replicas)
        [standby] = [p for p in replicas if p is not leader]
        # Every replica answers a scrape with the operator's leader gauge (what `helm test`
        # reads through the metrics Service, which reaches either replica).
        assert wait_for(lambda: _leading(ports[leader.pid]) == 1.0, timeout=30,
                        what="the leader's layercache_operator_leader 1")
        assert _leading(ports[standby.pid]) == 0.0
        leader.stop()  # SIGTERM: kopf stops, then the Lease is released and the process ends
        released = time.monotonic()
        assert "released Lease" in leader.log.read_text()
        assert _leader(kube, lease, [standby]) is standby
        # Within the standby's 2 s retry period, not the 15 s lease duration: it took the
        # released Lease instead of waiting for it to expire.
        handover = time.monotonic() - released
        print(f"clean stop of the leader: the standby leads {handover:.1f} s after its exit")
        assert handover < 8
    finally:
        for p in replicas:
            p.stop()


def test_a_leader_that_lost_its_lease_stops_and_exits(
        bed: BedState, kube: Kube, family: Family, tmp_path: Path, namespace: str) -> None:
    # Another holder written into the Lease (as after a partition in which this replica
    # could not renew): the replica must stop writing and exit, not run on beside a leader.
    lease = LEASE
    image = f"{(bed.proxy_url or '').removeprefix('http://')}/{family.images['curl'].reference}"
    only, _ = start_operator(bed, kube, tmp_path, standalone=False, name="op-only", lease=lease)
    try:
        _leader(kube, lease, [only])
        kube.kubectl("-n", NAMESPACE, "patch", "lease", lease, "--type=merge", "-p",
                     '{"spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 3600}}')
        assert only.popen is not None
        proc = only.popen
        wait_for(lambda: proc.poll() is not None, timeout=30, what="the deposed leader exiting")
        assert proc.returncode == 1
        assert "lost Lease" in only.log.read_text()
        assert _holder(kube, lease) == "someone-else"  # it did not release what it lost
        _apply(kube, namespace, "after", image)
        time.sleep(5)
        assert f"{namespace}/after" not in _caches_on_nodes(kube)
    finally:
        only.stop()
