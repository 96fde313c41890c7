"""One parser for insecure registry lists, normalised like image references, everywhere.

``LAYERCACHE_INSECURE_REGISTRIES`` (operator, agent, ``layercache plan``) and
``--insecure-registry`` give registry keys exactly as `parse_reference` computes them, so an
entry matches its images however either was written.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from layercache.agent.settings import AgentSettings
from layercache.cli.main import app
from layercache.controller.settings import OperatorSettings
from layercache.oci.reference import InvalidReferenceError, parse_reference, parse_registry_hosts
from layercache.registry.client import RegistryOptions, registry_options

WRITTEN = " Reg.Example:05000, LocalHost:5001,INDEX.docker.io,[0:0::1]:5002,reg.example:5000"
KEYS = ("reg.example:5000", "localhost:5001", "docker.io", "[::1]:5002")


def test_entries_become_the_registry_keys_of_their_images() -> None:
    assert parse_registry_hosts(WRITTEN) == KEYS
    assert parse_registry_hosts(["a.b:5000", "LOCALHOST", "c.d:1,e.f:2", "HTTP://G.h:3/"]) == (
        "a.b:5000", "localhost", "c.d:1", "e.f:2", "g.h:3")
    for key, image in zip(KEYS, ["Reg.Example:05000/app:1", "LocalHost:5001/app",
                                 "index.docker.io/library/app", "[0:0::1]:5002/app"],
                          strict=True):
        assert parse_reference(image).registry == key


@pytest.mark.parametrize(("entry", "part"), [
    ("registry", "registry"), ("reg.example/path", "registry"), ("reg.example:0", "port"),
    ("reg.example:http", "port"), ("bad_host.example", "registry"),
])
def test_entries_that_are_no_registry_host_are_refused(entry: str, part: str) -> None:
    with pytest.raises(InvalidReferenceError) as refused:
        parse_registry_hosts(f"ok.example,{entry}")
    assert refused.value.part == part and entry in str(refused.value)


def test_operator_and_agent_settings_key_insecure_registries_like_images(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERCACHE_INSECURE_REGISTRIES", WRITTEN)
    monkeypatch.setenv("NODE_NAME", "node-1")
    expected = {key: RegistryOptions(insecure=True) for key in KEYS}
    registries, default = OperatorSettings().registry_options()
    assert registries == expected and not default.insecure
    agent = AgentSettings()
    assert agent.insecure_hosts == KEYS
    assert registry_options(agent.insecure_registries)[0] == expected
    monkeypatch.setenv("LAYERCACHE_INSECURE_REGISTRIES", "registry")
    for settings in (OperatorSettings, AgentSettings):
        with pytest.raises(ValueError, match=r"insecure_registries[\s\S]*'registry' is no "
                                             "registry host"):
            settings()


def test_plan_reads_the_same_variable_and_refuses_a_bad_entry_clearly() -> None:
    result = CliRunner().invoke(app, ["plan", "reg.example/app:1"],
                                env={"LAYERCACHE_INSECURE_REGISTRIES": "registry"})
    assert result.exit_code == 2
    assert "--insecure-registry" in result.output and "'registry' is no registry host" in \
        result.output
