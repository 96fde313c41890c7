"""docs/kind.md's commands, as written, run against the bed.

`commands(section)` reads the `console` blocks of one `## ` section of docs/kind.md (a line
per command, `# ...` comments dropped); `run_command` runs one with the pinned kubectl and
helm against the bed's kubeconfig, from the repository root (the doc's paths are relative
to it). So a test runs what a reader types, not a paraphrase of it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from testbed.paths import REPO, tool
from testbed.procs import run

KIND_DOC = REPO / "docs" / "kind.md"
_BLOCK = re.compile(r"```console\n(.*?)```", re.S)


def commands(section: str, block: int | None = None, doc: Path = KIND_DOC) -> list[str]:
    """The commands of the `## <section>` section's console blocks, in order.

    `section` matches the heading's start ("3. Install layercache", "Uninstall"); `block`:
    only that console block of the section (0: the first), e.g. the Helm path of step 3
    and not its "without Helm" alternative.

    Raises:
        ValueError: no such section, or it has no console block.
    """
    text = doc.read_text()
    found = re.search(rf"^## {re.escape(section)}.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    if found is None:
        raise ValueError(f"{doc.name}: no section '## {section}'")
    blocks = _BLOCK.findall(found[1])
    chosen = blocks if block is None else blocks[block:block + 1]
    lines = [line.split(" # ", 1)[0].strip() for text in chosen for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{doc.name}: section '## {section}' has no console commands")
    return lines


def run_command(line: str, kubeconfig: Path, extra: Sequence[str] = (),
                timeout: float = 660) -> str:
    """Run one doc command (`kubectl` or `helm`) on the bed; `extra` args are appended.

    Returns stdout. Raises ComponentError (non-zero exit, with stderr), ValueError (a
    command that is not kubectl or helm: the bed cannot run it).
    """
    argv = shlex.split(line)
    if argv[0] not in ("kubectl", "helm"):
        raise ValueError(f"{KIND_DOC.name}: the bed runs kubectl and helm, not {argv[0]!r}")
    return run([tool(argv[0]), *argv[1:], *extra], timeout=timeout,
               env={"KUBECONFIG": str(kubeconfig)}, cwd=REPO)
