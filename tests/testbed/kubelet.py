"""Real kubelets on the bed's nodes (opt-in: `TestBed(kubelets=True)`, `testbed up --kubelets`).

Each node then runs the pinned kubelet (`make tools`) against its own containerd, both in the
node's own namespaces (`testbed.podnet`: mount, network, UTS; kind's paths inside, its own
node IP on the bed bridge, a pod network and a kube-proxy), as a kind node does: the kubelet
registers its own `Node` with a node client certificate from the bed's CA
(CN=system:node:<name>, O=system:nodes, so the apiserver's Node authorizer and
NodeRestriction admission apply), and runs pods through CRI. What one host needs for
several kubelets side by side (seen on these machines, see FACTS.md "Local control plane
from binaries"):

- the `cgroupfs` driver (PID 1 is not systemd) and `failCgroupV1: false` (cgroup v1 hybrid);
- a `cgroupRoot` per node that exists in every mounted hierarchy before the kubelet starts
  (else it refuses with "cgroup has some missing paths"); cpuset needs `cpuset.cpus` and
  `cpuset.mems` copied from the parent before anything can join it;
- every path the kubelet writes on kind's paths inside the node's mount namespace, which
  maps them to the node's directory (root dir /var/lib/kubelet with its config.yaml as the
  chart's agent reads it, /var/log/pods, /var/log/containers; volume plugins below the
  root dir), and the standard ports on the node IP (the read-only port is off);
- the sandbox ("pause") image imported into containerd's `k8s.io` namespace under the name
  the node's containerd pins (`SANDBOX_IMAGE`), built from the static `pause` tool as a
  one-layer OCI image, since the bed never pulls from the internet;
- a CNI config, so CRI reports its network ready (else the kubelet keeps the Node NotReady):
  written once the controller-manager gave the Node its podCIDR (`testbed.podnet`).

Teardown (`stop_pods`, `remove_cgroups`) leaves no process, mount or cgroup directory: pod
sandboxes are stopped and removed through CRI (`crictl stopp`/`rmp`) while containerd still
runs, so runc removes the containers' cgroups and the shims exit; what is left in the node's
namespaces is killed (`podnet.kill_node_processes`), the holder goes last and with it every
mount the node made; then the bed removes the node's cgroup directories, deepest first.
A node with a kubelet is marked by the file `CGROUP_ROOT_FILE` in its directory, written
before its cgroups are made, so `testbed down` in another process finds what to clean.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
import tarfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from testbed import pki
from testbed.controlplane import write_kubeconfig
from testbed.cri import crictl
from testbed.nodes import (
    _ARCH,
    BED_LABEL,
    KUBELET_DISK_POLICY,
    SANDBOX_IMAGE,
    SOCKET_ANNOTATION,
    SimNode,
)
from testbed.paths import tool
from testbed.podnet import CLUSTER_DOMAIN, DNS_SERVICE_IP, KUBELET_HEALTHZ_PORT, KUBELET_PORT
from testbed.procs import ComponentError, Process, processes_naming

#: Where the kernel's cgroup hierarchies are mounted (v1: one per controller; v2: unified).
CGROUP_MOUNT = Path("/sys/fs/cgroup")
#: File in a node's directory naming its kubelet's cgroupRoot (also: "this node has one").
CGROUP_ROOT_FILE = "kubelet-cgroup-root"
#: Node labels the kubelet sets at registration (`--node-labels`): NodeRestriction lets a
#: kubelet set labels outside the kubernetes.io/k8s.io namespaces, such as the bed's own.
KUBELET_LABELS = {BED_LABEL: "true"}
T = TypeVar("T")
#: The image of the bed's in-cluster probe (`probe_image`), imported into every kubelet
#: node: pods run it with `imagePullPolicy: Never`.
PROBE_IMAGE = "layercache.dev/testbed/probe:1"
#: The kubelet's root dir and config file inside its node (kind's, and the chart's
#: `agent.kubeletConfig`); the node's mount namespace maps them to its directory.
ROOT_DIR = Path("/var/lib/kubelet")
CONFIG_FILE = ROOT_DIR / "config.yaml"


def is_kubelet(process_name: str) -> bool:
    """Whether a bed process name (`ProcessRecord.name`) is a node's kubelet."""
    return process_name.startswith("kubelet[")


