"""LayerCache spec parsing: every invalid field is named; valid specs come out typed."""

from __future__ import annotations

import pytest

from layercache.api.spec import InvalidSpecError, Toleration, parse_duration, parse_spec
from layercache.oci.platform import parse_platform


@pytest.mark.parametrize(("text", "seconds"), [
    ("10m", 600), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("2h0m5s", 7205)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "1d", "0s", "10 m", "-1m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|longer than zero"):
        parse_duration(text)


@pytest.mark.parametrize(("spec", "field", "problem"), [
    ({}, "images", "set images, imagesFrom, or both"),
    ({"images": ["ok", "Bad/Repo"]}, r"images\[1\]", "lower-case"),
    ({"images": ["a"], "platforms": ["linux"]}, r"platforms\[0\]", ""),
    ({"images": ["a"], "maxBytesPerNode": "12 parsecs"}, "maxBytesPerNode", "not a quantity"),
    ({"images": ["a"], "refreshInterval": "1d"}, "refreshInterval", "duration"),
    ({"images": ["a"], "minSharedBy": 0}, "minSharedBy", ">= 1"),
    ({"images": ["a"], "mode": "Blobs"}, "mode", "Layers or Images"),
    ({"images": ["a"], "tolerations": [{"operator": "In"}]}, r"tolerations\[0\]\.operator", ""),
])
def test_invalid_specs_name_object_and_field(spec: dict[str, object], field: str,
                                              problem: str) -> None:
    with pytest.raises(InvalidSpecError, match=rf"^LayerCache ns/c: spec\.{field}: .*{problem}"):
        parse_spec("ns/c", spec)


def test_valid_spec() -> None:
    spec = parse_spec("ns/c", {
        "images": ["python:3.12", "ghcr.io/org/app@sha256:" + "a" * 64],
        "nodeSelector": {"pool": "gpu"}, "platforms": ["linux/arm64"],
        "maxBytesPerNode": "20Gi", "refreshInterval": "1h", "minSharedBy": 2,
        "mode": "Images", "pullSecrets": [{"name": "regcred"}],
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    assert [str(r) for r in spec.images] == [
        "docker.io/library/python:3.12", "ghcr.io/org/app@sha256:" + "a" * 64]
    assert spec.max_bytes_per_node == 20 * 2**30
    assert spec.refresh_seconds == 3600
    assert spec.pull_secrets == ("regcred",)
    # arm64's default variant v8 is implied, as containerd normalises it.
    assert spec.platforms == (parse_platform("linux/arm64/v8"),)
    gpu_taint = {"key": "gpu", "value": "a100", "effect": "NoSchedule"}
    assert spec.targets({"pool": "gpu"}, [gpu_taint])
    assert not spec.targets({"pool": "cpu"}, [])
    assert not spec.targets({"pool": "gpu"}, [{"key": "other", "effect": "NoExecute"}])
    # PreferNoSchedule does not keep Pods off a node, so it does not keep the cache off.
    assert spec.targets({"pool": "gpu"}, [{"key": "x", "effect": "PreferNoSchedule"}])


@pytest.mark.parametrize(("toleration", "taint", "tolerated"), [
    (Toleration("", "Exists"), {"key": "any", "effect": "NoExecute"}, True),
    (Toleration("k", "Equal", "v"), {"key": "k", "value": "v", "effect": "NoSchedule"}, True),
    (Toleration("k", "Equal", "v"), {"key": "k", "value": "w", "effect": "NoSchedule"}, False),
    (Toleration("k", "Exists", effect="NoExecute"), {"key": "k", "effect": "NoSchedule"}, False),
    (Toleration("", "Equal"), {"key": "k", "effect": "NoSchedule"}, False),
])
def test_toleration_matching(toleration: Toleration, taint: dict[str, str],
                             tolerated: bool) -> None:
    assert toleration.tolerates(taint) is tolerated


def test_pod_selector_keeps_match_expressions() -> None:
    spec = parse_spec("ns/c", {"imagesFrom": {"podSelector": {
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "example.com/track", "operator": "NotIn", "values": ["canary"]},
            {"key": "team", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"}]}}})
    assert spec.images_from_selector is not None
    assert spec.images_from_selector.query() == (
        "app=web,tier in (a,b),example.com/track notin (canary),team,!legacy")


def test_images_from_without_selector_selects_every_pod() -> None:
    spec = parse_spec("ns/c", {"imagesFrom": {"namespaces": ["x"]}})
    assert spec.images_from_selector is not None
    assert spec.images_from_selector.query() == ""
    assert parse_spec("ns/c", {"images": ["a"]}).images_from_selector is None


@pytest.mark.parametrize(("selector", "field", "problem"), [
    ({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]},
     r"matchExpressions\[0\]\.operator", "must be one of In, NotIn, Exists, DoesNotExist"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]},
     r"matchExpressions\[0\]\.values", "In needs at least one value"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
     r"matchExpressions\[0\]\.values", "Exists takes no values"),
    ({"matchExpressions": [{"key": "a b", "operator": "Exists"}]},
     r"matchExpressions\[0\]\.key", "not a label key"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x,y"]}]},
     r"matchExpressions\[0\]\.values\[0\]", "not a label value"),
    ({"matchLabels": {"app": "a)"}}, r"matchLabels\['app'\]", "not a label value"),
    ({"matchLabel": {"app": "a"}}, "matchLabel", "unknown field"),
])
def test_invalid_pod_selector_names_the_field(selector: dict[str, object], field: str,
                                              problem: str) -> None:
    with pytest.raises(InvalidSpecError, match=(
            rf"^LayerCache ns/c: spec\.imagesFrom\.podSelector\.{field}: .*{problem}")):
        parse_spec("ns/c", {"imagesFrom": {"podSelector": selector}})
