"""`uses_kubeconfig` in a home the process may not enter (the chart's agent Pod)."""

from __future__ import annotations

from pathlib import Path

import pytest

from layercache.kubeclient import uses_kubeconfig


def test_a_home_it_may_not_enter_means_in_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent runs as root without CAP_DAC_OVERRIDE; the image's HOME, /home/nonroot, is
    # 0750 nonroot's: stat of ~/.kube/config fails with EACCES, which is not a kubeconfig.
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: Path("/home/nonroot")))

    def denied(self: Path, *, follow_symlinks: bool = True) -> object:
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "stat", denied)
    assert uses_kubeconfig() is False
