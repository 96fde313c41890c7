"""The RBAC matrix: what each layercache ServiceAccount may and may not do, per the apiserver.

Both RBAC manifests from `manifests/` are applied as `testbed.product.install` does. Every
row is decided by the real apiserver in two ways: a SubjectAccessReview through the
kubernetes client for every row (fast: ~10 ms each), and `kubectl auth can-i
--as=system:serviceaccount:…` (the pinned kubectl, the bed's admin kubeconfig) for the
rows the issue names plus one per resource each ServiceAccount needs (`KUBECTL_ROWS`),
which must agree with the review.

Every ALLOWED row is an API call the code makes, named in ``why`` (operator:
`layercache.controller.kube`, `layercache.controller.handlers`, kopf's own watches and
events, the Lease of `layercache.controller.leadership`; agent:
`layercache.agent.kubeapi`, `layercache.agent.secrets`). Every DENIED row is something the
product must not be able to do. Each allowed row is also asked for a ServiceAccount with no
bindings in the same namespace, which must be denied: the matrix can fail, and what is
allowed is allowed by our bindings, not by a default grant.

One operator need is broad on purpose: ``get secrets`` in every namespace. A LayerCache
names pull Secrets in its own namespace (``spec.pullSecrets``), which the operator cannot
know at install time, and RBAC cannot grant "Secrets named by some LayerCache". It is
``get`` only (by name: no list, no watch, so Secrets cannot be enumerated or streamed) and
writes stay in ``layercache-system`` (create; update/patch of its two Secrets by name;
delete of the credentials Secret only, to recreate it with another type). ServiceAccounts
(imagesFrom: a Pod's ServiceAccount's ``imagePullSecrets``) are ``get`` only, likewise.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import pytest
from kubernetes import client

from testbed.bed import BedState
from testbed.kube import Kube
from testbed.paths import tool
from testbed.product import NAMESPACE, install

pytestmark = pytest.mark.integration

OPERATOR, AGENT = "layercache-operator", "layercache-agent"
#: A ServiceAccount name nothing binds: the control for every allowed row.
UNBOUND = "layercache-unbound"
ALL = "*"  # every namespace (`--all-namespaces`)
LC, NLC = "layercaches.layercache.dev", "nodelayercaches.layercache.dev"
CRD = "customresourcedefinitions.apiextensions.k8s.io"
LEASES = "leases.coordination.k8s.io"
#: The Lease the operator replicas elect their leader with (manifests/deployment-operator.yaml).
LEASE = "layercache-operator"
CREDENTIALS, TOKEN = "layercache-registry-credentials", "layercache-peer-token"


@dataclass(frozen=True)
class Case:
    """`sa` may (or may not) `verb` `resource` (``name`` = resource name) in `namespace`."""

    sa: str
    verb: str
    resource: str
    allowed: bool
    why: str
    namespace: str | None = None  # None: cluster-scoped; ALL: every namespace
    subresource: str | None = None
    name: str | None = None

    @property
    def id(self) -> str:
        target = self.resource.split(".")[0] + (f"/{self.subresource}" if self.subresource
                                                else "") + (f"/{self.name}" if self.name else "")
        where = {None: "", ALL: "@all"}.get(self.namespace, f"@{self.namespace}")
        return f"{self.sa.removeprefix('layercache-')}-{self.verb}-{target}{where}"


def allow(sa: str, verb: str, resource: str, why: str, **kw: str) -> Case:
    return Case(sa, verb, resource, True, why, **kw)


def deny(sa: str, verb: str, resource: str, why: str, **kw: str) -> Case:
    return Case(sa, verb, resource, False, why, **kw)


OPERATOR_CASES = [
    *(allow(OPERATOR, v, LC, "kopf watches LayerCaches cluster-wide", namespace=ALL)
      for v in ("list", "watch")),
    allow(OPERATOR, "patch", LC, "kopf's progress annotations", namespace="default"),
    allow(OPERATOR, "patch", LC, "kube.patch_cache_status", namespace="default",
          subresource="status"),
    *(allow(OPERATOR, v, NLC, "kube.node_layer_caches, kopf on.event(nodelayercaches)")
      for v in ("list", "watch")),
    *(allow(OPERATOR, v, NLC, "kube.write_node_spec / delete_node_cache")
      for v in ("create", "patch", "delete")),
    *(allow(OPERATOR, v, "nodes", "kube.nodes, kopf on.event(nodes)") for v in ("list", "watch")),
    allow(OPERATOR, "patch", "nodes", "kube.patch_node: warm label, startup taint (warmsignal)"),
    allow(OPERATOR, "list", "pods", "kube.pods (imagesFrom)", namespace="default"),
    allow(OPERATOR, "get", "serviceaccounts",
          "kube.service_account_pull_secrets (imagesFrom: a Pod's ServiceAccount)",
          namespace="default", name="builder"),
    allow(OPERATOR, "get", "secrets", "kube.docker_config: a cache's pull Secret, by name",
          namespace="default", name="regcred"),
    allow(OPERATOR, "create", "events", "kube.post_event, kopf.info/warn", namespace="default"),
    allow(OPERATOR, "create", "secrets", "kube.write_secret (first time)", namespace=NAMESPACE),
    allow(OPERATOR, "update", "secrets", "kube.write_secret (replace)", namespace=NAMESPACE,
          name=CREDENTIALS),
    allow(OPERATOR, "get", "secrets", "kube.ensure_peer_token", namespace=NAMESPACE, name=TOKEN),
    allow(OPERATOR, "delete", "secrets", "kube.write_secret (a credentials Secret of an "
          "older type)", namespace=NAMESPACE, name=CREDENTIALS),
    *(allow(OPERATOR, v, CRD, "kopf observes CRDs") for v in ("list", "watch")),
    allow(OPERATOR, "create", LEASES, "leadership: the first candidate creates the Lease",
          namespace=NAMESPACE),
    *(allow(OPERATOR, v, LEASES, "leadership: read, renew, take over, release the Lease",
            namespace=NAMESPACE, name=LEASE) for v in ("get", "update")),
    # -- must not
    *(deny(OPERATOR, v, "secrets", "no enumerating Secrets", namespace=ns)
      for v in ("list", "watch") for ns in (ALL, "default", NAMESPACE)),
    *(deny(OPERATOR, v, "secrets", "writes only in its own namespace", namespace="default")
      for v in ("create", "update", "patch", "delete")),
    deny(OPERATOR, "delete", "secrets", "deletes no Secret but the credentials",
         namespace=NAMESPACE, name=TOKEN),
    deny(OPERATOR, "delete", "secrets", "deletes no Secret but the credentials",
         namespace=NAMESPACE, name="someone-else"),
    *(deny(OPERATOR, v, "serviceaccounts", "ServiceAccounts by name only, read-only",
           namespace=ns) for v in ("list", "watch") for ns in (ALL, "default")),
    *(deny(OPERATOR, v, "serviceaccounts", "changes no ServiceAccount", namespace="default",
           name="builder") for v in ("update", "patch", "delete")),
    deny(OPERATOR, "update", "secrets", "only its two Secrets", namespace=NAMESPACE,
         name="someone-else"),
    deny(OPERATOR, "patch", NLC, "agents own NodeLayerCache status", subresource="status"),
    *(deny(OPERATOR, v, LC, "users own LayerCaches", namespace="default")
      for v in ("create", "delete")),
    *(deny(OPERATOR, v, "nodes", "Nodes: reads, and merge patches for the warm signal only")
      for v in ("update", "delete", "create")),
    deny(OPERATOR, "patch", "nodes", "node status is the kubelet's", subresource="status"),
    deny(OPERATOR, "create", "pods", "runs nothing", namespace="default"),
    deny(OPERATOR, "create", "pods", "no exec", namespace=NAMESPACE, subresource="exec"),
    deny(OPERATOR, "create", "serviceaccounts", "mints no tokens", namespace=NAMESPACE,
         subresource="token", name=AGENT),
    *(deny(OPERATOR, v, CRD, "never changes CRDs") for v in ("create", "patch", "delete")),
    deny(OPERATOR, "list", "namespaces", "not needed: kopf runs clusterwide=True"),
    # Leader election is the Lease in its own namespace: no shared cluster object, no
    # other Lease (e.g. kube-system's, other operators').
    *(deny(OPERATOR, v, "clusterkopfpeerings.kopf.dev", "no kopf peering: a Lease instead")
      for v in ("get", "list", "watch", "patch")),
    *(deny(OPERATOR, v, LEASES, "only its own Lease", namespace=NAMESPACE, name="someone-else")
      for v in ("get", "update")),
    *(deny(OPERATOR, v, LEASES, "Leases in its own namespace only", namespace="kube-system",
           name=LEASE) for v in ("get", "create", "update")),
    *(deny(OPERATOR, v, LEASES, "no enumerating or deleting Leases", namespace=NAMESPACE)
      for v in ("list", "watch", "delete")),
]

AGENT_CASES = [
    *(allow(AGENT, v, NLC, "kubeapi.list_own/get_cache/OwnObjectWatch")
      for v in ("get", "list", "watch")),
    allow(AGENT, "patch", NLC, "kubeapi.patch_status", subresource="status"),
    allow(AGENT, "get", "nodes", "kubeapi.get_node (DiskPressure, InternalIP)", name="node-1"),
    *(allow(AGENT, "get", "secrets", "agent.secrets: token and credentials", namespace=NAMESPACE,
            name=secret) for secret in (TOKEN, CREDENTIALS)),
    # -- must not
    *(deny(AGENT, v, NLC, "the operator owns NodeLayerCache spec")
      for v in ("create", "patch", "update", "delete")),
    deny(AGENT, "update", NLC, "status by merge patch only", subresource="status"),
    *(deny(AGENT, v, LC, "reads no LayerCaches", namespace=ALL) for v in ("list", "patch")),
    deny(AGENT, "patch", LC, "writes no LayerCache status", namespace="default",
         subresource="status"),
    *(deny(AGENT, "get", "secrets", "only its two Secrets, by name", namespace=ns, name=name)
      for ns, name in ((NAMESPACE, "someone-else"), ("default", "regcred"))),
    *(deny(AGENT, v, "secrets", "no enumerating Secrets", namespace=ns)
      for v in ("list", "watch") for ns in (ALL, NAMESPACE)),
    *(deny(AGENT, v, "nodes", "reads its Node only") for v in ("list", "patch", "delete")),
    deny(AGENT, "create", "pods", "runs nothing", namespace="default"),
    deny(AGENT, "create", "pods", "no exec", namespace=NAMESPACE, subresource="exec"),
    deny(AGENT, "create", "events", "posts no events", namespace="default"),
]

COMMON_DENIED = [
    case for sa in (OPERATOR, AGENT) for case in (
        deny(sa, "escalate", "clusterroles.rbac.authorization.k8s.io", "no privilege escalation"),
        deny(sa, "bind", "clusterroles.rbac.authorization.k8s.io", "no privilege escalation"),
        deny(sa, "create", "clusterroles.rbac.authorization.k8s.io", "no new roles"),
        deny(sa, "patch", "clusterroles.rbac.authorization.k8s.io", "no role changes",
             name=sa),
        deny(sa, "create", "rolebindings.rbac.authorization.k8s.io", "no new bindings",
             namespace=NAMESPACE),
        deny(sa, "create", "clusterrolebindings.rbac.authorization.k8s.io", "no new bindings"),
        deny(sa, "impersonate", "users", "no impersonation"),
        deny(sa, "impersonate", "serviceaccounts", "no impersonation", namespace=NAMESPACE),
        deny(sa, "delete", CRD, "never deletes CRDs", name="layercaches.layercache.dev"),
    )
]

CASES = OPERATOR_CASES + AGENT_CASES + COMMON_DENIED
#: Every allowed row asked for UNBOUND instead (rows both ServiceAccounts need, once).
CONTROLS = list({c.id: c for c in (
    Case(UNBOUND, c.verb, c.resource, False, f"control for {c.id}", c.namespace,
         c.subresource, c.name) for c in CASES if c.allowed)}.values())


@pytest.fixture(scope="module")
def installed(bed: BedState, kube: Kube) -> Kube:
    """The CRDs, namespace and both RBAC manifests applied (idempotent)."""
    install(kube, "rbac-operator.yaml", "rbac-agent.yaml")
    return kube


def _groups(sa: str) -> list[str]:
    # What the apiserver gives a ServiceAccount's token (and kubectl --as=… adds too).
    return ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}",
            "system:authenticated"]


def review(kube: Kube, case: Case) -> bool:
    """A SubjectAccessReview as the case's ServiceAccount: whether RBAC allows it."""
    resource, _, group = case.resource.partition(".")
    attributes = {"verb": case.verb, "group": group, "resource": resource,
                  "namespace": "" if case.namespace in (None, ALL) else case.namespace,
                  "subresource": case.subresource or "", "name": case.name or ""}
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": f"system:serviceaccount:{NAMESPACE}:{case.sa}",
                     "groups": _groups(case.sa), "resourceAttributes": attributes}}
    result = client.AuthorizationV1Api(kube.api).create_subject_access_review(body)
    return bool(result.status.allowed)


