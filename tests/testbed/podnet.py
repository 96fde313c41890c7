"""Kubelet nodes as kind runs them: a node's own namespaces, a bed bridge, a pod network.

With kubelets (`TestBed(kubelets=True)`) each node is what a kind node container is, made
of namespaces instead of a container:

- **Namespaces.** A holder process (`NodeNamespace`: `unshare --mount --net --uts
  --propagation private`, then the static `pause` tool) owns the node's mount, network and
  UTS namespaces; the node's containerd, kubelet and kube-proxy are started in them with
  `nsenter`. The mount namespace is private (nothing it mounts reaches the host) and puts
  the node's own directories on the standard paths the Helm chart's hostPaths name:
  `/run` is a fresh tmpfs (so the host's /run/containerd, /run/netns and xtables lock are
  never touched) with `<node>/run/containerd` bound on `/run/containerd`; `/var/lib` and
  `/var/log` are fresh tmpfs with `<node>/var/lib/containerd`, `<node>/var/lib/kubelet`,
  `<node>/var/log/pods` and `<node>/var/log/containers` bound in; `/etc` is an overlay on the
  host's (its upper layer in the tmpfs) with `<node>/certs.d` on `/etc/containerd/certs.d`
  and `<node>/cni` on `/etc/cni/net.d`. So inside a node, containerd listens on
  `/run/containerd/containerd.sock`, its root is `/var/lib/containerd` and the kubelet's
  config is `/var/lib/kubelet/config.yaml`, as on a kind node; from the host the same socket
  is `<node>/run/containerd/containerd.sock` (`SimNode.socket`). When the holder and every
  process in the namespaces are gone, the namespaces and all their mounts are gone too.
- **Bed network.** One Linux bridge per bed, `lcbed<k>` with `10.250.<k>.1/24` (the first
  free slot k of `SLOTS`; creating the bridge is the lock), and a veth per node: the host
  end `lcb<k>n<i>` on the bridge, the node end `eth0` with the node IP `10.250.<k>.<10+i>`
  (the kubelet's `--node-ip`, the Node's InternalIP). The apiserver and the registries
  listen on the bridge address in this mode, so nodes and pods reach them, as does the
  host. No default route exists in a node: nothing leaves the bed's addresses.
- **Pod network.** The controller-manager allocates each Node a /24 from the bed's cluster
  CIDR `10.244.<16k>.0/20`; once a Node has its podCIDR the bed writes the node's CNI
  config (Debian's containernetworking-plugins from /usr/lib/cni: `bridge` named
  `lcb<k>p<i>`, `host-local` IPAM on the podCIDR, `portmap`) and routes to every podCIDR
  via its node IP, in every other node and on the host (`ip route ... dev lcbed<k>`, gone
  with the bridge). Forwarding is on only in node network namespaces (per-namespace
  sysctls); no host network sysctl changes. No masquerading: the host routes replies to pod IPs.
- **Services.** A kube-proxy per node (the pinned v1.37.2, iptables mode, with the client
  certificate of `system:kube-proxy`, whom the bootstrap RBAC binds to
  `system:node-proxier`) writes its rules in the node's network namespace, so a pod reaches
  the apiserver through the `kubernetes` Service's ClusterIP.
- **Cluster DNS.** CoreDNS v1.14.6 (kubeadm v1.37's; `tests/testbed/tools/coredns`, only
  the plugins a cluster zone needs) runs as a bed process on the bridge address, port 53,
  with kind's Corefile for `cluster.local` minus forwarding (no upstream), as the user
  `system:coredns` with kubeadm's ClusterRole of that name. The Service `kube-system/kube-dns`
  has kind's ClusterIP 10.96.0.10 and an EndpointSlice naming the bridge address; the
  kubelets' `clusterDNS` is that IP, so pods resolve `<service>.<namespace>.svc` as on kind.

One host-wide sysctl: `fs.inotify.max_user_instances` (Linux's default 128 is shared by
every root process; each kubelet takes 6, containerd's CRI needs one or fails to load, so
a few kubelet beds side by side run out: "too many open files", seen here; kind's docs
raise it too). A bed raises it to `INOTIFY_INSTANCES` if lower and records the original in
`SYSCTL_FILE` (shared by the beds on the host); the last bed torn down restores it.

Host state the bed changes, all removed by `teardown` (also from another process: it reads
`NETWORK_FILE` and the nodes' `NS_FILE`): the bridge (with it the host veth ends and the
routes through it), and one iptables rule `-I FORWARD -i lcbed<k> -o lcbed<k> -j ACCEPT`
(hosts running Docker set FORWARD's policy to DROP, which with br_netfilter would drop
traffic bridged between two nodes).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed.paths import CACHE, tool
from testbed.procs import ComponentError, Process, free_port, pid_alive, run

#: Bed bridges are named `<BRIDGE_PREFIX><slot>`.
BRIDGE_PREFIX = "lcbed"
#: Slots: beds side by side on one host (one bridge, subnet and cluster CIDR each).
SLOTS = 16
#: The bed bridges' addresses: slot k gets 10.250.k.0/24, the host 10.250.k.1.
BED_NETWORKS = ipaddress.IPv4Network("10.250.0.0/16")
#: Pod addresses: slot k's cluster CIDR is 10.244.16k.0/20, a /24 per node.
POD_NETWORKS = ipaddress.IPv4Network("10.244.0.0/16")
#: Prefix length of a node's podCIDR (controller-manager `--node-cidr-mask-size`).
NODE_CIDR_MASK = 24
#: First host number of node IPs in the bed subnet (node i: .FIRST_NODE_HOST + i).
FIRST_NODE_HOST = 10
#: The bed's network record (slot, bridge, host rule), in the bed's directory.
NETWORK_FILE = "network.json"
#: A node's namespace record (holder PID, namespace inodes), in the node's directory.
NS_FILE = "node-ns.json"
#: Marker the holder writes once its mounts and sysctls are in place.
READY_FILE = "node-ns.ready"
#: The least `fs.inotify.max_user_instances` kubelet beds run with, and where the value
#: the host had before is kept while beds run (one file for all beds of this host).
INOTIFY_INSTANCES = 1024
INOTIFY_SYSCTL = Path("/proc/sys/fs/inotify/max_user_instances")
SYSCTL_FILE = CACHE / "bed-sysctl.json"
#: Standard ports of a node's components: each node has its own network namespace.
KUBELET_PORT, KUBELET_HEALTHZ_PORT = 10250, 10248
KUBE_PROXY_HEALTHZ_PORT, KUBE_PROXY_METRICS_PORT = 10256, 10249
#: The cluster DNS: its Service's ClusterIP (kubeadm's and kind's), domain and port.
DNS_SERVICE_IP, CLUSTER_DOMAIN, DNS_PORT = "10.96.0.10", "cluster.local", 53


def is_holder(process_name: str) -> bool:
    """Whether a bed process name (`ProcessRecord.name`) is a node's namespace holder."""
    return process_name.startswith("node-ns[")


