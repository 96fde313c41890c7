"""The agent's /healthz fails once containerd has been unreachable too long.

Pure: a fake probe and a fake clock; the real endpoint is covered by
tests/integration/test_agent.py.
"""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from layercache.agent.peer.server import ContainerdLiveness, PeerServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Probe:
    """containerd stand-in: answers while ``up``, else raises like a dead socket."""

    def __init__(self) -> None:
        self.up = True
        self.hang = False

    async def __call__(self) -> None:
        if self.hang:
            await asyncio.sleep(3600)
        if not self.up:
            raise ConnectionError("connect: no such file or directory")


async def test_unhealthy_only_after_max_down_seconds_and_healthy_again_on_answer() -> None:
    clock, probe = Clock(), Probe()
    liveness = ContainerdLiveness(probe, max_down_seconds=60, clock=clock)
    await liveness.check()
    assert liveness.healthy() and liveness.down_seconds() == 0
    probe.up = False
    clock.now += 30
    await liveness.check()
    assert liveness.healthy()  # a containerd restart is shorter than the grace
    assert liveness.down_seconds() == 30
    clock.now += 31
    await liveness.check()
    assert not liveness.healthy()
    assert liveness.last_error == "connect: no such file or directory"
    probe.up = True
    await liveness.check()
    assert liveness.healthy() and liveness.last_error is None


async def test_a_hanging_probe_times_out_and_counts_as_failure() -> None:
    clock, probe = Clock(), Probe()
    probe.hang = True
    liveness = ContainerdLiveness(probe, max_down_seconds=5, timeout_seconds=0.01, clock=clock)
    await liveness.check()
    assert liveness.last_error == "TimeoutError"
    clock.now += 6
    assert not liveness.healthy()


async def test_healthz_answers_503_while_containerd_is_down() -> None:
    clock, probe = Clock(), Probe()
    liveness = ContainerdLiveness(probe, max_down_seconds=60, clock=clock)
    server = PeerServer(store=None, token=lambda: None, on_served=lambda _n: None,  # type: ignore[arg-type]
                        liveness=liveness)
    async with TestClient(TestServer(server.app())) as client:
        assert (await client.get("/healthz")).status == 200
        probe.up = False
        clock.now += 61
        await liveness.check()
        response = await client.get("/healthz")
        assert response.status == 503
        assert "containerd unreachable for 61 s" in await response.text()
        probe.up = True
        await liveness.check()
        assert (await client.get("/healthz")).status == 200
