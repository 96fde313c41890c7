"""The chart's files against their sources and conventions (pure file checks, no helm).

- files/crds/, which templates/crds.yaml renders (with release labels and the keep policy
  inserted into the metadata, the rest as written), is a byte-identical copy of
  manifests/crds/ (one source of truth); the chart has no crds/ directory, which Helm would
  install once and never upgrade (the rendered CRDs are compared with manifests/crds/ in
  tests/integration/test_install.py, which runs helm);
- every value in values.yaml is documented with a helm-docs `# --` comment;
- values.yaml and values.schema.json declare the same keys (the schema's types are applied
  by `helm lint --strict`, in tests/integration/test_install.py).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "layercache"
MANIFEST_CRDS = REPO / "manifests" / "crds"


def test_chart_crds_are_the_manifests_crds_byte_for_byte() -> None:
    manifests = sorted(p.name for p in MANIFEST_CRDS.glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert manifests, "manifests/crds holds the CRDs"
    assert chart == manifests
    for name in manifests:
        assert (CHART / "files" / "crds" / name).read_bytes() == (
            MANIFEST_CRDS / name).read_bytes(), (
            f"helm/layercache/files/crds/{name} differs: "
            f"cp manifests/crds/{name} helm/layercache/files/crds/")


def test_the_chart_ships_crds_as_templates_only() -> None:
    # Helm installs crds/ once and never upgrades it; the CRDs are templates (crds.install).
    assert not (CHART / "crds").exists()
    template = (CHART / "templates" / "crds.yaml").read_text()
    assert '.Files.Glob "files/crds/*.yaml"' in template
    # Each CRD's metadata gets labels and annotations inserted: the sources have none, so
    # the insertion never makes a second `labels:` key.
    for path in MANIFEST_CRDS.glob("*.yaml"):
        metadata = yaml.safe_load(path.read_text())["metadata"]
        assert set(metadata) == {"name"}, path.name


def _comment_above(lines: list[str], line: int) -> list[str]:
    """The block of `#` comment lines right above 0-based `line` (top to bottom)."""
    block: list[str] = []
    i = line - 1
    while i >= 0 and lines[i].lstrip().startswith("#"):
        block.insert(0, lines[i].strip())
        i -= 1
    return block


def _undocumented(node: Node, lines: list[str], path: str = "") -> Iterator[str]:
    """Paths of values neither documented themselves nor made only of documented children.

    A `# --` comment on a key documents its whole subtree (helm-docs does the same), so
    `resources:` may hold `requests.cpu` without a comment of its own.
    """
    assert isinstance(node, MappingNode)
    for key, value in node.value:
        assert isinstance(key, ScalarNode)
        here = f"{path}.{key.value}" if path else key.value
        comment = _comment_above(lines, key.start_mark.line)
        if any(c.startswith("# --") for c in comment):
            continue
        if isinstance(value, MappingNode) and value.value:
            yield from _undocumented(value, lines, here)
        else:
            yield here


def test_every_value_has_a_helm_docs_comment() -> None:
    text = (CHART / "values.yaml").read_text()
    root = yaml.compose(text)
    assert root is not None
    assert list(_undocumented(root, text.splitlines())) == []


def test_an_undocumented_value_is_found() -> None:
    # The check itself: a value without `# --` (an ordinary comment is not enough) is named.
    text = "a:\n  # -- documented\n  b: 1\n  # plain comment\n  c: {}\nd:\n  e: [x]\n"
    root = yaml.compose(text)
    assert root is not None
    assert list(_undocumented(root, text.splitlines())) == ["a.c", "d.e"]


def _value_paths(values: dict[str, Any], schema: dict[str, Any], path: str = ""
                 ) -> Iterator[tuple[str, bool]]:
    """(path, declared?) for each values key, down to where the schema stops naming keys."""
    props = schema.get("properties", {})
    for name, value in values.items():
        here = f"{path}.{name}" if path else name
        sub = props.get(name)
        yield here, sub is not None
        if sub is not None and isinstance(value, dict) and "properties" in sub:
            yield from _value_paths(value, sub, here)


def _schema_paths(schema: dict[str, Any], path: str = "") -> Iterator[str]:
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        yield here
        yield from _schema_paths(sub, here)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


def test_schema_is_draft_07_and_closed(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    # Every object the schema spells out refuses keys it does not know (typos fail lint).
    open_objects = [p for p, sub in _walk(schema) if "properties" in sub
                    and sub.get("additionalProperties") is not False]
    assert open_objects == []


def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name)


@pytest.mark.parametrize("values_file", ["values.yaml", *sorted(
    f"ci/{p.name}" for p in (CHART / "ci").glob("*.yaml"))])
def test_values_keys_are_declared_in_the_schema(values_file: str, schema: dict[str, Any]
                                                ) -> None:
    values = yaml.safe_load((CHART / values_file).read_text())
    undeclared = [p for p, declared in _value_paths(values, schema) if not declared]
    assert undeclared == []


def test_schema_declares_nothing_values_yaml_lacks(schema: dict[str, Any]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    in_values = {p for p, _ in _value_paths(values, schema)}
    # `global` is Helm's (passed to every chart); the rest must be real, documented values.
    stale = sorted(p for p in _schema_paths(schema) if p not in in_values and p != "global")
    assert stale == []


def _env_names(manifest: str) -> set[str]:
    [workload] = [d for d in yaml.safe_load_all((REPO / "manifests" / manifest).read_text())
                  if d["kind"] in {"Deployment", "DaemonSet"}]
    return {e["name"] for c in workload["spec"]["template"]["spec"]["containers"]
            for e in c["env"]}


def _setting_variables(settings: type[Any]) -> set[str]:
    """Every environment variable a pydantic-settings class reads (names and aliases)."""
    names = set()
    for field, info in settings.model_fields.items():
        alias = info.validation_alias
        names |= set(alias.choices) if alias is not None else {f"LAYERCACHE_{field.upper()}"}
    return {str(n) for n in names}


def test_the_workloads_set_only_variables_the_settings_read() -> None:
    # A misspelt variable would be ignored silently by pydantic-settings: catch it here.
    from layercache.agent.settings import AgentSettings
    from layercache.controller.settings import OperatorSettings

    operator = _env_names("deployment-operator.yaml")
    agent = _env_names("daemonset-agent.yaml")
    assert operator <= _setting_variables(OperatorSettings)
    assert agent <= _setting_variables(AgentSettings)
    assert {"LAYERCACHE_STANDALONE", "LAYERCACHE_LEASE_NAME"} <= operator
    assert {"NODE_NAME", "POD_NAMESPACE", "POD_IP", "LAYERCACHE_CONTAINERD_SOCKET"} <= agent


def test_ci_default_values_only_restate_the_defaults() -> None:
    # Tests use ci/default-values.yaml for "the defaults": it must not change any.
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def restated(values: dict[str, Any], base: dict[str, Any]) -> bool:
        return all(restated(v, base[k]) if isinstance(v, dict) else base.get(k) == v
                   for k, v in values.items())
    ci = yaml.safe_load((CHART / "ci" / "default-values.yaml").read_text())
    assert ci and restated(ci, defaults)


def test_chart_yaml_carries_artifact_hub_metadata() -> None:
    # Artifact Hub reads its list-valued annotations as YAML documents held in strings
    # (https://artifacthub.io/docs/topics/annotations/helm/).
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    notes = chart["annotations"]
    assert all(isinstance(v, str) for v in notes.values()), notes
    assert notes["artifacthub.io/category"] == "integration-delivery"
    assert notes["artifacthub.io/license"] == pyproject["project"]["license"] == "Apache-2.0"
    assert notes["artifacthub.io/operator"] == "true"
    images = yaml.safe_load(notes["artifacthub.io/images"])
    assert images == [{"name": "layercache",
                       "image": f"{values['image']['repository']}:{chart['appVersion']}"}]
    links = yaml.safe_load(notes["artifacthub.io/links"])
    assert links and all(set(link) == {"name", "url"} and link["url"].startswith("https://")
                         for link in links), links
    changes = yaml.safe_load(notes["artifacthub.io/changes"])
    assert changes and all(c["kind"] in {"added", "changed", "deprecated", "removed", "fixed",
                                         "security"} and c["description"] for c in changes)
    # No public project URL exists yet: nothing invented for home, sources or icon.
    assert not {"home", "sources", "icon"} & set(chart)
    repo_meta = (CHART.parent / "artifacthub-repo.yml").read_text()
    assert "# repositoryID: " in repo_meta

