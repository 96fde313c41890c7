"""The bed comes up and goes down cleanly, also after a failure, leaving nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.bed import TestBed
from testbed.procs import ComponentError

pytestmark = pytest.mark.integration


def _leftovers(workdir: Path) -> tuple[list[str], list[str]]:
    """Processes whose command line names `workdir`, and mounts at or below it."""
    needle = str(workdir.resolve())
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline:
                procs.append(f"{entry.name}: {cmdline[:120]}")
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
              if line.split()[1].startswith(needle)]
    return procs, mounts


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_cli_up_status_down_twice_leaves_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "bed"
    for _ in range(2):  # a second up after down must work too
        up = _cli("up", "--dir", str(workdir), "--nodes", "1", "--no-images")
        assert up.returncode == 0, up.stdout + up.stderr
        status = _cli("status", "--dir", str(workdir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "apiserver" in status.stdout
        down = _cli("down", "--dir", str(workdir))
        assert down.returncode == 0, down.stdout + down.stderr
        assert _leftovers(workdir) == ([], [])
        assert not workdir.exists()
    # Status of a bed that is not there is a clear non-zero answer, not a traceback.
    missing = _cli("status", "--dir", str(workdir))
    assert missing.returncode == 1
    assert "no test bed" in missing.stdout


def test_failed_up_names_the_component_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "bed"
    bed = TestBed(workdir, nodes=1, seed_images=False,
                  apiserver_args=("--no-such-flag=1",))
    failure = r"(?s)kube-apiserver exited .*unknown flag: --no-such-flag"
    with pytest.raises(ComponentError, match=failure):
        bed.up()
    assert _leftovers(workdir) == ([], [])
