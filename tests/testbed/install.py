"""The install paths as tests see them: the chart rendered by helm, manifests/ by kustomize.

Both come back as parsed objects, so tests compare what Kubernetes would receive rather than
text. `release_neutral` removes what legitimately differs between a Helm release and the
plain manifests (release and chart labels), so the rest can be compared whole.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed.paths import REPO, tool
from testbed.procs import ComponentError, run

CHART = REPO / "helm" / "layercache"
MANIFESTS = REPO / "manifests"
#: Our helm is built without the release ldflags, so its default capabilities claim
#: Kubernetes v1.20 (below the chart's kubeVersion): render for the bed's pinned version.
KUBE_VERSION = "1.37.2"
#: Kinds served by the Prometheus Operator's CRDs, which the bed does not have.
MONITORING_GROUP = "monitoring.coreos.com/"
#: Labels a Helm release adds (or kustomize's `labels:` adds) that the other path lacks.
RELEASE_LABELS = frozenset({
    "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "app.kubernetes.io/version",
    "app.kubernetes.io/part-of", "helm.sh/chart",
})

#: Cluster-scoped kinds of both install paths.
CLUSTER_SCOPED = frozenset({
    "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "Namespace",
})

Obj = dict[str, Any]


def helm(*args: str | Path, kubeconfig: Path | None = None, timeout: float = 120) -> str:
    """Run the pinned helm; returns stdout.

    Raises:
        ComponentError: helm exited non-zero (its stderr is in the message).

    """
    env = {"KUBECONFIG": str(kubeconfig)} if kubeconfig else None
    return run([tool("helm"), *args], env=env, timeout=timeout)


def values_args(values: Iterable[Path] = (), sets: Iterable[str] = ()) -> list[str]:
    """Helm arguments for values files (in order) and `--set name=value` pairs."""
    args: list[str] = []
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


def parse(text: str) -> list[Obj]:
    """The objects of a multi-document YAML stream (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_chart(release: str = "layercache", namespace: str = "layercache-system",
                 values: Sequence[Path] = (), sets: Sequence[str] = (), *,
                 chart: Path = CHART) -> list[Obj]:
    """`helm template` of the chart (hooks and the CRD templates included), parsed.

    Raises:
        ComponentError: the chart failed to render.

    """
    out = helm("template", release, chart, "--namespace", namespace,
               "--kube-version", KUBE_VERSION, *values_args(values, sets))
    return parse(out)


def lint_chart(values: Sequence[Path] = (), sets: Sequence[str] = (), *,
               chart: Path = CHART) -> str:
    """`helm lint --strict` (values.schema.json applies); returns its report.

    Raises:
        ComponentError: lint found an error (or, being strict, a warning).

    """
    return helm("lint", "--strict", "--kube-version", KUBE_VERSION, chart,
                *values_args(values, sets))


def kustomize(directory: Path = MANIFESTS) -> list[Obj]:
    """`kubectl kustomize manifests/`, parsed."""
    return parse(run([tool("kubectl"), "kustomize", str(directory)]))


def without_monitoring(objects: Iterable[Obj]) -> list[Obj]:
    """The objects whose kind the bed serves (Prometheus Operator kinds dropped)."""
    return [o for o in objects if not o["apiVersion"].startswith(MONITORING_GROUP)]


def key(obj: Obj) -> tuple[str, str, str]:
    """(kind, namespace, name): how an object is found in a list of them."""
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def is_hook(obj: Obj) -> bool:
    """A Helm hook (e.g. the `helm test` Pod), not part of the installed release."""
    return "helm.sh/hook" in (obj["metadata"].get("annotations") or {})


def release_neutral(obj: Obj) -> Obj:
    """A copy of `obj` without what differs between a Helm release and the manifests.

    The object's own labels go (the chart labels every object, the manifests only some);
    pod-template labels, selectors and affinity label selectors lose the keys in
    `RELEASE_LABELS`; a cluster-scoped object loses the namespace kustomize's `namespace:`
    gives every kind it does not know (the API ignores it). Everything else is kept, so two
    install paths that agree compare equal.
    """
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in RELEASE_LABELS}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    neutral: Obj = strip(copy.deepcopy(obj))
    neutral["metadata"].pop("labels", None)
    if neutral["kind"] in CLUSTER_SCOPED:
        neutral["metadata"].pop("namespace", None)
    return neutral


def by_key(objects: Iterable[Obj]) -> dict[tuple[str, str, str], Obj]:
    """Objects indexed by `key`."""
    return {key(o): o for o in objects}


@dataclass(frozen=True)
class DryRun:
    """What `kubectl apply --dry-run=server` said: objects accepted, and its warnings."""

    applied: list[str]
    warnings: list[str]

    def pod_security(self) -> list[set[str]]:
        """Each PodSecurity warning as its set of violated checks (the text before `(`)."""
        found = []
        for warning in self.warnings:
            _, sep, reasons = warning.partition('would violate PodSecurity "restricted:latest": ')
            if sep:
                found.append({r.split(" (", 1)[0].strip() for r in _split_reasons(reasons)})
        return found


def _split_reasons(text: str) -> list[str]:
    # "a (x, y), b (z)": split on the commas outside parentheses.
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def server_dry_run(kubeconfig: Path, objects: Sequence[Obj]) -> DryRun:
    """Server-side apply of `objects` in dry-run mode (admission and PodSecurity run).

    Nothing is stored.

    Raises:
        ComponentError: the apiserver refused an object (kubectl's stderr in the message).

    """
    stream = yaml.safe_dump_all(objects, sort_keys=False).encode()
    cmd = [str(tool("kubectl")), f"--kubeconfig={kubeconfig}", "apply", "--server-side",
           "--dry-run=server", "--field-manager=layercache-install-test", "-f", "-"]
    proc = subprocess.run(cmd, input=stream, capture_output=True, timeout=60, check=False)
    stderr = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise ComponentError(f"kubectl apply --dry-run=server failed:\n{stderr}")
    applied = [line.split()[0] for line in proc.stdout.decode().splitlines()
               if line.endswith("(server dry run)")]
    warnings = [line.removeprefix("Warning: ") for line in stderr.splitlines()
                if line.startswith("Warning: ")]
    return DryRun(applied, warnings)
