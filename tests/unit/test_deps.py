"""`make deps` (.ci/deps.sh) is safe on a developer's laptop: read from the script itself.

The script installs Debian packages and must never stop, disable or restart a system
service (a developer's Docker and its containerd keep running). The bed's daemons are
processes of its own; none of them needs a system service out of the way.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "deps.sh"
#: Commands that stop, restart or reconfigure services, or end other processes.
SERVICE_COMMANDS = {"systemctl", "service", "invoke-rc.d", "update-rc.d", "kill", "pkill",
                    "killall", "start-stop-daemon", "deb-systemd-invoke"}


def _words() -> list[str]:
    """Every shell word of the script, comments dropped."""
    return shlex.split(SCRIPT.read_text(), comments=True)


def test_deps_stops_no_system_service() -> None:
    words = _words()
    named = sorted({w for w in words if w.rsplit("/", 1)[-1] in SERVICE_COMMANDS})
    assert named == [], f"{SCRIPT} runs {named}"
    assert not any(re.fullmatch(r"stop|restart|disable|mask", w) for w in words)
