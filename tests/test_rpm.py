"""packaging/rpm: the spec builds with rpmbuild (-bb, on Debian: Fedora's macros are replaced by
the stand-ins of packaging/rpm/macros.debian, and BuildRequires are not checked) and rpmlint
finds no errors in the spec or the package. The RPM is built, not installed: no RPM
distribution runs here.

rpmlint's defaults are openSUSE's; packaging/rpm/*.rpmlintrc filters four findings that do not
apply (each says why), and the unfiltered run is checked to report nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "systemd-memory-exporter"
RPM = ROOT / "packaging/rpm"
SPEC = RPM / f"{NAME}.spec"
BUILD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the distribution's python3, as an RPM build has
FILTERED = {"no-signature", "no-packager-tag", "no-group-tag", "no-dependency-on"}


def _version() -> str:
    return re.search(r"^Version:\s*(\S+)", SPEC.read_text(), re.M)[1]


@pytest.fixture(scope="module")
def rpm(tmp_path_factory) -> Path:
    if not shutil.which("rpmbuild", path=BUILD_PATH):
        reason = "rpmbuild missing (Debian package rpm): see tests/prerequisites.sh"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    top = tmp_path_factory.mktemp("rpmbuild")
    sources = top / "SOURCES"
    sources.mkdir()
    version = _version()
    with tarfile.open(sources / f"{NAME}-{version}.tar.gz", "w:gz") as tar:
        for name in ("pyproject.toml", "README.md", "LICENSE", "exporter", "grafana", "deploy", "packaging"):
            tar.add(ROOT / name, f"{NAME}-{version}/{name}", filter=lambda t: None if "__pycache__" in t.name else t)
    shutil.copy(ROOT / f"deploy/systemd/{NAME}.sysusers", sources)
    build = subprocess.run(
        ["rpmbuild", "--load", str(RPM / "macros.debian"), "--nodeps", "--define", f"_topdir {top}", "-bb", str(SPEC)],
        capture_output=True, text=True, env={"PATH": BUILD_PATH, "HOME": str(top), "LANG": "C.UTF-8"}, timeout=300)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (path,) = (top / "RPMS/noarch").glob(f"{NAME}-{version}-1*.noarch.rpm")
    return path


def _rpmlint(*args: str) -> subprocess.CompletedProcess:
    # rpmlint from PyPI (the test extra), run by this Python; it finds rpm's bindings (python3-rpm)
    # through its rpm shim.
    code = "import sys; from rpmlint.cli import lint; sys.argv[0] = 'rpmlint'; sys.exit(lint())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_rpmlint_reports_no_errors(rpm):
    result = _rpmlint("-r", str(RPM / f"{NAME}.rpmlintrc"), str(SPEC), str(rpm))
    print(result.stdout)
    summary = re.search(r"(\d+) packages and (\d+) specfiles checked; (\d+) errors, (\d+) warnings", result.stdout)
    assert summary, result.stdout + result.stderr
    assert summary.group(1, 2, 3) == ("1", "1", "0"), result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    # The filters hide only the findings they name.
    unfiltered = _rpmlint(str(SPEC), str(rpm)).stdout
    errors = {m[1] for m in re.finditer(r": E: (\S+)", unfiltered)}
    assert errors <= FILTERED, unfiltered


def _query(rpm: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True, check=True,
                          env={"PATH": BUILD_PATH}).stdout


def test_rpm_has_the_layout_and_scriptlets_of_the_debian_package(rpm):
    files = set(_query(rpm, "--list").split())
    for path in (f"/usr/lib/systemd/system/{NAME}.service", f"/usr/lib/sysusers.d/{NAME}.conf", f"/etc/default/{NAME}",
                 "/usr/bin/systemd-memory-exporter", f"/usr/share/{NAME}/prometheus/alerting-rules.yml",
                 f"/usr/share/{NAME}/grafana/dashboards/systemd-memory-overview.json"):
        assert path in files, path
    # %license: /usr/share/licenses/NAME/ on Fedora, NAME-VERSION/ with this host's rpm macros
    assert [f for f in files if f.startswith(f"/usr/share/licenses/{NAME}") and f.endswith("/LICENSE")], "no %license"
    assert not [f for f in files if f.startswith(("/opt", "/usr/local", f"/usr/share/{NAME}/systemd"))]
    assert f"/etc/default/{NAME}" in _query(rpm, "--configfiles").split()
    requires = _query(rpm, "--requires")
    assert "python3-pystemd >= 0.11" in requires and "python3-prometheus_client >= 0.16" in requires
    assert "pyyaml" not in requires and "psutil" not in requires
    recommends = _query(rpm, "--recommends")
    assert "python3-pyyaml" in recommends and "python3-bcrypt" in recommends
    scripts = _query(rpm, "--scripts")
    assert "systemd-sysusers" in scripts and "preset systemd-memory-exporter.service" in scripts
    assert "disable --now systemd-memory-exporter.service" in scripts and "try-restart" in scripts
    unit = subprocess.run(f"rpm2cpio {rpm} | cpio -i --quiet --to-stdout ./usr/lib/systemd/system/{NAME}.service",
                          shell=True, capture_output=True, text=True, check=True, env={"PATH": BUILD_PATH}).stdout
    shipped = (ROOT / f"deploy/systemd/{NAME}.service").read_text()
    assert unit == shipped.replace("ExecStart=/opt/systemd-memory-exporter/bin/", "ExecStart=/usr/bin/")
