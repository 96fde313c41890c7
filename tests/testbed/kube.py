"""Admin-side helpers for tests: the kubernetes client, kubectl, and polling for a state."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kubernetes import client, config

from testbed.paths import tool
from testbed.procs import run

T = TypeVar("T")


class Kube:
    """A kubeconfig's API access: typed clients plus `kubectl` with that kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        """Run kubectl (the pinned build) against this cluster; returns stdout.

        Raises:
            ComponentError: kubectl exited non-zero (message carries its stderr).

        """
        return run([tool("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
                   input=input.encode() if input is not None else None, timeout=timeout)

    def wait_established(self, *names: str, timeout: float = 60) -> None:
        """Wait until each CRD of ``names`` (``plural.group``) has condition Established.

        Not ``kubectl wait --for=condition=Established``: on a CRD created a moment before,
        whose ``status.conditions`` is still null, kubectl fails at once (".status.conditions
        accessor error: <nil> is of the type <nil>") instead of waiting; seen on a fresh
        machine's first run.

        Raises:
            TimeoutError: one was not Established within ``timeout`` seconds.

        """
        extensions = client.ApiextensionsV1Api(self.api)

        def established(name: str) -> bool:
            crd = extensions.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True"
                       for c in (crd.status.conditions if crd.status else None) or ())

        for name in names:
            wait_for(functools.partial(established, name), timeout, 0.1,
                     f"CRD {name} Established")

    def close(self) -> None:
        """Close the client's connection pool."""
        self.api.close()


def wait_for(probe: Callable[[], T | None], timeout: float = 60, interval: float = 0.2,
             what: str = "condition") -> T:
    """Poll `probe` until it returns a truthy value, and return that value.

    Raises:
        TimeoutError: after `timeout` seconds, naming `what` and the last value seen.

    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def service_account_kubeconfig(kube: Kube, namespace: str, name: str, path: Path,
                               duration_seconds: int = 3600) -> Path:
    """Write a kubeconfig that authenticates as ServiceAccount `namespace/name`.

    The token is a real bound token from the TokenRequest API (what a Pod's projected
    token is), so RBAC decisions are the apiserver's own. Returns `path`.
    """
    import yaml  # only this helper writes YAML

    token = kube.kubectl("-n", namespace, "create", "token", name,
                         f"--duration={duration_seconds}s").strip()
    cluster = kube.api.configuration
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {
            "server": cluster.host, "certificate-authority": cluster.ssl_ca_cert}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": "testbed", "user": name,
                                                 "namespace": namespace}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
