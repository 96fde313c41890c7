"""`layercache status` views rendered from status dicts (no I/O; a fixed clock).

The fixture `data/status_runtimes.yaml` is a LayerCache with its NodeLayerCaches in the
API's shape. The table views are compared with golden files in `data/`; regenerate them
after an intended change with ``UPDATE_GOLDEN=1 pytest tests/unit/test_statusview.py``
and review the diff.
"""

from __future__ import annotations

import copy
import datetime
import io
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from layercache.cli import statusview
from layercache.cli.statusview import cache_json, list_json, node_rows, stale_notes, status_written

DATA = Path(__file__).parent / "data"
NOW = datetime.datetime(2026, 11, 29, 19, 0, 0, tzinfo=datetime.UTC)


_OBJS: dict[str, Any] = yaml.safe_load((DATA / "status_runtimes.yaml").read_text())


@pytest.fixture
def objs() -> dict[str, Any]:
    """A fresh copy of the fixture objects (tests may change them)."""
    return copy.deepcopy(_OBJS)


def _plain(width: int = 130) -> Console:
    return Console(width=width, no_color=True, force_terminal=False, record=True,
                   file=io.StringIO())


def _golden(name: str, text: str) -> None:
    path = DATA / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; UPDATE_GOLDEN=1 to accept"


def test_list_view_matches_golden(objs: dict[str, Any]) -> None:
    console = _plain()
    statusview.render_list(console, [objs["cache"]], NOW)
    text = console.export_text()
    _golden("statusview_list.txt", text)
    row = next(line for line in text.splitlines() if "runtimes" in line)
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells == ["default", "runtimes", "False", "2/4", "3 (1)", "95.8 MB", "95.8 MB", "-",
                     "ManifestNotFound", "60m"]


def test_detail_view_matches_golden(objs: dict[str, Any]) -> None:
    console = _plain()
    statusview.render_detail(console, objs["cache"], objs["nodes"], NOW)
    text = console.export_text()
    _golden("statusview_detail.txt", text)
    assert "generation 2, status for generation 2, status written 90s ago" in text
    assert "node-z" not in text  # another cache's node
    assert "node-b also serves other LayerCaches" in text


@pytest.mark.parametrize(("node", "held", "wanted", "bar"), [
    ("node-a", 3, 3, 20), ("node-b", 5, 5, 20), ("node-c", 2, 3, 13)])
def test_progress_bar_is_held_over_wanted(objs: dict[str, Any], node: str, held: int,
                                          wanted: int, bar: int) -> None:
    console = _plain()
    statusview.render_detail(console, objs["cache"], objs["nodes"], NOW)
    row = next(line for line in console.export_text().splitlines() if f"│ {node} " in line)
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    # Without colour rich draws only the completed part of the bar: 20 * held / wanted.
    assert cells[1] == "━" * bar
    assert bar == int(statusview.BAR_WIDTH * 2 * held / wanted) // 2
    assert cells[2] == f"{held}/{wanted}"
    assert cells[3] == f"{100 * held / wanted:.0f}%"


def test_detail_after_every_node_is_ready(objs: dict[str, Any]) -> None:
    cache = copy.deepcopy(objs["cache"])
    cache["status"]["nodes"] = {"desired": 2, "ready": 2, "summary": "2/2", "failing": []}
    cache["status"]["bytes"].update(saved=287_400_000, naive=383_200_000)
    console = _plain()
    statusview.render_detail(console, cache, objs["nodes"][:2], NOW)
    text = console.export_text()
    assert "│ 287.4 MB │ 75% of naive " in text
    assert "counted once every node is ready" not in text
    assert "node-c" not in text and "node-d" not in text


def test_node_rows(objs: dict[str, Any]) -> None:
    rows = {row.name: row for row in node_rows(objs["cache"], objs["nodes"])}
    assert list(rows) == ["node-a", "node-b", "node-c", "node-d"]
    assert (rows["node-a"].held, rows["node-a"].wanted, rows["node-a"].bytes_held) == (
        3, 3, 95_800_000)
    assert (rows["node-a"].upstream, rows["node-a"].peer) == (63_400_000, 32_400_000)
    assert rows["node-a"].state == "AllLayersHeld"
    assert rows["node-b"].caches == 2
    # The cache's own verdict on a node wins over the agent's Ready reason.
    assert (rows["node-c"].state, rows["node-c"].message) == ("Fetching", "1 of 3 layers missing")
    assert rows["node-d"].held is None and rows["node-d"].state == "NodeCacheMissing"


