"""Shared fixtures: the session's test bed and clients for it.

The bed is started once per session, only if a selected test asks for it (unit tests never
do), and torn down at the end. Tests that need a clean slate create their own namespaces.

At the end of a run with failures, a short digest names each failed test with the first
lines of its error (`pytest_terminal_summary`): CI keeps only the tail of the output, and
a failed test's report (traceback, product logs) can be far above it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from testbed.bed import BedState, TestBed
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube
from testbed.product_image import BuiltImage, build_image

#: Lines of each failed test's error in the digest, and characters per line.
DIGEST_LINES: Final = 12
DIGEST_WIDTH: Final = 240


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print each failed test's error, a few short lines each, as the output's last section.

    The error is the report's crash message (an assertion's own message first); long lines
    are folded, not cut, up to `DIGEST_LINES` lines per test.
    """
    failed = [r for key in ("failed", "error") for r in terminalreporter.stats.get(key, [])
              if isinstance(r, pytest.TestReport)]
    if not failed:
        return
    terminalreporter.section("failure digest")
    for report in failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        lines = [text[i:i + DIGEST_WIDTH] for text in message.splitlines() or [""]
                 for i in range(0, max(len(text), 1), DIGEST_WIDTH)]
        terminalreporter.write_line(f"{report.nodeid} ({report.when}):")
        for line in lines[:DIGEST_LINES]:
            terminalreporter.write_line(f"    {line}")
        if len(lines) > DIGEST_LINES:
            terminalreporter.write_line(f"    ... {len(lines) - DIGEST_LINES} more lines")


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BedState]:
    """A running test bed with 3 nodes, registries, fault proxy and the image family."""
    testbed = TestBed(tmp_path_factory.mktemp("bed"), nodes=3)
    state = testbed.up()
    yield state
    testbed.down()


@pytest.fixture(scope="session")
def kube(bed: BedState) -> Iterator[Kube]:
    """Admin access to the bed's apiserver (kubernetes client and kubectl)."""
    yield from _admin(bed)


def _admin(state: BedState) -> Iterator[Kube]:
    """Admin access to the bed of `state` until the generator is closed."""
    client = Kube(Path(state.kubeconfig))
    yield client
    client.close()


@pytest.fixture(scope="session")
def family(bed: BedState) -> Family:
    """The image family pushed to every registry of the bed (expected digests and sizes)."""
    return _family(bed)


def _family(state: BedState) -> Family:
    """The image family the bed of `state` seeded its registries with."""
    assert state.family is not None, "the bed seeds the image family"
    return Family.load(Path(state.family).parent)


@pytest.fixture
def proxy(bed: BedState) -> Iterator[FaultProxy]:
    """The bed's fault proxy (in front of the plain registry), reset before and after."""
    assert bed.proxy_url is not None
    client = FaultProxy(bed.proxy_url)
    client.reset()
    client.set_rate(None)
    yield client
    client.reset()
    client.set_rate(None)
    client.close()


@pytest.fixture(scope="module")
def chart_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BedState]:
    """A module's own bed: 3 kubelet nodes with the image family, for a Helm release.

    Per module, not per session: a module installs the chart once and may uninstall it.
    """
    testbed = TestBed(tmp_path_factory.mktemp("chart-bed"), nodes=3, kubelets=True)
    yield testbed.up()
    testbed.down()


@pytest.fixture(scope="module")
def chart_kube(chart_bed: BedState) -> Iterator[Kube]:
    """Admin access to the module's `chart_bed`."""
    yield from _admin(chart_bed)


@pytest.fixture(scope="module")
def chart_family(chart_bed: BedState) -> Family:
    """The image family in the module's `chart_bed` registries."""
    return _family(chart_bed)


@pytest.fixture(scope="session")
def kubelet_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BedState]:
    """A bed of 2 kubelet nodes (own namespaces, pod network, kube-proxy: testbed.podnet).

    No image family: its tests run the static pause and probe images every node has.
    """
    testbed = TestBed(tmp_path_factory.mktemp("kubelet-bed"), nodes=2, seed_images=False,
                      kubelets=True)
    yield testbed.up()
    testbed.down()


@pytest.fixture(scope="session")
def kubelet_kube(kubelet_bed: BedState) -> Iterator[Kube]:
    """Admin access to the kubelet bed's apiserver."""
    yield from _admin(kubelet_bed)


@pytest.fixture(scope="session")
def built() -> BuiltImage:
    """The product image (`make image`; cached after the first build of this source).

    Here, not in tests/integration: the bed's own tests (tests/bed) load it onto nodes too.
    """
    return build_image()
