"""Simulated nodes: one real containerd daemon each, plus a registered `Node` object.

A node is what the kubelet would leave behind for our purposes: a containerd (with the CRI
plugin, and runc; which build is a profile: 2.x as in kind's node image, or 1.7, see
`testbed.paths.CONTAINERD_PROFILES`) with its own root, state dir and socket, whose registry
host configs (`config_path`) point at the bed's registries; and a `Node` in the apiserver
with the usual labels, addresses, capacity and `status.nodeInfo`, so DaemonSets and node
selectors behave as in a real cluster. The node's socket path is in the annotation
`layercache.dev/containerd-socket` so agents started outside pods can find it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import subprocess
import textwrap
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from testbed.paths import containerd_profile, containerd_tool
from testbed.procs import Process, run

if TYPE_CHECKING:
    from testbed.podnet import NodeNamespace

#: Annotation on the Node naming its containerd socket (bed only; agents in pods mount it).
SOCKET_ANNOTATION = "layercache.dev/containerd-socket"
#: Label on every simulated node, so tests can select them.
BED_LABEL = "layercache.dev/testbed"
#: The pod sandbox image every node's containerd pins (kind v0.33.0's node config pins it).
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
#: A bed node's disk and memory thresholds, as its kubelet runs with them: every node shares
#: one disk with the rest of the bed (and the host), so never evict for disk or memory and
#: never garbage-collect images (the layers are what layercache shares). kind's nodes do the
#: same (its kubeadm config sets every `evictionHard` disk signal to 0%).
KUBELET_DISK_POLICY: Mapping[str, Any] = {
    "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                     "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
    "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
}


def write_kubelet_disk_policy(path: Path) -> Path:
    """Write a KubeletConfiguration holding only `KUBELET_DISK_POLICY` to `path`; returns it.

    What an agent started as a process (no kubelet on its node) is given as its node's
    kubelet config (`LAYERCACHE_KUBELET_CONFIG`): without one it applies the kubelet's
    defaults (imagefs.available 15 %, plus its 5-point margin), and on a host with less than
    20 % of its disk free every such agent would refuse to fetch (DiskPressure) where the
    bed's kubelet nodes fetch.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"apiVersion": "kubelet.config.k8s.io/v1beta1",
                                    "kind": "KubeletConfiguration", **KUBELET_DISK_POLICY}))
    return path


@dataclass(frozen=True)
class RegistryHost:
    """How a node's containerd reaches one registry host (`config_path` hosts.toml)."""

    host: str            # as written in image references, "127.0.0.1:PORT"
    server: str          # URL containerd talks to, "http://…" or "https://…"
    ca_file: Path | None = None


def containerd_config(workdir: Path, registry_dir: Path, sandbox_image: str, *,
                      profile: str, runc: Path, standard_paths: bool = False) -> str:
    """The config of a node's containerd rooted at `workdir`, for containerd `profile`.

    containerd 2.x gets its native config version 3, 1.x version 2: the settings of kind
    v0.33.0's node config (images/base/files/etc/containerd/config.toml: overlayfs, the runc
    v2 shim as default runtime, a pinned pause sandbox image) with our kind patch
    (kind-config.yaml: keep layer blobs after unpack, registry host configs from
    `config_path`) and what the bed needs instead of kind's node container: every path
    under `workdir` (no system path, so several daemons and a system containerd coexist),
    the pinned runc, cgroupfs (no systemd here) and `restrict_oom_score_adj` (the bed lacks
    CAP_SYS_RESOURCE, as kind's rootless nodes do).

    `runc` is the OCI runtime's path (CRI's default runtime); `registry_dir` holds the
    per-registry `hosts.toml` files. `standard_paths`: a node in its own mount namespace
    (`testbed.podnet`): root, state, socket and CNI config at kind's paths
    (/var/lib/containerd, /run/containerd, /run/containerd/containerd.sock, /etc/cni/net.d),
    which that namespace maps to the node's directories. Returns the TOML text.
    """
    root, state, sock = workdir / "root", workdir / "state", workdir / "containerd.sock"
    cni_conf = workdir / "cni"
    if standard_paths:
        root, state = Path("/var/lib/containerd"), Path("/run/containerd")
        sock, cni_conf = state / "containerd.sock", Path("/etc/cni/net.d")
    common = f"""\
root = "{root}"
state = "{state}"
# Snapshotters that need kernel features or devices we don't set up; overlayfs works here.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{workdir / 'opt'}"
"""
    keep_blobs = """\
snapshotter = "overlayfs"
# Keep layer blobs after unpack (kind's default drops them): they are what we share.
discard_unpacked_layers = false
"""

    def runtimes(section: str, extra: str = "") -> str:
        """CRI's runtimes table under `section`: runc, with the given runc binary."""
        return f"""\
  [{section}.containerd]
{extra}    default_runtime_name = "runc"
    [{section}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{section}.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
"""

    stream = """\
  # Port 0: each daemon's CRI streaming server takes a free port.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""
    if profile == "2":
        images, runtime = 'plugins."io.containerd.cri.v1.images"', \
            'plugins."io.containerd.cri.v1.runtime"'
        return f"""\
