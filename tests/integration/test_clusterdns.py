"""The bed's cluster DNS (`testbed.clusterdns`) against the real apiserver.

A ClusterIP Service answers with its ClusterIP; a headless one with the addresses of its
ready endpoints (an EndpointSlice, as the endpoint-slice controller writes for Pods); the
search-path tries of a Pod's `ndots:5` and names outside the cluster domain get NXDOMAIN.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from testbed.bed import BedState
from testbed.clusterdns import start_cluster_dns
from testbed.kube import Kube
from testbed.procs import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def dns(bed: BedState, tmp_path: Path) -> Iterator[int]:
    """The cluster DNS on 127.0.0.1:<port>; yields the port."""
    port = free_port()
    proc = start_cluster_dns(tmp_path, Path(bed.kubeconfig), "127.0.0.1", port)
    try:
        yield port
    finally:
        proc.stop()


def _ask(port: int, name: str, tcp: bool = False) -> tuple[int, list[str]]:
    reply = DNSRecord.parse(DNSRecord.question(name).send("127.0.0.1", port, tcp=tcp,
                                                          timeout=5))
    return reply.header.rcode, sorted(str(rr.rdata) for rr in reply.rr
                                      if rr.rtype == QTYPE.A)


def test_services_resolve_as_in_a_cluster(kube: Kube, dns: int) -> None:
    ns = f"dns-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": ns}})
    try:
        svc = kube.core.create_namespaced_service(ns, {
            "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}})
        kube.core.create_namespaced_service(ns, {
            "metadata": {"name": "peers"},
            "spec": {"clusterIP": "None", "ports": [{"port": 9780}],
                     "selector": {"app": "peers"}}})
        kube.kubectl("-n", ns, "apply", "-f", "-", input="""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: peers-1, labels: {kubernetes.io/service-name: peers}}
addressType: IPv4
ports: [{port: 9780}]
endpoints:
- addresses: [10.244.0.7]
  conditions: {ready: true}
- addresses: [10.244.1.9]
  conditions: {ready: true}
- addresses: [10.244.2.4]
  conditions: {ready: false}
""")
        assert _ask(dns, f"web.{ns}.svc.cluster.local") == (RCODE.NOERROR,
                                                            [svc.spec.cluster_ip])
        assert _ask(dns, f"peers.{ns}.svc.cluster.local.", tcp=True) == (
            RCODE.NOERROR, ["10.244.0.7", "10.244.1.9"])  # the not-ready one left out
        # What `ndots:5` tries first for "web.<ns>.svc" from a Pod in <ns>, and strangers.
        for name in (f"web.{ns}.svc.{ns}.svc.cluster.local", f"nope.{ns}.svc.cluster.local",
                     "example.com", "cluster.local"):
            assert _ask(dns, name) == (RCODE.NXDOMAIN, []), name
    finally:
        kube.core.delete_namespace(ns)
