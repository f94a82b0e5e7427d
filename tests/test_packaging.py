"""The sdist and wheel are complete: built from this tree, the wheel installs into a fresh
venv (dependencies from the index, as a user gets them), its console script runs, and the
dashboards, rules and unit files land where the README says."""

from __future__ import annotations

import ast
import json
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


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed as `pip install .` would: no extras."""
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin/pip", "install", "-q", str(wheel)], check=True, capture_output=True)
    return venv


def test_wheel_installs_into_a_fresh_venv_and_runs(venv):
    help_text = subprocess.run([venv / "bin/systemd-memory-exporter", "--help"], check=True, capture_output=True, text=True).stdout
    assert "--web.listen-address" in help_text
    module = subprocess.run([venv / "bin/python", "-m", "exporter", "explain", "--help"], check=True, capture_output=True, text=True)
    assert "UNIT" in module.stdout
    for path in SHARED:
        assert (venv / "share/systemd-memory-exporter" / path).is_file(), path


def _imported_top_level_modules() -> set[str]:
    """Every top-level module exporter/ imports anywhere (lazily inside functions too)."""
    names = set()
    for source in (REPO / "exporter").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - {"exporter"}


# Run by the venv's python: which distributions are installed, which top-level modules each
# provides (from its file list, as importlib.metadata.packages_distributions does on 3.10+), and
# each one's unconditional requirements.
_INVENTORY = """
import json, re
from importlib.metadata import distributions
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
out = {}
for d in distributions():
    tops = {f.parts[0][:-3] if f.parts[0].endswith(".py") else f.parts[0] for f in d.files or []
            if f.parts and not f.parts[0].endswith((".dist-info", ".data")) and f.parts[0] not in ("..", "__pycache__")}
    reqs = [norm(re.split(r"[ ;<>=!~\\[(]", r, 1)[0]) for r in d.requires or [] if "extra ==" not in r]
    out[norm(d.metadata["Name"])] = {"modules": sorted(tops), "requires": reqs}
print(json.dumps(out))
"""


def test_pip_install_brings_only_what_the_exporter_imports(venv):
    """`pip install .` installs the distributions of the modules exporter/ imports and their own
    requirements, nothing else: psutil comes only as pystemd's requirement, pyyaml and bcrypt
    only with the [webconfig] extra."""
    inventory = json.loads(subprocess.run([venv / "bin/python", "-c", _INVENTORY], check=True,
                                          capture_output=True, text=True).stdout)
    ours = inventory.pop("systemd-memory-exporter")
    provider = {m: name for name, d in inventory.items() for m in d["modules"]}
    imported = _imported_top_level_modules()
    used = {provider[m] for m in imported if m in provider}
    assert set(ours["requires"]) == used == {"prometheus-client", "pystemd"}, (ours["requires"], used)
    needed, todo = set(), list(used)
    while todo:
        name = todo.pop()
        if name not in needed and name in inventory:
            needed.add(name)
            todo.extend(inventory[name]["requires"])
    tooling = {"pip", "setuptools", "wheel"}  # what venv itself puts there
    assert set(inventory) - tooling == needed, sorted(set(inventory) - tooling - needed)
    assert "yaml" in imported and "bcrypt" in imported  # lazily, for --web.config.file
    assert not {"pyyaml", "bcrypt"} & set(inventory)