def can_i(kube: Kube, case: Case) -> bool:
    """`kubectl auth can-i` as the case's ServiceAccount."""
    resource = case.resource + (f"/{case.name}" if case.name else "")
    argv = [str(tool("kubectl")), f"--kubeconfig={kube.kubeconfig}", "auth", "can-i",
            case.verb, resource, f"--as=system:serviceaccount:{NAMESPACE}:{case.sa}"]
    if case.subresource:
        argv.append(f"--subresource={case.subresource}")
    if case.namespace == ALL:
        argv.append("--all-namespaces")
    elif case.namespace:
        argv += ["-n", case.namespace]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    answer = done.stdout.strip()
    # Exit 0 = yes, 1 = no. A resource the server does not know is answered "no" with a
    # warning: that must fail a deny row, not pass it.
    assert done.returncode in (0, 1) and answer in ("yes", "no"), (argv, done.stderr)
    assert "doesn't have a resource type" not in done.stderr, (argv, done.stderr)
    return done.returncode == 0


@pytest.mark.parametrize("case", CASES + CONTROLS, ids=lambda c: c.id)
def test_subject_access_review(installed: Kube, case: Case) -> None:
    allowed = review(installed, case)
    print(f"{case.sa:<20} {case.id:<58} {'yes' if allowed else 'no':<4} {case.why}")
    assert allowed is case.allowed, f"{case.id}: expected {'yes' if case.allowed else 'no'} " \
                                    f"({case.why})"


