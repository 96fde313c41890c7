"""Every `layercache` command prints its help (rich markup in a help text once crashed it)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from layercache.cli.main import app

COMMANDS = ["plan", "status", "operator", "agent", "cleanup"]


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in COMMANDS]])
def test_help_exits_zero(argv: list[str]) -> None:
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if argv[0] == "plan":
        assert "os/arch[/variant]" in result.output


def test_every_command_is_covered() -> None:
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    assert names == set(COMMANDS)


def test_version_prints_the_installed_package_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"], env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert result.output == f"layercache {version('layercache')}\n"
    assert version("layercache") == "0.1.0"  # pyproject.toml [project] version


def test_help_lists_version() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "--version" in result.output
