"""The typed contract (layercache.api): round trips, errors naming the field, one reason table."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import layercache
from layercache.api import (
    GROUP,
    NLC_PLURAL,
    VERSION,
    InvalidNodeSpecError,
    InvalidObjectError,
    LayerCacheStatus,
    NodeLayerCacheSpec,
    NodeLayerCacheStatus,
    Reason,
    failure_reason,
)
from layercache.api.reasons import FAILURE_CLASSES
from layercache.registry.errors import ManifestNotFoundError, RateLimitedError

ROOT = Path(__file__).resolve().parents[2]
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64

SPEC: dict[str, Any] = {
    "nodeName": "n1",
    "layers": [{"digest": D1, "size": 10, "mediaType": "m", "repository": "r.example/a",
                "source": "Upstream", "peers": [], "caches": ["ns/a"]},
               {"digest": D2, "size": 20, "mediaType": "m", "repository": "r.example/a",
                "source": "Peer", "peers": ["n2"], "caches": ["ns/a", "ns/b"]}],
    "chains": [{"chainID": D1, "layers": [D1], "diffIDs": [D2], "unpackedBytes": 30,
                "caches": ["ns/a"]}],
    "images": [{"reference": f"r.example/a@{D1}", "caches": ["ns/a"]}],
    "caches": ["ns/a", "ns/b"],
    "paused": False,
    "imageLayers": [{"cache": "ns/a", "layers": [0, 1]}],
}
NODE_STATUS: dict[str, Any] = {
    "observedGeneration": 3,
    "layers": {"wanted": 2, "held": 1, "bytesHeld": 10},
    "chains": {"wanted": 1, "unpacked": 0, "bytesUnpacked": 0},
    "missing": [D2],
    "bytes": {"upstream": 10, "peer": 0, "servedToPeers": 5},
    "human": {"bytesHeld": "10 B", "upstream": "10 B", "peer": "0 B"},
    "errors": [{"reason": "UpstreamUnavailable", "message": "503", "digest": D2},
               {"reason": "CredentialsInvalid", "message": "bad"}],
    "diskPressure": False,
    "conditions": [{"type": "Ready", "status": "False", "reason": "LayersMissing",
                    "message": "1 of 2 layers missing",
                    "lastTransitionTime": "2026-12-07T00:00:00Z", "observedGeneration": 3}],
    "peerEndpoint": "http://10.0.0.1:8080",
    "disk": {"blobs": 10, "snapshots": 0, "separate": 30, "saved": 20,
             "caches": [{"cache": "ns/a", "blobs": 10, "snapshots": 0, "separate": 30,
                         "saved": 20}]},
    "lastSync": "2026-12-07T00:00:01Z",
}
CACHE_STATUS: dict[str, Any] = {
    "observedGeneration": 2, "reason": "AllNodesReady",
    "conditions": [{"type": "Ready", "status": "True", "reason": "AllNodesReady",
                    "message": "1/1 nodes hold their layers",
                    "lastTransitionTime": "2026-12-07T00:00:00Z", "observedGeneration": 2}],
    "images": [{"reference": "r.example/a:1", "digest": D1, "platform": "linux/amd64",
                "layers": 2},
               {"reference": "r.example/b:1", "platform": "linux/amd64",
                "error": "ManifestNotFound: no such tag"}],
    "layers": {"total": 2, "shared": 1, "skippedForBudget": 0},
    "chains": {"planned": 1, "skippedForBudget": 0, "wanted": 1, "unpacked": 1,
               "bytesUnpacked": 30},
    "bytes": {"unique": 30, "naive": 60, "expectedUpstream": 0, "upstream": 30, "peer": 30,
              "saved": 30, "savedHuman": "30 B"},
    "nodes": {"desired": 1, "ready": 1, "summary": "1/1", "failing": []},
    "disk": {"blobs": 30, "snapshots": 0, "separate": 30, "saved": 0},
    "lastResolved": None,
    "nonDistributableLayers": [{"image": "r.example/w:1", "digest": D2,
                                "mediaType": "application/vnd.docker.image.rootfs.foreign"}],
}


@pytest.mark.parametrize(("model", "data"), [
    (NodeLayerCacheSpec, SPEC),
    (NodeLayerCacheStatus, NODE_STATUS),
    (NodeLayerCacheStatus, {"bytes": {"upstream": 1, "peer": 2, "servedToPeers": 3},
                            "lastSync": "2026-12-07T00:00:01Z"}),  # before the inventory
    (LayerCacheStatus, CACHE_STATUS),
    (LayerCacheStatus, {"observedGeneration": 1, "reason": "InvalidSpec", "conditions": []}),
])
def test_round_trip_is_the_same_dict(model: Any, data: dict[str, Any]) -> None:
    assert model.from_dict(data).to_dict() == data


def test_snake_case_in_python_camel_case_on_the_wire() -> None:
    spec = NodeLayerCacheSpec.from_dict(SPEC)
    assert spec.chains[0].chain_id == D1 and spec.chains[0].diff_ids == [D2]
    assert spec.image_layers[0].layers == [0, 1]
    status = NodeLayerCacheStatus.from_dict(NODE_STATUS)
    assert status.bytes.served_to_peers == 5 and status.peer_endpoint == "http://10.0.0.1:8080"
    assert status.condition("Ready") is not None and status.synced
    assert not NodeLayerCacheStatus.from_dict({"bytes": {"upstream": 1}}).synced


def test_unknown_fields_are_ignored_not_written() -> None:
    spec = NodeLayerCacheSpec.from_dict({**SPEC, "futureField": 1})
    assert spec.to_dict() == SPEC


@pytest.mark.parametrize(("change", "path"), [
    ({"layers": [{**SPEC["layers"][0], "size": "10"}]}, "spec.layers[0].size"),
    ({"layers": [{**SPEC["layers"][0], "size": -1}]}, "spec.layers[0].size"),
    ({"layers": [SPEC["layers"][0], {**SPEC["layers"][1], "source": "Elsewhere"}]},
     "spec.layers[1].source"),
    ({"chains": [{"chainID": D1, "layers": [D1]}]}, "spec.chains[0].diffIDs"),
    ({"imageLayers": [{"cache": "ns/a", "layers": ["x"]}]}, "spec.imageLayers[0].layers[0]"),
    ({"paused": "yes"}, "spec.paused"),
])
def test_a_bad_spec_field_is_named_with_the_object(change: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidNodeSpecError) as caught:
        NodeLayerCacheSpec.read("n1", {**SPEC, **change})
    assert str(caught.value).startswith(f"NodeLayerCache n1: {path}: ")
    assert caught.value.field == path.removeprefix("spec.")


def test_a_bad_status_field_is_named_with_the_object() -> None:
    with pytest.raises(InvalidObjectError, match=r"^NodeLayerCache n2: status\.bytes\.peer: "):
        NodeLayerCacheStatus.from_dict({"bytes": {"peer": True}}, "NodeLayerCache", "n2",
                                       "status")
    with pytest.raises(InvalidObjectError,
                       match=r"^LayerCache ns/a: status\.nodes\.failing\[0\]\.name: "):
        LayerCacheStatus.from_dict({"nodes": {"failing": [{"reason": "Fetching"}]}},
                                   "LayerCache", "ns/a", "status")


def test_lenient_read_drops_unusable_entries_and_keeps_layer_positions() -> None:
    spec = NodeLayerCacheSpec.read_lenient({**SPEC, "layers": [{"digest": D1}, SPEC["layers"][1]],
                                            "chains": [{"chainID": "x"}]})
    assert [layer.digest for layer in spec.layers] == [D1, D2]
    assert spec.chains == [] and spec.image_layers[0].layers == [0, 1]


def test_group_version_plural_are_the_crds() -> None:
    crd = yaml.safe_load((ROOT / "manifests/crds/layercache.dev_nodelayercaches.yaml")
                         .read_text())
    assert (crd["spec"]["group"], crd["spec"]["versions"][0]["name"],
            crd["spec"]["names"]["plural"]) == (GROUP, VERSION, NLC_PLURAL)


def test_one_reason_table_names_each_failure_where_it_is_reported() -> None:
    assert failure_reason(RateLimitedError("GET x"), "resolve") == "RateLimited"
    assert failure_reason(RateLimitedError("GET x"), "fetch") == "UpstreamRateLimited"
    missing = ManifestNotFoundError(404, "GET m")
    assert failure_reason(missing, "resolve") == Reason.MANIFEST_NOT_FOUND
    assert failure_reason(missing, "fetch") == Reason.UPSTREAM_REFUSED
    assert failure_reason(KeyError("x"), "fetch") == Reason.INTERNAL_ERROR


def test_every_class_the_reason_table_names_exists() -> None:
    # The table is keyed by class name (api imports no client): a renamed exception class
    # must fail here, not silently change a public reason.
    for module in pkgutil.walk_packages(layercache.__path__, "layercache."):
        if ".protos" not in module.name and not module.name.endswith("__main__"):
            importlib.import_module(module.name)

    def subclasses(kind: type[BaseException]) -> set[str]:
        found = set()
        for sub in kind.__subclasses__():
            if sub.__module__.startswith("layercache."):
                found.add(sub.__name__)
            found |= subclasses(sub)
        return found

    assert subclasses(BaseException) >= FAILURE_CLASSES


def test_the_agent_acts_on_its_spec_whatever_its_status_holds() -> None:
    from layercache.agent.nodespec import Counters, parse_node_spec

    spec = parse_node_spec({"metadata": {"name": "n1", "generation": 2},
                            "spec": {**SPEC, "chains": []},
                            "status": {"bytes": {"upstream": "many"}}})
    assert spec.counters == Counters() and len(spec.layers) == 2


def test_one_unreadable_node_object_stops_no_replan_or_aggregation() -> None:
    from layercache.controller.nodeindex import SpecRecord
    from layercache.controller.status import cache_disk

    good = {"metadata": {"name": "n2"}, "spec": SPEC, "status": NODE_STATUS}
    bad_spec = {**SPEC, "layers": [{"digest": D1, "size": 1}]}  # no repository, no source
    assert {n: SpecRecord.of(n, s).assignments for n, s in
            {"n1": bad_spec, "n2": SPEC}.items()} == {
        "n1": {}, "n2": {D1: ("Upstream", ()), D2: ("Peer", ("n2",))}}
    bad_status = {"metadata": {"name": "n1"},
                  "status": {"disk": {"caches": [{"cache": "ns/a", "blobs": "lots"}]}}}
    assert cache_disk("ns/a", ["n1", "n2"], {"n1": bad_status, "n2": good}) == {
        "blobs": 10, "snapshots": 0, "separate": 30, "saved": 20}
