"""The CRDs as users read them: `kubectl explain`, `kubectl get` columns and categories.

What kubectl does with them on a real apiserver: tests/integration/test_kubectl_crds.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((REPO / "manifests" / "crds").glob("*.yaml"))


def _crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in CRD_FILES]


def _undescribed(schema: Mapping[str, Any], path: str) -> Iterator[str]:
    """Paths under ``schema`` of properties with no description (what `explain` prints)."""
    for name, prop in (schema.get("properties") or {}).items():
        here = f"{path}.{name}"
        if here.count(".") == 1 and name == "metadata":
            # The apiserver refuses anything but `type` here; `kubectl explain` shows
            # ObjectMeta's own description.
            continue
        if not str(prop.get("description", "")).strip():
            yield here
        yield from _undescribed(prop, here)
        if isinstance(prop.get("items"), Mapping):
            yield from _undescribed(prop["items"], f"{here}[]")


#: The JSONSchemaProps keywords these CRDs use; any other key is a YAML slip (an unquoted
#: comma in a flow mapping makes the rest of a description a key of its own).
SCHEMA_KEYWORDS = {
    "type", "description", "properties", "items", "required", "enum", "default", "format",
    "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "maxProperties", "additionalProperties", "anyOf", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}


def _stray_keys(schema: Mapping[str, Any], path: str) -> Iterator[str]:
    for key in set(schema) - SCHEMA_KEYWORDS:
        yield f"{path}: {key!r}"
    for name, prop in (schema.get("properties") or {}).items():
        yield from _stray_keys(prop, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), Mapping):
            yield from _stray_keys(schema[key], f"{path}[{key}]")
    for i, option in enumerate(schema.get("anyOf") or ()):
        yield from _stray_keys(option, f"{path}.anyOf[{i}]")


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_schemas_hold_only_schema_keywords(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        assert list(_stray_keys(schema, crd["spec"]["names"]["kind"])) == []
        for column in version.get("additionalPrinterColumns", ()):
            assert set(column) <= {"name", "type", "jsonPath", "description", "priority",
                                   "format"}, column


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_schema_property_has_a_description(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        assert str(schema.get("description", "")).strip(), f"{path.name}: top level"
        assert list(_undescribed(schema, crd["spec"]["names"]["kind"])) == []


def test_no_category_is_a_resource_name() -> None:
    # kubectl expands a category before it looks for a resource: with a category named
    # "layercache", `kubectl get layercache NAME` meant every LayerCache and every
    # NodeLayerCache, and failed with "you must specify only one resource".
    names: set[str] = set()
    categories: set[str] = set()
    for crd in _crds():
        n = crd["spec"]["names"]
        names |= {n["plural"], n["singular"], n["kind"].lower(), *n.get("shortNames", ())}
        categories |= set(n.get("categories", ()))
    assert categories, "the layercache CRDs share a category"
    assert categories.isdisjoint(names)


def _columns(kind: str) -> dict[str, dict[str, Any]]:
    crd = next(c for c in _crds() if c["spec"]["names"]["kind"] == kind)
    (version,) = crd["spec"]["versions"]
    return {c["name"]: c for c in version["additionalPrinterColumns"]}


def test_layercache_has_a_reason_column() -> None:
    assert _columns("LayerCache")["Reason"]["jsonPath"] == ".status.reason"


def test_nodelayercache_default_byte_columns_are_human() -> None:
    columns = _columns("NodeLayerCache")
    default = {name: c for name, c in columns.items() if c.get("priority", 0) == 0}
    raw = [name for name, c in default.items() if c["jsonPath"].startswith(".status.bytes.")
           or c["jsonPath"] == ".status.layers.bytesHeld"]
    assert raw == [], "raw byte counts only at priority 1 (-o wide)"
    assert {default[name]["jsonPath"] for name in ("Size", "Upstream", "Peer")} == {
        ".status.human.bytesHeld", ".status.human.upstream", ".status.human.peer"}
