"""Tests of the real-systemd test host harness (tests/testhost/) itself.

Every test using the `testhost` fixture is marked e2e by tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.testhost import HostCommandError, HostError, TestHost, require_available, workloads
from tests.testhost.host import REPO_ROOT, STATE_ROOT, _hierarchies

MiB = 1 << 20


# ------------------------------------------------------------------ boot
def test_boots_to_running(testhost):
    state = testhost.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded"), testhost.diagnostics()
    assert testhost.boot_seconds < 30


def test_host_root_cgroup_is_its_th_cgroup(testhost):
    # cgroup namespace: inside, every hierarchy's root is the host's th-… cgroup
    assert all(line.endswith(":/") for line in testhost.run(["cat", "/proc/self/cgroup"]).stdout.split())
    for controller in ("memory", "systemd", "pids", "unified"):
        inside = os.stat(testhost.path(f"/sys/fs/cgroup/{controller}"))
        assert inside.st_ino == os.stat(testhost.cgroup_dir(controller)).st_ino
    assert (testhost.cgroup_dir("memory") / "system.slice" / "memory.stat").exists()


def test_dbus_and_private_socket(testhost):
    names = testhost.run(["busctl", "--system", "--no-pager", "list"]).stdout
    assert "org.freedesktop.systemd1" in names
    assert stat.S_ISSOCK(os.stat(testhost.path("/run/systemd/private")).st_mode)


def test_systemd_answers_without_dbus(testhost):
    """The exporter's fallback: with the bus stopped, systemd is still reachable on
    its private socket (which systemctl uses as root)."""
    testhost.systemctl("stop", "dbus.socket", "dbus.service")
    try:
        assert testhost.run(["busctl", "--system", "list"], check=False).returncode != 0
        assert testhost.show("init.scope", "ActiveState") == {"ActiveState": "active"}
    finally:
        testhost.systemctl("start", "dbus.socket", "dbus.service")
    workloads.wait_until(lambda: testhost.run(["busctl", "--system", "list"], check=False).returncode == 0,
                         10, "the system bus to come back")


def test_isolation_from_the_machine(testhost):
    # (a UTS-namespaced sysctl, so nothing happens to the machine even if this test fails)
    r = testhost.run(["sh", "-c", "echo x > /proc/sys/kernel/hostname"], check=False)
    assert r.returncode != 0 and "Read-only" in r.stderr
    assert not testhost.path("/dev/vda").exists() and not testhost.path("/dev/kmsg").exists()
    marker = f"th-isolation-{os.getpid()}"
    testhost.run(["touch", f"/tmp/{marker}", f"/dev/shm/{marker}"])
    assert not Path("/tmp", marker).exists() and not Path("/dev/shm", marker).exists()
    testhost.run(["rm", f"/tmp/{marker}", f"/dev/shm/{marker}"])


def test_binds_are_live_both_ways(testhost):
    """Checkout, data and exchange dirs are bound at the same path: changes made
    after boot are seen on both sides (the overlay alone would not show them)."""
    outside = testhost.exchange_dir / "from-outside"
    outside.write_text("hello")
    assert testhost.run(["cat", str(outside)]).stdout == "hello"
    testhost.run(["sh", "-c", f"echo hi > {testhost.data_dir}/from-inside"])
    assert (testhost.data_dir / "from-inside").read_text() == "hi\n"
    assert testhost.run(["pwd"]).stdout.strip() == str(REPO_ROOT)
    assert testhost.run(["test", "-f", "tests/testhost/host.py"]).returncode == 0


def test_python_inside_has_exporter_dependencies(testhost):
    """`python3` inside is the interpreter running the tests: the same environment (a venv's
    prefix, or the system's) and the same binary. Compared by prefix and file, not by name: in a
    venv, <venv>/bin/python3 is a symlink to the <venv>/bin/python pytest may run as."""
    out = testhost.run(["python3", "-c", "import pystemd, psutil, prometheus_client, sys; print(sys.prefix); "
                                         "print(sys.executable)"])
    prefix, executable = out.stdout.split()
    assert prefix == sys.prefix
    assert os.path.samefile(executable, testhost.python), (executable, testhost.python)


# ------------------------------------------------------------ run / popen
def test_run_captures_output_and_exit_code(testhost):
    r = testhost.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(HostCommandError, match="exit status 1"):
        testhost.run(["false"])
    assert testhost.run(["cat"], input="piped").stdout == "piped"
    assert testhost.run(["sh", "-c", "echo $FOO"], env={"FOO": "bar"}).stdout == "bar\n"


def test_run_timeout_kills_the_command_inside(testhost):
    with pytest.raises(subprocess.TimeoutExpired):
        testhost.run(["sleep", "61.25"], timeout=0.5)
    assert testhost.run(["pgrep", "-f", "sleep 61.25"], check=False).returncode == 1


def test_popen_signals_reach_the_command_inside(testhost):
    proc = testhost.popen(["sleep", "62.25"])
    inner = proc.inner_pid
    assert inner and testhost.run(["cat", f"/proc/{inner}/comm"]).stdout.strip() == "sleep"
    proc.terminate()
    assert proc.wait(timeout=5) == -signal.SIGTERM
    assert testhost.run(["pgrep", "-f", "sleep 62.25"], check=False).returncode == 1


# -------------------------------------------------------------- workloads
def test_memory_current_matches_cgroup_usage(testhost, workload):
    unit = workload(workloads.anon_hog, mib=100)
    current = testhost.show(unit, "MemoryCurrent")["MemoryCurrent"]
    assert current.isdigit(), f"MemoryCurrent={current!r}: memory accounting is off"
    usage = int(testhost.cgroup_file(unit, "memory.usage_in_bytes"))
    assert abs(int(current) - usage) <= 0.02 * usage


def test_anon_hog_shape(testhost, workload):
    stat_ = testhost.memory_stat(workload(workloads.anon_hog))
    assert stat_["total_rss"] >= 150 * MiB
    assert stat_["total_cache"] < 20 * MiB


def test_page_cache_reader_shape(testhost, workload):
    stat_ = testhost.memory_stat(workload(workloads.page_cache_reader))
    assert stat_["total_cache"] >= 180 * MiB
    assert stat_["total_shmem"] < 5 * MiB
    assert stat_["total_rss"] < 50 * MiB


@pytest.mark.parametrize("mapped", [False, True])
def test_shm_writer_shape(testhost, workload, mapped):
    unit = workload(workloads.shm_writer, mib=64, mapped=mapped)
    stat_ = testhost.memory_stat(unit)
    assert stat_["total_shmem"] >= 64 * MiB
    assert stat_["total_cache"] >= 64 * MiB  # v1 counts shmem as cache
    assert (stat_["total_mapped_file"] >= 64 * MiB) == mapped
    workloads.stop_units(testhost, [unit])
    assert not testhost.path(f"/dev/shm/{unit}").exists()


def test_multi_process_shape(testhost, workload):
    unit = workload(workloads.multi_process, children=4, mib=20)
    assert testhost.show(unit, "TasksCurrent")["TasksCurrent"] == "5"
    assert len(testhost.cgroup_file(unit, "cgroup.procs").split()) == 5
    assert testhost.memory_stat(unit)["total_rss"] >= 4 * 20 * MiB


def test_nested_slice(testhost, workload):
    unit = workload(workloads.nested_slice)
    assert testhost.unit_cgroup(unit) == f"/th.slice/th-outer.slice/th-outer-inner.slice/{unit}"
    outer = int(testhost.show("th-outer.slice", "MemoryCurrent")["MemoryCurrent"])
    assert outer >= int(testhost.show(unit, "MemoryCurrent")["MemoryCurrent"])


def test_escaped_unit_name(testhost, workload):
    unit = workload(workloads.escaped_name)
    assert unit.startswith("th\\x2descaped\\x2ddemo\\x2d") and unit.endswith(".service")
    assert testhost.show(unit, "Id")["Id"] == unit
    assert (testhost.cgroup_dir("memory") / "system.slice" / unit).is_dir()


def test_stop_removes_unit_and_cgroup(testhost):
    unit = workloads.anon_hog(testhost, mib=10)
    cgroup = testhost.cgroup_dir("memory") / testhost.unit_cgroup(unit).lstrip("/")
    assert cgroup.is_dir()
    testhost.systemctl("stop", unit)
    assert testhost.show(unit, "LoadState")["LoadState"] == "not-found"
    assert not cgroup.exists()


def test_short_lived_units_are_gone(testhost):
    units = workloads.short_lived(testhost, count=3, lifetime=0.2)
    assert len(set(units)) == 3
    for unit in units:
        assert testhost.show(unit, "LoadState")["LoadState"] == "not-found"


def test_churn_comes_and_goes(testhost, workload):
    unit = workload(workloads.churn, period=0.1, lifetime=0.5)
    stem = unit.removesuffix(".service")
    seen = set()
    for _ in range(10):
        seen |= {line.split()[0] for line in testhost.systemctl("list-units", "--no-legend", "--plain",
                                                                 f"{stem}-*").splitlines()}
        time.sleep(0.15)
    assert len(seen) >= 3
    workloads.stop_units(testhost, [unit])
    assert testhost.systemctl("list-units", "--no-legend", f"{stem}-*").strip() == ""


def test_batch(testhost, workload):
    units = workload(workloads.batch, 20, procs=3, prefix="th-batchtest")
    assert len(units) == 20
    states = testhost.systemctl("is-active", *units).split()
    assert states == ["active"] * 20
    assert all(len(testhost.cgroup_file(u, "cgroup.procs", "systemd").split()) == 3 for u in units)


# ----------------------------------------------------------------- cleanup
def _namespace_members(ns_inodes: set[tuple[str, int]]) -> list[int]:
    """Processes on the machine in any of the given (kind, inode) namespaces."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            for kind, ino in ns_inodes:
                try:
                    if os.stat(entry / "ns" / kind).st_ino == ino:
                        found.append(int(entry.name))
                except OSError:
                    pass
    return found


def _assert_nothing_left(name: str, namespaces: set[tuple[str, int]]) -> None:
    assert _namespace_members(namespaces) == []
    assert [h for h in _hierarchies().values() if (h / name).exists()] == []
    assert name not in Path("/proc/self/mountinfo").read_text()
    assert not (STATE_ROOT / name).exists()


def test_stopped_host_leaves_nothing_behind(testhost, tmp_path):
    (tmp_path / "bound").write_text("extra")
    host = TestHost(name="throwaway", extra_binds=[str(tmp_path), (str(tmp_path), "/srv/th-extra")]).start()
    try:
        assert host.run(["cat", str(tmp_path / "bound"), "/srv/th-extra/bound"]).stdout == "extraextra"
        workloads.anon_hog(host, mib=10)
        workloads.page_cache_reader(host, mib=8)
        popen = host.popen(["sleep", "600"])
        namespaces = {(kind, os.stat(f"/proc/{host.pid}/ns/{kind}").st_ino) for kind in ("pid", "mnt", "cgroup")}
        assert len(_namespace_members(namespaces)) >= 5
    finally:
        host.stop()
    host.stop()  # idempotent
    assert popen.poll() is not None
    _assert_nothing_left(host.name, namespaces)
    assert testhost.run(["true"]).returncode == 0  # the session host is unaffected


def test_failed_boot_explains_and_cleans_up(testhost):
    host = TestHost(name="broken", extra_binds=["/nonexistent-th-bind"])
    with pytest.raises(HostError, match="exited during boot") as failure:
        host.start()
    assert "nonexistent-th-bind" in str(failure.value)  # the console shows setup.sh's error
    assert [h for h in _hierarchies().values() if (h / host.name).exists()] == []
    assert not host.state_dir.exists()


def test_cleanup_stale_after_a_crashed_run(testhost):
    """A test process killed with SIGKILL takes its host down (PDEATHSIG); what remains
    (cgroups, state dir) is removed by cleanup_stale(), which spares live hosts."""
    script = ("from tests.testhost import TestHost; import time\n"
              "h = TestHost(name='crashed').start(); print(h.name, h.pid, flush=True); time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        name, pid = child.stdout.readline().split()
        namespaces = {(kind, os.stat(f"/proc/{pid}/ns/{kind}").st_ino) for kind in ("pid", "mnt")}
    finally:
        child.kill()
        child.wait()
    workloads.wait_until(lambda: not _namespace_members(namespaces), 10, "the crashed host's processes to die")
    assert (testhost.cgroup_dir("memory").parent / name).is_dir()  # left behind by the crash
    removed = TestHost.cleanup_stale()
    assert name in removed and testhost.name not in removed
    _assert_nothing_left(name, namespaces)
    assert testhost.run(["true"]).returncode == 0


# ------------------------------------------------------------ availability
@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_unavailable_skips_locally_but_fails_in_ci(monkeypatch, ci, outcome):
    monkeypatch.setattr(TestHost, "unavailable_reason", staticmethod(lambda: "no cgroup v1 memory"))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no cgroup v1 memory"):
        require_available()