def cgroup_hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers and, if mounted, v2), sorted.

    Read from /proc/self/mounts (types `cgroup` and `cgroup2`), so hybrid hosts (v1
    controllers plus `unified`) and pure v2 hosts (one mount) are both covered.
    """
    points = set()
    with Path("/proc/self/mounts").open() as mounts:
        for line in mounts:
            parts = line.split()
            if parts[2] in ("cgroup", "cgroup2"):
                points.add(Path(parts[1]))
    return sorted(points)


def create_cgroup_root(root: str) -> list[Path]:
    """Create cgroup `root` ("/name") in every hierarchy; returns the directories made.

    cpuset: `cpuset.cpus` and `cpuset.mems` are copied from the parent, since an empty
    cpuset accepts no task. cgroup v2: the parent's controllers are delegated to the
    children first (`cgroup.subtree_control`), best effort.
    """
    made = []
    for hierarchy in cgroup_hierarchies():
        directory = hierarchy / root.lstrip("/")
        controllers = hierarchy / "cgroup.controllers"
        if controllers.exists():  # v2: enable what the kubelet manages for our subtree
            with contextlib.suppress(OSError):
                wanted = " ".join(f"+{c}" for c in controllers.read_text().split())
                (hierarchy / "cgroup.subtree_control").write_text(wanted)
        directory.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (hierarchy / name).exists() and (directory / name).exists():
                (directory / name).write_text((hierarchy / name).read_text())
        made.append(directory)
    return made


def remove_cgroup_root(root: str, timeout: float = 15) -> list[Path]:
    """Remove cgroup `root` and everything below it in every hierarchy; returns leftovers.

    Directories go deepest first; a process still in one (a container whose runtime died)
    is killed first, since a cgroup with tasks cannot be removed. Missing paths are fine.
    """
    deadline = time.monotonic() + timeout
    left: list[Path] = []
    for hierarchy in cgroup_hierarchies():
        top = hierarchy / root.lstrip("/")
        if not top.is_dir():
            continue
        below = sorted((p for p in top.rglob("*") if p.is_dir()),
                       key=lambda p: len(p.parts), reverse=True)
        dirs = [*below, top]
        for directory in dirs:
            while True:
                with contextlib.suppress(OSError, ValueError):
                    for pid in (directory / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        left.append(directory)
                        break
                    time.sleep(0.1)
    return left


def cgroup_root_for(workdir: Path, node: str) -> str:
    """The cgroupRoot of `node` of the bed in `workdir`: unique per bed and node, top level."""
    bed = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:8]
    return f"/layercache-bed-{bed}-{node}"


def pause_image(directory: Path) -> Path:
    """Write the bed's sandbox image (`SANDBOX_IMAGE`, the `pause` tool) into `directory`.

    See `static_image`; returns the tar's path.
    """
    return static_image("pause", SANDBOX_IMAGE, directory)


def probe_image(directory: Path) -> Path:
    """Write the bed's in-cluster probe image (`PROBE_IMAGE`) into `directory`.

    The `probe` tool (tests/testbed/tools/probe); see `static_image`; returns the tar's path.
    """
    return static_image("probe", PROBE_IMAGE, directory)


def static_image(command: str, name: str, directory: Path) -> Path:
    """Write an image of the static pinned tool `command` as an OCI image-layout tar.

    One gzip layer holding the binary as `/<command>` (its entrypoint), for this host's
    platform, named `name` (annotation `io.containerd.image.name`, which `ctr images import`
    names the image by), written to `directory/<command>-image.tar`; returns that path.
    Deterministic: same binary, same digests.

    Raises:
        MissingToolError: the tool is not built (`make tools`).
    """
    binary = tool(command).read_bytes()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as layer:
        info = tarfile.TarInfo(command)
        info.size, info.mode, info.mtime = len(binary), 0o755, 0
        layer.addfile(info, io.BytesIO(binary))
    diff = raw.getvalue()
    compressed = gzip.compress(diff, mtime=0)
    platform = {"architecture": _ARCH, "os": "linux"}
    config = json.dumps({
        **platform, "config": {"Entrypoint": [f"/{command}"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(diff)]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar+gzip", compressed)],
    }, sort_keys=True).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        **_descriptor("application/vnd.oci.image.manifest.v1+json", manifest),
        "platform": platform,
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
    }]}, sort_keys=True).encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{command}-image.tar"
    with tarfile.open(path, "w") as out:
        files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
        files |= {f"blobs/sha256/{_digest(b).split(':')[1]}": b
                  for b in (compressed, config, manifest)}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            out.addfile(info, io.BytesIO(data))
    return path


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}


def kubeconfig_path(node_dir: Path) -> Path:
    """The kubeconfig of the kubelet of the node in `node_dir` (its node credentials)."""
    return node_dir / "kubelet.kubeconfig"


@dataclass
class Kubelet:
    """The kubelet of `node`, talking to the apiserver `server` with a certificate from `ca`.

    `start()` writes its configuration and certificates and starts it in the node's
    namespaces (`node.ns`, required); `wait()` blocks until its /healthz answers. It serves
    on the node IP's standard ports (`podnet.KUBELET_PORT`, `KUBELET_HEALTHZ_PORT`).
    """

    node: SimNode
    ca: pki.CA
    server: str
    process: Process | None = None

    def __post_init__(self) -> None:
        if self.node.ns is None:
            raise ValueError(f"node {self.node.name} has no namespaces (testbed.podnet): "
                             "a kubelet runs only in a node's own namespaces")
        self.ns = self.node.ns

    @property
    def root_dir(self) -> Path:
        """The kubelet's root dir as the host sees it (`ROOT_DIR` inside the node)."""
        return self.node.workdir / "var" / "lib" / "kubelet"

    @property
    def cgroup_root(self) -> str:
        """The node's cgroupRoot ("/layercache-bed-<bed>-<node>")."""
        return cgroup_root_for(self.node.workdir.parents[1], self.node.name)

    def prepare(self, *images: Path) -> None:
        """Import `images` (OCI layout tars: the sandbox image, the probe), create cgroups."""
        for image in images:
            self.node.ctr("images", "import", str(image))
        # Marker first: whatever happens next, teardown knows which cgroups to remove.
        (self.node.workdir / CGROUP_ROOT_FILE).write_text(self.cgroup_root)
        create_cgroup_root(self.cgroup_root)

    def start(self) -> Process:
        """Write certificates, kubeconfig and KubeletConfiguration; start the kubelet."""
        name, workdir, ip = self.node.name, self.node.workdir, self.ns.ip
        client = self.ca.issue(f"kubelet-{name}", f"system:node:{name}",
                               orgs=("system:nodes",), client=True)
        serving = self.ca.issue(f"kubelet-{name}-serving", f"system:node:{name}",
                                hosts=(ip, name))
        kubeconfig = write_kubeconfig(kubeconfig_path(workdir), self.server, self.ca.cert,
                                      client, f"system:node:{name}")
        self.root_dir.mkdir(parents=True, exist_ok=True)
        config = self.root_dir / CONFIG_FILE.name
        config.write_text(yaml.safe_dump(self.configuration(serving), sort_keys=False))
        labels = ",".join(f"{k}={v}" for k, v in {**KUBELET_LABELS, **self.node.labels}.items())
        self.process = Process(f"kubelet[{name}]", self.ns.argv([
            tool("kubelet"), f"--config={CONFIG_FILE}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={ROOT_DIR}", f"--cert-dir={ROOT_DIR / 'pki'}",
            f"--hostname-override={name}", f"--node-ip={ip}", f"--node-labels={labels}",
        ]), workdir / "kubelet.log").start()
        return self.process

    def configuration(self, serving: pki.CertPair) -> dict[str, Any]:
        """The KubeletConfiguration (kubelet.config.k8s.io/v1beta1) this kubelet runs with."""
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.ns.ip, "port": KUBELET_PORT, "readOnlyPort": 0,
            "healthzBindAddress": self.ns.ip, "healthzPort": KUBELET_HEALTHZ_PORT,
            "tlsCertFile": str(serving.cert), "tlsPrivateKeyFile": str(serving.key),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.ca.cert)}},
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            # No systemd as PID 1, cgroup v1 hybrid: see the module docstring.
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "cgroupRoot": self.cgroup_root,
            # The bed lacks CAP_SYS_RESOURCE: the kubelet cannot lower its own OOM score.
            "oomScoreAdj": 0,
            "podLogsDir": "/var/log/pods",
            # The cluster DNS Service (testbed.podnet), as kind's nodes have it.
            "clusterDNS": [DNS_SERVICE_IP], "clusterDomain": CLUSTER_DOMAIN,
            # Its default, /usr/libexec/kubernetes/…, is on the host's file system.
            "volumePluginDir": str(ROOT_DIR / "volume-plugins"),
            **KUBELET_DISK_POLICY,
        }

    def wait(self, timeout: float = 60) -> None:
        """Block until the kubelet's /healthz answers ok.

        Raises:
            ComponentError: it exited or was not healthy within `timeout` seconds.
        """
        assert self.process is not None
        url = f"http://{self.ns.ip}:{KUBELET_HEALTHZ_PORT}/healthz"

        def healthy() -> bool:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        self.process.wait_ready(healthy, timeout)


