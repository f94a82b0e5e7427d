"""Every user's own units, and container-style scopes, on cgroup v2 in the QEMU guest: a real user (useradd), its user
manager started the way logind starts it, units started with `systemd-run --user` as the user.

The guest image has no logind and no dbus-user-session, so there is no user bus for
`systemctl --user -M u@` to bridge to: `systemctl --user` and `systemd-run --user` run as the
user instead, and reach the user manager on its private socket
(/run/user/UID/systemd/private). Same manager, same properties.

On v2 systemd 252's user@.service has Delegate=pids memory cpu, so the user's units have
their own memory.current: they get cgroup figures as well as RSS, each checked against
`systemctl --user show`, the cgroup files and /proc in the guest. The v1/hybrid
counterpart (RSS only, MemoryCurrent [not set]) is tests/test_user_units.py. Scopes named
like podman's and docker's are made with `systemd-run --scope`, as in tests/test_libvirt.py.
"""
from __future__ import annotations

import os

import pytest

from tests.testhost.workloads import PAYLOAD, USER_MANAGER_DROPIN
from tests.truth import MiB, check_rss_is_proc_sums, proc_sums

from .guest import EXPORTER, wait_until
from .test_v2_truth import INTERVAL, GuestExporter

# Written against bookworm's systemd 252 (its user@.service delegation); not yet run on trixie.
pytestmark = [pytest.mark.e2e, pytest.mark.vm, pytest.mark.layouts("unified"), pytest.mark.suites("bookworm")]

USER, UID = "u", 1500
PORT = 10074  # not test_v2_truth's, should both modules' exporters overlap
URL = f"http://127.0.0.1:{PORT}/metrics"
EXPORTER_UNIT = "smx-exporter-users.service"
MANAGER_CGROUP = f"/user.slice/user-{UID}.slice/user@{UID}.service"


def _as_user(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--init-groups", "env", f"XDG_RUNTIME_DIR=/run/user/{UID}",
            *argv]


def _user_show(vm, unit: str, *props: str) -> dict[str, str]:
    out = vm.run(_as_user("systemctl", "--user", "show", *(f"--property={p}" for p in props), "--", unit),
                 check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def user_units(vm):
    if vm.run(["id", "-u", USER]).returncode:
        vm.run(["useradd", "-m", "-u", str(UID), USER], check=True)
    # The image has no logind (minbase, no libpam-systemd): give the user manager the
    # XDG_RUNTIME_DIR logind would, as tests/testhost/workloads.user_manager does.
    path = "/run/systemd/system/user@.service.d/th-xdg.conf"
    vm.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path], input=USER_MANAGER_DROPIN, check=True)
    vm.run(["systemctl", "daemon-reload"], check=True)
    vm.run(["systemctl", "start", f"user@{UID}.service"], check=True, timeout=120)
    units = {"hog": "th-user-hog.service", "multi": "th-user-multi.service"}
    for (key, unit), args in zip(units.items(), (["anon", "60"], ["multi", "2", "10"])):
        started = vm.run(_as_user("systemd-run", "--user", "--quiet", "--collect", f"--unit={unit}",
                                  "-p", "Type=notify", "-p", "TimeoutStartSec=120", "--", "python3", "-c", PAYLOAD, *args),
                         timeout=180)
        assert started.returncode == 0, started.stderr
    yield units
    vm.run(_as_user("systemctl", "--user", "stop", *units.values()))
    vm.run(["systemctl", "stop", f"user@{UID}.service"], timeout=120)


@pytest.fixture(scope="module")
def exporter(vm, user_units):
    # The exporter pip-installed into the guest's venv (tests/vm/conftest.py), cwd / as in test_v2_truth.py.
    vm.start_unit(EXPORTER_UNIT, [EXPORTER, f"--web.listen-address=127.0.0.1:{PORT}",
                                  f"--sample.interval={INTERVAL:g}"], cwd="/")
    try:
        client = GuestExporter(vm, URL, INTERVAL)
        client.wait_ready(timeout=60)
        yield client
    finally:
        journal = vm.run(["journalctl", "--no-pager", "-o", "cat", "-u", EXPORTER_UNIT]).stdout
        vm.stop_unit(EXPORTER_UNIT)
    assert "Traceback" not in journal, journal[-4000:]


