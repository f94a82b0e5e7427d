"""The guests can show everything the exporter reports (issues 5 and 11).

These tests prove the guest, not the exporter: the cgroup figures the metric
contract relies on (usage, swap, OOM events, pressure) are produced here by real
workloads and read back. Tests marked layouts("unified") run on the v2 guests
only; the others on every guest (tests/vm/conftest.py GUESTS).
"""
import subprocess

import pytest

from .guest import VENV_PYTHON, wait_until
from .image import AGENT, GUEST_PROJECT, VENV

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

MiB = 1 << 20
# Holds argv[1] MiB of anonymous memory; bytes * n writes every page.
HOLD = ("import sys, time; blob = b'x' * (int(sys.argv[1]) << 20); "
        "print('holding', flush=True); time.sleep(3600)")


def read_int(vm, path):
    return int(vm.read_text(path))


def read_keyed(vm, path):
    """Parse a flat keyed cgroup file such as memory.events."""
    return {k: int(v) for k, v in (line.split() for line in vm.read_text(path).splitlines())}


def read_pressure(vm, path):
    """memory.pressure -> {"some": {"avg10": ..., "total": ...}, "full": {...}}."""
    kinds = {}
    for line in vm.read_text(path).splitlines():
        kind, *fields = line.split()
        kinds[kind] = {k: float(v) for k, v in (f.split("=") for f in fields)}
    return kinds


def test_boots_debian_kernel_and_systemd(vm):
    assert vm.run(["uname", "-r"]).stdout.strip() == vm.kernel.version
    assert vm.run(["systemctl", "--version"]).stdout.startswith(f"systemd {vm.suite.systemd} ")
    assert vm.run(["python3", "--version"]).stdout.startswith(f"Python {vm.suite.python}.")
    failed = vm.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"])
    assert failed.stdout == ""


@pytest.mark.layouts("unified")
def test_unified_hierarchy_with_memory_controller(vm):
    assert vm.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"]).stdout.strip() == "cgroup2fs"
    assert not vm.exists("/sys/fs/cgroup/unified")  # no hybrid mode
    assert "memory" in vm.read_text("/sys/fs/cgroup/cgroup.controllers").split()
    for parent in ("/sys/fs/cgroup", "/sys/fs/cgroup/system.slice"):
        assert "memory" in vm.read_text(f"{parent}/cgroup.subtree_control").split()
    for name in ("memory.current", "memory.stat", "memory.events", "memory.pressure",
                 "memory.swap.current", "memory.max"):
        assert vm.exists(f"/sys/fs/cgroup/system.slice/{name}"), name
    # memory.peak came in 5.19: bullseye510's 5.10 has none, the 6.1 guests have it.
    assert vm.exists("/sys/fs/cgroup/system.slice/memory.peak") == vm.kernel_at_least(5, 19)


@pytest.mark.layouts("legacy")
def test_legacy_hierarchy_with_swap_accounting(vm):
    assert vm.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"]).stdout.strip() == "tmpfs"
    assert vm.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup/memory"]).stdout.strip() == "cgroupfs"
    assert not vm.exists("/sys/fs/cgroup/unified")  # no cgroup2 anywhere: legacy, not hybrid
    assert "cgroup2" not in vm.read_text("/proc/self/mounts")
    own = vm.read_text("/proc/1/cgroup").splitlines()
    assert "1:name=systemd:/init.scope" in own and not [line for line in own if line.startswith("0::")], own
    for name in ("memory.usage_in_bytes", "memory.stat", "memory.oom_control", "memory.limit_in_bytes",
                 "memory.memsw.usage_in_bytes"):  # memsw: swap accounting is on
        assert vm.exists(f"/sys/fs/cgroup/memory/system.slice/{name}"), name
    assert "total_swap" in read_keyed(vm, "/sys/fs/cgroup/memory/system.slice/memory.stat")


def test_checkout_is_shared_read_only(vm):
    assert vm.read_text(f"{GUEST_PROJECT}/tests/vm/agent.py") == AGENT.read_text()
    assert vm.run(["touch", f"{GUEST_PROJECT}/write-test"]).returncode != 0


