"""The agent's free-space floor sits above the kubelet's own disk thresholds.

KubeletConfiguration files as kind/kubeadm write them (YAML) and as some clouds do (JSON);
the disk guard examined on a real filesystem (``os.statvfs`` of the test's tmp dir).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from layercache.agent.status.disk import DiskGuard, DiskPressureError
from layercache.agent.status.kubelet import (
    MARGIN_PERCENT,
    DiskThreshold,
    kubelet_disk,
    parse_threshold,
    read_kubelet_disk,
)

GIB = 2**30
TOTAL = 100 * GIB


def _floor_percent(config: dict[str, object]) -> float:
    return read_floor(kubelet_disk(config, "test").floor(TOTAL)[0])


def read_floor(size: int) -> float:
    return round(100 * size / TOTAL, 6)


def test_defaults_keep_clear_of_imagefs_15_percent_and_image_gc_85() -> None:
    # No file: the kubelet's defaults (imagefs.available 15 %, nodefs.available 10 %,
    # imageGCHighThresholdPercent 85), plus the margin.
    floor, why = read_kubelet_disk(None).floor(TOTAL)
    assert read_floor(floor) == 15 + MARGIN_PERCENT == 20
    assert "imagefs.available=15%" in why
    assert read_kubelet_disk(Path("/nonexistent/config.yaml")).floor(TOTAL)[0] == floor


def test_an_explicit_eviction_hard_replaces_the_defaults_as_in_the_kubelet() -> None:
    # evictionHard given: unnamed signals get no threshold (mergeDefaultEvictionSettings off).
    assert _floor_percent({"evictionHard": {"imagefs.available": "8%"},
                           "imageGCHighThresholdPercent": 100}) == 8 + MARGIN_PERCENT
    # Merged: the given signals win, the others keep their defaults (nodefs 10 %).
    assert _floor_percent({"evictionHard": {"imagefs.available": "8%"},
                           "mergeDefaultEvictionSettings": True,
                           "imageGCHighThresholdPercent": 100}) == 10 + MARGIN_PERCENT
    # A soft threshold evicts too (after its grace period); quantities count in bytes.
    assert _floor_percent({"evictionHard": {"nodefs.available": "1Gi"},
                           "evictionSoft": {"imagefs.available": "30Gi"},
                           "imageGCHighThresholdPercent": 90}) == 30 + MARGIN_PERCENT
    assert _floor_percent({"evictionHard": {"imagefs.available": "0%"},
                           "imageGCHighThresholdPercent": 75}) == 25 + MARGIN_PERCENT


@pytest.mark.parametrize(("text", "expected"), [
    ("15%", DiskThreshold("x=15%", percent=15.0)),
    ("12.5%", DiskThreshold("x=12.5%", percent=12.5)),
    ("10Gi", DiskThreshold("x=10Gi", size=10 * GIB)),
    ("500M", DiskThreshold("x=500M", size=500_000_000)),
    ("1.5Gi", DiskThreshold("x=1.5Gi", size=int(1.5 * GIB))),
    ("0%", None), ("0", None),
])
def test_thresholds_parse_percentages_and_quantities(text: str,
                                                     expected: DiskThreshold | None) -> None:
    assert parse_threshold("x", text) == expected


@pytest.mark.parametrize("text", ["150%", "ten", "10Qi", "-1Gi"])
def test_bad_thresholds_name_the_signal(text: str) -> None:
    with pytest.raises(ValueError, match=r"^evictionHard imagefs.available: "):
        parse_threshold("evictionHard imagefs.available", text)


def test_kubeadm_yaml_and_json_files_are_read(tmp_path: Path) -> None:
    config = {"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
              "evictionHard": {"imagefs.available": "22%", "memory.available": "100Mi"}}
    yaml_file, json_file = tmp_path / "config.yaml", tmp_path / "kubelet-config.json"
    yaml_file.write_text(yaml.safe_dump(config))
    json_file.write_text('{"kind": "KubeletConfiguration", "evictionHard": '
                         '{"imagefs.available": "22%"}}')
    for file in (yaml_file, json_file):
        floor, why = read_kubelet_disk(file).floor(TOTAL)
        assert read_floor(floor) == 22 + MARGIN_PERCENT
        assert why.startswith("the kubelet's evictionHard imagefs.available=22% (")
        assert str(file) in why


@pytest.mark.parametrize("text", ["", "evictionHard: [1, 2]\n", ":\n  - [", "- a\n",
                                  "evictionHard: {imagefs.available: lots}\n"])
def test_empty_or_malformed_files_mean_the_kubelets_defaults(tmp_path: Path, text: str) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(text)
    assert read_floor(read_kubelet_disk(file).floor(TOTAL)[0]) == 15 + MARGIN_PERCENT


async def _refused_at(tmp_path: Path, guard: DiskGuard, leave_percent: float) -> bool:
    stat = os.statvfs(tmp_path)
    total, available = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
    size = available - int(total * leave_percent / 100)
    try:
        await guard.reserve(size)
    except DiskPressureError:
        return True
    guard.release(size)
    return False


async def test_the_guard_refuses_a_fetch_that_would_cross_the_kubelets_threshold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 100 GB image filesystem with 50 GB free, whatever the machine's own disk holds
    # (a test that depends on the free space of the runner's disk would skip or flake).
    block = 4096
    total, free = 100 * 10**9 // block, 50 * 10**9 // block
    fake = os.statvfs_result((block, block, total, free, free, 10**6, 10**6, 10**6, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda _path: fake)

    async def locate() -> Path:
        return tmp_path

    config = tmp_path / "config.yaml"
    config.write_text("evictionHard:\n  imagefs.available: 15%\n")
    guard = DiskGuard(locate, 0.0, read_kubelet_disk(config))
    # Leaving 12 % free: under the kubelet's 15 % (the old 10 % default allowed it) ...
    assert await _refused_at(tmp_path, guard, 12)
    assert guard.refusal is not None and "imagefs.available=15%" in str(guard.refusal)
    # ... and under 15 % + the margin; 21 % left is fine.
    assert await _refused_at(tmp_path, guard, 19)
    assert not await _refused_at(tmp_path, guard, 21)
    # LAYERCACHE_MIN_FREE_PERCENT may raise the floor, never lower it under the kubelet's.
    assert await _refused_at(tmp_path, DiskGuard(locate, 22.0, read_kubelet_disk(config)), 21)
    assert await _refused_at(tmp_path, DiskGuard(locate, 5.0, read_kubelet_disk(config)), 12)


async def test_the_agent_wires_the_kubelet_floor_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from layercache.agent.app import Agent
    from layercache.agent.settings import AgentSettings

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    monkeypatch.setenv("NODE_NAME", "node-1")
    monkeypatch.setenv("LAYERCACHE_KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("LAYERCACHE_CONTAINERD_SOCKET", str(tmp_path / "containerd.sock"))
    # Where the DaemonSet mounts the kubelet's file, none here: the kubelet's defaults.
    monkeypatch.setenv("LAYERCACHE_KUBELET_CONFIG", str(tmp_path / "absent.yaml"))
    agent = Agent(AgentSettings())
    try:
        floor, why = agent.disk.floor(TOTAL)
        assert read_floor(floor) == 20 and "imagefs.available=15%" in why
        config = tmp_path / "config.yaml"
        config.write_text("evictionHard: {imagefs.available: 30%}\n")
        monkeypatch.setenv("LAYERCACHE_KUBELET_CONFIG", str(config))
        second = Agent(AgentSettings())
        assert read_floor(second.disk.floor(TOTAL)[0]) == 35
        await second.close()
    finally:
        await agent.close()
