"""One agent against real faults: ``kill -9`` mid-ingest, a corrupt body, a full disk.

Faults come from where they happen in life: the process is SIGKILLed while containerd
holds a half-written ingest; the fault proxy flips a byte of the registry's answer or
answers a resume from another byte; a peer on loopback says it holds a blob it then does
not send; the image filesystem (by threshold) or the Node's ``DiskPressure`` condition
says no. Each test writes its own NodeLayerCache for one node and clears that node before
and after.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_agent_harness import (
    GROUP,
    PEER_TOKEN,
    PLURAL,
    VERSION,
    Agent,
    add_stale_lease,
    blob_path,
    condition,
    delete_cache,
    held,
    ingests,
    installed,  # noqa: F401 - autouse fixture: CRDs, RBAC and Secrets for the module
    layer_entry,
    one_agent,
    our_leases,
    runnable_layers,
    status,
    stored_sha256,
    wait_ready,
    write_cache,
)

from layercache.containerd.content import ingest_ref
from layercache.containerd.leases import GC_EXPIRE_LABEL
from testbed.bed import BedState
from testbed.faultproxy import FaultProxy
from testbed.images import Family, Layer
from testbed.kube import Kube, wait_for

pytestmark = pytest.mark.integration



def _layer(family: Family, index: int) -> Layer:
    """The family's runnable layers, largest first: 0 is the 63 MB base layer."""
    return runnable_layers(family)[index]


def _env(proxy: FaultProxy, **extra: str) -> dict[str, str]:
    return {"LAYERCACHE_INSECURE_REGISTRIES": proxy.host, **extra}


def _errors(kube: Kube, node: str) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = status(kube, node).get("errors") or []
    return errors


def _wait_for_error(kube: Kube, agent: Agent, reason: str, digest: str) -> dict[str, Any]:
    """The first ``status.errors[]`` entry of ``reason`` for layer ``digest``, once there."""
    def reported() -> dict[str, Any] | None:
        assert agent.alive(), agent.tail()
        return next((e for e in _errors(kube, agent.node.name)
                     if e.get("digest") == digest and e["reason"] == reason), None)

    found: dict[str, Any] = wait_for(reported, 120, 0.5, f"a {reason} error in status")
    return found


def _stable_bytes(proxy: FaultProxy, path: str) -> int:
    """The proxy's byte count for ``path`` once it stops moving (a dead client's tail)."""
    last = -1
    while True:
        now = proxy.stats().bytes_by_path.get(path, 0)
        if now == last:
            return now
        last = now
        time.sleep(0.5)


