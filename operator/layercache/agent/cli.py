"""The agent's entry point: ``layercache-agent``, ``python -m layercache.agent``.

`main` is also what ``layercache agent`` calls. Settings come from the environment only
(`layercache.agent.settings.AgentSettings`); an invalid one exits with status 2 and a
message naming the variable, before anything starts.
"""

from __future__ import annotations

import asyncio
import sys

from pydantic import ValidationError

from layercache.agent.app import run_agent
from layercache.agent.logs import configure
from layercache.agent.settings import AgentSettings

__all__ = ["main"]

#: Exit status for invalid settings (usage errors exit 2, as typer's do).
EXIT_SETTINGS = 2


def _variable(loc: tuple[int | str, ...]) -> str:
    name = "_".join(str(part) for part in loc)
    # An alias (NODE_NAME, LAYERCACHE_NODE_NAME) is reported as is, a field by its variable.
    return name if name.isupper() else f"LAYERCACHE_{name.upper()}"


def main() -> None:
    """Read the settings, set up JSON logs, run the agent until SIGTERM; exit 0."""
    try:
        settings = AgentSettings()
    except ValidationError as error:
        problems = "; ".join(f"{_variable(e['loc'])}: {e['msg']}" for e in error.errors())
        print(f"layercache agent: invalid settings: {problems}", file=sys.stderr)
        sys.exit(EXIT_SETTINGS)
    configure(settings.log_level)
    asyncio.run(run_agent(settings))