def test_user_manager_has_the_memory_controller(vm, user_units):
    controllers = vm.read_text(f"/sys/fs/cgroup{MANAGER_CGROUP}/cgroup.subtree_control").split()
    assert "memory" in controllers
    assert _user_show(vm, user_units["hog"], "MemoryCurrent")["MemoryCurrent"] != "[not set]"


def test_user_unit_usage_equals_systemctl_user_and_memory_current(vm, exporter, user_units):
    """cgroup_usage against `systemctl --user -M u@ show` and memory.current, within 2 %,
    retried from a fresh sample: the guest runs under TCG and the figures move."""
    mismatched = {}
    for _attempt in range(5):
        m = exporter.next_sample()
        mismatched = {}
        for unit in user_units.values():
            show = _user_show(vm, unit, "MemoryCurrent", "ControlGroup")
            kernel = int(vm.read_text(f"/sys/fs/cgroup{show['ControlGroup']}/memory.current"))
            usage = m.value("systemd_unit_memory_bytes", unit=unit, uid=str(UID), type="cgroup_usage")
            print(f"{unit} uid={UID}: cgroup_usage={usage:.0f} MemoryCurrent={show['MemoryCurrent']} memory.current={kernel}")
            if not (usage == pytest.approx(int(show["MemoryCurrent"]), rel=0.02) and usage == pytest.approx(kernel, rel=0.02)):
                mismatched[unit] = (usage, show["MemoryCurrent"], kernel)
        if not mismatched:
            break
    assert not mismatched, f"cgroup_usage differs from MemoryCurrent by more than 2 % five times: {mismatched}"
    hog = user_units["hog"]
    assert m.value("systemd_unit_memory_stat_bytes", unit=hog, uid=str(UID), item="anon") >= 60 * MiB
    [info] = m.series("systemd_unit_info", unit=hog, uid=str(UID))
    assert info.labels["control_group"] == f"{MANAGER_CGROUP}/app.slice/{hog}"


def test_user_unit_rss_equals_proc_sums(vm, exporter, user_units):
    for unit in user_units.values():
        group = _user_show(vm, unit, "ControlGroup")["ControlGroup"]
        check_rss_is_proc_sums(exporter.scrape(), unit, proc_sums(vm, f"/sys/fs/cgroup{group}"), uid=str(UID))


def test_the_users_init_scope_is_not_the_systems(vm, exporter, user_units):
    """No user bus here, so no user dbus.service: the user manager's own init.scope (systemd
    --user and sd-pam) is the unit named like a system one."""
    m = exporter.scrape()
    [system] = m.series("systemd_unit_info", unit="init.scope", uid=None)
    [user] = m.series("systemd_unit_info", unit="init.scope", uid=str(UID))
    assert system.labels["control_group"] == "/init.scope"
    assert user.labels["control_group"] == _user_show(vm, "init.scope", "ControlGroup")["ControlGroup"] \
        == f"{MANAGER_CGROUP}/init.scope"
    # both have their own cgroup figures on v2, and they differ
    system_usage = m.value("systemd_unit_memory_bytes", unit="init.scope", uid=None, type="cgroup_usage")
    user_usage = m.value("systemd_unit_memory_bytes", unit="init.scope", uid=str(UID), type="cgroup_usage")
    assert system_usage > 0 and user_usage > 0 and system_usage != user_usage
    procs = vm.read_text(f"/sys/fs/cgroup{MANAGER_CGROUP}/init.scope/cgroup.procs").split()
    assert m.value("systemd_unit_processes", unit="init.scope", uid=str(UID)) == len(procs) >= 1


