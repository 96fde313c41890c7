"""Both install paths: the Helm chart and manifests/, linted, rendered, and on the real bed.

- `helm lint --strict` (values.schema.json applied) and `helm template` with the default
  values and every ci/ values file; the schema refuses typos and wrong types;
- the chart renders exactly what manifests/ holds (whole objects, release labels aside);
- the apiserver accepts both renderings (`kubectl apply --dry-run=server`), and its
  PodSecurity admission finds only the agent outside `restricted`, for the socket alone.
  The bed has no Prometheus Operator CRDs: PodMonitor/PrometheusRule are left out of the
  dry run (they are checked as rendered objects instead);
- a real `helm install` creates the operator's two Pods and one agent Pod bound to each
  Node (no kubelet runs them: they stay Pending), and `helm uninstall` leaves nothing.
  `helm test` needs running Pods, so its hook Pod is rendered and dry-run, and its script
  is run as a process against a real operator and agent.

The release lives in its own namespace with its own cluster-scoped names, next to the
layercache-system install the operator and end-to-end tests use on the same bed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.bed import BedState
from testbed.install import (
    CHART,
    MANIFESTS,
    MONITORING_GROUP,
    Obj,
    by_key,
    helm,
    is_hook,
    kustomize,
    lint_chart,
    parse,
    release_neutral,
    render_chart,
    server_dry_run,
    without_monitoring,
)
from testbed.kube import Kube, wait_for
from testbed.procs import ComponentError, Process
from testbed.product import install, start_agent, start_operator

pytestmark = pytest.mark.integration

RELEASE = NAMESPACE = "layercache-helm"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
#: What PodSecurity's `restricted` level must refuse in the agent, and nothing more: the
#: hostPath mounts of the containerd socket and image filesystem, and root for the socket.
AGENT_VIOLATIONS = {"restricted volume types", "runAsNonRoot != true", "runAsUser=0"}


def kinds(objects: list[Obj]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj["kind"]] = counts.get(obj["kind"], 0) + 1
    return counts


def pod_spec(objects: list[Obj], kind: str) -> dict[str, Any]:
    [workload] = [o for o in objects if o["kind"] == kind]
    spec: dict[str, Any] = workload["spec"]["template"]
    return spec


# --- chart, no cluster ---------------------------------------------------------------------

# ci/default-values.yaml is the defaults; `make lint` (.ci/lint-chart.sh) also runs without it.
@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_chart_lints_and_renders(values: Path) -> None:
    report = lint_chart([values])
    assert "1 chart(s) linted, 0 chart(s) failed" in report
    objects = render_chart(RELEASE, NAMESPACE, [values])
    counts = kinds([o for o in objects if not is_hook(o)])  # the uninstall hook has its own
    assert counts["Deployment"] == counts["DaemonSet"] == 1
    assert counts["ClusterRole"] == counts["ClusterRoleBinding"] == 2
    # Cluster-scoped names carry the release's name, so releases never share one.
    fullname = yaml.safe_load(values.read_text()).get("fullnameOverride", RELEASE)
    for obj in objects:
        if obj["kind"] in {"ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["name"].startswith(fullname)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    operator = pod_spec(objects, "Deployment")["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    assert env["LAYERCACHE_STANDALONE"] == "false"
    # Leader election: a Lease in the release namespace, named like the operator, which
    # the operator's Role (not its ClusterRole) may read and renew by that name only.
    assert env["LAYERCACHE_LEASE_NAME"] == f"{fullname}-operator"
    [role] = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith(
        "-operator")]
    assert {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
            "resourceNames": [f"{fullname}-operator"], "verbs": ["get", "update"]
            } in role["rules"]
    assert not any("coordination.k8s.io" in r["apiGroups"] or "kopf.dev" in r["apiGroups"]
                   for o in objects if o["kind"] == "ClusterRole" for r in o["rules"])
    assert not any(o["apiVersion"].startswith("kopf.dev") for o in objects)
    # A disruption budget only where a second replica can keep the operator up.
    replicas = next(o for o in objects if o["kind"] == "Deployment")["spec"]["replicas"]
    assert counts.get("PodDisruptionBudget", 0) == (1 if replicas >= 2 else 0)


def test_long_release_names_give_short_distinct_names() -> None:
    # The full name is cut before a component's suffix: with a 53-character release (Helm's
    # limit) every name still fits 63 characters and operator and agent never share one.
    release = "r" * 53
    objects = render_chart(release, NAMESPACE, sets=[
        "monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true",
        "monitoring.dashboard.enabled=true"])
    names: dict[str, list[str]] = {}
    for obj in objects:
        names.setdefault(obj["kind"], []).append(obj["metadata"]["name"])
    assert max(len(n) for kind in names.values() for n in kind) == 63
    for kind, kind_names in names.items():
        assert all(len(n) <= 63 for n in kind_names), kind
        assert len(set(kind_names)) == len(kind_names), f"{kind}: {kind_names}"
    assert f"{release[:46]}-operator-metrics" in names["Service"]
    assert len(names["PodMonitor"]) == 2
    assert len(names["ClusterRole"]) == 3  # operator, agent, and the uninstall hook's


def test_schema_refuses_typos_and_wrong_types() -> None:
    for bad, where in (("operator.replicas=two", "/operator/replicas"),
                       ("operator.replica=2", "'replica' not allowed"),
                       ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
                       ("agent.containerd.socket=relative.sock", "/agent/containerd/socket"),
                       ("tests.timeoutSeconds=0", "/tests/timeoutSeconds")):
        with pytest.raises(ComponentError, match="values don't meet the specifications") as err:
            render_chart(sets=[bad])
        assert where in str(err.value)


def test_settings_the_chart_owns_cannot_be_overridden_by_env() -> None:
    with pytest.raises(ComponentError, match=r"agent\.env\.POD_IP is set by the chart"):
        render_chart(sets=["agent.env.POD_IP=10.0.0.1"])
    objects = render_chart(sets=["agent.env.LAYERCACHE_CONCURRENCY=8"])
    env = pod_spec(objects, "DaemonSet")["spec"]["containers"][0]["env"]
    assert {"name": "LAYERCACHE_CONCURRENCY", "value": "8"} in env
    # The Lease's name is the chart's (its Role names it).
    with pytest.raises(ComponentError, match=r"operator\.env\.LAYERCACHE_LEASE_NAME is set by"):
        render_chart(sets=["operator.env.LAYERCACHE_LEASE_NAME=mine"])
    # Settings that would break the install: Secrets other than the chart's are outside the
    # RBAC's resourceNames.
    for bad in ("operator.env.LAYERCACHE_CREDENTIALS_SECRET=mine",
                "operator.env.LAYERCACHE_PEER_TOKEN_SECRET=mine",
                "agent.env.LAYERCACHE_PEER_TOKEN_SECRET=mine",
                "agent.env.LAYERCACHE_REGISTRY_SECRET=mine"):
        name = bad.partition("=")[0]
        with pytest.raises(ComponentError, match=rf"{re.escape(name)} cannot be set: "):
            render_chart(sets=[bad])


def test_user_labels_never_double_or_override_the_charts(tmp_path: Path) -> None:
    # Labels are merged, not appended: a key of both appears once. Selector labels win on
    # Pods (a podLabels component would orphan them) and on every object; the user's
    # grafana_dashboard value wins over the chart's default "1".
    values = tmp_path / "labels.yaml"
    values.write_text(yaml.safe_dump({
        "commonLabels": {"app.kubernetes.io/name": "other", "owner": "me"},
        "agent": {"podLabels": {"app.kubernetes.io/component": "evil", "team": "a"}},
        "operator": {"podLabels": {"app.kubernetes.io/instance": "evil"}},
        "monitoring": {"dashboard": {"enabled": True, "labels": {"grafana_dashboard": "lc"}},
                       "podMonitor": {"enabled": True, "labels": {
                           "app.kubernetes.io/component": "evil", "release": "prom"}}}}))
    objects = render_chart(RELEASE, NAMESPACE, [values])
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "layercache", obj["kind"]
        assert labels["owner"] == "me"
    for kind in ("Deployment", "DaemonSet"):
        [workload] = [o for o in objects if o["kind"] == kind]
        pod = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod.items()
    assert pod_spec(objects, "DaemonSet")["metadata"]["labels"]["team"] == "a"
    [dashboard] = [o for o in objects if o["kind"] == "ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "lc"
    monitors = [o["metadata"]["labels"] for o in objects if o["kind"] == "PodMonitor"]
    assert sorted(m["app.kubernetes.io/component"] for m in monitors) == ["agent", "operator"]
    assert all(m["release"] == "prom" for m in monitors)


def test_env_numbers_render_as_written(tmp_path: Path) -> None:
    # YAML numbers reach Helm as float64: without care 104857600 renders as 1.048576e+08,
    # which the settings cannot parse as an integer.
    values = tmp_path / "env.yaml"
    values.write_text("agent:\n  env:\n    LAYERCACHE_MAX_BYTES_PER_SECOND: 104857600\n"
                      "    LAYERCACHE_MIN_FREE_PERCENT: 12.5\n"
                      "operator:\n  env:\n    LAYERCACHE_RESOLVE_CONCURRENCY: 16\n"
                      "    LAYERCACHE_LOG_JSON: true\n    LAYERCACHE_OTHER: '007'\n")
    objects = render_chart(values=[values])
    agent = pod_spec(objects, "DaemonSet")["spec"]["containers"][0]["env"]
    operator = pod_spec(objects, "Deployment")["spec"]["containers"][0]["env"]
    assert {"name": "LAYERCACHE_MAX_BYTES_PER_SECOND", "value": "104857600"} in agent
    assert {"name": "LAYERCACHE_MIN_FREE_PERCENT", "value": "12.5"} in agent
    assert {"name": "LAYERCACHE_RESOLVE_CONCURRENCY", "value": "16"} in operator
    assert {"name": "LAYERCACHE_LOG_JSON", "value": "true"} in operator
    assert {"name": "LAYERCACHE_OTHER", "value": "007"} in operator


def test_chart_renders_what_the_manifests_hold() -> None:
    # Release "layercache" in layercache-system gives the manifests' names: every object must
    # then be the same, whole, once release and chart labels are set aside.
    chart = by_key(release_neutral(o) for o in render_chart("layercache", "layercache-system")
                   if not is_hook(o))
    manifests = by_key(release_neutral(o) for o in kustomize() if o["kind"] != "Namespace")
    # The CRDs (templates, crds.install) are the manifests' own, schema and all, plus the
    # keep policy (crds.keep) that `helm uninstall` leaves them by.
    crds = [k for k in chart if k[0] == "CustomResourceDefinition"]
    assert len(crds) == 2
    for k in crds:
        assert chart[k]["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert sorted(chart) == sorted(manifests)
    for key, obj in manifests.items():
        assert chart[key] == obj, f"chart and manifests/ differ in {key}"
    rbac = [k for k in manifests if k[0] in {"ClusterRole", "Role"}]
    assert len(rbac) == 4 and all(chart[k]["rules"] == manifests[k]["rules"] for k in rbac)


def test_podmonitors_select_the_manifests_pods_by_their_metrics_port() -> None:
    # podmonitor.yaml cannot be dry-run on the bed (no Prometheus Operator CRDs): check
    # that each PodMonitor finds its workload's Pods and a port named as it says.
    workloads = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in kustomize()
                 if o["kind"] in {"Deployment", "DaemonSet"}}
    monitors = parse((MANIFESTS / "podmonitor.yaml").read_text())
    assert sorted(m["metadata"]["name"] for m in monitors) == [
        "layercache-agent", "layercache-operator"]
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        template = workloads[selector["app.kubernetes.io/component"]]["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    # The alerts and the dashboard match these exact job names, for any release name.
    chart = [o for o in render_chart("infra", "infra", sets=[
        "fullnameOverride=lc", "monitoring.podMonitor.enabled=true"]) if o["kind"] == "PodMonitor"]
    for monitor in [*monitors, *chart]:
        component = monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        assert {"action": "replace", "targetLabel": "job",
                "replacement": f"layercache-{component}"} in endpoint["relabelings"]


def test_pod_templates_do_not_change_with_the_chart_version(tmp_path: Path) -> None:
    # An upgrade that only bumps the chart must not roll every agent: no chart version in
    # pod templates (object labels may carry it).
    bumped = tmp_path / "layercache"
    shutil.copytree(CHART, bumped)
    meta = yaml.safe_load((bumped / "Chart.yaml").read_text())
    meta["version"] = "9.9.9"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(meta))
    before, after = render_chart(), render_chart(chart=bumped)
    for kind in ("Deployment", "DaemonSet"):
        assert pod_spec(after, kind) == pod_spec(before, kind)
        [obj] = [o for o in after if o["kind"] == kind]
        assert obj["metadata"]["labels"]["helm.sh/chart"] == "layercache-9.9.9"


def test_monitoring_objects_follow_their_toggles_and_files(tmp_path: Path) -> None:
    chart = tmp_path / "layercache"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("files"))
    on = ["monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true",
          "monitoring.dashboard.enabled=true"]
    # No files/ (the dashboard and the rules are optional): only the PodMonitors.
    counts = kinds(render_chart(sets=on, chart=chart))
    assert counts.get("PodMonitor") == 2
    assert "PrometheusRule" not in counts and "ConfigMap" not in counts
    groups = [{"name": "layercache", "rules": [{"alert": "LayerCacheDegraded",
               "expr": "max by (namespace, cache) (layercache_cache_degraded) == 1",
               "for": "15m", "annotations": {"summary": "{{ $labels.cache }} is degraded"}}]}]
    (chart / "files").mkdir()
    (chart / "files" / "alerts.yaml").write_text(yaml.safe_dump({"groups": groups}))
    dashboard = '{"title": "layercache", "panels": []}\n'
    (chart / "files" / "dashboard.json").write_text(dashboard)
    objects = render_chart(sets=[*on, "monitoring.dashboard.namespace=grafana"], chart=chart)
    [rule] = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == groups  # Prometheus templates pass through untouched
    # runbookBaseURL makes the shipped rules' relative runbook links absolute.
    [rule] = [o for o in render_chart(sets=[
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.runbookBaseURL=https://docs.example/lc/"]) if o["kind"] ==
        "PrometheusRule"]
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert urls and all(u.startswith("https://docs.example/lc/docs/observability.md#")
                        for u in urls), urls
    [config] = [o for o in objects if o["kind"] == "ConfigMap"]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["namespace"] == "grafana"
    assert config["data"]["layercache.json"] == dashboard.rstrip("\n")
    # Toggles off (the default): none of them, files or not.
    assert not {"PodMonitor", "PrometheusRule", "ConfigMap"} & set(kinds(
        render_chart(chart=chart)))


# --- on the bed ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def release_namespace(kube: Kube) -> Iterator[str]:
    """The release's namespace; PodSecurity warns at `restricted`, so dry runs report it."""
    install(kube)  # the shared CRDs and layercache-system, as the other bed tests have them
    kube.core.create_namespace({"metadata": {"name": NAMESPACE, "labels": {
        "pod-security.kubernetes.io/warn": "restricted"}}})
    yield NAMESPACE
    _force_delete_pods(kube)
    kube.core.delete_namespace(NAMESPACE)