def test_a_failing_entry_without_reason_reads_failing(objs: dict[str, Any]) -> None:
    failing = objs["cache"]["status"]["nodes"]["failing"]
    assert failing, "the fixture has failing nodes"
    for entry in failing:
        entry.pop("reason", None)
    failing.append({"name": "node-gone", "message": "no NodeLayerCache"})
    rows = {row.name: row for row in node_rows(objs["cache"], objs["nodes"])}
    assert {rows[entry["name"]].state for entry in failing} == {"Failing"}


def test_status_written_prefers_managed_fields(objs: dict[str, Any]) -> None:
    cache = objs["cache"]
    assert status_written(cache) == datetime.datetime(2026, 11, 29, 18, 58, 30,
                                                      tzinfo=datetime.UTC)
    del cache["metadata"]["managedFields"]
    assert status_written(cache) == datetime.datetime(2026, 11, 29, 18, 58, tzinfo=datetime.UTC)
    cache["status"] = {}
    assert status_written(cache) is None


def _at(cache: dict[str, Any], written: str) -> dict[str, Any]:
    cache = copy.deepcopy(cache)
    cache["metadata"]["managedFields"][1]["time"] = written
    return cache


@pytest.mark.parametrize(("written", "spec", "stale_after", "expected"), [
    ("2026-11-29T18:58:30Z", {}, None, []),
    # refreshInterval 10m + 120 s of grace = 12 minutes.
    ("2026-11-29T18:48:01Z", {}, None, []),
    ("2026-11-29T18:47:59Z", {}, None, ["status last written 12m ago (more than 12m)"]),
    ("2026-11-29T18:00:00Z", {"refreshInterval": "1h"}, None, []),
    ("2026-11-29T17:00:00Z", {"refreshInterval": "1h"}, None,
     ["status last written 2h ago (more than 62m)"]),
    ("2026-11-29T17:00:00Z", {"paused": True}, None, []),
    ("2026-11-29T18:58:30Z", {}, 60.0, ["status last written 90s ago (more than 60s)"]),
])
def test_stale_by_age(objs: dict[str, Any], written: str, spec: dict[str, Any],
                      stale_after: float | None, expected: list[str]) -> None:
    cache = _at(objs["cache"], written)
    cache["spec"].update(spec)
    notes = stale_notes(cache, NOW, stale_after)
    assert [note.split(":")[0] for note in notes] == expected


def test_stale_generation_and_missing_status(objs: dict[str, Any]) -> None:
    cache = copy.deepcopy(objs["cache"])
    cache["metadata"]["generation"] = 3
    assert stale_notes(cache, NOW) == [
        "status is for generation 2, the spec is at generation 3: the operator has not caught "
        "up with the last change"]
    cache["status"] = {}
    console = _plain()
    statusview.render_detail(console, cache, objs["nodes"], NOW)
    text = console.export_text()
    assert "no status yet: the operator has not reported on this LayerCache" in text
    assert "Nodes:" not in text
    console = _plain()
    statusview.render_list(console, [cache], NOW)
    assert "NoStatus" in console.export_text()


def test_json_shapes(objs: dict[str, Any]) -> None:
    data = cache_json(objs["cache"], objs["nodes"])
    assert data["metadata"] == {"namespace": "default", "name": "runtimes", "generation": 2,
                                "creationTimestamp": "2026-11-29T18:00:00Z"}
    assert data["status"] == objs["cache"]["status"]
    assert sorted(data["nodes"]) == ["node-a", "node-b", "node-c"]
    assert data["nodes"]["node-b"]["status"]["layers"]["held"] == 5
    assert cache_json(objs["cache"], None)["nodes"] is None
    assert list_json([objs["cache"]])["items"][0]["status"]["bytes"]["unique"] == 95_800_000