def _kubectl_rows() -> list[Case]:
    """Each ServiceAccount's first row per (verb, resource) it needs, and the issue's denials."""
    seen: set[tuple[str, str, str | None]] = set()
    rows = []
    for case in CASES:
        key = (case.sa, case.resource, case.subresource)
        if case.allowed and key not in seen:
            seen.add(key)
            rows.append(case)
    named = {"operator-get-secrets/regcred@default", "operator-list-secrets@all",
             "agent-list-secrets@all", "operator-delete-nodes", "agent-delete-nodes",
             "operator-create-pods@default", "agent-create-pods@default",
             "operator-escalate-clusterroles", "agent-escalate-clusterroles",
             "agent-patch-nodelayercaches", "agent-patch-layercaches/status@default",
             "operator-patch-nodes", "operator-update-nodes"}
    rows += [c for c in CASES if c.id in named and c not in rows]
    rows += [c for c in CONTROLS if c.resource == "secrets"]
    return rows


KUBECTL_ROWS = _kubectl_rows()


@pytest.mark.parametrize("case", KUBECTL_ROWS, ids=lambda c: c.id)
def test_kubectl_auth_can_i(installed: Kube, case: Case) -> None:
    started = time.monotonic()
    allowed = can_i(installed, case)
    print(f"kubectl auth can-i {case.id}: {'yes' if allowed else 'no'} "
          f"({time.monotonic() - started:.2f} s)")
    assert allowed is case.allowed is review(installed, case), case.why