def _wait_nodes(api: Any, nodes: list[SimNode], value: Callable[[Any], T | None],
                deadline: float, what: str) -> list[T]:
    """Poll each node's Node until `value(node)` is truthy; returns the values, in order.

    A missing Node counts as not yet. `what` names the wait in the error.

    Raises:
        ComponentError: a node's value is still falsy at `deadline` (time.monotonic()).
    """
    from kubernetes import client  # imported late: only the bed process needs it

    found: list[T] = []
    for node in nodes:
        while True:
            got = None
            with contextlib.suppress(client.ApiException):
                got = value(api.read_node(node.name))
            if got:
                found.append(got)
                break
            if time.monotonic() > deadline:
                raise ComponentError(f"Node {node.name}: {what} not seen in time (last: "
                                     f"{got!r}); log {node.workdir / 'kubelet.log'}")
            time.sleep(0.3)
    return found


def wait_pod_cidrs(kubeconfig: Path, nodes: list[SimNode], timeout: float = 120) -> list[str]:
    """Wait until the controller-manager gave each node's Node a podCIDR; returns them.

    Raises:
        ComponentError: a Node is missing or has none after `timeout` seconds.
    """
    from kubernetes import client, config  # imported late: only the bed process needs it

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    try:
        return _wait_nodes(api, nodes, lambda n: n.spec.pod_cidr,
                           time.monotonic() + timeout, "podCIDR (node IPAM controller)")
    finally:
        api.api_client.close()


