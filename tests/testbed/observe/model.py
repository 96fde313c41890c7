"""The dashboard JSON against Grafana's dashboard model, and the structure panels need.

grafana-foundation-sdk ships Grafana's dashboard model as generated Python classes with
`from_json`, but no validator and no JSON schema: `from_json` keeps unknown keys out and
assigns values without checking them. So validation is two checks on its model:
  1. a round trip (`from_json`, then the SDK's own JSON encoder) must give back every key
     of the input with the same value — a dropped key is a field the model does not know
     (a typo, or an option of a newer Grafana);
  2. every value must have the type its model field declares (enums, literals, numbers,
     nested models, lists), read from the classes' annotations.
The SDK release installed is generated for Grafana 10.1 (its PyPI package says so); a
dashboard that passes imports into Grafana 10.1 and later, which migrate older models.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

#: Grafana's grid is 24 columns wide.
GRID_COLUMNS = 24
#: Panel types the dashboard may use (each needs a datasource, targets and a unit story).
PANEL_TYPES = frozenset({"stat", "timeseries", "bargauge", "table"})
_PRIMITIVES: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float),
                                             str: (str,)}

register_default_plugins()  # panel options and Prometheus queries decode into typed models


@dataclass(frozen=True)
class Target:
    """One query of a panel: panel id and title, `refId`, PromQL `expr`, legend, table?"""

    panel_id: int
    panel: str
    ref_id: str
    expr: str
    legend: str
    table: bool


def load(path: Path) -> dict[str, Any]:
    """The dashboard JSON at `path` (raises `json.JSONDecodeError` when it is not JSON)."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def validate(dashboard: dict[str, Any]) -> list[str]:
    """Problems of `dashboard` against the SDK's dashboard model ([] when it conforms).

    Each problem is `"<json path>: <what>"`.
    """
    model = Dashboard.from_json(dashboard)
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    problems = list(_lost(dashboard, back, "$"))
    _check_model(model, "dashboard", problems)
    return problems


def _lost(original: Any, back: Any, path: str) -> Iterator[str]:
    """Keys and values of `original` that the round trip `back` does not reproduce."""
    if isinstance(original, dict) and isinstance(back, dict):
        for key, value in original.items():
            if key not in back:
                yield f"{path}.{key}: not a field of Grafana's dashboard model"
            else:
                yield from _lost(value, back[key], f"{path}.{key}")
    elif isinstance(original, list) and isinstance(back, list) and len(original) == len(back):
        for i, (a, b) in enumerate(zip(original, back, strict=True)):
            yield from _lost(a, b, f"{path}[{i}]")
    elif original != back:
        yield f"{path}: {original!r} read back as {back!r}"


def _check_model(obj: Any, path: str, problems: list[str]) -> None:
    """Check each field of SDK model `obj` against its annotation (appends to `problems`)."""
    for name, kind in typing.get_type_hints(type(obj).__init__).items():
        if name != "return":
            _check(getattr(obj, name), kind, f"{path}.{name}", problems)


def _check(value: Any, kind: Any, path: str, problems: list[str]) -> None:
    origin = typing.get_origin(kind)
    if kind in (Any, object):
        if hasattr(type(value), "from_json"):  # panel options: typed by the panel plugin
            _check_model(value, path, problems)
    elif origin in (typing.Union, types.UnionType):
        _check_union(value, typing.get_args(kind), path, problems)
    elif origin is typing.Literal:
        if value not in typing.get_args(kind):
            problems.append(f"{path}: {value!r} is not one of {typing.get_args(kind)}")
    elif origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: {value!r} is not a list")
            return
        item = (typing.get_args(kind) or (Any,))[0]
        for i, element in enumerate(value):
            _check(element, item, f"{path}[{i}]", problems)
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: {value!r} is not an object")
    elif kind is type(None):
        if value is not None:
            problems.append(f"{path}: {value!r} is not null")
    else:
        _check_scalar_or_model(value, kind, path, problems)


