"""Byte counts for people: one formatter for the CLI, the demo and LayerCache status.

SI units (powers of 1000: kB, MB, GB, TB), as registries, networks and the README count,
so a figure in ``kubectl get lc`` (``status.bytes.savedHuman``), in ``layercache status``
and in the demo's report reads the same.
"""

from __future__ import annotations

__all__ = ["human_bytes"]

_UNITS = ("kB", "MB", "GB", "TB", "PB")


def human_bytes(size: int) -> str:
    """``size`` bytes in SI units with one decimal, e.g. ``63.4 MB``; below 1 kB ``512 B``.

    Negative sizes keep their sign (``-1.5 MB``); sizes of 1000 PB and more stay in PB.
    """
    if abs(size) < 1000:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1000
        # Round first: 999,950 bytes is "1.0 MB", not "1000.0 kB".
        if abs(round(value, 1)) < 1000 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