def wait_registered(kubeconfig: Path, nodes: list[SimNode], timeout: float = 120) -> None:
    """Wait until each node's kubelet has registered its Node and reports it Ready.

    Then, as the admin, annotate each Node with its containerd socket (`SOCKET_ANNOTATION`;
    the kubelet has no flag for annotations), and wait until the node lifecycle controller
    has lifted the not-ready taint admission put on the new Node, so the bed's nodes are
    schedulable once `up()` returns.

    Raises:
        ComponentError: a Node is missing, not Ready or still tainted after `timeout` seconds.
    """
    from kubernetes import client, config  # imported late: only the bed process needs it

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    try:
        deadline = time.monotonic() + timeout
        _wait_nodes(api, nodes, lambda n: any(
            c.type == "Ready" and c.status == "True" for c in n.status.conditions or []),
            deadline, "registered Ready by its kubelet")
        for node in nodes:
            api.patch_node(node.name, {"metadata": {"annotations": {
                SOCKET_ANNOTATION: str(node.socket)}}})
        _wait_nodes(api, nodes, lambda n: not n.spec.taints, deadline,
                    "not-ready taint lifted (node lifecycle controller)")
    finally:
        api.api_client.close()


def kubelet_node_dirs(workdir: Path) -> list[Path]:
    """Directories of the nodes of the bed in `workdir` that run (or ran) a kubelet."""
    return sorted(p.parent for p in (workdir / "nodes").glob(f"*/{CGROUP_ROOT_FILE}"))


def stop_pods(node_dir: Path) -> None:
    """Stop and remove every pod sandbox on the node in `node_dir` through CRI.

    Done after its kubelet stopped (or it would recreate them) and while containerd runs:
    runc then removes the containers and their cgroups, and their shims exit. Errors (a
    containerd already gone) are ignored: `remove_cgroups` and `kill_strays` catch the rest.
    """
    socket = node_dir / "run" / "containerd" / "containerd.sock"  # SimNode.socket, with ns
    if not socket.exists():
        return
    with contextlib.suppress(ComponentError, OSError):
        pods = crictl(socket, "pods", "-q", timeout=30).split()
        if pods:
            crictl(socket, "stopp", *pods, timeout=60)
            crictl(socket, "rmp", "--force", *pods, timeout=60)


def remove_cgroups(node_dir: Path) -> list[Path]:
    """Remove the kubelet cgroups of the node in `node_dir`; returns directories left."""
    with contextlib.suppress(FileNotFoundError):
        return remove_cgroup_root((node_dir / CGROUP_ROOT_FILE).read_text().strip())
    return []


def kill_strays(workdir: Path) -> list[int]:
    """SIGKILL every process whose command line names a path under `workdir`; returns PIDs.

    What a killed containerd leaves running: its shims (`-address <workdir>/…/containerd.sock`)
    are in their own process groups, so stopping containerd's group does not reach them.
    """
    killed = []
    for pid in processes_naming(workdir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed
