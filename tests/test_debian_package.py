"""debian/: the package is built with the standard tools (dpkg-buildpackage, dh + pybuild),
lintian finds no errors, and it is installed for real: `apt install ./….deb` in a test host
(a real systemd 252 as PID 1 of its own namespaces, tests/testhost), whose apt fetches
python3-pystemd and python3-prometheus-client from the Debian archive as a user's apt would.
The package's postinst creates the user and enables and starts the unit; the test checks the
running service (sandboxed, Debian's python3 and pystemd, /metrics with units), reloads its
web config, then removes and purges the package and checks that nothing is left (but the system
user, which Debian packages leave in place; no file belongs to it).

The host's root is an overlay of this machine's / on a tmpfs: apt's writes stay in the host.
tests/prerequisites.sh (and the README) keep daemons from starting on this machine with a
/usr/sbin/policy-rc.d that refuses every start; the host must not inherit it, or the postinst
would never start the service, so it is removed inside the host (an overlay whiteout) first.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.cli import build_parsers
from tests.testhost import TestHost, require_available

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "systemd-memory-exporter"
UNIT = f"{PACKAGE}.service"
# dpkg-buildpackage uses the distribution's python3: a pyenv or venv earlier in PATH would
# give pybuild the wrong interpreter.
BUILD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "lintian", "apt-get")


def _require_tools() -> None:
    missing = [t for t in TOOLS if not shutil.which(t, path=BUILD_PATH)]
    if not missing and Path("/usr/share/dh-python/dhpython/build/plugin_pyproject.py").exists():
        return
    reason = f"Debian packaging tools missing ({', '.join(missing) or 'pybuild-plugin-pyproject'}): see tests/prerequisites.sh"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """The .deb, built by dpkg-buildpackage from a copy of what the package is built from
    (so the checkout stays clean and parallel runs do not collide)."""
    _require_tools()
    work = tmp_path_factory.mktemp("deb")
    src = work / PACKAGE
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "exporter", "grafana", "deploy", "debian"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    build = subprocess.run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, capture_output=True, text=True,
                           env={"PATH": BUILD_PATH, "HOME": str(work), "LANG": "C.UTF-8"}, timeout=300)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (path,) = work.glob(f"{PACKAGE}_*_all.deb")
    return path


def _control(deb: Path) -> dict[str, str]:
    out = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
    fields, key = {}, None
    for line in out.splitlines():
        if line.startswith(" ") and key:
            fields[key] += "\n" + line
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _files(deb: Path) -> dict[str, bytes]:
    """Regular files of the package: path -> content."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return {m.name.lstrip("."): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def test_lintian_reports_no_errors(deb):
    changes = next(deb.parent.glob(f"{PACKAGE}_*.changes"))
    result = subprocess.run(["lintian", "--pedantic", "--display-info", str(changes)], capture_output=True,
                            text=True, env={"PATH": BUILD_PATH, "LANG": "C.UTF-8"}, timeout=300)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:", "N:")]
    print("lintian:\n" + "\n".join(tags))  # shown with -s / in the CI log on failure
    # No errors, and (on Debian 12's lintian 2.116) no warnings either: only the note that the
    # package has no init.d script besides its unit.
    assert not [t for t in tags if t[:2] in ("E:", "W:")], "\n".join(tags)
    # lintian exits 1 on errors only (and 2 on its own failures)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_depends_on_debian_python_modules_and_ships_the_layout(deb):
    control = _control(deb)
    depends = {d.strip().split()[0] for d in control["Depends"].split(",")}
    assert {"python3-pystemd", "python3-prometheus-client"} <= depends, control["Depends"]
    # pyproject's lower bounds, which dh_python3 leaves out: bullseye's pystemd 0.7 must not satisfy it.
    versioned = {d.strip() for d in control["Depends"].split(",")}
    assert {"python3-pystemd (>= 0.11)", "python3-prometheus-client (>= 0.16)", "python3 (>= 3.9)"} <= versioned, control["Depends"]
    assert not {"python3-psutil", "python3-yaml", "python3-bcrypt"} & depends, control["Depends"]
    assert {"python3-yaml", "python3-bcrypt"} <= {d.strip() for d in control["Recommends"].split(",")}
    assert control["Architecture"] == "all"

    files = _files(deb)
    unit = files[f"/lib/systemd/system/{UNIT}"].decode()
    shipped = (ROOT / "deploy/systemd" / UNIT).read_text()
    # The packaged unit is the tested one (tests/test_deploy_unit.py), with only the program path changed.
    assert unit == shipped.replace("ExecStart=/opt/systemd-memory-exporter/bin/", "ExecStart=/usr/bin/")
    assert "ExecStart=/usr/bin/systemd-memory-exporter $ARGS" in unit and "ExecReload=" in unit
    # One sysusers file: debian/'s is a link to deploy/systemd/'s (the .rpm ships that one too).
    assert os.readlink(ROOT / "debian" / f"{PACKAGE}.sysusers") == f"../deploy/systemd/{PACKAGE}.sysusers"
    assert files[f"/usr/lib/sysusers.d/{PACKAGE}.conf"] == (ROOT / "deploy/systemd" / f"{PACKAGE}.sysusers").read_bytes()
    default = files[f"/etc/default/{PACKAGE}"].decode()
    args = subprocess.run(["sh", "-c", 'eval "$1" && printf "%s\\n" $ARGS', "sh", default],
                          capture_output=True, text=True, check=True).stdout.split()
    build_parsers()[0].parse_args(args)  # exits 2 on a bad flag
    assert "/opt/" not in default
    for shared in ("grafana/dashboards/systemd-memory-overview.json", "prometheus/alerting-rules.yml",
                   "prometheus/recording-rules.yml"):
        assert f"/usr/share/{PACKAGE}/{shared}" in files, shared
    assert "/usr/bin/systemd-memory-exporter" in files
    assert files["/usr/bin/systemd-memory-exporter"].startswith(b"#!/usr/bin/python3\n")
    assert not [f for f in files if f.startswith(("/opt/", "/usr/local/", f"/usr/share/{PACKAGE}/systemd/"))]


# --- installed on a real systemd -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait(predicate, what: str, host: TestHost, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except OSError as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    journal = host.run(["journalctl", "--no-pager", "-b", "-n", "40", "-u", UNIT], check=False).stdout
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})\n{journal}")


@pytest.fixture(scope="module")
def debhost():
    """A host of its own: installing and purging a package must not touch the session's."""
    require_available()
    TestHost.cleanup_stale()
    with TestHost(name="deb") as host:
        yield host


def test_apt_install_starts_the_packaged_unit_and_purge_leaves_nothing(deb, debhost):
    host = debhost
    apt_env = {"PATH": BUILD_PATH, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()

    def step(what: str) -> None:  # progress in the CI log (pytest -s or on failure)
        print(f"[{time.monotonic() - started:5.1f} s] {what}", flush=True)

    machine_policy = Path("/usr/sbin/policy-rc.d").exists()
    host.run(["rm", "-f", "/usr/sbin/policy-rc.d"])
    assert not host.path("/usr/sbin/policy-rc.d").exists()

    # The admin's flags before the install (a free port instead of :10073, which may be taken
    # on this shared machine); dpkg keeps them (--force-confold) as it keeps any admin's file.
    port = _free_port()
    host.write_file(f"/etc/default/{PACKAGE}", f'ARGS="--web.listen-address=127.0.0.1:{port} --sample.interval=1"\n')
    inside = host.exchange_dir / deb.name
    shutil.copy(deb, inside)
    step("apt install ./deb")
    install = host.run(["apt", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", f"./{deb.name}"],
                       cwd=host.exchange_dir, env=apt_env, timeout=600)
    print(install.stdout[-3000:])
    versions = dict(line.split("\t") for line in host.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", PACKAGE, "python3-pystemd", "python3-prometheus-client",
         "python3-yaml", "python3-bcrypt"], env=apt_env).stdout.splitlines())
    print("installed:", versions)
    assert versions[PACKAGE] == "0.1.0" and versions["python3-pystemd"] and versions["python3-prometheus-client"]
    # (apt exited 0; its packagekit hook's "Error: ... packagekit.service is masked" is the test host's mask)
    assert not [line for line in install.stderr.splitlines() if line.startswith("E:")], install.stderr

    step("installed")
    # The user from sysusers.d, the unit enabled and running from /lib/systemd/system.
    user = host.run(["getent", "passwd", PACKAGE]).stdout.strip().split(":")
    uid = int(user[2])
    assert 0 < uid < 1000 and user[6] == "/usr/sbin/nologin", user
    assert host.systemctl("is-enabled", UNIT).strip() == "enabled"
    _wait(lambda: host.systemctl("is-active", UNIT, check=False).strip() == "active", "the unit to be active", host)
    show = host.show(UNIT, "FragmentPath", "MainPID", "User", "ExecStart")
    assert show["FragmentPath"] == f"/lib/systemd/system/{UNIT}" and show["User"] == PACKAGE
    pid = show["MainPID"]
    status = dict(line.split(":\t", 1) for line in host.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines() if ":\t" in line)
    assert int(status["Uid"].split()[0]) == uid
    assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    # Debian's interpreter and Debian's pystemd, not this machine's pyenv.
    assert host.run(["readlink", f"/proc/{pid}/exe"]).stdout.strip().startswith("/usr/bin/python3")
    # pystemd is loaded by the discovery child, which is in the unit's cgroup too.
    # (cgroup.procs read from out here lists this machine's PIDs)
    procs = host.cgroup_file(UNIT, "cgroup.procs").split()
    maps = " ".join(Path(f"/proc/{p}/maps").read_text() for p in procs)
    assert len(procs) == 2 and "/usr/lib/python3/dist-packages/pystemd/" in maps, "not Debian's python3-pystemd"

    step("unit active and sandboxed")
    # /metrics answers, with units seen over D-Bus (the exporter's own unit among them).
    def metrics():
        status_code, text = _get(port)
        if status_code != 200:
            return None
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        own = samples.get(("systemd_unit_memory_bytes", (("type", "cgroup_usage"), ("unit", UNIT))))
        up = samples.get(("systemd_memory_exporter_source_up", (("source", "dbus"),)))
        return samples if up == 1 and own and own > 0 else None

    samples = _wait(metrics, "/metrics with the exporter's own unit", host)
    units = {dict(labels)["unit"] for name, labels in samples if name == "systemd_unit_memory_bytes"}
    assert {"init.scope", "dbus.service", UNIT} <= units, units

    step("scraped")
    # systemctl reload re-reads the web config: basic auth on, then a new password, same process.
    host.run(["mkdir", "-p", f"/etc/{PACKAGE}"])
    web_config = f"/etc/{PACKAGE}/web-config.yml"

    def users(password: str) -> str:
        return f"basic_auth_users:\n  prometheus: {bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"

    host.write_file(web_config, users("first"))
    host.write_file(f"/etc/default/{PACKAGE}",
                    f'ARGS="--web.listen-address=127.0.0.1:{port} --sample.interval=1 --web.config.file={web_config}"\n')
    host.systemctl("restart", UNIT)
    _wait(lambda: _get(port, "prometheus:first")[0] == 200, "basic auth with the first password", host)
    assert _get(port)[0] == 401
    pid = host.show(UNIT, "MainPID")["MainPID"]
    host.write_file(web_config, users("second"))
    host.systemctl("reload", UNIT)
    _wait(lambda: _get(port, "prometheus:second")[0] == 200, "the reloaded password", host)
    assert _get(port, "prometheus:first")[0] == 401
    assert host.show(UNIT, "MainPID")["MainPID"] == pid and host.systemctl("is-active", UNIT).strip() == "active"

    # An upgrade (here: the same version again) restarts the service and keeps the admin's flags.
    step("reinstall")
    host.run(["apt", "install", "-y", "-q", "--reinstall", "-o", "Dpkg::Options::=--force-confold", f"./{deb.name}"],
             cwd=host.exchange_dir, env=apt_env, timeout=300)
    _wait(lambda: host.systemctl("is-active", UNIT, check=False).strip() == "active", "the unit active again", host)
    assert host.show(UNIT, "MainPID")["MainPID"] != pid, "not restarted by the upgrade"
    assert "--web.config.file" in host.path(f"/etc/default/{PACKAGE}").read_text()
    _wait(lambda: _get(port, "prometheus:second")[0] == 200, "/metrics after the upgrade", host)
    pid = host.show(UNIT, "MainPID")["MainPID"]
    host.run(["rm", "-r", f"/etc/{PACKAGE}"])  # the admin's own file: purge leaves those alone

    step("reloaded")
    # remove: the service is stopped and the program gone; the conffile stays until purge.
    packaged = [p for p in _files(deb) if not p.startswith("/usr/share/doc/")]
    host.run(["apt-get", "remove", "-y", "-q", PACKAGE], env=apt_env, timeout=300)
    assert host.show(UNIT, "LoadState")["LoadState"] == "not-found"
    assert not host.path(f"/proc/{pid}").exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert host.path(f"/etc/default/{PACKAGE}").exists()
    assert not [p for p in packaged if not p.startswith("/etc/") and host.path(p).exists()]

    step("removed")
    # purge: nothing of the package is left, nor any file of its user.
    host.run(["apt-get", "purge", "-y", "-q", PACKAGE], env=apt_env, timeout=300)
    assert host.run(["dpkg-query", "-W", "-f", "${db:Status-Status}", PACKAGE], check=False, env=apt_env).stdout \
        in ("", "not-installed")
    left = [p for p in packaged + [f"/etc/systemd/system/multi-user.target.wants/{UNIT}",
                                   f"/var/lib/systemd/deb-systemd-helper-enabled/{UNIT}.dsh-also",
                                   f"/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/{UNIT}",
                                   f"/usr/share/{PACKAGE}", f"/usr/lib/python3/dist-packages/exporter"]
            if host.path(p).exists() or host.path(p).is_symlink()]
    assert not left, left
    step("purged")
    owned = host.run(["find", "/etc", "/var", "/usr", "/opt", "/srv", "/run", "/tmp", "-xdev", "-uid", str(uid)],
                     check=False, timeout=120).stdout.split()
    assert not owned, owned
    # The user stays, as Debian leaves system users (a reused UID could inherit files elsewhere).
    assert host.run(["getent", "passwd", PACKAGE]).stdout.split(":")[2] == str(uid)
    # This machine's own guard was never touched.
    assert Path("/usr/sbin/policy-rc.d").exists() == machine_policy
    step("nothing left")