def test_exporter_installed_in_a_venv_of_the_guests_python(vm):
    """pip put the exporter and its dependencies in VENV; pystemd was compiled there, against
    the guest's own libsystemd, and lists units over the system bus."""
    script = ("import sys, psutil, prometheus_client, pystemd, pystemd.dbuslib, pystemd.systemd1 as s; "
              "m = s.Manager(); m.load(); print(len(m.Manager.ListUnits()), pystemd.dbuslib.__file__, sys.prefix)")
    units, dbuslib, prefix = vm.run([VENV_PYTHON, "-c", script], check=True, cwd="/").stdout.split()
    assert int(units) > 50
    assert prefix == VENV and dbuslib.startswith(VENV + "/lib/python")
    linked = vm.run(["ldd", dbuslib], check=True).stdout
    assert "libsystemd.so.0 => /lib/x86_64-linux-gnu/libsystemd.so.0" in linked or (
        "libsystemd.so.0 => /usr/lib/x86_64-linux-gnu/libsystemd.so.0" in linked), linked
    shown = vm.run([f"{VENV}/bin/pip", "show", "systemd-memory-exporter"], check=True).stdout
    assert f"Location: {VENV}/lib/python{vm.suite.python}/site-packages" in shown


@pytest.mark.layouts("unified")
def test_memory_current_matches_cgroup(vm, unit):
    name = unit("smx-hold.service", ["python3", "-c", HOLD, "150"],
                ["MemoryAccounting=yes"])
    group = vm.cgroup_dir(name)
    wait_until(lambda: read_int(vm, f"{group}/memory.current") >= 150 * MiB, 60,
               what="150 MiB charged")
    # Read both in one guest command so they are as close in time as possible.
    current, shown = vm.sh(f"cat {group}/memory.current; "
                           f"systemctl show --value -p MemoryCurrent {name}").stdout.split()
    assert int(shown) == pytest.approx(int(current), rel=0.02)
    assert read_keyed(vm, f"{group}/memory.stat")["anon"] >= 150 * MiB


@pytest.fixture(scope="module")
def swapped_unit(vm):
    """A service squeezed to 64 MiB of RAM while holding 150 MiB: the rest is swapped."""
    name = "smx-swap.service"
    vm.start_unit(name, ["python3", "-c", HOLD, "150"],
                  ["MemoryMax=64M", "MemorySwapMax=infinity"])
    group = vm.cgroup_dir(name)
    wait_until(lambda: read_int(vm, f"{group}/memory.swap.current") >= 80 * MiB, 120,
               what="80 MiB swapped out")
    yield group
    vm.stop_unit(name)


@pytest.mark.layouts("unified")
def test_swap_is_real(vm, swapped_unit):
    assert vm.run(["swapon", "--show=NAME", "--noheadings"]).stdout.split() == ["/dev/vdb"]
    assert read_int(vm, f"{swapped_unit}/memory.current") <= 64 * MiB
    used = vm.sh("awk '/^SwapTotal/ {t=$2} /^SwapFree/ {f=$2} END {print t-f}' /proc/meminfo")
    assert int(used.stdout) * 1024 >= 80 * MiB


@pytest.mark.layouts("unified")
def test_memory_pressure_counts_stalls(vm, swapped_unit):
    pressure = read_pressure(vm, f"{swapped_unit}/memory.pressure")
    assert set(pressure) == {"some", "full"}
    for kind in pressure.values():
        assert set(kind) == {"avg10", "avg60", "avg300", "total"}
    assert pressure["some"]["total"] > 0  # reclaiming into swap stalled the unit


@pytest.mark.layouts("unified")
def test_oom_kill_is_counted(vm, unit):
    # The shell outlives its OOM-killed child, and OOMPolicy=continue keeps
    # the unit (and so its cgroup and memory.events) around to be read.
    script = f"python3 -c \"{HOLD}\" 100; exec sleep 3600"
    name = unit("smx-oom.service", ["sh", "-c", script],
                ["MemoryMax=32M", "MemorySwapMax=0", "OOMPolicy=continue"])
    group = vm.cgroup_dir(name)

    def oom_killed():
        events = read_keyed(vm, f"{group}/memory.events")
        return events if events["oom_kill"] else None
    events = wait_until(oom_killed, 60, what="an oom_kill")
    assert events["oom_kill"] == 1 and events["oom"] >= 1 and events["max"] >= 1
    assert set(events) >= {"low", "high", "max", "oom", "oom_kill"}
    assert ("oom_group_kill" in events) == vm.kernel_at_least(5, 17)  # 5.10 has none
    assert vm.unit_property(name, "ActiveState") == "active"


def test_long_running_server_and_fetch(vm, unit):
    unit("smx-http.service",
         ["python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", GUEST_PROJECT,
          "8123"])
    body = vm.wait_for_url("http://127.0.0.1:8123/tests/vm/agent.py")
    assert body == AGENT.read_text()


def test_run_timeout_kills_the_command(vm):
    with pytest.raises(subprocess.TimeoutExpired):
        vm.run(["sh", "-c", "sleep 61; true"], timeout=2)
    assert vm.run(["pgrep", "-f", "sleep 61"]).returncode == 1
