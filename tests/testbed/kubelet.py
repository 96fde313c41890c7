"""Real kubelets on the bed's nodes (opt-in: `TestBed(kubelets=True)`, `testbed up --kubelets`).

Each simulated node then runs the pinned kubelet (`make tools`) against its own containerd,
as a kind node does: the kubelet registers its own `Node` with a node client certificate
from the bed's CA (CN=system:node:<name>, O=system:nodes, so the apiserver's Node authorizer
and NodeRestriction admission apply), and runs pods through CRI. What one host needs for
several kubelets side by side (seen on these machines, see FACTS.md "Local control plane
from binaries"):

- the `cgroupfs` driver (PID 1 is not systemd) and `failCgroupV1: false` (cgroup v1 hybrid);
- a `cgroupRoot` per node that exists in every mounted hierarchy before the kubelet starts
  (else it refuses with "cgroup has some missing paths"); cpuset needs `cpuset.cpus` and
  `cpuset.mems` copied from the parent before anything can join it;
- every path the kubelet writes (root dir, pod logs, certificates, volume plugins) under the
  node's directory, and distinct ports (kubelet API, healthz; the read-only port is off);
- the sandbox ("pause") image imported into containerd's `k8s.io` namespace under the name
  the node's containerd pins (`SANDBOX_IMAGE`), built from the static `pause` tool as a
  one-layer OCI image, since the bed never pulls from the internet;
- a CNI config, so CRI reports its network ready (else the kubelet keeps the Node NotReady).
  It is a loopback-only network: pods here are `hostNetwork` (a pod network is later work).

Teardown (`stop_pods`, `remove_cgroups`) leaves no process, mount or cgroup directory: pod
sandboxes are stopped and removed through CRI (`crictl stopp`/`rmp`) while containerd still
runs, so runc removes the containers' cgroups and the shims exit; then the bed unmounts
what is left under its directory and removes the node's cgroup directories, deepest first.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed import pki
from testbed.controlplane import write_kubeconfig
from testbed.cri import crictl
from testbed.nodes import _ARCH, BED_LABEL, SANDBOX_IMAGE, SOCKET_ANNOTATION, SimNode
from testbed.paths import tool
from testbed.procs import ComponentError, Process, free_port, processes_naming

#: Where the kernel's cgroup hierarchies are mounted (v1: one per controller; v2: unified).
CGROUP_MOUNT = Path("/sys/fs/cgroup")
#: File in a node's directory naming its kubelet's cgroupRoot (also: "this node has one").
CGROUP_ROOT_FILE = "kubelet-cgroup-root"
#: Node labels the kubelet sets at registration (`--node-labels`): NodeRestriction lets a
#: kubelet set labels outside the kubernetes.io/k8s.io namespaces, such as the bed's own.
KUBELET_LABELS = {BED_LABEL: "true"}
#: Longest kubelet root dir: the kubelet listens on unix sockets below it (the longest,
#: `pod-resources/<10 digits>`, adds 25 characters) and a socket path has at most 107 bytes.
MAX_ROOT_DIR = 107 - len("/pod-resources/1234567890")
#: Where every kubelet links container logs (fixed in its code, whatever `podLogsDir`).
CONTAINER_LOG_LINKS = Path("/var/log/containers")


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
    """Write the bed's sandbox image, an OCI image-layout tar, into `directory`; returns it.

    One gzip layer holding the static `pause` tool as `/pause` (its entrypoint), for this
    host's platform, named `SANDBOX_IMAGE` (annotation `io.containerd.image.name`, which
    `ctr images import` names the image by). Deterministic: same binary, same digests.

    Raises:
        MissingToolError: the pause tool is not built (`make tools`).
    """
    binary = tool("pause").read_bytes()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as layer:
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime = len(binary), 0o755, 0
        layer.addfile(info, io.BytesIO(binary))
    diff = raw.getvalue()
    compressed = gzip.compress(diff, mtime=0)
    platform = {"architecture": _ARCH, "os": "linux"}
    config = json.dumps({
        **platform, "config": {"Entrypoint": ["/pause"]},
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
        "annotations": {"io.containerd.image.name": SANDBOX_IMAGE,
                        "org.opencontainers.image.ref.name": SANDBOX_IMAGE.rsplit(":", 1)[1]},
    }]}, sort_keys=True).encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pause-image.tar"
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

    `start()` writes its configuration and certificates under the node's directory and
    starts it; `wait()` blocks until its /healthz answers. Ports are free ones on 127.0.0.1.
    """

    node: SimNode
    ca: pki.CA
    server: str
    port: int = field(default_factory=free_port)
    healthz_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def root_dir(self) -> Path:
        """The kubelet's `--root-dir` (pods, volumes, plugins; it bind-mounts it on itself)."""
        return self.node.workdir / "kubelet"

    @property
    def cgroup_root(self) -> str:
        """The node's cgroupRoot ("/layercache-bed-<bed>-<node>")."""
        return cgroup_root_for(self.node.workdir.parents[1], self.node.name)

    def prepare(self, pause_tar: Path) -> None:
        """Import the sandbox image, write the CNI config, create the node's cgroups."""
        self.node.ctr("images", "import", str(pause_tar))
        (self.node.workdir / "cni" / "10-bed-hostnetwork.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "bed-hostnetwork",
            "plugins": [{"type": "loopback"}]}))
        # Marker first: whatever happens next, teardown knows which cgroups to remove.
        (self.node.workdir / CGROUP_ROOT_FILE).write_text(self.cgroup_root)
        create_cgroup_root(self.cgroup_root)

    def start(self) -> Process:
        """Write certificates, kubeconfig and KubeletConfiguration; start the kubelet.

        Raises:
            ValueError: the root dir's path is too long for the kubelet's sockets below it
                (`MAX_ROOT_DIR`); the kubelet itself would fail late with "bind: invalid
                argument".
        """
        name, workdir = self.node.name, self.node.workdir
        if len(str(self.root_dir)) > MAX_ROOT_DIR:
            raise ValueError(f"kubelet root dir {self.root_dir} of node {name} is "
                             f"{len(str(self.root_dir))} characters, more than the "
                             f"{MAX_ROOT_DIR} its unix sockets allow: use a shorter bed directory")
        client = self.ca.issue(f"kubelet-{name}", f"system:node:{name}",
                               orgs=("system:nodes",), client=True)
        serving = self.ca.issue(f"kubelet-{name}-serving", f"system:node:{name}",
                                hosts=("127.0.0.1", "localhost", name))
        kubeconfig = write_kubeconfig(kubeconfig_path(workdir), self.server, self.ca.cert,
                                      client, f"system:node:{name}")
        config = workdir / "kubelet-config.yaml"
        config.write_text(yaml.safe_dump(self.configuration(serving), sort_keys=False))
        self.root_dir.mkdir(parents=True, exist_ok=True)
        labels = ",".join(f"{k}={v}" for k, v in {**KUBELET_LABELS, **self.node.labels}.items())
        self.process = Process(f"kubelet[{name}]", [
            tool("kubelet"), f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={self.root_dir}", f"--cert-dir={workdir / 'kubelet-pki'}",
            f"--hostname-override={name}", "--node-ip=127.0.0.1", f"--node-labels={labels}",
        ], workdir / "kubelet.log").start()
        return self.process

    def configuration(self, serving: pki.CertPair) -> dict[str, Any]:
        """The KubeletConfiguration (kubelet.config.k8s.io/v1beta1) this kubelet runs with."""
        workdir = self.node.workdir
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "127.0.0.1", "port": self.port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.healthz_port,
            "tlsCertFile": str(serving.cert), "tlsPrivateKeyFile": str(serving.key),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.ca.cert)}},
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.node.socket}",
            # No systemd as PID 1, cgroup v1 hybrid: see the module docstring.
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "cgroupRoot": self.cgroup_root,
            # The bed lacks CAP_SYS_RESOURCE: the kubelet cannot lower its own OOM score.
            "oomScoreAdj": 0,
            "podLogsDir": str(workdir / "pod-logs"),
            "volumePluginDir": str(workdir / "kubelet-volume-plugins"),
            # Every node shares one disk with the rest of the bed: never evict for disk or
            # memory, never garbage-collect images (the layers are what layercache shares).
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        }

    def wait(self, timeout: float = 60) -> None:
        """Block until the kubelet's /healthz answers ok.

        Raises:
            ComponentError: it exited or was not healthy within `timeout` seconds.
        """
        assert self.process is not None
        url = f"http://127.0.0.1:{self.healthz_port}/healthz"

        def healthy() -> bool:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        self.process.wait_ready(healthy, timeout)


