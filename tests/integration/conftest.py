"""Fixtures of the containerd contract tests (test_containerd_*.py), one round per profile.

Module-scoped: each module that asks for them gets its own registry and runs its tests once
per containerd profile the agent supports (``testbed.paths.CONTRACT_CONTAINERD``).

A failed test that ran the product on a cluster (a ``cluster`` fixture) gets the tail of
every product log in its report: what a failed CI run has to go on.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from testbed.contract import family_registry
from testbed.e2e import LayerCacheCluster
from testbed.faultproxy import FaultProxy
from testbed.images import Family, build_family
from testbed.paths import CONTRACT_CONTAINERD


@pytest.fixture(scope="module", params=CONTRACT_CONTAINERD)
def profile(request: pytest.FixtureRequest) -> str:
    """The containerd profile of this round of the module's tests."""
    chosen: str = request.param
    return chosen


@pytest.fixture(scope="module")
def oci_family() -> Family:
    """The image family's OCI layout (built once, then cached; not the session bed's)."""
    return build_family()


@pytest.fixture(scope="module")
def registry_proxy(tmp_path_factory: pytest.TempPathFactory,
                   oci_family: Family) -> Iterator[FaultProxy]:
    """A plain registry holding the family, behind a counting proxy."""
    with family_registry(tmp_path_factory.mktemp("registry"), oci_family) as proxy:
        yield proxy


#: Lines of each product log a failed test's report ends with.
LOG_TAIL_LINES = 120


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the product logs' tails to the report of a failed test with a ``cluster``.

    Setup and teardown too: a fixture's own wait (a release after the namespace is deleted)
    fails in them, and the logs are then what says why.
    """
    report = yield
    cluster = (getattr(item, "funcargs", None) or {}).get("cluster")
    if report.failed and isinstance(cluster, LayerCacheCluster):
        try:
            logs = cluster.logs()
        except Exception as error:  # the cluster may be what failed
            logs = {"(logs unreadable)": repr(error)}
        for name, text in sorted(logs.items()):
            tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
            report.sections.append((f"product log {name} (last {LOG_TAIL_LINES} lines)", tail))
    return report
