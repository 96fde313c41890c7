"""Pure parsing of the agent: NodeLayerCache spec, Range headers, settings, Node facts."""

from __future__ import annotations

import re
from typing import Any

import pytest

from layercache.agent.nodeinfo import NodeInfo
from layercache.agent.nodespec import Counters, InvalidNodeSpecError, parse_node_spec
from layercache.agent.settings import AgentSettings
from layercache.httprange import parse_range

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def _obj(layers: list[dict[str, Any]], **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "n1", "generation": 3},
            "spec": {"nodeName": "n1", "layers": layers, "caches": ["ns/c"],
                     "images": [{"reference": "r.example/a@" + DIGEST}]},
            "status": status}


def _layer(digest: str = DIGEST, **extra: Any) -> dict[str, Any]:
    return {"digest": digest, "size": 10, "repository": "127.0.0.1:5000/family/base",
            "source": "Peer", "peers": ["n2"], **extra}


def test_spec_is_parsed_in_order_with_duplicates_dropped_and_counters_read_back() -> None:
    spec = parse_node_spec(_obj([_layer(OTHER), _layer(), _layer(OTHER, source="Upstream")],
                                bytes={"upstream": 5, "peer": 7, "servedToPeers": 9}))
    assert [layer.digest for layer in spec.layers] == [OTHER, DIGEST]
    assert spec.layers[0].repository.registry == "127.0.0.1:5000"
    assert spec.layers[0].repository.repository == "family/base"
    assert spec.layers[0].source == "Peer" and spec.layers[0].peers == ("n2",)
    assert spec.generation == 3 and spec.caches == ("ns/c",) and not spec.paused
    assert spec.counters == Counters(5, 7, 9)
    assert spec.images == ("r.example/a@" + DIGEST,)
    assert spec.wanted == frozenset({DIGEST, OTHER})


@pytest.mark.parametrize(("layer", "field"), [
    (_layer("sha256:xyz"), "layers[0].digest"),
    (_layer(size=-1), "layers[0].size"),
    (_layer(size=True), "layers[0].size"),
    (_layer(repository="UPPER/Case"), "layers[0].repository"),
    (_layer(source="Somewhere"), "layers[0].source"),
])
def test_unusable_layers_name_the_field(layer: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidNodeSpecError, match=re.escape(f"NodeLayerCache n1: spec.{field}")
                       ) as info:
        parse_node_spec(_obj([layer]))
    assert info.value.field == field


def test_missing_status_counts_from_zero() -> None:
    assert parse_node_spec(_obj([])).counters == Counters()


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 100, None),
    ("bytes=0-9", 100, (0, 9)),
    ("bytes=90-", 100, (90, 99)),
    ("bytes=90-1000", 100, (90, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-1000", 100, (0, 99)),
    ("bytes=0-1,5-6", 100, None),  # several ranges: the whole blob
    ("items=0-1", 100, None),
    ("bytes=-", 100, None),
])
def test_range_headers(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-3", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(ValueError, match="range"):
        parse_range(header, 100)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "worker-1")
    monkeypatch.setenv("POD_IP", "10.0.0.7")
    monkeypatch.setenv("LAYERCACHE_INSECURE_REGISTRIES", "a:5000, b:5001,")
    monkeypatch.setenv("LAYERCACHE_MAX_BYTES_PER_SECOND", "1000000")
    settings = AgentSettings()
    assert settings.node_name == "worker-1"
    assert settings.peer_advertise_address == "10.0.0.7"
    assert settings.insecure_hosts == ("a:5000", "b:5001")
    assert settings.max_bytes_per_second == 1_000_000
    # min_free_percent: unset, the kubelet's thresholds set the floor (issue 10).
    assert (settings.concurrency, settings.peer_wait_seconds, settings.min_free_percent) == (
        4, 120.0, None)
    assert settings.registry_secret == "layercache-registry-credentials"
    assert settings.describe()["node_name"] == "worker-1"
    with pytest.raises(ValueError, match="frozen"):
        settings.concurrency = 8


@pytest.mark.parametrize(("name", "value"), [
    ("LAYERCACHE_CONCURRENCY", "0"), ("LAYERCACHE_MIN_FREE_PERCENT", "101"),
    ("LAYERCACHE_LOG_LEVEL", "chatty"), ("LAYERCACHE_PEER_PORT", "70000"),
])
def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch, name: str,
                                      value: str) -> None:
    monkeypatch.setenv("NODE_NAME", "worker-1")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="validation error"):
        AgentSettings()


def test_node_facts() -> None:
    info = NodeInfo()
    info.update({
        "metadata": {"labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64"}},
        "status": {"conditions": [{"type": "DiskPressure", "status": "True"}],
                   "addresses": [{"type": "Hostname", "address": "w1"},
                                 {"type": "InternalIP", "address": "10.1.2.3"}]},
    })
    assert (info.platform, info.disk_pressure, info.internal_ip) == (
        "linux/arm64", True, "10.1.2.3")
    info.update(None)  # a Node we could not read leaves the facts as they were
    assert info.disk_pressure


def test_an_images_layers_are_read_as_digests_of_spec_layers() -> None:
    obj = _obj([_layer(OTHER), _layer()])
    obj["spec"]["images"] = [{"reference": "r.example/a@" + DIGEST, "layers": [1, 0]},
                             {"reference": "r.example/b@" + OTHER}]
    spec = parse_node_spec(obj)
    # Base first, as the operator resolved it; an image without layers is resolved here.
    assert spec.image_layers == {"r.example/a@" + DIGEST: (DIGEST, OTHER)}
    assert spec.images == ("r.example/a@" + DIGEST, "r.example/b@" + OTHER)


def test_an_images_layer_index_outside_spec_layers_names_the_field() -> None:
    obj = _obj([_layer()])
    obj["spec"]["images"] = [{"reference": "r.example/a@" + DIGEST, "layers": [0, 3]}]
    with pytest.raises(InvalidNodeSpecError, match=re.escape(
            "spec.images[0].layers: 3 is not an index of spec.layers (1 layers)")):
        parse_node_spec(obj)
