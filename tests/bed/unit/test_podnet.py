"""The kubelet bed's addressing and node configs (`testbed.podnet`), as data.

Pure: slots, subnets, node IPs and cluster CIDRs; the CNI network and kube-proxy config a
node gets. The namespaces, bridge and pod traffic themselves run in
tests/bed/integration/test_pod_network.py.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from testbed import podnet
from testbed.podnet import (
    BED_NETWORKS,
    DNS_SERVICE_IP,
    POD_NETWORKS,
    SLOTS,
    BedNetwork,
    NodeNamespace,
    corefile,
    dns_objects,
    kube_proxy_config,
    node_argv,
)


def test_each_slot_has_its_own_subnet_and_cluster_cidr_inside_the_bed_ranges() -> None:
    nets = [BedNetwork(slot, Path("/tmp/bed")) for slot in range(SLOTS)]
    subnets = [n.subnet for n in nets]
    clusters = [ipaddress.IPv4Network(n.cluster_cidr) for n in nets]
    assert all(s.subnet_of(BED_NETWORKS) for s in subnets)
    assert all(c.subnet_of(POD_NETWORKS) for c in clusters)
    assert len(set(subnets)) == len(set(clusters)) == SLOTS
    assert not any(a.overlaps(b) for i, a in enumerate(clusters) for b in clusters[i + 1:])
    third = nets[3]
    assert (third.bridge, third.gateway, str(third.subnet), third.cluster_cidr) == (
        "lcbed3", "10.250.3.1", "10.250.3.0/24", "10.244.48.0/20")
    assert [third.node_ip(i) for i in range(3)] == ["10.250.3.10", "10.250.3.11",
                                                     "10.250.3.12"]
    # Interface names fit IFNAMSIZ (15 characters) for every slot and many nodes.
    last = NodeNamespace("n", 49, Path("/tmp/bed/nodes/n49"), nets[-1])
    assert len(last.pod_bridge) <= 15 and len(nets[-1].bridge) <= 15


def test_cni_config_is_a_bridge_on_the_nodes_pod_cidr(tmp_path: Path) -> None:
    (tmp_path / "cni").mkdir()
    ns = NodeNamespace("layercache-worker2", 1, tmp_path, BedNetwork(0, tmp_path))
    network = json.loads(ns.write_cni_config("10.244.1.0/24").read_text())
    bridge, portmap = network["plugins"]
    assert (bridge["type"], bridge["bridge"], bridge["isGateway"]) == ("bridge", "lcb0p1", True)
    assert bridge["ipam"] == {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                              "routes": [{"dst": "0.0.0.0/0"}]}
    assert portmap["capabilities"] == {"portMappings": True}


def test_kube_proxy_serves_on_the_node_ip_and_leaves_conntrack_sizes_alone() -> None:
    ns = NodeNamespace("layercache-worker", 0, Path("/tmp/bed/nodes/n0"),
                       BedNetwork(2, Path("/tmp/bed")))
    config = kube_proxy_config(ns, Path("/tmp/bed/kube-proxy.kubeconfig"))
    assert (config["mode"], config["hostnameOverride"], config["clusterCIDR"]) == (
        "iptables", "layercache-worker", "10.244.32.0/20")
    assert config["healthzBindAddress"] == "10.250.2.10:10256"
    assert config["conntrack"]["maxPerCore"] == 0
    assert node_argv(42, ["ip", "addr"]) == [
        "nsenter", "--target=42", "--mount", "--net", "--uts", "--", "ip", "addr"]


def test_cluster_dns_serves_the_cluster_zone_on_the_bridge_only_and_forwards_nothing() -> None:
    text = corefile("10.250.1.1", Path("/tmp/bed/coredns.kubeconfig"), 20001, 20002)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == ".:53 {" and "bind 10.250.1.1" in lines
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa {" in lines
    assert "kubeconfig /tmp/bed/coredns.kubeconfig testbed" in lines
    assert (lines[4], lines[3]) == ("ready 127.0.0.1:20001", "health 127.0.0.1:20002")
    assert not any(line.startswith("forward") for line in lines)
    role, binding, service, endpoints = dns_objects("10.250.1.1")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "system:coredns"
    assert binding["subjects"][0]["name"] == "system:coredns"
    assert service["spec"]["clusterIP"] == DNS_SERVICE_IP == "10.96.0.10"
    assert "selector" not in service["spec"]  # its endpoints are the bed's, not pods'
    assert endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == "kube-dns"
    assert endpoints["endpoints"] == [{"addresses": ["10.250.1.1"]}]
    assert {(p["protocol"], p["port"]) for p in endpoints["ports"]} == {("UDP", 53), ("TCP", 53)}


def test_inotify_limit_is_raised_once_and_the_hosts_value_restored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sysctl, record = tmp_path / "max_user_instances", tmp_path / "cache" / "bed-sysctl.json"
    monkeypatch.setattr(podnet, "INOTIFY_SYSCTL", sysctl)
    monkeypatch.setattr(podnet, "SYSCTL_FILE", record)
    sysctl.write_text("128\n")
    podnet.raise_inotify_limit()
    podnet.raise_inotify_limit()  # a second bed: the host's value stays the one recorded
    assert sysctl.read_text() == str(podnet.INOTIFY_INSTANCES)
    assert json.loads(record.read_text()) == {str(sysctl): 128}
    podnet.restore_inotify_limit()
    assert (sysctl.read_text(), record.exists()) == ("128", False)
    sysctl.write_text("8192")  # a host above the floor is left alone
    podnet.raise_inotify_limit()
    assert (sysctl.read_text(), record.exists()) == ("8192", False)