def wait_registered(kubeconfig: Path, nodes: list[SimNode], timeout: float = 120) -> None:
    """Wait until each node's kubelet has registered its Node and reports it Ready.

    Then, as the admin, annotate each Node with its containerd socket (`SOCKET_ANNOTATION`;
    the kubelet has no flag for annotations) and set its addresses (see below), and wait
    until the node lifecycle controller has lifted the not-ready taint admission put on
    the new Node, so the bed's nodes are schedulable once `up()` returns.

    Raises:
        ComponentError: a Node is missing, not Ready or still tainted after `timeout` seconds.
    """
    from kubernetes import client, config  # imported late: only the bed process needs it

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    try:
        deadline = time.monotonic() + timeout
        for node in nodes:
            while True:
                ready = None
                with contextlib.suppress(client.ApiException):
                    found = api.read_node(node.name)
                    ready = next((c.status for c in found.status.conditions or []
                                  if c.type == "Ready"), None)
                if ready == "True":
                    break
                if time.monotonic() > deadline:
                    raise ComponentError(
                        f"Node {node.name} not registered Ready by its kubelet after "
                        f"{timeout:.0f} s (Ready: {ready}); log {node.workdir / 'kubelet.log'}")
                time.sleep(0.5)
            api.patch_node(node.name, {"metadata": {"annotations": {
                SOCKET_ANNOTATION: str(node.socket)}}})
            # The kubelet refuses a loopback node IP ("nodeIP can't be loopback address") and
            # then leaves the addresses alone; without --node-ip it would pick a non-loopback
            # interface, and the bed stays on 127.0.0.1. So the admin sets them, as the bed's
            # simulated nodes have them: hostNetwork pods get 127.0.0.1, the apiserver
            # reaches the kubelet there.
            api.patch_node_status(node.name, {"status": {"addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": node.name}]}})
        for node in nodes:
            while taints := api.read_node(node.name).spec.taints:
                if time.monotonic() > deadline:
                    raise ComponentError(f"Node {node.name} still tainted after {timeout:.0f} s: "
                                         f"{[t.key for t in taints]}")
                time.sleep(0.5)
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
    socket = node_dir / "containerd.sock"
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


def unlink_container_logs(workdir: Path) -> list[Path]:
    """Remove the kubelets' links in `CONTAINER_LOG_LINKS` that point under `workdir`.

    The kubelet links each container's log there whatever its `podLogsDir` (the path is
    fixed in its code); a pod removed through CRI instead of by its kubelet leaves them.
    Returns the links removed.
    """
    prefix = str(workdir.resolve()) + "/"
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for link in CONTAINER_LOG_LINKS.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and str(link.readlink()).startswith(prefix):
                    link.unlink()
                    removed.append(link)
    return removed


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
