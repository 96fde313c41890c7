"""layercache installed by Helm on the kubelet bed, as a user installs it on kind.

- `load_image`: the product image (`make image`, built without Docker and cached) imported
  into every node's containerd, namespace `k8s.io`, under the chart's default reference,
  as `kind load` does (`ctr images import --digests`; kind streams a Docker archive, we an
  OCI archive of the same image). The archive is cached next to the cached build.
- `helm_install`: docs/kind.md step 3's commands as written (namespace, its Pod Security
  label, `helm install` of helm/layercache), the `helm install` with only image values
  added (repository and tag of the loaded image, `pullPolicy: Never`, so a node without
  the image fails at once instead of reaching for the internet) and the bed's plain-HTTP
  registries; waits until the operator Deployment and the agent DaemonSet are Ready on
  every node. `helm_test` runs the chart's test hook; `uninstall` the doc's "Uninstall"
  commands in their order.
- `pod_rows`: pods as `kubectl get pods -o wide` shows them; `pulled_seconds`: the
  kubelet's pull time of a pod's image from its `Pulled` event.

Only the image loader works on a bed without kubelets; the rest needs `TestBed(kubelets=
True)`, whose nodes run the chart's Pods.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.bed import BedState
from testbed.install import helm
from testbed.kube import Kube, wait_for
from testbed.paths import containerd_tool
from testbed.procs import ComponentError, run
from testbed.product_image import DEFAULT_REFERENCE, BuiltImage, build_image
from testbed.walkthrough import commands, run_command

#: Release name and namespace of docs/kind.md (and the chart's NOTES).
RELEASE = "layercache"
NAMESPACE = "layercache-system"
#: The sections of docs/kind.md whose commands install and uninstall (`testbed.walkthrough`).
INSTALL_STEP, UNINSTALL_STEP = "3. Install layercache", "Uninstall"
#: Name of the cached OCI archive, beside the cached layout of one build.
ARCHIVE = "oci-archive.tar"
#: The kubelet's `Pulled` event message (pkg/kubelet/images/image_manager.go).
_PULLED = re.compile(r'^Successfully pulled image "(?P<image>[^"]+)" in (?P<took>\S+)')
#: A Go `time.Duration` string ("1.234s", "812.3ms", "1m2.5s"): value-unit pairs.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6,
                 "ns": 1e-9}


def split_reference(reference: str) -> tuple[str, str]:
    """`registry/repo:tag` -> (`registry/repo`, `tag`).

    Raises:
        ValueError: the reference has no tag.
    """
    repository, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        raise ValueError(f"image reference {reference!r} has no tag")
    return repository, tag


def image_archive(image: BuiltImage) -> Path:
    """An OCI archive (tar of the layout) of `image`, written once beside its layout.

    Returns its path. The tar is renamed into place only when complete, so a reader never
    sees a partial one.
    """
    path = image.layout.parent / ARCHIVE
    if path.exists():
        return path
    fd, partial = tempfile.mkstemp(prefix=".archive-", dir=image.layout.parent)
    os.close(fd)
    try:
        with tarfile.open(partial, "w") as tar:
            for child in sorted(image.layout.iterdir()):
                tar.add(child, arcname=child.name)
        Path(partial).replace(path)
    finally:
        Path(partial).unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class LoadedImage:
    """The product image as the nodes hold it: `reference` (repo:tag) and manifest digest."""

    reference: str
    digest: str
    nodes: tuple[str, ...]

    @property
    def helm_values(self) -> list[str]:
        """`--set` arguments pointing the chart at this image and nothing else."""
        repository, tag = split_reference(self.reference)
        return ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                "--set", "image.pullPolicy=Never"]


def load_image(state: BedState, image: BuiltImage | None = None,
               reference: str = DEFAULT_REFERENCE) -> LoadedImage:
    """Import the product image into every node's containerd (`k8s.io`), as `kind load`.

    `image`: a build (default: `build_image()`, cached). The image is named `reference`
    (default: the chart's own default, so the chart finds it by name) and by digest.

    Raises:
        ComponentError: `ctr images import` failed on a node, or the node holds another
            digest under `reference` afterwards.
        CommandError / ToolMissingError: the image build failed (see `build_image`).
    """
    built = image or build_image()
    archive = image_archive(built)
    repository, tag = split_reference(reference)
    if tag != built.tag:
        raise ValueError(f"image reference {reference!r}: the build's tag is {built.tag!r}")
    ctr = containerd_tool("ctr", state.containerd)
    for node in state.nodes:
        base = [ctr, "--address", node.socket, "--namespace", "k8s.io", "images"]
        run([*base, "import", "--base-name", repository, "--digests", archive], timeout=300)
        listed = run([*base, "ls", f"name=={reference}"])
        if built.manifest_digest not in listed:
            raise ComponentError(f"node {node.name}: {reference} is not "
                                 f"{built.manifest_digest} after import:\n{listed}")
    return LoadedImage(reference, built.manifest_digest, tuple(n.name for n in state.nodes))


@dataclass(frozen=True)
class Release:
    """A Helm release of the chart on the bed: `name` in `namespace`, its `image`."""

    name: str
    namespace: str
    image: LoadedImage

    def selector(self, component: str | None = None) -> str:
        """Label selector of the release's Pods (of one `component`: operator, agent)."""
        labels = f"app.kubernetes.io/instance={self.name}"
        return f"{labels},app.kubernetes.io/component={component}" if component else labels


def helm_install(kube: Kube, image: LoadedImage, *, insecure_registries: Sequence[str] = (),
                 values: Sequence[str] = (), objects: Sequence[Mapping[str, Any]] = (),
                 timeout: float = 300) -> Release:
    """Install the chart by the commands of docs/kind.md step 3, as written.

    They create and label the namespace, `helm install layercache helm/layercache -n
    layercache-system` and list what came up; to the `helm install` line the bed adds only
    the image values (`LoadedImage.helm_values`), `insecure_registries`, plain-HTTP
    registries the chart's `insecureRegistries` names (the bed's byte-counting proxy is one,
    as kind's local-registry recipe is), and `values`: further `--set`/`--set-json`
    arguments (the end-to-end tests' settings and registry CA). `objects` (manifests, e.g.
    the ConfigMap `registryCA.configMap` names) are created in the release namespace just
    before `helm install`, as a user creates them once the namespace exists. Then waits
    until the operator Deployment has all its replicas Ready and the agent DaemonSet one
    Ready Pod on every node (`wait_ready`).

    Raises:
        ComponentError: a command failed; TimeoutError: not Ready in `timeout` s (the
            message lists every Pod's phase and waiting reason).
    """
    insecure = (["--set-json", f"insecureRegistries={json.dumps(list(insecure_registries))}"]
                if insecure_registries else [])
    for line in commands(INSTALL_STEP, block=0):  # the Helm path, not the manifests'
        installing = line.startswith("helm install ")
        for obj in objects if installing else ():
            kube.kubectl("-n", NAMESPACE, "create", "-f", "-", input=json.dumps(obj))
        extra = [*image.helm_values, *insecure, *values] if installing else []
        run_command(line, kube.kubeconfig, extra)
    installed = Release(RELEASE, NAMESPACE, image)
    wait_ready(kube, installed, timeout)
    return installed


def wait_ready(kube: Kube, release: Release, timeout: float = 300) -> None:
    """Wait until the release's operator Deployment and agent DaemonSet are all Ready.

    The DaemonSet counts as Ready when it schedules a Pod on every Node and each is Ready.

    Raises:
        TimeoutError: not in `timeout` seconds; the message lists the release's Pods.
    """
    nodes = len(kube.core.list_node().items)

    def ready() -> bool:
        deployment = kube.apps.read_namespaced_deployment(
            f"{release.name}-operator", release.namespace).status
        daemonset = kube.apps.read_namespaced_daemon_set(
            f"{release.name}-agent", release.namespace).status
        return (bool(deployment.replicas) and deployment.ready_replicas == deployment.replicas
                and daemonset.desired_number_scheduled == nodes
                and daemonset.number_ready == nodes)
    try:
        wait_for(ready, timeout=timeout, interval=1,
                 what=f"release {release.name}: operator and {nodes} agents Ready")
    except TimeoutError as e:
        rows = "\n".join("  " + "  ".join(r) for r in pod_rows(kube, release.namespace))
        raise TimeoutError(f"{e}\n{rows}") from None


def helm_test(kube: Kube, release: Release, timeout: float = 180) -> str:
    """`helm test` of `release` (the chart's metrics hook Pod); returns helm's report.

    No `--logs`: the hook's delete policy removes a Pod that succeeded before helm asks
    for its logs ("unable to get pod logs").

    Raises:
        ComponentError: the hook Pod failed (helm's stderr, then the failed Pod's log and
            its events: a failed hook Pod stays).
    """
    try:
        return helm("test", release.name, "--namespace", release.namespace,
                    f"--timeout={int(timeout)}s", kubeconfig=kube.kubeconfig,
                    timeout=timeout + 30)
    except ComponentError as error:
        selector = "app.kubernetes.io/component=test"
        found = []
        for args in (("logs", "-l", selector, "--tail=50"),
                     ("get", "events", "--field-selector", "involvedObject.kind=Pod")):
            try:
                found.append(kube.kubectl("-n", release.namespace, *args))
            except ComponentError as more:
                found.append(f"(kubectl {args[0]}: {more})")
        raise ComponentError(f"{error}\nthe test Pod:\n" + "\n".join(found)) from None


def uninstall(kube: Kube, timeout: float = 600) -> list[str]:
    """Uninstall by the Helm path of docs/kind.md's "Uninstall" section (its first block).

    `helm uninstall` runs the chart's pre-delete hook (a Job: `layercache cleanup` deletes
    every LayerCache and waits until every agent has released its layers), then the CRDs
    the chart keeps are deleted. The section's second block, plain manifests, is run by
    tests/integration/test_uninstall.py. Returns each command's output.

    Raises:
        ComponentError: a command failed (a hook that timed out fails `helm uninstall`).
    """
    return [run_command(line, kube.kubeconfig, timeout=timeout)
            for line in commands(UNINSTALL_STEP, block=0)]


#: Columns of `kubectl get pods -o wide` that `pod_rows` fills.
POD_COLUMNS = ("NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "IP", "NODE")


def pod_rows(kube: Kube, namespace: str | None = None,
             selector: str | None = None) -> list[tuple[str, ...]]:
    """Pods as `kubectl get pods -o wide` lists them (`POD_COLUMNS`), by namespace and name.

    STATUS is the phase, or the first container's waiting reason (ErrImageNeverPull,
    CrashLoopBackOff) when it has one, as kubectl shows it.
    """
    pods = (kube.core.list_namespaced_pod(namespace, label_selector=selector or "")
            if namespace else kube.core.list_pod_for_all_namespaces(
                label_selector=selector or ""))
    rows = []
    for pod in sorted(pods.items, key=lambda p: (p.metadata.namespace, p.metadata.name)):
        statuses = pod.status.container_statuses or []
        waiting = next((s.state.waiting.reason for s in statuses
                        if s.state and s.state.waiting), None)
        rows.append((pod.metadata.namespace, pod.metadata.name,
                     f"{sum(bool(s.ready) for s in statuses)}/{len(pod.spec.containers)}",
                     waiting or pod.status.phase, str(sum(s.restart_count for s in statuses)),
                     pod.status.pod_ip or "<none>", pod.spec.node_name or "<none>"))
    return rows


def go_duration_seconds(text: str) -> float:
    """Seconds in a Go `time.Duration` string ("1.5s", "812.3ms", "1m2.5s").

    Raises:
        ValueError: `text` is not one.
    """
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(v + u for v, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(value) * _UNIT_SECONDS[unit] for value, unit in parts)


def pulled_seconds(kube: Kube, namespace: str, pod: str) -> float | None:
    """The kubelet's pull time of `pod`'s image: "in X" of its `Pulled` event, in seconds.

    None while there is no such event (not pulled yet, or the image was already present:
    the kubelet then says "already present on machine" and pulls nothing).

    Raises:
        ValueError: a `Pulled` event whose message does not read as the kubelet's.
    """
    events = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={pod},reason=Pulled").items
    for event in events:
        found = _PULLED.match(event.message or "")
        if found:
            return go_duration_seconds(found["took"])
        if "already present" not in (event.message or ""):
            raise ValueError(f"Pulled event of pod {namespace}/{pod}: {event.message!r}")
    return None


def app_deployment(name: str, image: str, node: str, *,
                   command: Sequence[str] = ()) -> dict[str, Any]:
    """A one-replica Deployment of `image` pinned to `node` (nodeSelector by hostname).

    `command` replaces the image's entrypoint (the family's apps print and exit; a
    Deployment's Pod must keep running).
    """
    container: dict[str, Any] = {"name": "app", "image": image,
                                 "imagePullPolicy": "IfNotPresent"}
    if command:
        container["command"] = list(command)
    labels = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "nodeSelector": {"kubernetes.io/hostname": node},
                     "terminationGracePeriodSeconds": 5, "containers": [container]}}},
    }