def _force_delete_pods(kube: Kube) -> None:
    # No kubelet confirms a bound Pod's deletion on the bed: do what it would have done.
    kube.kubectl("-n", NAMESPACE, "delete", "pods", "-l", INSTANCE, "--grace-period=0",
                 "--force", "--ignore-not-found")


def test_manifests_pass_a_server_dry_run(kube: Kube, release_namespace: str) -> None:
    objects = kustomize()
    result = server_dry_run(kube.kubeconfig, objects)
    assert len(result.applied) == len(objects)
    # layercache-system warns at `restricted`: the operator meets it, the agent misses only
    # what the containerd socket requires.
    assert result.pod_security() == [AGENT_VIOLATIONS]
    # The sample cache (applied separately: its CRD must be established first) fits the CRD.
    sample = parse((MANIFESTS / "samples" / "layercache.yaml").read_text())
    assert server_dry_run(kube.kubeconfig, sample).applied == ["layercache.layercache.dev/runtimes"]


# ci/default-values.yaml stands for the defaults here (the bed's time is shared).
@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_chart_passes_a_server_dry_run(kube: Kube, release_namespace: str,
                                       values: Path) -> None:
    # The dashboard's own namespace is a ci/ choice; on the bed it goes to the release's.
    objects = render_chart(RELEASE, release_namespace, [values],
                           ["monitoring.dashboard.namespace=" + release_namespace])
    served = without_monitoring(objects)
    skipped = {o["kind"] for o in objects} - {o["kind"] for o in served}
    assert skipped <= {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    result = server_dry_run(kube.kubeconfig, served)
    assert len(result.applied) == len(served)
    assert any(is_hook(o) and o["kind"] == "Pod" for o in served)  # `helm test`, dry-run
    # The operator and the `helm test` Pod meet `restricted`; the agent as above.
    assert result.pod_security() == [AGENT_VIOLATIONS]
    assert all(not o["apiVersion"].startswith(MONITORING_GROUP) for o in served)


def test_helm_install_schedules_the_operator_and_one_agent_per_node(
        bed: BedState, kube: Kube, release_namespace: str) -> None:
    started = time.monotonic()
    # The bed's CRDs came from manifests/crds (kubectl): the release adopts them, as a user
    # who installed them that way does (or passes crds.install=false).
    helm("install", RELEASE, CHART, "--namespace", release_namespace, "--take-ownership",
         kubeconfig=kube.kubeconfig)
    try:
        nodes = sorted(n.metadata.name for n in kube.core.list_node(
            label_selector="kubernetes.io/os=linux").items)
        assert len(nodes) >= len(bed.nodes)

        def pods(component: str) -> list[Any]:
            items = kube.core.list_namespaced_pod(
                release_namespace, label_selector=f"{INSTANCE},app.kubernetes.io/component="
                                                  f"{component}").items
            return [p for p in items if p.spec.node_name]  # created and bound by the scheduler
        operators = wait_for(lambda: (p := pods("operator")) and len(p) == 2 and p,
                             timeout=30, what="2 operator Pods bound to nodes")
        # Soft anti-affinity, three free nodes: the scheduler spreads the replicas.
        assert len({p.spec.node_name for p in operators}) == 2
        agents = wait_for(lambda: (p := pods("agent")) and len(p) == len(nodes) and p,
                          timeout=30, what=f"{len(nodes)} agent Pods bound to nodes")
        assert sorted(p.spec.node_name for p in agents) == nodes  # each node exactly once
        for pod in [*operators, *agents]:
            assert pod.status.phase == "Pending"  # no kubelet on the bed runs them
            assert pod.spec.service_account_name.startswith(RELEASE)
        daemonset = kube.apps.read_namespaced_daemon_set(f"{RELEASE}-agent", release_namespace)
        assert daemonset.status.desired_number_scheduled == len(nodes)
    finally:
        # --no-hooks: no kubelet would run the pre-delete cleanup Job (it waits for the pod
        # network; its command runs as a process in test_uninstall.py).
        helm("uninstall", RELEASE, "--namespace", release_namespace, "--no-hooks",
             kubeconfig=kube.kubeconfig)
    # The garbage collector takes the Pods with their owners; without a kubelet they wait
    # for its confirmation, so once all are marked for deletion, confirm in its place.
    wait_for(lambda: all(p.metadata.deletion_timestamp for p in kube.core.list_namespaced_pod(
        release_namespace, label_selector=INSTANCE).items), timeout=30,
        what="the release's Pods marked for deletion")
    _force_delete_pods(kube)
    wait_for(lambda: _leftovers(kube, release_namespace) == "", timeout=30,
             what="nothing of the release left")
    assert helm("list", "--namespace", release_namespace, "--short",
                kubeconfig=kube.kubeconfig).strip() == ""
    assert time.monotonic() - started < 60


def _leftovers(kube: Kube, namespace: str) -> str:
    namespaced = kube.kubectl("-n", namespace, "get", "all,serviceaccounts,roles,rolebindings,"
                              "poddisruptionbudgets,configmaps,secrets", "-l", INSTANCE,
                              "-o", "name")
    releases = kube.kubectl("-n", namespace, "get", "secrets", "-l", f"name={RELEASE}",
                            "-o", "name")  # Helm's release records
    cluster = kube.kubectl("get", "clusterroles,clusterrolebindings",
                           "-l", INSTANCE, "-o", "name")
    return (namespaced + releases + cluster).strip()


def test_the_helm_test_script_passes_against_a_real_operator_and_agent(
        bed: BedState, kube: Kube, tmp_path: Path) -> None:
    # `helm test` cannot run on the bed (no kubelet), but its script can: run the hook Pod's
    # own command, with the Pod's env pointed at a real operator and agent (processes under
    # their ServiceAccounts), instead of the Services' DNS names.
    [hook] = [o for o in render_chart() if is_hook(o)
              and o["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    [container] = hook["spec"]["containers"]
    assert container["command"] == ["python3", "-c"]
    script = container["args"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OPERATOR_URL"] == ("http://layercache-operator-metrics.layercache-system.svc:"
                                   "8080/metrics")
    install(kube, "rbac-operator.yaml", "rbac-agent.yaml")
    # The agent starts in the background while start_operator waits for the operator.
    agent, _, agent_port = start_agent(bed, kube, bed.nodes[0], tmp_path / "agent")
    try:
        operator, operator_port = start_operator(bed, kube, tmp_path / "operator")
    except BaseException:
        agent.stop()
        raise
    try:
        def answers(port: int) -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                    return True
            except OSError:
                return False
        wait_for(lambda: answers(agent_port), timeout=30, what="the agent's metrics")

        def hook(agent_metrics: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                env={**env, "OPERATOR_URL": f"http://127.0.0.1:{operator_port}/metrics",
                     "AGENT_HOST": "127.0.0.1", "AGENT_PORT": str(agent_metrics)}, check=False)
        passed = hook(agent_port)
        assert passed.returncode == 0, passed.stderr
        assert passed.stdout.splitlines()[-1] == "operator and 1 agents answer"
        # An endpoint without agent metrics (the operator's, as if it were an agent) fails it.
        failed = hook(operator_port)
        assert failed.returncode == 1
        assert "without layercache_agent_* metrics" in failed.stderr
    finally:
        with ThreadPoolExecutor() as pool:  # both shut down gracefully, at the same time
            list(pool.map(Process.stop, [agent, operator]))