version = 3
{common}[plugins."io.containerd.nri.v1.nri"]
  socket_path = "{workdir / 'nri.sock'}"
  plugin_path = "{workdir / 'nri' / 'plugins'}"
  plugin_config_path = "{workdir / 'nri' / 'conf.d'}"
[plugins."io.containerd.grpc.v1.cri"]
{stream}[{images}]
{textwrap.indent(keep_blobs, "  ")}  [{images}.pinned_images]
    sandbox = "{sandbox_image}"
  [{images}.registry]
    config_path = "{registry_dir}"
[{runtime}]
  restrict_oom_score_adj = true
{runtimes(runtime)}  [{runtime}.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni_conf}"
"""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
version = 2
{common}[{cri}]
  sandbox_image = "{sandbox_image}"
{stream}  restrict_oom_score_adj = true
{runtimes(cri, textwrap.indent(keep_blobs, "    "))}  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
  [{cri}.registry]
    config_path = "{registry_dir}"
"""


#: The registry's CA certificate, copied into its host directory (`configure_registries`).
HOST_CA = "ca.crt"


def hosts_toml(reg: RegistryHost) -> str:
    """A containerd `hosts.toml` sending pulls for `reg.host` to `reg.server`.

    A CA is named relative to the host directory (`HOST_CA`), as containerd resolves it:
    an agent Pod that mounts the node's `config_path` then finds it too, which a path
    into the bed's own directory would not be inside the Pod.
    """
    ca = f'\n  ca = "{HOST_CA}"' if reg.ca_file else ""
    return (f'server = "{reg.server}"\n\n[host."{reg.server}"]\n'
            f'  capabilities = ["pull", "resolve"]{ca}\n')


def unmount_under(path: Path) -> list[str]:
    """Unmount every mount point at or below `path`, deepest first; returns what was unmounted.

    containerd leaves overlay and shm mounts behind when killed; they keep the
    directory busy and must go before it can be removed.
    """
    prefix = str(path.resolve())
    points = []
    with Path("/proc/self/mounts").open() as mounts:
        for line in mounts:
            point = line.split()[1].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    return points


