"""Relays (cut-through fan-out) and transfer slots: pure logic, one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import weakref
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from layercache.agent.fetch.fetcher import Slots
from layercache.agent.peer.client import MISSING_TTL, PeerDirectory
from layercache.agent.peer.relay import Relay, RelayFailedError, Relays, relayed
from layercache.agent.peer.server import PeerServer
from layercache.oci.digest import Digest
from twins.agent_kube import AgentKubeTwin
from twins.content_store import ContentStoreTwin

BLOB = bytes(range(256)) * 64
DIGEST = Digest.from_bytes(BLOB)


async def _read(relay: Relay, start: int, end: int) -> bytes:
    return b"".join([bytes(view) async for view in relay.read(start, end)])


async def test_a_reader_follows_the_growing_blob_from_any_offset() -> None:
    relay = Relay(DIGEST, len(BLOB))
    relay.feed(0, BLOB[:1000])
    early = asyncio.create_task(_read(relay, 0, len(BLOB)))
    ranged = asyncio.create_task(_read(relay, 500, 3000))
    await asyncio.sleep(0)
    assert not early.done()  # waits for bytes not received yet
    relay.feed(1000, BLOB[1000:2500])
    relay.feed(2000, BLOB[2000:6000])  # a retry resuming from an earlier offset: no repeat
    relay.feed(6000, BLOB[6000:])
    assert await early == BLOB
    assert await ranged == BLOB[500:3000]
    assert await _read(relay, 7000, len(BLOB)) == BLOB[7000:]  # a late reader


async def test_a_failed_relay_stops_its_readers_and_a_gap_fails_it() -> None:
    relay = Relay(DIGEST, len(BLOB))
    relay.feed(0, BLOB[:100])
    reader = asyncio.create_task(_read(relay, 0, len(BLOB)))
    await asyncio.sleep(0)
    relay.feed(200, BLOB[200:300])  # bytes this relay never saw before them
    with pytest.raises(RelayFailedError, match="only 100 held"):
        await reader


async def test_relays_bound_memory_announce_and_fail_on_error() -> None:
    relays = Relays(budget=len(BLOB) + 10)
    waiter = asyncio.create_task(relays.wait_available(DIGEST, 30))
    other = Digest.from_bytes(b"other")
    with pytest.raises(ValueError, match="boom"), relays.receiving(DIGEST, len(BLOB)) as relay:
        assert relay is not None and relays.get(DIGEST) is None  # no byte yet: not offered
        relay.seeding = True  # this node's own upstream transfer: the whole budget
        await asyncio.sleep(0)
        assert not waiter.done()
        relay.feed(0, BLOB[:10])
        assert relays.get(DIGEST) is relay
        await asyncio.wait_for(waiter, 1)  # announced when its first bytes arrived
        assert relays.held == len(BLOB)  # counted whole from its first bytes
        with relays.receiving(other, 20) as over:
            assert over is not None and relays.held == len(BLOB)  # no byte yet: not counted
            over.feed(0, b"x")
            assert relays.get(other) is None  # over budget at its first bytes: never offered
            assert over.error is not None and relays.held == len(BLOB)
        raise ValueError("boom")
    assert relay.error is not None and "boom" in relay.error
    assert relays.get(DIGEST) is None and relays.held == 0
    with relays.receiving(other, 20) as fits:
        assert fits is not None
        fits.feed(0, b"x")
        assert relays.get(other) is fits and relays.held == 20
    assert relays.held == 0


async def test_relays_count_only_transfers_under_way_against_the_budget() -> None:
    # A node waiting for peers or a transfer slot holds no bytes: many such fetches must
    # not use up the budget of the ones that run (every peer copy is relayed now).
    relays = Relays(budget=len(BLOB))
    digests = [Digest.from_bytes(bytes([i])) for i in range(8)]
    with contextlib.ExitStack() as stack:
        waiting = [stack.enter_context(relays.receiving(d, len(BLOB))) for d in digests[1:]]
        assert all(r is not None for r in waiting) and relays.held == 0
        with relays.receiving(digests[0], len(BLOB)) as running:
            assert running is not None
            running.seeding = True
            running.feed(0, BLOB[:1])
            assert relays.get(digests[0]) is running
            with relays.receiving(digests[0], len(BLOB)) as twice:
                assert twice is None  # one relay per blob


async def test_a_seeder_the_registry_refuses_never_offers_its_relay() -> None:
    # The seeder's first upstream request is refused (say 401 before its pull secret is
    # read): waiting peers must not hear "held" and then find nothing to GET.
    relays = Relays()
    waiter = asyncio.create_task(relays.wait_available(DIGEST, 0.2))
    with pytest.raises(PermissionError), relays.receiving(DIGEST, len(BLOB)) as relay:
        assert relay is not None and relays.get(DIGEST) is None
        raise PermissionError("401")
    await waiter  # timed out: never announced
    assert relays.get(DIGEST) is None
    with relays.receiving(DIGEST, len(BLOB)) as retry:  # the seeder's retry offers it
        assert retry is not None
        retry.feed(0, BLOB[:1])
        assert relays.get(DIGEST) is retry
        retry.feed(1, BLOB[1:])


async def test_relayed_source_feeds_what_it_yields_at_its_offset() -> None:
    relay = Relay(DIGEST, len(BLOB))

    async def source(offset: int):  # type: ignore[no-untyped-def]
        for start in range(offset, len(BLOB), 3000):
            yield BLOB[start:start + 3000]

    assert b"".join([c async for c in relayed(source, relay)(0)]) == BLOB
    assert relay.length == len(BLOB)
    assert await _read(relay, 0, len(BLOB)) == BLOB


async def test_slots_serve_a_waiting_upstream_transfer_before_peer_copies() -> None:
    slots = Slots(1)
    order: list[str] = []

    async def transfer(name: str, upstream: bool) -> None:
        async with slots.take(upstream):
            order.append(name)
            await asyncio.sleep(0.01)

    async with slots.take(upstream=False):  # the one slot is busy
        tasks = [asyncio.create_task(transfer("peer1", False)),
                 asyncio.create_task(transfer("peer2", False))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(transfer("upstream", True)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order[0] == "upstream"
    assert sorted(order[1:]) == ["peer1", "peer2"] and slots.free == 1


async def test_peer_copies_share_the_budget_and_seeded_layers_have_one_of_their_own() -> None:
    relays = Relays(budget=len(BLOB))
    other, third = Digest.from_bytes(b"other"), Digest.from_bytes(b"third")
    with relays.receiving(DIGEST, len(BLOB)) as copy:
        assert copy is not None
        copy.feed(0, BLOB[:1])
        assert relays.get(DIGEST) is copy and relays.held == len(BLOB)
        with relays.receiving(other, 1) as second_copy:
            assert second_copy is not None
            second_copy.feed(0, b"x")
            assert relays.get(other) is None  # the budget is full: not relayed
        with relays.receiving(third, len(BLOB)) as seeded:
            assert seeded is not None
            seeded.seeding = True
            seeded.feed(0, BLOB[:1])
            assert relays.get(third) is seeded  # the peer copy did not take its room
            assert (relays.held, relays.seeded) == (2 * len(BLOB), len(BLOB))
        assert (relays.held, relays.seeded) == (len(BLOB), 0)
    assert relays.held == 0


async def test_a_long_poll_whose_asker_left_ends_without_an_error_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    # A node asks every peer with a long-poll and drops the others' requests once one
    # says yes: the others' answers then find the connection closing. That is ordinary
    # and must not be logged as an error with a traceback (bench A: hundreds per run).
    relays = Relays()
    server = PeerServer(store=ContentStoreTwin(), token=lambda: "t", on_served=lambda _n: None,
                        relays=relays)
    async with TestClient(TestServer(server.app())) as client:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.head(f"/v1/blobs/{DIGEST}?wait=5",
                                               headers={"Authorization": "Bearer t"}), 0.1)
        with caplog.at_level(logging.DEBUG, logger="aiohttp"), \
                relays.receiving(DIGEST, len(BLOB)) as relay:
            assert relay is not None
            relay.feed(0, BLOB[:10])  # the blob becomes available: the long-poll answers
            for _ in range(20):
                await asyncio.sleep(0.01)
            relay.feed(10, BLOB[10:])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_node_without_an_endpoint_is_read_once_per_missing_ttl() -> None:
    # Every fetch waiting on a node that has not published its endpoint looks it up every
    # peer poll: the directory shares one NodeLayerCache read among them per MISSING_TTL.
    class Counting(AgentKubeTwin):
        reads = 0

        async def get_cache(self, node: str) -> dict[str, Any] | None:
            self.reads += 1
            return await super().get_cache(node)

    now = [100.0]
    kube = Counting("n1")
    directory = PeerDirectory(kube, clock=lambda: now[0])
    assert [await directory.endpoint("n2") for _ in range(32)] == [None] * 32
    assert kube.reads == 1
    now[0] += MISSING_TTL
    kube.put({"apiVersion": "layercache.dev/v1alpha1", "kind": "NodeLayerCache",
              "metadata": {"name": "n2"}, "spec": {},
              "status": {"peerEndpoint": "http://n2.test:5780"}})
    assert await directory.endpoint("n2") == "http://n2.test:5780"
    assert await directory.endpoint("n2") == "http://n2.test:5780" and kube.reads == 2


def test_a_finished_relay_and_its_bytes_go_with_the_last_reference_not_at_a_gc() -> None:
    # The relay holds every byte of a blob being received (63 MB for the e2e base layer).
    # In a reference cycle it would wait for the cyclic collector's rare full passes: agents
    # grew by ~70 MB per such layer fetched and were OOM-killed at 512 MiB.
    relays = Relays(budget=len(BLOB))
    gc.disable()
    try:
        with relays.receiving(DIGEST, len(BLOB)) as relay:
            assert relay is not None
            relay.seeding = True
            relay.feed(0, BLOB)
            assert relays.get(DIGEST) is relay and relays.seeded == len(BLOB)
        gone = weakref.ref(relay)
        del relay
        assert gone() is None, gc.get_referrers(gone())
        assert relays.held == relays.seeded == 0
    finally:
        gc.enable()
