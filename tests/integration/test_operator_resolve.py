"""The operator's resolutions against the real registry behind the bed's fault proxy.

What a refresh costs, and how `Controller.resolve` and its refresh loop treat a registry
that rate-limits or refuses HEAD. The Controller runs in the test's process, on the bed's
apiserver; what reached the registry is the proxy's count.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from layercache.controller import state as state_module
from layercache.controller.controller import Controller
from layercache.controller.kube import KubeApi
from layercache.controller.settings import OperatorSettings
from testbed.faultproxy import FaultProxy
from testbed.images import Family
from testbed.kube import Kube

pytestmark = pytest.mark.integration

AMD64 = "linux/amd64"
NAMESPACE = "team-a"


@pytest.fixture
def metrics() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def controller(kube: Kube, proxy: FaultProxy, metrics: CollectorRegistry,
               monkeypatch: pytest.MonkeyPatch) -> Controller:
    monkeypatch.setenv("LAYERCACHE_INSECURE_REGISTRIES", proxy.host)
    return Controller(KubeApi(kube.api), OperatorSettings(), metrics)


def _spec(proxy: FaultProxy, *names: str) -> dict[str, Any]:
    return {"images": [f"{proxy.host}/family/{name}:v1" for name in names],
            "platforms": [AMD64]}


async def test_unchanged_tag_costs_one_head_per_refresh(
    controller: Controller, proxy: FaultProxy, family: Family, metrics: CollectorRegistry
) -> None:
    # multi is an index (HEAD, index GET, manifest GET, config GET the first time).
    spec = _spec(proxy, "multi", "nginx")
    first = await controller.resolve(NAMESPACE, "warm", 1, spec)
    assert not first.errors
    proxy.reset()
    again = await controller.resolve(NAMESPACE, "warm", 1, spec)
    assert not again.errors
    assert again.digests() == first.digests()
    assert {str(r.reference): r.digest for r in again.resolved} == {
        f"{proxy.host}/family/{n}:v1": family.images[n].manifest_digest
        for n in ("multi", "nginx")}
    stats = proxy.stats()
    assert sorted((r.method, r.path, r.status) for r in stats.requests for _ in range(r.count)) \
        == [("HEAD", "/v2/family/multi/manifests/v1", 200),
            ("HEAD", "/v2/family/nginx/manifests/v1", 200)]
    # Counted by host and code: the first resolution's 7 requests, then the 2 HEADs.
    assert metrics.get_sample_value("layercache_registry_requests_total",
                                    {"registry": proxy.host, "code": "200"}) == 7 + 2


async def test_head_refused_is_learned_once_for_every_cache(
    controller: Controller, proxy: FaultProxy, family: Family
) -> None:
    proxy.add_fault(r"/manifests/", "status", method="HEAD", status=501, times=None)
    one = await controller.resolve(NAMESPACE, "one", 1, _spec(proxy, "base"))
    other = await controller.resolve(NAMESPACE, "other", 1, _spec(proxy, "nginx", "curl"))
    assert not one.errors and not other.errors
    assert [r.digest for r in other.resolved] == [
        family.images[n].manifest_digest for n in ("nginx", "curl")]
    stats = proxy.stats()
    assert sum(r.count for r in stats.requests if r.method == "HEAD") == 1
    assert stats.count("/v2/family/nginx/manifests/v1", "GET", 200) == 1


async def test_rate_limited_cache_is_not_resolved_again_before_retry_after(
    controller: Controller, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 429 with Retry-After: 600 for the whole window; the usual transient retry (30 s,
    # here shortened to 1 s) must not come before the server's 600 s.
    monkeypatch.setattr(state_module, "TRANSIENT_RETRY_SECONDS", 1.0)
    proxy.add_fault(r"/manifests/", "status", status=429, retry_after=600, window_seconds=600)
    state = await controller.resolve(NAMESPACE, "limited", 1, _spec(proxy, "base"))
    assert [e.reason for e in state.errors] == ["RateLimited"]
    assert "Retry-After 600" in state.errors[0].message
    assert "?" not in state.errors[0].message
    refresh = asyncio.create_task(controller.refresh_forever(interval=0.2))
    try:
        await asyncio.sleep(4)
    finally:
        refresh.cancel()
        await asyncio.gather(refresh, return_exceptions=True)
    assert controller.caches[f"{NAMESPACE}/limited"] is state  # not resolved again
    assert not controller.due_for_refresh(f"{NAMESPACE}/limited")
    assert proxy.stats().total_requests == 1
