"""The bed's Kubernetes control plane: etcd, kube-apiserver, controller-manager, scheduler.

All four are the pinned upstream binaries (`make tools`), run as processes on 127.0.0.1 with
TLS everywhere and `--authorization-mode=Node,RBAC`, so RBAC tests meet the real authorizer.
Each component gets its own client certificate (CN = its user name, as kubeadm does) and its
own kubeconfig; the admin kubeconfig (O=system:masters) is what tests and users get.
"""

from __future__ import annotations

import ssl
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed import pki
from testbed.paths import tool
from testbed.podnet import NODE_CIDR_MASK
from testbed.procs import Process, free_port

#: Service CIDR; the first address is the `kubernetes` Service, hence in the server cert.
SERVICE_CIDR = "10.96.0.0/16"
#: Controllers the bed runs. Node lifecycle is off: simulated nodes have no kubelet to
#: heartbeat, so the controller would taint them unreachable and evict their pods.
CONTROLLERS = "*,-node-lifecycle-controller,-node-ipam-controller"


def write_kubeconfig(path: Path, server: str, ca: Path, cert: pki.CertPair, user: str) -> Path:
    """Write a kubeconfig for `user` authenticating with a client certificate; returns `path`."""
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "testbed", "cluster": {
            "server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(cert.cert), "client-key": str(cert.key)}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": user}}],
        "current-context": "testbed",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler under `workdir`.

    `start()` brings them up in order and returns once the apiserver's /readyz answers ok;
    `processes` lists what runs, for `stop()` and for the bed's state file.
    """

    workdir: Path
    ca: pki.CA
    api_port: int = field(default_factory=free_port)
    etcd_port: int = field(default_factory=free_port)
    #: Extra kube-apiserver flags (feature gates, admission plugins; tests use a bad one).
    apiserver_args: tuple[str, ...] = ()
    #: kube-controller-manager's `--controllers` (with kubelets the node lifecycle one runs).
    controllers: str = CONTROLLERS
    #: The apiserver's bind and advertise address. Not loopback (kubelet beds: the bed
    #: bridge's, `testbed.podnet`): the `kubernetes` Service's endpoint, reached from pods.
    address: str = "127.0.0.1"
    #: Pod CIDR the controller-manager allocates node podCIDRs (/24) from; None: none.
    cluster_cidr: str | None = None
    processes: list[Process] = field(default_factory=list)

    @property
    def server(self) -> str:
        """The apiserver URL, https://ADDRESS:PORT (`address`, by default 127.0.0.1)."""
        return f"https://{self.address}:{self.api_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        """Kubeconfig of the cluster admin (O=system:masters)."""
        return self.workdir / "admin.kubeconfig"

    def _kubeconfig(self, name: str, user: str, orgs: tuple[str, ...] = ()) -> Path:
        cert = self.ca.issue(name, user, orgs=orgs, client=True)
        return write_kubeconfig(self.workdir / f"{name}.kubeconfig", self.server,
                                self.ca.cert, cert, user)

    def start_etcd(self) -> Process:
        """Start etcd on 127.0.0.1 (plain HTTP: it is reachable from loopback only)."""
        peer = free_port()
        url = f"http://127.0.0.1:{self.etcd_port}"
        etcd = Process("etcd", [
            tool("etcd"), "--name=testbed", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=testbed=http://127.0.0.1:{peer}",
            "--listen-metrics-urls=", "--log-level=warn",
            # Snapshots and unsafe fsync settings: this etcd is a throwaway on a shared disk.
            "--unsafe-no-fsync", "--snapshot-count=100000",
        ], self.workdir / "logs" / "etcd.log").start()
        self.processes.append(etcd)
        return etcd

    def wait_etcd(self, etcd: Process, timeout: float = 30) -> None:
        """Block until etcd's /health reports healthy."""
        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health",
                                        timeout=2) as r:
                return b'"health":"true"' in r.read()
        etcd.wait_ready(healthy, timeout)

    def start_apiserver(self, timeout: float = 90) -> None:
        """Start kube-apiserver and wait for /readyz (needs etcd up)."""
        serving = self.ca.issue("apiserver", "kube-apiserver", hosts=(
            *dict.fromkeys(("127.0.0.1", self.address)), "localhost", "10.96.0.1",
            "kubernetes", "kubernetes.default",
            "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"))
        sa = pki.service_account_keys(self.workdir)
        self._kubeconfig("admin", "kubernetes-admin", ("system:masters",))
        apiserver = Process("kube-apiserver", [
            tool("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.address}", f"--advertise-address={self.address}",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={self.ca.cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa.cert}",
            f"--service-account-signing-key-file={sa.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            "--enable-priority-and-fairness=false", "--profiling=false",
            # On loopback no pod could use the `kubernetes` Service's endpoint: none is kept.
            *(["--endpoint-reconciler-type=none"] if self.address == "127.0.0.1" else []),
            *self.apiserver_args,
        ], self.workdir / "logs" / "kube-apiserver.log").start()
        self.processes.append(apiserver)
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        # Client certificates live beside the CA that issued them.
        context.load_cert_chain(self.ca.directory / "admin.crt", self.ca.directory / "admin.key")

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.server}/readyz", context=context,
                                        timeout=5) as r:
                return r.status == 200
        apiserver.wait_ready(ready, timeout)

    def start_controllers(self) -> list[Process]:
        """Start controller-manager and scheduler (readiness: see `wait_controllers`)."""
        sa_key = self.workdir / "sa.key"
        cm_config = self._kubeconfig("controller-manager", "system:kube-controller-manager")
        sched_config = self._kubeconfig("scheduler", "system:kube-scheduler")
        self.cm_port, self.sched_port = free_port(), free_port()
        started = [
            Process("kube-controller-manager", [
                tool("kube-controller-manager"), f"--kubeconfig={cm_config}",
                f"--authentication-kubeconfig={cm_config}",
                f"--authorization-kubeconfig={cm_config}",
                "--bind-address=127.0.0.1", f"--secure-port={self.cm_port}",
                "--leader-elect=false", f"--controllers={self.controllers}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={self.ca.cert}", "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false",
                *([] if self.cluster_cidr is None else [
                    "--allocate-node-cidrs=true", f"--cluster-cidr={self.cluster_cidr}",
                    f"--node-cidr-mask-size={NODE_CIDR_MASK}"]),
            ], self.workdir / "logs" / "kube-controller-manager.log").start(),
            Process("kube-scheduler", [
                tool("kube-scheduler"), f"--kubeconfig={sched_config}",
                f"--authentication-kubeconfig={sched_config}",
                f"--authorization-kubeconfig={sched_config}",
                "--bind-address=127.0.0.1", f"--secure-port={self.sched_port}",
                "--leader-elect=false", "--profiling=false",
            ], self.workdir / "logs" / "kube-scheduler.log").start(),
        ]
        self.processes += started
        return started

    def wait_controllers(self, procs: list[Process], timeout: float = 60) -> None:
        """Block until controller-manager and scheduler answer /healthz."""
        context = ssl.create_default_context()
        # Their serving certs are self-signed at start-up; this probe checks liveness only.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for proc, port in zip(procs, (self.cm_port, self.sched_port), strict=True):
            def healthy(port: int = port) -> bool:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz",
                                            context=context, timeout=2) as r:
                    return r.status == 200
            proc.wait_ready(healthy, timeout)

    def stop(self) -> None:
        """Stop every component, newest first."""
        for proc in reversed(self.processes):
            proc.stop()
