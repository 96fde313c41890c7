"""The bed's Helm helpers that are pure logic: the kubelet's pull time, image references."""

from __future__ import annotations

import pytest

from testbed.chart import LoadedImage, go_duration_seconds, split_reference


@pytest.mark.parametrize(("text", "seconds"), [
    ("1.5s", 1.5), ("812.3ms", 0.8123), ("1m2.5s", 62.5), ("1h0m0s", 3600.0),
    ("250us", 0.00025), ("250µs", 0.00025), ("17ns", 1.7e-8), ("0s", 0.0),
])
def test_go_durations_read_as_seconds(text: str, seconds: float) -> None:
    assert go_duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1.5", "s", "1.5 s", "1.5sec", "-1s", "1s2"])
def test_what_is_not_a_go_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a Go duration"):
        go_duration_seconds(text)


def test_references_split_into_repository_and_tag() -> None:
    assert split_reference("ghcr.io/layercache/layercache:0.1.0") == (
        "ghcr.io/layercache/layercache", "0.1.0")
    assert split_reference("127.0.0.1:5000/family/python:v1") == (
        "127.0.0.1:5000/family/python", "v1")
    for untagged in ("127.0.0.1:5000/family/python", "layercache"):
        with pytest.raises(ValueError, match="has no tag"):
            split_reference(untagged)


def test_the_chart_gets_only_image_values() -> None:
    loaded = LoadedImage("ghcr.io/layercache/layercache:0.1.0", "sha256:" + "0" * 64, ("n",))
    assert loaded.helm_values == [
        "--set", "image.repository=ghcr.io/layercache/layercache", "--set", "image.tag=0.1.0",
        "--set", "image.pullPolicy=Never"]
