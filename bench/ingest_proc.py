"""Facts about a running process from ``/proc`` (Linux): CPU time and memory high-water mark.

Used by the ingest (B) and scale (D) benchmarks. CPU seconds are a fairer yardstick than wall
time on a shared machine: they do not grow when other work holds the cores.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (``/proc/<pid>/stat`` fields 14-15).

    Raises:
        FileNotFoundError: no such process.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> tuple[float, float]:
    """(peak ``VmHWM``, current ``VmRSS``) of process ``pid`` in MiB (``/proc/<pid>/status``).

    Raises:
        FileNotFoundError: no such process.
    """
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024)
