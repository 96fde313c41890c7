"""The bed's cluster DNS: Service names to addresses, what CoreDNS's `kubernetes` plugin does.

Pods on kubelet nodes resolve `<service>.<namespace>.svc.<domain>` through the nameserver
their kubelet's `clusterDNS` names (the chart's `helm test` Pod looks up the operator's
metrics Service and the agents' headless Service). This is that nameserver, the subset
of the Kubernetes DNS specification (github.com/kubernetes/dns, docs/specification.md)
the bed needs, on dnslib's server:

- `A` for `<service>.<namespace>.svc.<domain>`: the ClusterIP, or for a headless Service
  the addresses of its ready endpoints (EndpointSlices labelled with its name);
- NXDOMAIN for any other name under `<domain>` (the search-path tries of `ndots:5`), and
  for every name outside it: nothing is forwarded, the bed has no upstream resolver.

Answers have a TTL of `TTL` seconds and are read from the apiserver per query (the bed's
clients ask rarely). Runs as a bed process: `python -m testbed.clusterdns --kubeconfig K
--address A [--port 53] [--domain cluster.local]`, UDP and TCP.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import threading
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import DNSServer

from testbed.procs import Process

#: Seconds clients may cache an answer (CoreDNS's default for the kubernetes plugin: 5).
TTL = 5
DOMAIN = "cluster.local"


class ServiceResolver:
    """Answers Service `A` queries under `domain` from the apiserver (`kubeconfig`)."""

    def __init__(self, kubeconfig: str, domain: str = DOMAIN) -> None:
        from kubernetes import client, config  # the bed process only

        api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.suffix = f".svc.{domain.strip('.')}"

    def addresses(self, name: str) -> list[str] | None:
        """IPv4 addresses of Service DNS name `name` (no trailing dot); None: no such name."""
        from kubernetes.client import ApiException

        if not name.endswith(self.suffix):
            return None
        parts = name[: -len(self.suffix)].split(".")
        if len(parts) != 2:
            return None
        service, namespace = parts
        try:
            svc = self.core.read_namespaced_service(service, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        if svc.spec.cluster_ip and svc.spec.cluster_ip != "None":
            return [svc.spec.cluster_ip]
        slices = self.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}").items
        return sorted({address for s in slices if s.address_type == "IPv4"
                       for e in s.endpoints or [] if e.conditions is None
                       or e.conditions.ready is not False for address in e.addresses})

    def resolve(self, request: Any, handler: Any) -> Any:
        """The reply to `request` (the resolver hook dnslib calls)."""
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        try:
            found = self.addresses(name)
        except Exception:  # the apiserver failed: SERVFAIL, keep serving
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if found is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
            for address in found:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=TTL))
        return reply


def serve(kubeconfig: str, address: str, port: int = 53, domain: str = DOMAIN) -> None:
    """Serve UDP and TCP on `address:port` until the process is killed."""
    ipaddress.ip_address(address)  # a clear error for a bad --address
    resolver = ServiceResolver(kubeconfig, domain)
    servers = [DNSServer(resolver, address=address, port=port, tcp=tcp, logger=_Quiet())
               for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    print(f"cluster DNS for *{resolver.suffix} on {address}:{port}", flush=True)
    threading.Event().wait()


def start_cluster_dns(workdir: Path, kubeconfig: Path, address: str, port: int = 53,
                      timeout: float = 30) -> Process:
    """Start the cluster DNS as a bed process on `address:port`; returns it once it answers.

    Raises:
        ComponentError: it exited or did not answer within `timeout` seconds.
    """
    from dnslib import DNSRecord

    workdir.mkdir(parents=True, exist_ok=True)
    proc = Process("clusterdns", [sys.executable, "-m", "testbed.clusterdns", "--kubeconfig",
                                  kubeconfig, "--address", address, "--port", str(port)],
                   workdir / "clusterdns.log").start()

    def answers() -> bool:
        DNSRecord.question(f"kubernetes.default.svc.{DOMAIN}").send(address, port, timeout=1)
        return True
    try:
        proc.wait_ready(answers, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


class _Quiet:
    """dnslib's logger hooks, silenced except for errors (its default logs every query)."""

    def __getattr__(self, name: str) -> Any:
        return (lambda *args: print("dns error", *args[1:], flush=True)) if name == "log_error" \
            else (lambda *args: None)


def main() -> None:
    """`python -m testbed.clusterdns`: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--domain", default=DOMAIN)
    args = parser.parse_args()
    serve(args.kubeconfig, args.address, args.port, args.domain)


if __name__ == "__main__":
    main()
