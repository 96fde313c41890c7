"""LICENSE at the repository root is the Apache License 2.0 that pyproject.toml declares."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: sha256 of the unmodified standard text (terms and the appendix with its bracketed
#: boilerplate notice), the same bytes as Debian's /usr/share/common-licenses/Apache-2.0.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_is_the_apache_2_0_text_pyproject_declares() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    data = (REPO / "LICENSE").read_bytes()
    head = [line.strip() for line in data.decode().splitlines()[:4]]
    assert head == ["", "Apache License", "Version 2.0, January 2004",
                    "http://www.apache.org/licenses/"]
    assert b"APPENDIX: How to apply the Apache License to your work." in data
    assert hashlib.sha256(data).hexdigest() == APACHE_2_0_SHA256
