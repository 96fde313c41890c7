"""The whole test bed: control plane, simulated nodes, registries, fault proxy, image family.

`TestBed(workdir).up()` starts everything (independent parts in parallel), seeds the image
family and writes `state.json`, which is all another process needs to use the bed or to
stop it (`testbed-down` runs in a different process from `testbed-up`). Any failure during
`up()` tears down what did start before the error propagates.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from testbed import pki, podnet
from testbed.controlplane import ControlPlane, write_kubeconfig
from testbed.faultproxy import start_fault_proxy
from testbed.images import build_family, push_family
from testbed.kubelet import (
    Kubelet,
    is_kubelet,
    kill_strays,
    kubelet_node_dirs,
    pause_image,
    probe_image,
    remove_cgroups,
    stop_pods,
    wait_pod_cidrs,
    wait_registered,
)
from testbed.nodes import SANDBOX_IMAGE, RegistryHost, SimNode, containerd_version, unmount_under
from testbed.paths import containerd_profile
from testbed.procs import Process, pid_alive, stop_group
from testbed.registry import FLAVOURS, Flavour, Registry, start_registry

#: Kubernetes version of the pinned build (tests/testbed/tools/build.sh).
KUBERNETES_VERSION = "v1.37.2"
#: Node names: kind's worker naming, so examples read the same on kind and on the bed.
NODE_PREFIX = "layercache-worker"


def node_name(index: int) -> str:
    """Name kind gives worker `index` (0-based): layercache-worker, layercache-worker2 and so on."""
    return NODE_PREFIX if index == 0 else f"{NODE_PREFIX}{index + 1}"


@dataclass
class ProcessRecord:
    """A running component as recorded in the state file."""

    name: str
    pid: int
    log: str


@dataclass
class NodeRecord:
    """A simulated node as recorded in the state file.

    `socket` is its containerd's socket as the host sees it. Kubelet nodes also have `ip`
    (node IP on the bed bridge, the Node's InternalIP) and `ns_pid`, the PID holding the
    node's namespaces: `nsenter --target=<ns_pid> --mount --net --uts -- CMD` runs CMD
    inside the node (`testbed.podnet.node_argv`), where the socket is
    /run/containerd/containerd.sock.
    """

    name: str
    socket: str
    workdir: str
    ip: str | None = None
    ns_pid: int | None = None


@dataclass
class RegistryRecord:
    """A registry endpoint as recorded in the state file (see testbed.registry).

    For `token`, `token_config` and `token_log` are its token server's users file (see
    `testbed.tokenserver.set_users`) and log (one line per token issued).
    """

    flavour: str
    host: str
    url: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    token_config: str | None = None
    token_log: str | None = None


@dataclass
class BedState:
    """Everything a client of a running bed needs; serialised to `<workdir>/state.json`."""

    workdir: str
    kubeconfig: str
    server: str
    ca_file: str
    kubernetes_version: str
    nodes: list[NodeRecord] = field(default_factory=list)
    #: The containerd profile every node runs (`testbed.paths.CONTAINERD_PROFILES`).
    containerd: str = field(default_factory=containerd_profile)
    registries: dict[str, RegistryRecord] = field(default_factory=dict)
    proxy_url: str | None = None
    family: str | None = None
    processes: list[ProcessRecord] = field(default_factory=list)
    ready_seconds: float = 0.0
    #: Whether every node runs a kubelet that registered its own Node (`testbed.kubelet`).
    kubelets: bool = False
    #: Kubelet beds (`testbed.podnet`): the bed bridge, the host's address on it (where
    #: the apiserver and registries listen) and the pods' cluster CIDR.
    bridge: str | None = None
    gateway: str | None = None
    cluster_cidr: str | None = None

    @classmethod
    def load(cls, workdir: Path) -> BedState:
        """Read the state of the bed in `workdir`.

        Raises:
            FileNotFoundError: no bed was brought up there (or it was torn down).

        """
        raw = json.loads((workdir / "state.json").read_text())
        raw["nodes"] = [NodeRecord(**n) for n in raw["nodes"]]
        raw["registries"] = {k: RegistryRecord(**r) for k, r in raw["registries"].items()}
        raw["processes"] = [ProcessRecord(**p) for p in raw["processes"]]
        return cls(**raw)

    def save(self) -> None:
        """Write the state file atomically."""
        path = Path(self.workdir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def register_nodes(kubeconfig: Path, nodes: list[SimNode]) -> None:
    """Create each node's `Node` object and write its status as a kubelet would."""
    from kubernetes import client, config  # imported late: only the bed process needs it

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    runtimes = {profile: containerd_version(profile) for profile in {n.containerd for n in nodes}}
    for node in nodes:
        api.create_node(node.node_object())
        api.patch_node_status(node.name, {"status": node.node_status(
            KUBERNETES_VERSION, runtimes[node.containerd])})
        # Admission (TaintNodesByCondition) taints every new Node not-ready:NoSchedule; the
        # node-lifecycle controller, off on the bed, lifts it once the node reports Ready.
        api.patch_node(node.name, {"spec": {"taints": None}})
    api.api_client.close()


