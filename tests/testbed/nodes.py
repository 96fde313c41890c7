"""Simulated nodes: one real containerd daemon each, plus a registered `Node` object.

A node is what the kubelet would leave behind for our purposes: a containerd (Debian
1.6 + runc, with the CRI plugin) with its own root, state dir and socket, whose registry
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
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.paths import tool
from testbed.procs import Process, run

#: Annotation on the Node naming its containerd socket (bed only; agents in pods mount it).
SOCKET_ANNOTATION = "layercache.dev/containerd-socket"
#: Label on every simulated node, so tests can select them.
BED_LABEL = "layercache.dev/testbed"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


@dataclass(frozen=True)
class RegistryHost:
    """How a node's containerd reaches one registry host (`config_path` hosts.toml)."""

    host: str            # as written in image references, "127.0.0.1:PORT"
    server: str          # URL containerd talks to, "http://…" or "https://…"
    ca_file: Path | None = None


def containerd_config(workdir: Path, registry_dir: Path, sandbox_image: str) -> str:
    """The containerd 1.6 config (version 2 TOML) of a node rooted at `workdir`."""
    return f"""\
version = 2
root = "{workdir / 'root'}"
state = "{workdir / 'state'}"
# Snapshotters that need kernel features or devices we don't set up; overlayfs works here.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{workdir / 'containerd.sock'}"
[ttrpc]
  address = "{workdir / 'containerd.sock.ttrpc'}"
[debug]
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{workdir / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # Port 0: each daemon's CRI streaming server takes a free port.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    # Keep layer blobs after unpack (kind's default drops them): they are what we share.
    discard_unpacked_layers = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{workdir / 'cni'}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{registry_dir}"
"""


def hosts_toml(reg: RegistryHost) -> str:
    """A containerd `hosts.toml` sending pulls for `reg.host` to `reg.server`."""
    ca = f'\n  ca = "{reg.ca_file}"' if reg.ca_file else ""
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
    """One simulated node: `name`, its containerd under `workdir`, and its Node object."""

    name: str
    workdir: Path
    labels: Mapping[str, str] = field(default_factory=dict)
    process: Process | None = None

    @property
    def socket(self) -> Path:
        """Containerd's gRPC socket (also serves CRI `runtime.v1`)."""
        return self.workdir / "containerd.sock"

    def configure_registries(self, registries: list[RegistryHost]) -> None:
        """Write a `hosts.toml` per registry host (containerd reads them at each pull)."""
        for reg in registries:
            (self.workdir / "certs.d" / reg.host).mkdir(parents=True, exist_ok=True)
            (self.workdir / "certs.d" / reg.host / "hosts.toml").write_text(hosts_toml(reg))

    def start(self, sandbox_image: str) -> Process:
        """Write the config, start containerd (readiness: `wait`; registries: later)."""
        registry_dir = self.workdir / "certs.d"
        registry_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "cni").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "containerd.toml"
        config.write_text(containerd_config(self.workdir, registry_dir, sandbox_image))
        self.process = Process(f"containerd[{self.name}]",
                               [tool("containerd"), "--config", config],
                               self.workdir / "containerd.log").start()
        return self.process

    def wait(self, timeout: float = 30) -> None:
        """Block until containerd answers on its socket."""
        assert self.process is not None
        ctr = tool("ctr")
        self.process.wait_ready(
            lambda: bool(run([ctr, "--address", self.socket, "version"], timeout=5)), timeout)

    def ctr(self, *args: str, namespace: str = "k8s.io") -> str:
        """Run `ctr` against this node's containerd (namespace `k8s.io`, the CRI one)."""
        return run([tool("ctr"), "--address", self.socket, "--namespace", namespace, *args])

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


def containerd_version() -> str:
    """Containerd's version as the kubelet reports it, e.g. `containerd://1.6.20`."""
    out = run([tool("containerd"), "--version"])
    with contextlib.suppress(IndexError):
        return "containerd://" + out.split()[2].split("~")[0]
    return "containerd://unknown"
