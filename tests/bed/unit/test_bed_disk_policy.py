"""A bed node's kubelet disk thresholds, as the agent reads them.

Agents started as processes (no kubelet on their node: the process beds, the harness, a node
joining a chart bed) are given `testbed.nodes.write_kubelet_disk_policy`'s file as their
kubelet configuration. Without it they applied the kubelet's defaults — 15 % imagefs, plus
their 5-point margin — while the bed's kubelet nodes run with 1 %: on a host with less than
20 % of its disk free (CI on 2026-12-07: 19.8 %) every process agent refused to fetch
(DiskPressure) and the kubelet nodes beside it did not.
"""

from __future__ import annotations

from pathlib import Path

from layercache.agent.status.kubelet import read_kubelet_disk
from testbed.nodes import write_kubelet_disk_policy

GIB = 2**30


def test_a_process_node_keeps_the_floor_of_the_bed_kubelets(tmp_path: Path) -> None:
    path = write_kubelet_disk_policy(tmp_path / "node" / "kubelet.yaml")
    disk = read_kubelet_disk(path)
    assert disk.source == str(path)
    assert sorted(t.what for t in disk.thresholds) == [
        "evictionHard imagefs.available=1%", "evictionHard nodefs.available=1%"]
    # 1 % + the agent's 5 points: a disk 19.8 % free (as CI's was) is far above it.
    floor, why = disk.floor(250 * GIB)
    assert floor == int(250 * GIB * 0.01) + int(250 * GIB * 0.05)
    assert "imagefs.available=1%" in why or "nodefs.available=1%" in why
    # The kubelet's defaults, which a process agent read before, would not be.
    default_floor, _ = read_kubelet_disk(tmp_path / "absent.yaml").floor(250 * GIB)
    assert default_floor == int(250 * GIB * 0.15) + int(250 * GIB * 0.05) > 0.198 * 250 * GIB