class TestBed:
    """Bring the bed up in `workdir` with `nodes` simulated nodes, or tear it down.

    `containerd` is the nodes' containerd profile (`testbed.paths.CONTAINERD_PROFILES`; None:
    `LAYERCACHE_BED_CONTAINERD`, else the default). `kubelets`: each node gets its own
    namespaces on a bed bridge, a kubelet that registers its own Node, a pod network and a
    kube-proxy (`testbed.podnet`, `testbed.kubelet`; the apiserver and the registries then
    listen on the bridge address, the apiserver also runs NodeRestriction, and the node
    lifecycle and IPAM controllers run); off, nodes are containerd processes on the host
    and the bed writes each Node and its status itself. Attributes after `up()`: `state`
    (BedState), `control_plane`, `nodes`, `network` (kubelet beds).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, workdir: Path, nodes: int = 3, *, seed_images: bool = True,
                 apiserver_args: tuple[str, ...] = (), containerd: str | None = None,
                 kubelets: bool = False) -> None:
        self.workdir = workdir.resolve()
        self.kubelets = kubelets
        self.containerd = containerd_profile(containerd)
        self.apiserver_args = apiserver_args
        self.node_count = nodes
        self.seed_images = seed_images
        self.nodes: list[SimNode] = []
        self.processes: list[Process] = []
        self.state: BedState | None = None
        self.network: podnet.BedNetwork | None = None
        #: Where the apiserver, registries and fault proxy listen.
        self.address = "127.0.0.1"

    def up(self) -> BedState:
        """Start every component and wait until all are ready; returns the state.

        Raises:
            ComponentError / MissingToolError: a component failed or a tool is missing;
                everything already started has been stopped.

        """
        if (self.workdir / "state.json").exists():
            raise RuntimeError(f"a bed is already up in {self.workdir}: run testbed-down first")
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as on_error:
            on_error.callback(self.down)
            self.state = self._start()
            self.state.ready_seconds = round(time.monotonic() - started, 1)
            self.state.save()
            on_error.pop_all()
        return self.state

    def _start(self) -> BedState:
        ca = pki.CA.create(self.workdir / "pki")
        cp = ControlPlane(self.workdir / "control-plane", ca,
                          apiserver_args=self.apiserver_args)
        if self.kubelets:
            # The apiserver reaches kubelets (logs, exec) at their InternalIP, the node IP, and
            # checks their serving certificates, which the bed's CA issued.
            kubelet_client = ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                      orgs=("system:masters",), client=True)
            self.network = podnet.BedNetwork.create(self.workdir)
            self.address = cp.address = self.network.gateway
            cp.cluster_cidr = self.network.cluster_cidr
            cp.apiserver_args = (
                "--enable-admission-plugins=NodeRestriction",
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-certificate-authority={ca.cert}",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}", *self.apiserver_args)
            # Kubelets heartbeat: the node lifecycle controller can run (and lifts the
            # not-ready taint admission puts on every new Node once it reports Ready); the
            # node IPAM controller gives each Node its podCIDR.
            cp.controllers = "*"
        cp.workdir.mkdir(parents=True, exist_ok=True)
        self.control_plane = cp
        self.nodes = [SimNode(node_name(i), self.workdir / "nodes" / f"n{i}",
                              containerd=self.containerd)
                      for i in range(self.node_count)]
        if self.network is not None:
            for i, node in enumerate(self.nodes):
                node.ns = podnet.NodeNamespace(node.name, i, node.workdir, self.network)
                self.processes.append(node.ns.start())
            for node in self.nodes:
                assert node.ns is not None
                node.ns.wait()
        etcd = cp.start_etcd()
        self.processes.append(etcd)
        for node in self.nodes:
            self.processes.append(node.start(SANDBOX_IMAGE))
        # Registries, nodes and the control plane are independent until nodes register:
        # start them side by side, so bed start-up costs the slowest, not the sum.
        with ThreadPoolExecutor(max_workers=6) as pool:
            regs = {f: pool.submit(self._start_registry, f, ca) for f in FLAVOURS}
            node_waits = [pool.submit(n.wait) for n in self.nodes]
            cp.wait_etcd(etcd)
            cp.start_apiserver()
            self.processes.append(cp.processes[-1])
            controllers = cp.start_controllers()
            self.processes += controllers
            registries = {f: r.result() for f, r in regs.items()}
            proxy = start_fault_proxy(self.workdir / "proxy", registries["plain"].url,
                                      address=self.address)
            proxy.close()  # the process stays; only this client's connection pool goes
            assert proxy.process is not None
            self.processes.append(proxy.process)
            for w in node_waits:
                w.result()
            hosts = [RegistryHost(proxy.host, proxy.url)] + [
                RegistryHost(r.host, r.url, r.ca_file) for r in registries.values()]
            for node in self.nodes:
                node.configure_registries(hosts)
            register = (pool.submit(self._start_kubelets, cp, ca) if self.kubelets else
                        pool.submit(register_nodes, cp.admin_kubeconfig, self.nodes))
            family = pool.submit(self._seed, registries) if self.seed_images else None
            cp.wait_controllers(controllers)
            register.result()
            family_path = family.result() if family else None
        return BedState(
            workdir=str(self.workdir), kubeconfig=str(cp.admin_kubeconfig), server=cp.server,
            ca_file=str(ca.cert), kubernetes_version=KUBERNETES_VERSION,
            nodes=[NodeRecord(n.name, str(n.socket), str(n.workdir),
                              ip=n.ns.ip if n.ns else None, ns_pid=n.ns.pid if n.ns else None)
                   for n in self.nodes],
            containerd=self.containerd,
            registries={f: RegistryRecord(
                flavour=f, host=r.host, url=r.url, username=r.username, password=r.password,
                ca_file=str(r.ca_file) if r.ca_file else None,
                token_config=str(r.token_server.config) if r.token_server else None,
                token_log=str(r.token_server.log) if r.token_server else None)
                for f, r in registries.items()},
            proxy_url=proxy.url, family=family_path,
            processes=[ProcessRecord(p.name, p.pid, str(p.log)) for p in self.processes],
            kubelets=self.kubelets,
            bridge=self.network.bridge if self.network else None,
            gateway=self.network.gateway if self.network else None,
            cluster_cidr=self.network.cluster_cidr if self.network else None,
        )

    def _start_kubelets(self, cp: ControlPlane, ca: pki.CA) -> None:
        """Start a kubelet per node, its pod network and kube-proxy; wait until all are Ready.

        The CNI config needs the podCIDR the controller-manager gives the Node the kubelet
        registers; until CRI finds one, the kubelet reports the Node NotReady.
        """
        assert self.network is not None
        dns, dns_ready = self._start_cluster_dns(cp, ca)
        images = (pause_image(self.workdir / "kubelet"), probe_image(self.workdir / "kubelet"))
        kubelets = [Kubelet(node, ca, cp.server) for node in self.nodes]
        for kubelet in kubelets:
            kubelet.prepare(*images)
            self.processes.append(kubelet.start())
        for kubelet in kubelets:
            kubelet.wait()
        spaces = [kubelet.ns for kubelet in kubelets]
        cidrs = wait_pod_cidrs(cp.admin_kubeconfig, self.nodes)
        for ns, cidr in zip(spaces, cidrs, strict=True):
            ns.write_cni_config(cidr)
        self.network.pod_routes(list(zip(spaces, cidrs, strict=True)))
        # The bootstrap RBAC binds system:node-proxier to this user (as kubeadm's).
        proxy_kubeconfig = write_kubeconfig(
            self.workdir / "kube-proxy.kubeconfig", cp.server, ca.cert,
            ca.issue("kube-proxy", "system:kube-proxy", client=True), "system:kube-proxy")
        proxies = [podnet.start_kube_proxy(ns, proxy_kubeconfig) for ns in spaces]
        self.processes += proxies
        wait_registered(cp.admin_kubeconfig, self.nodes)
        for ns, proxy in zip(spaces, proxies, strict=True):
            podnet.wait_kube_proxy(ns, proxy)
        podnet.wait_cluster_dns(dns, dns_ready)

    def _start_cluster_dns(self, cp: ControlPlane, ca: pki.CA) -> tuple[Process, int]:
        """Create the cluster DNS's RBAC, Service and EndpointSlice; start CoreDNS.

        Returns its process and ready port (`podnet.wait_cluster_dns`).
        """
        from kubernetes import config, utils  # imported late: only the bed process needs it

        assert self.network is not None
        api = config.new_client_from_config(config_file=str(cp.admin_kubeconfig))
        try:
            for obj in podnet.dns_objects(self.network.gateway):
                utils.create_from_dict(api, obj)
        finally:
            api.close()
        kubeconfig = write_kubeconfig(
            self.workdir / "coredns.kubeconfig", cp.server, ca.cert,
            ca.issue("coredns", "system:coredns", client=True), "system:coredns")
        dns, ready = podnet.start_cluster_dns(self.workdir / "coredns", self.network.gateway,
                                              kubeconfig)
        self.processes.append(dns)
        return dns, ready

    def _start_registry(self, flavour: Flavour, ca: pki.CA) -> Registry:
        registry = start_registry(flavour, self.workdir / "registries" / flavour, ca,
                                  address=self.address)
        self.processes.append(registry.process)
        if registry.token_server is not None:
            self.processes.append(registry.token_server.process)
        return registry

    def _seed(self, registries: dict[str, Registry]) -> str:
        """Build (cached) and push the image family to every registry; returns family.json."""
        family = build_family()
        for reg in registries.values():
            push_family(family, reg.host, tls_verify=reg.ca_file is not None,
                        cert_dir=reg.cert_dir, username=reg.username, password=reg.password)
        return str(family.root / "family.json")

    def down(self) -> None:
        """Stop every process of the bed, unmount what it mounted, remove `workdir`."""
        stop_bed(self.workdir, self.processes)


def stop_bed(workdir: Path, processes: list[Process] | None = None) -> list[str]:
    """Stop the bed in `workdir`: its live processes (and those in its state file), its mounts.

    Works from another process than the one that started the bed. Returns the names of the
    processes it stopped.
    """
    stopped = []
    own = {proc.pid: proc for proc in processes or [] if proc.popen is not None}
    recorded: dict[int, str] = {}
    with suppress(FileNotFoundError):
        recorded = {rec.pid: rec.name for rec in BedState.load(workdir).processes}
    names = {**recorded, **{pid: proc.name for pid, proc in own.items()}}

    def stop(pid: int, name: str) -> None:
        if pid in own:
            # Our own child: stop it and reap it, so no zombie or Popen outlives the bed.
            if own[pid].popen.poll() is None:  # type: ignore[union-attr]
                stopped.append(name)
            own[pid].stop()
        elif pid_alive(pid):
            stop_group(pid)
            stopped.append(name)

    # Kubelets first (else they restart pods), then their pods through CRI while containerd
    # still runs, so runc removes the containers' cgroups and their shims exit.
    kubelet_dirs = kubelet_node_dirs(workdir)
    for pid, name in names.items():
        if is_kubelet(name):
            stop(pid, name)
    for node_dir in kubelet_dirs:
        stop_pods(node_dir)
    # Newest first: clients (controllers) before the servers they talk to. Node namespace
    # holders last: what is left inside a node (shims) is found by its namespaces.
    for pid, name in reversed(names.items()):
        if not is_kubelet(name) and not podnet.is_holder(name):
            stop(pid, name)
    for node_dir in sorted((workdir / "nodes").glob(f"*/{podnet.NS_FILE}")):
        podnet.kill_node_processes(node_dir.parent)
    for pid, name in reversed(names.items()):
        if podnet.is_holder(name):
            stop(pid, name)
    if kubelet_dirs:
        kill_strays(workdir)
    unmount_under(workdir)
    for node_dir in kubelet_dirs:
        remove_cgroups(node_dir)
    podnet.teardown(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return stopped