def node_argv(ns_pid: int, command: list[str | os.PathLike[str]],
              ) -> list[str | os.PathLike[str]]:
    """`command` prefixed to run in the namespaces (mount, network, UTS) held by `ns_pid`.

    `ns_pid` is `NodeRecord.ns_pid` (or `NodeNamespace.pid`): another process can run
    commands inside a node of a running bed.
    """
    return ["nsenter", f"--target={ns_pid}", "--mount", "--net", "--uts", "--", *command]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(["ip", *args], capture_output=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise ComponentError(f"ip {' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return proc


@dataclass
class BedNetwork:
    """The bed's bridge, subnet and pod cluster CIDR in slot `slot` (see the module doc)."""

    slot: int
    workdir: Path

    @property
    def bridge(self) -> str:
        """The bridge's name, `lcbed<slot>`."""
        return f"{BRIDGE_PREFIX}{self.slot}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        """The bed subnet, 10.250.<slot>.0/24."""
        return list(BED_NETWORKS.subnets(new_prefix=24))[self.slot]

    @property
    def gateway(self) -> str:
        """The host's address on the bridge: apiserver and registries listen here."""
        return str(self.subnet.network_address + 1)

    @property
    def cluster_cidr(self) -> str:
        """The bed's pod CIDR (controller-manager `--cluster-cidr`), 10.244.<16 slot>.0/20."""
        return str(list(POD_NETWORKS.subnets(new_prefix=20))[self.slot])

    def node_ip(self, index: int) -> str:
        """The IP of node `index` (0-based) on the bridge."""
        return str(self.subnet.network_address + FIRST_NODE_HOST + index)

    def forward_rule(self) -> list[str]:
        """The host FORWARD rule's match and target (for `iptables -I/-D FORWARD`)."""
        return ["-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment",
                f"layercache bed {self.workdir}", "-j", "ACCEPT"]

    @classmethod
    def create(cls, workdir: Path) -> BedNetwork:
        """Take the first free slot: create its bridge, address it, allow its forwarding.

        The record (`NETWORK_FILE`) is written as soon as the bridge exists, so `teardown`
        finds it whatever fails next.

        Raises:
            ComponentError: every slot is taken, `ip`/`iptables` failed, or a host route
                already covers the slot's subnet or cluster CIDR (nothing is left made).
        """
        for slot in range(SLOTS):
            made = _ip("link", "add", f"{BRIDGE_PREFIX}{slot}", "type", "bridge", check=False)
            if made.returncode == 0:
                break
            if b"exists" not in made.stderr:
                raise ComponentError(f"cannot create a bed bridge: {made.stderr.decode()}")
        else:
            raise ComponentError(f"all {SLOTS} bed bridges ({BRIDGE_PREFIX}0..) exist: "
                                 "stop other beds (testbed down)")
        net = cls(slot, workdir.resolve())
        (workdir / NETWORK_FILE).write_text(json.dumps({"slot": slot, "rule": False}))
        try:
            raise_inotify_limit()
            net._check_free()
            _ip("addr", "add", f"{net.gateway}/{net.subnet.prefixlen}", "dev", net.bridge)
            _ip("link", "set", net.bridge, "up")
            run(["iptables", "-w", "-I", "FORWARD", *net.forward_rule()])
            (workdir / NETWORK_FILE).write_text(json.dumps({"slot": slot, "rule": True}))
        except BaseException:
            teardown(workdir)
            raise
        return net

    def _check_free(self) -> None:
        """Refuse a slot whose subnet or cluster CIDR a host route already covers."""
        ours = {self.subnet, ipaddress.IPv4Network(self.cluster_cidr)}
        for route in json.loads(_ip("-j", "route", "show").stdout or b"[]"):
            dst = route.get("dst", "")
            if dst in ("", "default") or route.get("dev", "").startswith(BRIDGE_PREFIX):
                continue
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
            if any(isinstance(net, ipaddress.IPv4Network) and net.overlaps(o) for o in ours):
                raise ComponentError(f"host route {dst} dev {route.get('dev')} overlaps the "
                                     f"bed's {sorted(map(str, ours))}")

    def pod_routes(self, nodes: list[tuple[NodeNamespace, str]]) -> None:
        """Route each node's podCIDR (pairs of namespace, podCIDR) via its node IP.

        On the host and in every other node. Idempotent (`ip route replace`).
        """
        for ns, cidr in nodes:
            _ip("route", "replace", cidr, "via", ns.ip, "dev", self.bridge)
            for other, _ in nodes:
                if other is not ns:
                    other.run(["ip", "route", "replace", cidr, "via", ns.ip, "dev", "eth0"])


def teardown(workdir: Path) -> None:
    """Remove the bed network of `workdir` (its bridge, veths, routes, FORWARD rule).

    Safe to call twice or without a network. Run after the nodes' processes are gone.
    """
    try:
        record = json.loads((workdir / NETWORK_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return
    net = BedNetwork(record["slot"], workdir.resolve())
    if record.get("rule"):
        while subprocess.run(["iptables", "-w", "-D", "FORWARD", *net.forward_rule()],
                             capture_output=True, check=False).returncode == 0:
            pass
    for name in veths(net.slot):
        _ip("link", "del", name, check=False)
    _ip("link", "del", net.bridge, check=False)
    (workdir / NETWORK_FILE).unlink(missing_ok=True)
    if not bed_bridges():
        restore_inotify_limit()


def bed_bridges() -> list[str]:
    """Names of the bed bridges (`lcbed<k>`) that exist on this host now."""
    links = json.loads(_ip("-j", "link", "show").stdout or b"[]")
    return [link["ifname"] for link in links if link["ifname"].startswith(BRIDGE_PREFIX)
            and link["ifname"].removeprefix(BRIDGE_PREFIX).isdigit()]


def raise_inotify_limit() -> None:
    """Raise `fs.inotify.max_user_instances` to `INOTIFY_INSTANCES` if it is lower.

    The first bed to raise it records the host's value in `SYSCTL_FILE`
    (`restore_inotify_limit` puts it back). A host already at or above it is left alone.
    """
    current = int(INOTIFY_SYSCTL.read_text())
    if current >= INOTIFY_INSTANCES:
        return
    SYSCTL_FILE.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError), SYSCTL_FILE.open("x") as record:
        record.write(json.dumps({str(INOTIFY_SYSCTL): current}))
    INOTIFY_SYSCTL.write_text(str(INOTIFY_INSTANCES))


def restore_inotify_limit() -> None:
    """Put back the value `raise_inotify_limit` recorded (no bed is left to need it)."""
    with contextlib.suppress(FileNotFoundError):
        for path, value in json.loads(SYSCTL_FILE.read_text()).items():
            Path(path).write_text(str(value))
        SYSCTL_FILE.unlink()


def veths(slot: int) -> list[str]:
    """Host ends of node veths of bed slot `slot` that exist now."""
    links = json.loads(_ip("-j", "link", "show").stdout or b"[]")
    return [link["ifname"] for link in links
            if link["ifname"].startswith(f"lcb{slot}n")]


def _ns_inode(pid: int, kind: str) -> int | None:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/ns/{kind}").stat().st_ino
    return None


@dataclass
class NodeNamespace:
    """The namespaces of node `name` (index `index`) whose directory is `node_dir`.

    `start()` starts the holder; `wait()` waits for its mounts; `link()` adds the veth.
    `argv()` prefixes a command so it runs inside; `run()` runs a short one there.
    """

    name: str
    index: int
    node_dir: Path
    network: BedNetwork
    process: Process | None = None

    @property
    def ip(self) -> str:
        """The node IP (InternalIP) on the bed bridge."""
        return self.network.node_ip(self.index)

    @property
    def pid(self) -> int:
        """The holder's PID: `nsenter --target` this."""
        assert self.process is not None
        return self.process.pid

    @property
    def pod_bridge(self) -> str:
        """Name of the node's CNI bridge (distinct per node and bed)."""
        return f"lcb{self.network.slot}p{self.index}"

    def mount_script(self) -> str:
        """The shell commands that set the namespaces up inside, then exec the holder."""
        d = self.node_dir
        binds = [(d / "run" / "containerd", "/run/containerd"),
                 (d / "certs.d", "/etc/containerd/certs.d"), (d / "cni", "/etc/cni/net.d"),
                 (d / "var" / "lib" / "containerd", "/var/lib/containerd"),
                 (d / "var" / "lib" / "kubelet", "/var/lib/kubelet"),
                 (d / "var" / "log" / "pods", "/var/log/pods"),
                 (d / "var" / "log" / "containers", "/var/log/containers")]
        for source, _ in binds:
            source.mkdir(parents=True, exist_ok=True)
        lines = [
            "set -eu", f"hostname {self.name}",
            "mount -t tmpfs -o mode=0755 bed-run /run",
            "mkdir -p /run/bed-etc/upper /run/bed-etc/work",
            "mount -t overlay bed-etc -o lowerdir=/etc,upperdir=/run/bed-etc/upper,"
            "workdir=/run/bed-etc/work /etc",
            "mount -t tmpfs -o mode=0755 bed-var-lib /var/lib",
            "mount -t tmpfs -o mode=0755 bed-var-log /var/log",
            *(f"mkdir -p {target} && mount --bind {source} {target}"
              for source, target in binds),
            "ip link set lo up",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
            # Bridged pod traffic must pass kube-proxy's rules (br_netfilter; per namespace).
            "if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then "
            "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables; fi",
            f"touch {d / READY_FILE}",
            f"exec {tool('pause')}",
        ]
        return "\n".join(lines)

    def start(self) -> Process:
        """Start the holder process (readiness: `wait`)."""
        (self.node_dir / READY_FILE).unlink(missing_ok=True)
        self.process = Process(f"node-ns[{self.name}]", [
            "unshare", "--mount", "--net", "--uts", "--propagation", "private", "--",
            "sh", "-c", self.mount_script()], self.node_dir / "node-ns.log").start()
        return self.process

    def wait(self, timeout: float = 30) -> None:
        """Wait for the mounts; record the namespaces (`NS_FILE`); add and address the veth.

        Raises:
            ComponentError: the holder exited (its log says which mount failed) or timed out.
        """
        assert self.process is not None
        self.process.wait_ready(lambda: (self.node_dir / READY_FILE).exists(), timeout)
        (self.node_dir / NS_FILE).write_text(json.dumps({
            "pid": self.pid, "net": _ns_inode(self.pid, "net"),
            "mnt": _ns_inode(self.pid, "mnt")}))
        host_end = f"lcb{self.network.slot}n{self.index}"
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns",
            str(self.pid))
        _ip("link", "set", host_end, "master", self.network.bridge, "up")
        self.run(["ip", "addr", "add", f"{self.ip}/{self.network.subnet.prefixlen}",
                  "dev", "eth0"])
        self.run(["ip", "link", "set", "eth0", "up"])

    def argv(self, command: list[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
        """`command` prefixed to run in the node's namespaces (mount, network, UTS)."""
        return node_argv(self.pid, command)

    def run(self, command: list[str | os.PathLike[str]], timeout: float = 60) -> str:
        """Run a short `command` inside the node; returns its stdout.

        Raises:
            ComponentError: it failed (the message has its stderr).
        """
        return run(self.argv(command), timeout=timeout)

    def write_cni_config(self, pod_cidr: str) -> Path:
        """Write the node's CNI network for `pod_cidr` (containerd picks it up); returns it."""
        path = self.node_dir / "cni" / "10-bed-pods.conflist"
        path.write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "bed-pods",
            "plugins": [
                {"type": "bridge", "bridge": self.pod_bridge, "isGateway": True,
                 "hairpinMode": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=2))
        return path


def kube_proxy_config(ns: NodeNamespace, kubeconfig: Path) -> dict[str, Any]:
    """The KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) of node `ns`.

    iptables mode. conntrack sizes and timeouts are 0: kube-proxy leaves the kernel's as
    they are (`nf_conntrack_max` and the hash size are host-wide).
    """
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "mode": "iptables", "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": ns.name, "bindAddress": ns.ip,
        "healthzBindAddress": f"{ns.ip}:{KUBE_PROXY_HEALTHZ_PORT}",
        "metricsBindAddress": f"{ns.ip}:{KUBE_PROXY_METRICS_PORT}",
        "clusterCIDR": ns.network.cluster_cidr,
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
    }


def start_kube_proxy(ns: NodeNamespace, kubeconfig: Path) -> Process:
    """Start kube-proxy in node `ns` with the `system:kube-proxy` credentials `kubeconfig`."""
    config = ns.node_dir / "kube-proxy.yaml"
    config.write_text(yaml.safe_dump(kube_proxy_config(ns, kubeconfig), sort_keys=False))
    return Process(f"kube-proxy[{ns.name}]", ns.argv([tool("kube-proxy"), f"--config={config}"]),
                   ns.node_dir / "kube-proxy.log").start()


def wait_kube_proxy(ns: NodeNamespace, process: Process, timeout: float = 90) -> None:
    """Block until kube-proxy of node `ns` reports healthy (its rules are synced).

    Raises:
        ComponentError: it exited or was not healthy within `timeout` seconds.
    """
    import urllib.request

    url = f"http://{ns.ip}:{KUBE_PROXY_HEALTHZ_PORT}/healthz"

    def healthy() -> bool:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    process.wait_ready(healthy, timeout)


def kill_node_processes(node_dir: Path) -> list[int]:
    """SIGKILL every process in the namespaces of the node in `node_dir`; returns PIDs.

    What stopping the bed's own processes leaves: containerd's shims (their command lines
    name no bed path). A process counts if it is in the node's network namespace while the
    holder still holds it, or else in both its network and mount namespaces (so an inode a
    gone namespace left for reuse cannot match another bed's process).
    """
    try:
        record = json.loads((node_dir / NS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return []
    holder_alive = pid_alive(record["pid"]) and _ns_inode(record["pid"], "net") == record["net"]
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), record["pid"]):
            continue
        pid = int(entry.name)
        if _ns_inode(pid, "net") != record["net"]:
            continue
        if holder_alive or _ns_inode(pid, "mnt") == record["mnt"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def corefile(address: str, kubeconfig: Path, ready_port: int, health_port: int) -> str:
    """The CoreDNS config: kind's cluster zone, served on `address`:53 only, no forwarding.

    `ready_port`/`health_port`: its /ready and /health on 127.0.0.1 (the bed waits on /ready,
    which answers once the kubernetes plugin has synced).
    """
    return f"""\
.:{DNS_PORT} {{
    bind {address}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} testbed
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    cache 30
}}
"""


def dns_objects(gateway: str) -> list[dict[str, Any]]:
    """The cluster DNS's API objects, as dicts to create in this order.

    kubeadm's `system:coredns` ClusterRole and its binding (to the user of that name), and
    the `kube-dns` Service (kind's ClusterIP) with an EndpointSlice naming `gateway`:53.
    """
    ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
    labels = {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods",
                                                     "namespaces"], "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                       "name": "system:coredns"}]},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {"clusterIP": DNS_SERVICE_IP,
                  "ports": [{"name": n, "protocol": p, "port": DNS_PORT, "targetPort": DNS_PORT}
                            for n, p in ports]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "kube-dns-bed", "namespace": "kube-system",
                      "labels": {"kubernetes.io/service-name": "kube-dns",
                                 "endpointslice.kubernetes.io/managed-by": "layercache-testbed"}},
         "addressType": "IPv4", "endpoints": [{"addresses": [gateway]}],
         "ports": [{"name": n, "protocol": p, "port": DNS_PORT} for n, p in ports]},
    ]


def start_cluster_dns(workdir: Path, gateway: str, kubeconfig: Path) -> tuple[Process, int]:
    """Start CoreDNS (`corefile`) with `kubeconfig` (user `system:coredns`).

    Returns the process and its ready port (`wait_cluster_dns`).
    """
    ready, health = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "Corefile"
    config.write_text(corefile(gateway, kubeconfig, ready, health))
    process = Process("coredns", [tool("coredns"), "-conf", config], workdir / "coredns.log",
                      cwd=workdir).start()
    return process, ready


def wait_cluster_dns(process: Process, ready_port: int, timeout: float = 60) -> None:
    """Block until CoreDNS reports ready (its kubernetes plugin has synced).

    Raises:
        ComponentError: it exited or was not ready within `timeout` seconds.
    """
    import urllib.request

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/ready", timeout=2) as r:
            return r.status == 200
    process.wait_ready(ready, timeout)
