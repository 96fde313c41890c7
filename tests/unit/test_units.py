"""The one byte formatter (SI) the CLI, the demo and LayerCache status share."""

from __future__ import annotations

import pytest

from layercache.units import human_bytes


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (658_688, "658.7 kB"),
    (999_949, "999.9 kB"), (999_950, "1.0 MB"),  # rounds up into the next unit
    (95_800_000, "95.8 MB"), (191_600_000, "191.6 MB"), (287_400_000, "287.4 MB"),
    (20 * 1024**3, "21.5 GB"), (10**18, "1000.0 PB"), (-1_500_000, "-1.5 MB"),
])
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text
