"""The Dockerfile and the Docker-less build (testbed.product_image) describe the same image.

No Docker engine here, so the Dockerfile is never built; these checks keep what it says in
step with the build CI does run: entry point, user, environment, labels, the venv path,
and a final stage that installs nothing.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from testbed import product_image

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def assignments(args: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(args))


def test_entrypoint_and_user_match() -> None:
    stage = dict(final_stage())
    assert json.loads(stage["ENTRYPOINT"]) == [product_image.ENTRYPOINT]
    assert stage["USER"] == product_image.USER == "65532:65532"


def test_environment_matches() -> None:
    stage = dict(final_stage())
    expected = dict(env.split("=", 1) for env in product_image.ENV)
    assert assignments(stage["ENV"]) == expected
    assert expected["PATH"].startswith(f"{product_image.VENV}/bin:")


def test_labels_match() -> None:
    labels = assignments(dict(final_stage())["LABEL"])
    for key, value in product_image.LABELS.items():
        if key != "org.opencontainers.image.base.name":  # each build names its own base
            assert labels[key] == value
    assert labels["org.opencontainers.image.version"] == "${VERSION}"


def test_final_stage_installs_nothing_and_copies_only_the_venv() -> None:
    stage = final_stage()
    words = [word for word, _ in stage]
    assert "RUN" not in words  # no package manager, compiler or pip in the image
    copies = [args for word, args in stage if word == "COPY"]
    venv = product_image.VENV
    assert copies == [f"--from=builder {venv} {venv}"]


@pytest.mark.parametrize("needed", ["pyproject.toml", "README.md", "operator/"])
def test_dockerignore_lets_the_wheel_sources_in(needed: str) -> None:
    rules = (REPO / ".dockerignore").read_text().splitlines()
    assert rules[rules.index("*") + 1:].count(f"!{needed}") == 1