def test_unreadable_nodes_are_reported(objs: dict[str, Any]) -> None:
    console = _plain()
    statusview.render_detail(console, objs["cache"], None, NOW, nodes_error="forbidden")
    text = console.export_text()
    assert "per-node progress unavailable: forbidden" in text
    assert "NodeCacheMissing" in text  # the cache's own failing list still shows


def test_no_color_and_pipes_get_plain_text(objs: dict[str, Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Console() decides: a pipe gets no escape codes; NO_COLOR drops colour on a tty."""
    piped = Console(file=io.StringIO(), width=130)
    statusview.render_detail(piped, objs["cache"], objs["nodes"], NOW)
    assert "\x1b[" not in piped.file.getvalue()  # type: ignore[attr-defined]
    monkeypatch.setenv("NO_COLOR", "1")
    tty = Console(file=io.StringIO(), width=130, force_terminal=True)
    statusview.render_detail(tty, objs["cache"], objs["nodes"], NOW)
    styled = tty.file.getvalue()  # type: ignore[attr-defined]
    monkeypatch.delenv("NO_COLOR")
    colour = Console(file=io.StringIO(), width=130, force_terminal=True)
    statusview.render_detail(colour, objs["cache"], objs["nodes"], NOW)
    assert "\x1b[1m" in styled  # bold stays
    assert "\x1b[31m" not in styled and "\x1b[32m" not in styled
    assert "\x1b[31m" in colour.file.getvalue()  # type: ignore[attr-defined]


def test_detail_shows_unpacked_chains_per_node(objs: dict[str, Any]) -> None:
    cache = copy.deepcopy(objs["cache"])
    cache["status"]["chains"] = {"planned": 6, "skippedForBudget": 1, "wanted": 6,
                                 "unpacked": 4, "bytesUnpacked": 400_000_000}
    nodes = copy.deepcopy(objs["nodes"][:2])
    nodes[0]["status"]["chains"] = {"wanted": 3, "unpacked": 3, "bytesUnpacked": 300_000_000}
    nodes[1]["status"]["chains"] = {"wanted": 3, "unpacked": 1, "bytesUnpacked": 100_000_000}
    console = _plain()
    statusview.render_detail(console, cache, nodes, NOW)
    text = console.export_text()
    assert "Unpacked chains: 4/6" in text
    assert "│ node-a │    3/3 │ 100% │  300.0 MB │" in text
    assert "│ node-b │    1/3 │  33% │  100.0 MB │" in text
    assert "1 chain(s) not unpacked: their estimated size is over maxBytesPerNode" in text
    # A cache without chains shows no chain table (the golden detail view above).
    console = _plain()
    statusview.render_detail(console, objs["cache"], objs["nodes"], NOW)
    assert "Unpacked chains" not in console.export_text()


def test_detail_shows_disk_savings_per_node_and_in_total(objs: dict[str, Any]) -> None:
    cache = copy.deepcopy(objs["cache"])
    key = statusview.cache_key(cache)
    figures = {"blobs": 81_000_000, "snapshots": 170_000_000, "separate": 502_000_000,
               "saved": 251_000_000}
    nodes = copy.deepcopy(objs["nodes"][:2])
    for node in nodes:
        node["status"]["disk"] = {**figures, "caches": [{"cache": key, **figures},
                                                        {"cache": "other/cache", **figures}]}
    cache["status"]["disk"] = {k: 2 * v for k, v in figures.items()}
    console = _plain()
    statusview.render_detail(console, cache, nodes, NOW)
    text = console.export_text()
    assert "Disk (this LayerCache)" in text
    rows = [line for line in text.splitlines() if "251.0 MB" in line or "502.0 MB" in line]
    assert [line.split("│")[1].strip() for line in rows] == ["node-a", "node-b", "total"]
    cells = [[cell.strip() for cell in line.split("│")[2:-1]] for line in rows]
    assert cells[0] == ["81.0 MB", "170.0 MB", "502.0 MB", "251.0 MB", "50%"]
    assert cells[2] == ["162.0 MB", "340.0 MB", "1.0 GB", "502.0 MB", "50%"]
    assert "content addressing" in text
    # Without status.disk (an older operator) the view has no disk table.
    del cache["status"]["disk"]
    console = _plain()
    statusview.render_detail(console, cache, nodes, NOW)
    assert "Disk (this LayerCache)" not in console.export_text()
