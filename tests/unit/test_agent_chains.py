"""The agent's side of chains without I/O: spec parsing, status, metrics, snapshotter config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from layercache.agent.nodespec import Counters, InvalidNodeSpecError, parse_node_spec
from layercache.agent.status.disk import DiskGuard
from layercache.agent.status.report import StatusBook
from layercache.agent.store.unpacking import ChainUnpacker, configured_snapshotter
from layercache.backoff import RetryTimes
from layercache.controller.state import CacheState
from layercache.controller.status import cache_status
from layercache.metrics import AgentGauges, AgentMetrics
from layercache.oci.digest import Digest, chain_ids

BASE, TOP = Digest.from_bytes(b"base"), Digest.from_bytes(b"top")
DIFF_BASE, DIFF_TOP = Digest.from_bytes(b"diff-base"), Digest.from_bytes(b"diff-top")
CHAIN = chain_ids([DIFF_BASE, DIFF_TOP])


def _layer(digest: Digest) -> dict[str, Any]:
    return {"digest": str(digest), "size": 10, "repository": "127.0.0.1:5000/family/base",
            "source": "Upstream", "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}


def _obj(*chains: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "n1", "generation": 1},
            "spec": {"nodeName": "n1", "layers": [_layer(BASE), _layer(TOP)],
                     "caches": ["ns/c"], "chains": list(chains)}}


def _chain(**changes: Any) -> dict[str, Any]:
    return {"chainID": str(CHAIN[1]), "layers": [str(BASE), str(TOP)],
            "diffIDs": [str(DIFF_BASE), str(DIFF_TOP)], "unpackedBytes": 60,
            "caches": ["ns/c"], **changes}


def test_chains_are_parsed_in_order() -> None:
    spec = parse_node_spec(_obj(_chain(chainID=str(CHAIN[0]), layers=[str(BASE)],
                                       diffIDs=[str(DIFF_BASE)]), _chain()))
    assert [c.chain_id for c in spec.chains] == CHAIN
    assert spec.chains[1].layers == (BASE, TOP)
    assert spec.chains[1].diff_ids == (DIFF_BASE, DIFF_TOP)
    assert (spec.chains[1].unpacked_bytes, spec.chains[1].caches) == (60, ("ns/c",))
    assert parse_node_spec(_obj()).chains == ()


@pytest.mark.parametrize(("changes", "field"), [
    ({"chainID": str(CHAIN[0])}, "chains[0].chainID"),  # not the chain ID of the diff IDs
    ({"chainID": "sha256:nothex"}, "chains[0].chainID"),
    ({"diffIDs": [str(DIFF_BASE)]}, "chains[0].diffIDs"),
    ({"layers": [str(BASE), str(Digest.from_bytes(b"x"))]}, "chains[0].layers"),
])
def test_unusable_chains_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidNodeSpecError) as caught:
        parse_node_spec(_obj(_chain(**changes)))
    assert caught.value.field == field
    assert f"spec.{field}" in str(caught.value)


def test_ready_waits_for_the_chains_and_status_counts_them() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics("n1", registry)
    book = StatusBook(Counters(), metrics, list)
    book.synced, book.wanted, book.held = True, 2, 2
    book.chains_wanted, book.chains_unpacked, book.chains_pending = 2, 1, 1
    book.bytes_unpacked = 1234
    conditions = {c["type"]: c for c in book.body()["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == (
        "False", "ChainsPending")
    assert "1 of 2 chains" in conditions["Ready"]["message"]
    assert book.body()["chains"] == {"wanted": 2, "unpacked": 1, "bytesUnpacked": 1234}
    book.chains_unpacked, book.chains_pending = 2, 0
    ready = {c["type"]: c for c in book.body()["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("True", "AllLayersHeld")

    metrics.track(lambda: AgentGauges(2, 2, 20, False, 2, 1, 1234))
    metrics.unpacked(True, 0.3)
    metrics.unpacked(False, 2.0)
    sample = registry.get_sample_value
    assert sample("layercache_agent_chains_wanted", {"node": "n1"}) == 2
    assert sample("layercache_agent_chains_unpacked", {"node": "n1"}) == 1
    assert sample("layercache_agent_unpacked_bytes", {"node": "n1"}) == 1234
    assert sample("layercache_agent_unpack_duration_seconds_count",
                  {"node": "n1", "result": "ok"}) == 1
    assert sample("layercache_agent_unpack_duration_seconds_bucket",
                  {"node": "n1", "result": "error", "le": "2.5"}) == 1


@pytest.mark.parametrize(("text", "expected"), [
    # containerd 2.x (config version 3) and 1.7 (version 2), as kind's nodes write them.
    ("version = 3\n[plugins.'io.containerd.cri.v1.images']\nsnapshotter = 'native'\n",
     "native"),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\nsnapshotter = "zfs"\n',
     "zfs"),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".cni]\nbin_dir = "/x"\n', "overlayfs"),
    ("not = [toml", "overlayfs"),
    (None, "overlayfs"),
])
def test_snapshotter_from_the_containerd_config(tmp_path: Path, text: str | None,
                                                 expected: str) -> None:
    config = tmp_path / "config.toml"
    if text is not None:
        config.write_text(text)
    assert configured_snapshotter(config) == expected


def test_cache_status_sums_its_nodes_chains() -> None:
    state = CacheState("ns", "c", 1, desired_nodes=("n1", "n2"), planned=True)
    nodes = {name: {"metadata": {"name": name, "generation": 1},
                    "status": {"observedGeneration": 1,
                               "chains": {"wanted": 3, "unpacked": unpacked,
                                          "bytesUnpacked": 100 * unpacked}}}
             for name, unpacked in (("n1", 3), ("n2", 1))}
    status = cache_status(state, nodes)
    assert status["chains"] == {"planned": 0, "skippedForBudget": 0, "wanted": 6,
                                "unpacked": 4, "bytesUnpacked": 400}


def test_an_unsupported_snapshotter_is_reported_not_crashed_on(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics("n1", registry)
    book = StatusBook(Counters(), metrics, list)

    async def nowhere() -> Path:
        return tmp_path
    chains = ChainUnpacker.for_node(tmp_path / "containerd.sock", "k8s.io", "native",
                                    book=book, disk=DiskGuard(nowhere),
                                    retry=RetryTimes(1, 2), metrics=metrics)
    assert chains.unpacker is None
    spec = parse_node_spec(_obj(_chain(chainID=str(CHAIN[0]), layers=[str(BASE)],
                                       diffIDs=[str(DIFF_BASE)])))
    chains.report(spec)
    book.synced, book.wanted, book.held = True, 2, 2
    conditions = {c["type"]: (c["status"], c["reason"]) for c in book.body()["conditions"]}
    # Nothing can be unpacked: Ready is about the blobs, Degraded says why.
    assert conditions == {"Ready": ("True", "AllLayersHeld"),
                          "Progressing": ("False", "Complete"),
                          "Degraded": ("True", "UnsupportedSnapshotter")}
    assert book.body()["chains"] == {"wanted": 1, "unpacked": 0, "bytesUnpacked": 0}
    assert "'native' is not supported" in book.body()["errors"][0]["message"]
    assert registry.get_sample_value("layercache_agent_errors_total",
                                     {"node": "n1", "reason": "UnsupportedSnapshotter"}) == 1
