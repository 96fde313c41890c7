"""docs/configuration.md lists every setting of the operator and the agent, as the code has it.

Regenerate with: .venv/bin/python tests/unit/test_docs.py > docs/configuration.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from layercache.agent.settings import AgentSettings
from layercache.controller.settings import OperatorSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _table(model: type[BaseSettings]) -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(required)" if field.is_required() else f"`{default}`" if default not in (
            None, "") else "(unset)"
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `LAYERCACHE_{name.upper()}` | {shown} | {text} |")
    return "\n".join(rows)


def render() -> str:
    return f"""# Configuration

Both programs read `LAYERCACHE_*` environment variables (pydantic-settings) into one
frozen settings object and log it once at start-up, without secrets. Sizes are bytes,
durations seconds, unless the name says otherwise. This page is generated from the code
(`tests/unit/test_docs.py` fails when it is out of date).

## Operator (`layercache operator`)

{_table(OperatorSettings)}

## Agent (`layercache agent`, one per node)

{_table(AgentSettings)}
"""


def test_configuration_doc_matches_the_settings() -> None:
    assert DOC.read_text() == render(), "regenerate: python tests/unit/test_docs.py > " + str(DOC)


if __name__ == "__main__":
    sys.stdout.write(render())
