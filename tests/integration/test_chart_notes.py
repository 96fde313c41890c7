"""The chart's NOTES.txt as `helm install` prints it, rendered by the bed's helm binary.

An integration test because it runs the pinned helm (`make tools`); a missing helm is an
error naming that target, never a skip.

`helm template` leaves NOTES.txt out and `helm install --dry-run` needs a reachable API
server, so a copy of the chart gets one extra template that renders files/NOTES.txt (a copy
of templates/NOTES.txt) with `tpl` against the same values and release: the text a user
reads after `helm install`, from the same template engine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from testbed.paths import tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "layercache"
#: The bed's Kubernetes version (.ci/lint-chart.sh): our helm build's default capabilities
#: say v1.20, which the chart's kubeVersion refuses.
KUBE_VERSION = "1.37.2"


def _notes(tmp_path: Path, *sets: str) -> str:
    """NOTES.txt rendered for release `layercache` in `layercache-system` with `--set` values."""
    chart = tmp_path / "layercache"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "NOTES.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "files/NOTES.txt") . | toJson }}\n')
    argv = [str(tool("helm")), "template", "layercache", str(chart),
            "--namespace", "layercache-system", "--kube-version", KUBE_VERSION,
            "--show-only", "templates/zz-notes.yaml"]
    for s in sets:
        argv += ["--set", s]
    env = {"PATH": "/usr/bin:/bin", "KUBECONFIG": "/dev/null",
           **{f"HELM_{d}_HOME": str(tmp_path / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    notes = yaml.safe_load(out.stdout)["notes"]
    assert isinstance(notes, str)
    return notes


def test_notes_install_the_plugin_with_pipx_not_the_pypi_namesake(tmp_path: Path) -> None:
    notes = _notes(tmp_path)
    assert "pip install layercache" not in notes
    assert "pip install ." not in notes
    assert "\n  pipx install ./  " in notes
    assert 'not the unrelated PyPI package named "layercache"' in notes
    assert "kubectl layercache --version        # layercache 0.1.0" in notes
    # prometheusRule is off by default: no runbook line, but the setting is named.
    assert "Alert runbook links" not in notes
    assert "monitoring.prometheusRule.enabled, with .runbookBaseURL" in notes


def test_notes_show_where_alert_runbook_links_point(tmp_path: Path) -> None:
    relative = _notes(tmp_path / "a", "monitoring.prometheusRule.enabled=true")
    assert ("Alert runbook links (monitoring.prometheusRule.runbookBaseURL): relative "
            "(docs/observability.md#…)") in relative
    absolute = _notes(tmp_path / "b", "monitoring.prometheusRule.enabled=true",
                      "monitoring.prometheusRule.runbookBaseURL=https://docs.example.test/v0.1.0/")
    assert ("Alert runbook links (monitoring.prometheusRule.runbookBaseURL): "
            "https://docs.example.test/v0.1.0/docs/observability.md#…\n") in absolute


def test_notes_say_the_uninstall_hook_releases_the_layers(tmp_path: Path) -> None:
    notes = _notes(tmp_path / "on")
    assert "`helm uninstall` first deletes every LayerCache and waits (up to 240 s)" in notes
    assert "kubectl -n layercache-system logs job/layercache-cleanup" in notes
    assert "kubectl wait nodelayercaches" not in notes
    # Without the hook, the manual sequence.
    off = _notes(tmp_path / "off", "cleanup.enabled=false")
    assert "kubectl wait nodelayercaches --all" in off and "job/layercache-cleanup" not in off