@dataclass
class SimNode:
    """One simulated node: `name`, its containerd under `workdir`, and its Node object.

    `containerd` is the profile it runs (`testbed.paths.CONTAINERD_PROFILES`; by default the
    one `LAYERCACHE_BED_CONTAINERD` names, else the bed's default). `ns`: the node's own
    namespaces (kubelet nodes, `testbed.podnet`), in which containerd then runs on kind's
    standard paths; None: a host process with every path under `workdir`.

    Raises:
        ValueError: unknown profile.
    """

    name: str
    workdir: Path
    labels: Mapping[str, str] = field(default_factory=dict)
    process: Process | None = None
    containerd: str = field(default_factory=containerd_profile)
    ns: NodeNamespace | None = None

    def __post_init__(self) -> None:
        containerd_profile(self.containerd)  # fail here, not at start

    @property
    def socket(self) -> Path:
        """Containerd's gRPC socket (also serves CRI `runtime.v1`), as the host sees it.

        In a node's namespaces (`ns`) containerd listens on /run/containerd/containerd.sock,
        which is `<workdir>/run/containerd/containerd.sock` from outside.
        """
        if self.ns is not None:
            return self.workdir / "run" / "containerd" / "containerd.sock"
        return self.workdir / "containerd.sock"

    def configure_registries(self, registries: list[RegistryHost]) -> None:
        """Write a `hosts.toml` per registry host (containerd reads them at each pull)."""
        for reg in registries:
            directory = self.workdir / "certs.d" / reg.host
            directory.mkdir(parents=True, exist_ok=True)
            if reg.ca_file:
                shutil.copyfile(reg.ca_file, directory / HOST_CA)
            (directory / "hosts.toml").write_text(hosts_toml(reg))

    def start(self, sandbox_image: str) -> Process:
        """Write the config, start containerd (readiness: `wait`; registries: later)."""
        registry_dir = self.workdir / "certs.d"
        registry_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "cni").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "containerd.toml"
        binary = containerd_tool("containerd", self.containerd)
        runc = containerd_tool("runc", self.containerd)
        standard = self.ns is not None
        config.write_text(containerd_config(
            self.workdir, Path("/etc/containerd/certs.d") if standard else registry_dir,
            sandbox_image, profile=self.containerd, runc=runc, standard_paths=standard))
        # containerd looks its shim up on PATH, and the shim its runc (`ctr run` names none):
        # the profile's own must come before any system one.
        path = os.pathsep.join(dict.fromkeys([str(binary.parent), str(runc.parent),
                                              os.environ.get("PATH", os.defpath)]))
        env = {"PATH": path}
        argv: list[str | os.PathLike[str]] = [binary, "--config", config]
        self.process = Process(f"containerd[{self.name}]",
                               self.ns.argv(argv) if self.ns is not None else argv,
                               self.workdir / "containerd.log", env=env).start()
        return self.process

    def wait(self, timeout: float = 30) -> None:
        """Block until containerd answers on its socket."""
        assert self.process is not None
        ctr = containerd_tool("ctr", self.containerd)
        self.process.wait_ready(
            lambda: bool(run([ctr, "--address", self.socket, "version"], timeout=5)), timeout)

    def ctr(self, *args: str, namespace: str = "k8s.io") -> str:
        """Run `ctr` against this node's containerd (namespace `k8s.io`, the CRI one)."""
        return run([containerd_tool("ctr", self.containerd), "--address", self.socket,
                    "--namespace", namespace, *args])

    def stop(self) -> None:
        """Stop containerd and its shims, and unmount whatever it left mounted."""
        if self.process is not None:
            self.process.stop()
        unmount_under(self.workdir)

    def node_object(self) -> dict[str, Any]:
        """The `Node` this node registers (metadata only; status: `node_status`)."""
        labels = {
            "kubernetes.io/hostname": self.name, "kubernetes.io/arch": _ARCH,
            "kubernetes.io/os": "linux", BED_LABEL: "true", **self.labels,
        }
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": labels,
                             "annotations": {SOCKET_ANNOTATION: str(self.socket)}}}

    def node_status(self, kubelet_version: str, containerd_version: str) -> dict[str, Any]:
        """`Node.status` as a kubelet reports it: Ready, capacity, addresses, nodeInfo."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        resources = {"cpu": str(os.cpu_count() or 2), "memory": "8Gi", "pods": "110",
                     "ephemeral-storage": "100Gi"}
        conditions = [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                       "message": "simulated by the layercache test bed",
                       "lastHeartbeatTime": now, "lastTransitionTime": now}]
        conditions += [{"type": t, "status": "False", "reason": f"KubeletHasNo{t}",
                        "message": "simulated", "lastHeartbeatTime": now,
                        "lastTransitionTime": now}
                       for t in ("MemoryPressure", "DiskPressure", "PIDPressure")]
        node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, self.name))
        return {
            "capacity": resources, "allocatable": resources, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.name}],
            "nodeInfo": {
                "machineID": node_id.replace("-", ""), "systemUUID": node_id,
                "bootID": node_id, "kernelVersion": platform.release(),
                "osImage": "layercache test bed", "operatingSystem": "linux",
                "architecture": _ARCH, "containerRuntimeVersion": containerd_version,
                "kubeletVersion": kubelet_version, "kubeProxyVersion": kubelet_version,
            },
        }


def containerd_version(profile: str | None = None) -> str:
    """Containerd's version as the kubelet reports it, e.g. `containerd://v2.3.4`.

    `containerd --version` prints `containerd <package> <version> <revision>`, the version
    the CRI `Version` call returns (a release build's has the tag's `v`, as on kind's nodes).
    """
    out = run([containerd_tool("containerd", profile), "--version"])
    with contextlib.suppress(IndexError):
        return "containerd://" + out.split()[2]
    return "containerd://unknown"