def test_kill_9_mid_ingest_resumes_from_containerds_offset(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    node = bed.nodes[1]
    layer = _layer(family, 0)
    ref = ingest_ref(layer.digest)
    path = blob_path(family, layer.digest)
    proxy.set_rate(3_000_000)  # ~21 s for the layer: time to kill it in flight
    entry = layer_entry(family, proxy.host, layer, "Upstream")
    with one_agent(kube, node, [entry], tmp_path, _env(proxy)) as agent:
        wait_for(lambda: ingests(node.socket).get(ref, 0) >= 12_000_000, 120, 0.2,
                 "an ingest well under way")
        counted = (status(kube, node.name).get("bytes") or {}).get("upstream", 0)
        agent.kill9()
        seen = ingests(node.socket)[ref]  # what containerd holds: the resume point
        assert 12_000_000 <= seen < layer.size
        leases = our_leases(node.socket)
        assert len(leases) == 1, leases  # the ingest's lease, kept for the resume...
        assert GC_EXPIRE_LABEL in next(iter(leases.values()))  # ...with a GC backstop
        assert held(node.socket).get(layer.digest) is None
        add_stale_lease(node.socket, "layercache-stale-from-an-old-plan")
        before = _stable_bytes(proxy, path)
        restarted = Agent(agent.node, agent.kubeconfig, agent.workdir, agent.env).start()
        try:
            proxy.set_rate(None)
            final = wait_ready(kube, restarted, 180)
            stats = proxy.stats()
            # Resumed: one Range request (206), and only what containerd lacked was fetched.
            assert stats.count(path, "GET", 206) == 1
            assert stats.bytes_by_path[path] - before <= layer.size - seen
            assert stored_sha256(node.socket, layer.digest) == layer.digest
            assert held(node.socket)[layer.digest] == layer.size
            assert ref not in ingests(node.socket)
            # The stale lease went at start-up, the resumed write's lease when it committed.
            assert our_leases(node.socket) == {}
            assert final["bytes"]["upstream"] >= counted  # counters continue, never reset
        finally:
            restarted.terminate()


def test_peer_layer_falls_back_to_upstream_when_no_peer_serves_in_time(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    node, absent = bed.nodes[2], bed.nodes[1]  # no agent (and no endpoint) on `absent`
    layer = _layer(family, 5)
    entry = layer_entry(family, proxy.host, layer, "Peer", [absent.name])
    env = _env(proxy, LAYERCACHE_PEER_WAIT_SECONDS="3", LAYERCACHE_PEER_POLL_SECONDS="0.5")
    with one_agent(kube, node, [entry], tmp_path, env) as agent:
        found = wait_ready(kube, agent, 120)
        assert found["bytes"] == {"upstream": layer.size, "peer": 0, "servedToPeers": 0}
        assert proxy.stats().bytes_by_path[blob_path(family, layer.digest)] == layer.size
        assert stored_sha256(node.socket, layer.digest) == layer.digest


def test_corrupt_upstream_body_is_never_committed_and_is_retried(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    node = bed.nodes[2]
    layer = _layer(family, 3)
    path = blob_path(family, layer.digest)
    proxy.add_fault(f"^{re.escape(path)}$", "corrupt", times=None, after_bytes=1000)
    entry = layer_entry(family, proxy.host, layer, "Upstream")
    env = _env(proxy, LAYERCACHE_RETRY_INITIAL_SECONDS="1", LAYERCACHE_RETRY_MAX_SECONDS="2")
    with one_agent(kube, node, [entry], tmp_path, env) as agent:
        _wait_for_error(kube, agent, "DigestMismatch", layer.digest)
        wait_for(lambda: proxy.stats().faults_fired.get("corrupt", 0) >= 2, 60, 0.5,
                 "a retry, corrupted again")
        degraded = condition(kube, node.name, "Degraded")
        assert (degraded["status"], degraded["reason"]) == ("True", "DigestMismatch")
        assert condition(kube, node.name, "Ready")["status"] == "False"
        assert held(node.socket).get(layer.digest) is None  # never committed
        # The wrong bytes were dropped, not resumed from: every attempt fetched from byte 0.
        assert proxy.stats().count(path, "GET", 206) == 0
        text = json.dumps(status(kube, node.name))
        assert PEER_TOKEN not in text and str(bed.registries["basic"].password) not in text
        proxy.reset()  # the fault is gone
        wait_ready(kube, agent, 120)
        assert stored_sha256(node.socket, layer.digest) == layer.digest
        assert condition(kube, node.name, "Degraded")["status"] == "False"
        assert agent.metric("layercache_agent_errors_total", node=node.name,
                            reason="DigestMismatch") >= 2


def test_rate_limited_layer_is_not_retried_before_retry_after(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    # The registry refuses the blob for 10 minutes and says so (Retry-After: 600): longer
    # than a request waits for itself, so the layer's retry is scheduled — not after the
    # agent's usual 2, 6, 14 s backoff, but after the 600 s.
    layer = _layer(family, 4)
    path = blob_path(family, layer.digest)
    proxy.add_fault(f"^{re.escape(path)}$", "status", status=429, retry_after=600,
                    window_seconds=600)
    node = bed.nodes[2]
    with one_agent(kube, node, [layer_entry(family, proxy.host, layer, "Upstream")], tmp_path,
                   _env(proxy)) as agent:
        error = _wait_for_error(kube, agent, "UpstreamRateLimited", layer.digest)
        assert "Retry-After 600" in error["message"]
        refused_at = time.monotonic()
        while time.monotonic() - refused_at < 20:  # the old backoff retried 3 times by now
            assert agent.alive(), agent.tail()
            time.sleep(1)
        assert proxy.stats().count(path) == 1
        assert agent.metric("layercache_registry_requests_total", code="429",
                            registry=proxy.host) == 1
        assert held(node.socket).get(layer.digest) is None


def test_disk_threshold_stops_every_fetch(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    node = bed.nodes[0]
    layers = [_layer(family, i) for i in (4, 5)]
    entries = [layer_entry(family, proxy.host, layer, "Upstream") for layer in layers]
    env = _env(proxy, LAYERCACHE_MIN_FREE_PERCENT="100")  # no filesystem can satisfy it
    with one_agent(kube, node, entries, tmp_path, env) as agent:
        def refused() -> dict[str, Any] | None:
            assert agent.alive(), agent.tail()
            found = status(kube, node.name)
            return found if found.get("diskPressure") is True else None

        found = wait_for(refused, 120, 0.5, "diskPressure in status")
        kinds = {c["type"]: c for c in found["conditions"]}
        assert (kinds["Degraded"]["status"], kinds["Degraded"]["reason"]) == (
            "True", "DiskPressure")
        assert (kinds["Progressing"]["status"], kinds["Progressing"]["reason"]) == (
            "False", "DiskPressure")
        assert kinds["Ready"]["status"] == "False"
        assert found["missing"] == [layer.digest for layer in layers]
        assert any(e["reason"] == "DiskPressure" for e in found["errors"])
        assert proxy.stats().blob_bytes == 0  # nothing fetched
        stored = held(node.socket)
        assert not any(layer.digest in stored for layer in layers)
        assert agent.metric("layercache_agent_disk_pressure", node=node.name) == 1


def _node_disk_pressure(kube: Kube, node: str, on: bool) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    condition_ = {"type": "DiskPressure", "status": "True" if on else "False",
                  "reason": "KubeletHasDiskPressure" if on else "KubeletHasNoDiskPressure",
                  "message": "set by test_agent_faults", "lastHeartbeatTime": now,
                  "lastTransitionTime": now}
    kube.core.patch_node_status(node, {"status": {"conditions": [condition_]}},
                                _content_type="application/strategic-merge-patch+json")


def test_node_disk_pressure_condition_stops_fetching_until_it_clears(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    node = bed.nodes[0]
    layer = _layer(family, 6)
    entry = layer_entry(family, proxy.host, layer, "Upstream")
    _node_disk_pressure(kube, node.name, True)
    try:
        env = _env(proxy, LAYERCACHE_NODE_CHECK_SECONDS="1")
        with one_agent(kube, node, [entry], tmp_path, env) as agent:
            wait_for(lambda: condition(kube, node.name, "Degraded").get("reason")
                     == "NodeDiskPressure", 120, 0.5, "NodeDiskPressure in status")
            assert status(kube, node.name)["diskPressure"] is True
            assert proxy.stats().blob_bytes == 0
            _node_disk_pressure(kube, node.name, False)
            found = wait_ready(kube, agent, 120)
            assert found["diskPressure"] is False
            assert proxy.stats().blob_bytes == layer.size
    finally:
        _node_disk_pressure(kube, node.name, False)


@pytest.mark.parametrize("refusal", ["206-elsewhere", "416"])
def test_refused_resume_aborts_the_ingest_and_restarts_from_byte_0(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path, refusal: str
) -> None:
    node = bed.nodes[1]
    # The smallest layer over 4 MiB: a cut at 3 MiB leaves whole 1 MiB WRITEs in the ingest.
    layer = next(la for la in reversed(runnable_layers(family)) if la.size > 4 * 2**20)
    path = blob_path(family, layer.digest)
    ref = ingest_ref(layer.digest)
    pattern = f"^{re.escape(path)}$"
    # The first GET is cut short, so the retry resumes from what containerd holds...
    proxy.add_fault(pattern, "truncate", method="GET", after_bytes=3 * 2**20 + 1000,
                    ranged=False)
    # ...and every resume is answered with other bytes than asked for, for ever.
    if refusal == "416":
        proxy.add_fault(pattern, "status", method="GET", status=416, ranged=True, times=None)
    else:
        proxy.add_fault(pattern, "range", method="GET", after_bytes=1000, ranged=True,
                        times=None)
    entry = layer_entry(family, proxy.host, layer, "Upstream")
    env = _env(proxy, LAYERCACHE_RETRY_INITIAL_SECONDS="1", LAYERCACHE_RETRY_MAX_SECONDS="2")
    with one_agent(kube, node, [entry], tmp_path, env) as agent:
        found = wait_ready(kube, agent, 60)
        stats = proxy.stats()
        refused = 416 if refusal == "416" else 206
        # One resume was tried and refused; then the ingest was aborted and the blob
        # fetched whole from byte 0 (the cut first GET, then the full one).
        assert stats.count(path, "GET", refused) == 1, stats.requests
        assert stats.count(path, "GET", 200) == 2, stats.requests
        assert stored_sha256(node.socket, layer.digest) == layer.digest
        assert held(node.socket)[layer.digest] == layer.size
        assert ref not in ingests(node.socket)
        assert our_leases(node.socket) == {}
        assert found["missing"] == []


@contextlib.contextmanager
def _liar_peer(size: int, body: bytes | None = None) -> Iterator[tuple[str, list[str]]]:
    """A peer on loopback that answers ``HEAD`` 200 (it holds the blob) and ``GET`` 404.

    With ``body`` (``size`` bytes that are not the blob), ``GET`` answers 200 with it: a
    seeder relaying what a broken upstream sent. Yields its endpoint and the methods it was
    asked with, in order.
    """
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            asked.append("HEAD")
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()

        def do_GET(self) -> None:
            asked.append("GET")
            self.send_response(404 if body is None else 200)
            self.send_header("Content-Length", "0" if body is None else str(len(body)))
            self.end_headers()
            if body is not None:
                self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def _warm_beside_liar(bed: BedState, kube: Kube, family: Family, proxy: FaultProxy,
                      tmp_path: Path, layer: Layer, body: bytes | None, *, listed: int,
                      settle: float = 0.0) -> Iterator[tuple[dict[str, Any], list[str], float]]:
    """Warm ``layer`` on node 2 with ``listed`` peers: node 0 is `_liar_peer` (``body``).

    The other listed peer (node 1) has no agent and never has the layer. The default peer
    wait (120 s) stands, so only a quick drop or give-up gets the node Ready within 45 s.
    ``settle``: seconds to keep the agent running after Ready (a peer still polled would
    be asked again by then). Yields, while the agent still runs (its node's content is
    cleared when it stops), the node's status, what the liar was asked, and the seconds
    to Ready.
    """
    node = bed.nodes[2]
    peers = [bed.nodes[0].name, bed.nodes[1].name][:listed]
    entry = layer_entry(family, proxy.host, layer, "Peer", peers)
    with _liar_peer(layer.size, body=body) as (endpoint, asked):
        for name in peers:
            write_cache(kube, name, [])
        try:
            kube.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, PLURAL, peers[0], {"status": {"peerEndpoint": endpoint}})
            env = _env(proxy, LAYERCACHE_PEER_POLL_SECONDS="0.5")
            with one_agent(kube, node, [entry], tmp_path, env) as agent:
                started = time.monotonic()
                found = wait_ready(kube, agent, 45)
                seconds = time.monotonic() - started
                time.sleep(settle)
                yield found, list(asked), seconds
        finally:
            for name in peers:
                delete_cache(kube, name)


def test_peer_that_fails_its_get_is_dropped_at_once(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    node, layer = bed.nodes[2], _layer(family, 5)
    with _warm_beside_liar(bed, kube, family, proxy, tmp_path, layer, None, listed=1,
                           settle=2) as (found, asked, seconds):
        assert seconds < 45
        assert asked == ["HEAD", "GET"]
        assert found["bytes"]["upstream"] == layer.size
        assert found["bytes"]["peer"] == 0
        assert proxy.stats().bytes_by_path[blob_path(family, layer.digest)] == layer.size
        assert stored_sha256(node.socket, layer.digest) == layer.digest


def test_a_peer_with_wrong_bytes_sends_the_node_upstream_at_once(
    bed: BedState, kube: Kube, family: Family, proxy: FaultProxy, tmp_path: Path
) -> None:
    # The liar relays its registry's wrong bytes; the other listed peer waits on the same
    # seeder. Dropping only the liar would leave the node waiting out the 120 s peer wait.
    node, layer = bed.nodes[2], _layer(family, 5)
    with _warm_beside_liar(bed, kube, family, proxy, tmp_path, layer, b"\0" * layer.size,
                           listed=2) as (found, asked, seconds):
        assert seconds < 45
        assert asked[:2] == ["HEAD", "GET"] and asked.count("GET") == 1, asked
        assert found["bytes"]["upstream"] == layer.size
        assert found["bytes"]["peer"] == layer.size  # received, rejected at COMMIT
        assert [e["reason"] for e in found["errors"]] == ["DigestMismatch"]
        assert stored_sha256(node.socket, layer.digest) == layer.digest
        assert ingest_ref(layer.digest) not in ingests(node.socket)
