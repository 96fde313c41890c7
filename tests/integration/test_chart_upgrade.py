"""`helm upgrade` from the previous chart updates the CRDs' schemas on the real apiserver.

The previous chart (commit PREVIOUS, before the CRDs became templates) kept them in crds/,
which Helm installs once and never upgrades. This chart renders them as templates
(crds.install, crds.keep): an upgrade to a chart whose CRD schema changed must put the new
schema into the apiserver. The changed schema is a test copy of this chart with one extra,
harmless property; the upgrade is what a user types (`--take-ownership` once, because the
previous chart's CRDs were created outside any release). No Pod needs to run for this; the
uninstall skips the pre-delete hook, whose Job would need one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.install import CHART, MANIFESTS, helm
from testbed.kube import Kube
from testbed.paths import REPO
from testbed.product import install

pytestmark = pytest.mark.integration

#: The last commit whose chart kept its CRDs in crds/ (and a ClusterKopfPeering).
PREVIOUS = "b77fca5"
CRD = "layercaches.layercache.dev"
PROBE = "upgradeProbe"


def _previous_chart(into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS, "helm/layercache"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    chart = into / "helm" / "layercache"
    assert (chart / "crds" / "layercache.dev_layercaches.yaml").exists()
    return chart


def _changed_chart(into: Path) -> Path:
    """This chart with one more (optional, string) property in the LayerCache spec schema."""
    chart = into / "layercache"
    shutil.copytree(CHART, chart)
    path = chart / "files" / "crds" / "layercache.dev_layercaches.yaml"
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec["properties"][PROBE] = {"type": "string", "description": "test-only field"}
    path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return chart


def _spec_properties(kube: Kube) -> dict[str, Any]:
    crd = json.loads(kube.kubectl("get", "crd", CRD, "-o", "json"))
    [version] = crd["spec"]["versions"]
    props: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]
    return props


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    install(kube)  # the bed's shared CRDs, as the other tests have them
    name = f"upgrade-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
        helm("uninstall", name, "--namespace", name, "--ignore-not-found", "--no-hooks",
             kubeconfig=kube.kubeconfig)
    finally:
        # Give the other tests back the CRDs of manifests/crds: without the probe field, and
        # without the release's labels, whose field manager ("helm") would make later
        # server-side applies of another release's labels conflict.
        kube.kubectl("replace", "-f", str(MANIFESTS / "crds"))
        kube.kubectl("delete", "namespace", name, "--wait=false")


def test_helm_upgrade_from_the_previous_chart_updates_the_crd_schema(
        kube: Kube, tmp_path: Path, namespace: str) -> None:
    release = namespace
    previous = _previous_chart(tmp_path / "previous")
    changed = _changed_chart(tmp_path / "changed")
    helm("install", release, previous, "--namespace", namespace, kubeconfig=kube.kubeconfig)
    assert PROBE not in _spec_properties(kube)
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "layercache.dev/v1alpha1", "kind": "LayerCache",
         "metadata": {"name": "before"}, "spec": {"images": ["registry.invalid/a:1"]}}))

    helm("upgrade", release, changed, "--namespace", namespace, "--take-ownership",
         kubeconfig=kube.kubeconfig)

    assert _spec_properties(kube)[PROBE] == {"type": "string",
                                             "description": "test-only field"}
    crd = json.loads(kube.kubectl("get", "crd", CRD, "-o", "json"))
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
    # The new field is served: the apiserver keeps it instead of pruning it.
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "layercache.dev/v1alpha1", "kind": "LayerCache",
         "metadata": {"name": "after"},
         "spec": {"images": ["registry.invalid/a:1"], PROBE: "kept"}}))
    after = json.loads(kube.kubectl("-n", namespace, "get", "layercache", "after", "-o", "json"))
    assert after["spec"][PROBE] == "kept"
    assert kube.kubectl("-n", namespace, "get", "layercache", "before", "-o", "name").strip()
    # The previous chart's ClusterKopfPeering went with the upgrade (leader election is a
    # Lease now); its CRD, from the previous chart's crds/, is the user's to delete.
    assert kube.kubectl("get", "clusterkopfpeerings", "-o", "name",
                        "--ignore-not-found").strip() == ""
    kube.kubectl("delete", "crd", "clusterkopfpeerings.kopf.dev", "--ignore-not-found")

    # crds.keep: the uninstall leaves the CRD, and so the caches, in place. --no-hooks: the
    # pre-delete hook's Job needs a running Pod (the pod network; its command is tested in
    # test_uninstall.py).
    helm("uninstall", release, "--namespace", namespace, "--no-hooks",
         kubeconfig=kube.kubeconfig)
    assert PROBE in _spec_properties(kube)
    assert kube.kubectl("-n", namespace, "get", "layercache", "after", "-o", "name").strip()
    kube.kubectl("-n", namespace, "delete", "layercaches", "--all", "--timeout=30s")