def test_user_units_are_inside_their_manager(vm, exporter, user_units):
    """Host totals on v2 come from the top-level cgroups; user units are below user@UID.service,
    whose usage already holds theirs."""
    m = exporter.scrape()
    manager = m.value("systemd_unit_memory_bytes", unit=f"user@{UID}.service", uid=None, type="cgroup_usage")
    inside = sum(m.value("systemd_unit_memory_bytes", unit=u, uid=str(UID), type="cgroup_usage")
                 for u in user_units.values())
    assert manager >= inside >= 60 * MiB
    top_level = [s for s in m.series("systemd_unit_info", uid=None) if s.labels["control_group"].count("/") == 1
                 and s.labels["control_group"] != "/"]
    assert all("uid" not in s.labels for s in top_level)
    assert "user.slice" in {s.labels["unit"] for s in top_level}


def test_series_vanish_when_the_user_unit_stops(vm, exporter, user_units):
    unit = "th-user-short.service"
    started = vm.run(_as_user("systemd-run", "--user", "--quiet", "--collect", f"--unit={unit}",
                              "-p", "Type=notify", "--", "python3", "-c", PAYLOAD, "anon", "5"), timeout=120)
    assert started.returncode == 0, started.stderr
    assert exporter.next_sample().series("systemd_unit_info", unit=unit, uid=str(UID))
    vm.run(_as_user("systemctl", "--user", "stop", unit), check=True)
    assert not exporter.next_sample().series("systemd_unit_info", unit=unit)


# --------------------------------------------------------------------------- container scopes
SCOPE_START = (
    # systemd-run --scope runs its command in the foreground: detach it from the agent's pipes.
    'setsid systemd-run --quiet --scope --unit="$1" --slice="$2" -p MemoryAccounting=yes '
    '-- python3 -c "$0" anon "$3" </dev/null >/dev/null 2>&1 &'
)


@pytest.fixture(scope="module")
def container_scopes(vm):
    scopes = {"podman": (f"libpod-{os.urandom(32).hex()}.scope", "machine.slice", 30),
              "docker": (f"docker-{os.urandom(32).hex()}.scope", "system.slice", 40)}
    for unit, slice_name, mib in scopes.values():
        ready = f"/run/{unit}.ready"
        vm.run(["env", f"READY_FILE={ready}", "sh", "-c", SCOPE_START, PAYLOAD, unit, slice_name, str(mib)], check=True)
        wait_until(lambda: vm.exists(ready), 60, what=f"{unit} to hold {mib} MiB")
    yield scopes
    vm.run(["systemctl", "stop", *(unit for unit, _, _ in scopes.values())])


def test_container_scopes_are_reported_like_services(vm, exporter, container_scopes):
    mismatched = {}
    for _attempt in range(5):
        m = exporter.next_sample()
        mismatched = {}
        for runtime, (unit, slice_name, mib) in container_scopes.items():
            [info] = m.series("systemd_unit_info", unit=unit, uid=None)
            assert info.labels["unit_type"] == "scope"
            assert info.labels["control_group"] == f"/{slice_name}/{unit}" == vm.unit_property(unit, "ControlGroup")
            assert m.value("systemd_unit_memory_bytes", unit=unit, type="rss_anon") >= mib * MiB
            assert m.value("systemd_unit_memory_stat_bytes", unit=unit, item="anon") >= mib * MiB
            usage = m.value("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage")
            current = int(vm.unit_property(unit, "MemoryCurrent"))
            print(f"{unit}: cgroup_usage={usage:.0f} MemoryCurrent={current}")
            if usage != pytest.approx(current, rel=0.02):
                mismatched[unit] = (usage, current)
        if not mismatched:
            break
    assert not mismatched, f"cgroup_usage differs from MemoryCurrent by more than 2 % five times: {mismatched}"
    for unit, _, _ in container_scopes.values():
        expected = proc_sums(vm, f"/sys/fs/cgroup{vm.unit_property(unit, 'ControlGroup')}")
        assert expected["processes"] == 1
        check_rss_is_proc_sums(exporter.scrape(), unit, expected, uid=None)
