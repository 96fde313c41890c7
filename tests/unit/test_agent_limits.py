"""The agent's memory limit from its cgroup files, and the relay budget sized to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from layercache.agent.limits import memory_limit
from layercache.agent.peer.relay import DEFAULT_BUDGET, LIMIT_SHARE, default_budget
from layercache.agent.settings import AgentSettings

MIB = 2**20


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(("files", "limit"), [
    ({"memory.max": "536870912\n"}, 512 * MIB),  # cgroup v2, the chart's default limit
    ({"memory.max": "max\n"}, None),  # v2 without a limit
    ({"memory/memory.limit_in_bytes": "268435456\n"}, 256 * MIB),  # cgroup v1
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1 without one
    ({"memory.max": "garbage"}, None),
    ({}, None),  # no cgroup files at all (not in a container)
])
def test_the_memory_limit_is_read_from_cgroup_v2_or_v1(
        tmp_path: Path, files: dict[str, str], limit: int | None) -> None:
    assert memory_limit(_cgroup(tmp_path, files)) == limit


def test_v2_is_read_before_v1(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"memory.max": str(300 * MIB),
                              "memory/memory.limit_in_bytes": str(100 * MIB)})
    assert memory_limit(root) == 300 * MIB


def test_the_relay_budget_takes_an_eighth_of_the_limit_up_to_the_default() -> None:
    assert LIMIT_SHARE == 8
    assert default_budget(None) == DEFAULT_BUDGET == 128 * MIB
    assert default_budget(512 * MIB) == 64 * MIB  # both budgets: a quarter of the limit
    assert default_budget(256 * MIB) == 32 * MIB
    assert default_budget(4 * 2**30) == DEFAULT_BUDGET


def test_the_relay_budget_setting_is_optional_and_positive() -> None:
    assert AgentSettings(node_name="n").relay_budget_bytes is None
    assert AgentSettings(node_name="n", relay_budget_bytes=MIB).relay_budget_bytes == MIB
    with pytest.raises(ValueError, match="relay_budget_bytes"):
        AgentSettings(node_name="n", relay_budget_bytes=0)
