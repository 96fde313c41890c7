"""`layercache.containerd.unpack`'s checks that need no daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from layercache.containerd.unpack import Unpacker, UnsupportedSnapshotterError


def test_other_snapshotters_are_reported_unsupported_before_any_call(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSnapshotterError, match=r"'native'.*overlayfs") as raised:
        Unpacker(tmp_path / "no.sock", snapshotter="native")
    assert raised.value.snapshotter == "native"
