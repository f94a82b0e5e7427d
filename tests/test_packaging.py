"""The sdist and wheel are complete: built from this tree, the wheel installs into a fresh
venv (dependencies from the index, as a user gets them), its console script runs, and the
dashboards, rules and unit files land where the README says."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = ["grafana/dashboards/systemd-memory-overview.json", "prometheus/alerting-rules.yml",
          "prometheus/recording-rules.yml", "systemd/systemd-memory-exporter.service"]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], check=True, capture_output=True)
    return out


def test_sdist_holds_everything_needed_to_build(dist):
    (sdist,) = dist.glob("*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for needed in ("pyproject.toml", "README.md", "exporter/cli.py", "grafana/dashboards/systemd-memory-unit.json",
                   "deploy/prometheus/alerting-rules.yml", "deploy/systemd/systemd-memory-exporter.service"):
        assert needed in names, needed


def test_wheel_installs_into_a_fresh_venv_and_runs(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin/pip", "install", "-q", str(wheel)], check=True, capture_output=True)
    help_text = subprocess.run([venv / "bin/systemd-memory-exporter", "--help"], check=True, capture_output=True, text=True).stdout
    assert "--web.listen-address" in help_text
    module = subprocess.run([venv / "bin/python", "-m", "exporter", "explain", "--help"], check=True, capture_output=True, text=True)
    assert "UNIT" in module.stdout
    for path in SHARED:
        assert (venv / "share/systemd-memory-exporter" / path).is_file(), path