def _check_scalar_or_model(value: Any, kind: Any, path: str, problems: list[str]) -> None:
    """`_check` for an enum, a primitive or an SDK model class `kind`."""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        allowed = [member.value for member in kind]
        if value not in allowed:
            problems.append(f"{path}: {value!r} is not one of {allowed}")
    elif kind in _PRIMITIVES:
        if isinstance(value, bool) is not (kind is bool) or not isinstance(
                value, _PRIMITIVES[kind]):
            problems.append(f"{path}: {value!r} is not {kind.__name__}")
    elif isinstance(kind, type):
        if isinstance(value, dict) and hasattr(kind, "from_json"):
            value = kind.from_json(value)  # lists of models the SDK leaves as dicts
        if not isinstance(value, kind):
            problems.append(f"{path}: {type(value).__name__} is not {kind.__name__}")
        else:
            _check_model(value, path, problems)


def _check_union(value: Any, kinds: tuple[Any, ...], path: str, problems: list[str]) -> None:
    """Accept `value` if one member fits; else report the member whose shape it has."""
    if value is None and type(None) in kinds:
        return
    shaped: list[list[str]] = []
    for kind in kinds:
        found: list[str] = []
        _check(value, kind, path, found)
        if not found:
            return
        outer = typing.get_origin(kind) or kind
        if (isinstance(outer, type) and outer not in _PRIMITIVES
                and not issubclass(outer, enum.Enum) and isinstance(value, outer | dict)):
            shaped.append(found)
    problems.extend(shaped[0] if shaped else [f"{path}: {value!r} fits none of {kinds}"])


def structure(dashboard: dict[str, Any]) -> list[str]:
    """Problems with what every panel needs ([] when none).

    Checked: uid and title set; a `datasource` template variable of type prometheus; every
    panel of a known type with a datasource pointing at `${datasource}`, at least one
    target with a PromQL `expr` and a unique `refId`, a unique id, and a `gridPos` inside
    the 24-column grid; panels do not overlap.
    """
    problems: list[str] = []
    if not dashboard.get("uid") or not dashboard.get("title"):
        problems.append("dashboard: uid and title must be set")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if (source.get("type"), source.get("query")) != ("datasource", "prometheus"):
        problems.append("templating: needs a `datasource` variable of type prometheus")
    seen: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard.get("panels", []):
        name = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in seen or not isinstance(panel.get("id"), int):
            problems.append(f"{name}: id missing or not unique")
        seen.add(panel.get("id", -1))
        if panel.get("type") not in PANEL_TYPES:
            problems.append(f"{name}: type {panel.get('type')!r} not in {sorted(PANEL_TYPES)}")
        if (panel.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"{name}: datasource must be the ${{datasource}} variable")
        targets = panel.get("targets") or []
        if not targets or not all(t.get("expr") for t in targets):
            problems.append(f"{name}: needs targets, each with a PromQL expr")
        if len({t.get("refId") for t in targets}) != len(targets):
            problems.append(f"{name}: refIds must be unique")
        grid = panel.get("gridPos") or {}
        x, y, w, h = (grid.get(k) for k in ("x", "y", "w", "h"))
        if not all(isinstance(v, int) for v in (x, y, w, h)):
            problems.append(f"{name}: gridPos needs integer x, y, w, h")
            continue
        assert isinstance(x, int) and isinstance(y, int)  # for mypy: checked just above
        assert isinstance(w, int) and isinstance(h, int)
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > GRID_COLUMNS:
            problems.append(f"{name}: gridPos {grid} outside the {GRID_COLUMNS}-column grid")
        for cell in ((cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)):
            if cell in cells:
                problems.append(f"{name}: overlaps {cells[cell]}")
                break
            cells[cell] = name
    return problems


def targets(dashboard: dict[str, Any]) -> list[Target]:
    """Every query of every panel, in panel order."""
    return [Target(p["id"], p["title"], t["refId"], t["expr"], t.get("legendFormat", ""),
                   t.get("format") == "table")
            for p in dashboard.get("panels", []) for t in p.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Query variables: name → its `label_values(metric, label)` query text."""
    found: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            found[variable["name"]] = query["query"] if isinstance(query, dict) else query
    return found
