"""Fixtures of the containerd contract tests (test_containerd_*.py), one round per profile.

Module-scoped: each module that asks for them gets its own registry and runs its tests once
per containerd profile the agent supports (``testbed.paths.CONTRACT_CONTAINERD``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.contract import family_registry
from testbed.faultproxy import FaultProxy
from testbed.images import Family, build_family
from testbed.paths import CONTRACT_CONTAINERD
from testbed.product_image import BuiltImage, build_image


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


@pytest.fixture(scope="session")
def built() -> BuiltImage:
    """The product image (`make image`; cached after the first build of this source)."""
    return build_image()
