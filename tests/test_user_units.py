"""User managers' units, found in the cgroup tree below user@UID.service (exporter/systemd.py
says why not over their buses): the walk as a pure function on hand-built trees, shaped like
the tree systemd 252 made in the test host for `systemd-run --user --unit=x` as uid 1500."""

from __future__ import annotations

import os

from exporter.systemd import UnitFilter, unit_name_of_cgroup, user_manager_uid, user_units_in_tree

MANAGER = "/user.slice/user-1500.slice/user@1500.service"

# child cgroup names per cgroup path (what `find /sys/fs/cgroup/unified/user.slice -type d` shows,
# plus a rootless-podman-like delegated subtree and a non-unit directory)
TREE = {
    MANAGER: ["app.slice", "init.scope", "session.slice", "user.slice"],
    f"{MANAGER}/app.slice": ["dbus.socket", "dbus.service", "x.service", "app-th\\x2dweb.slice", "_cpu.service"],
    f"{MANAGER}/app.slice/app-th\\x2dweb.slice": ["web@1.service"],
    f"{MANAGER}/app.slice/x.service": ["worker"],  # a service's own sub-cgroup: not a unit
    f"{MANAGER}/session.slice": [],
    f"{MANAGER}/user.slice": ["libpod-0123abcd.scope"],
    f"{MANAGER}/user.slice/libpod-0123abcd.scope": ["container"],
    f"{MANAGER}/init.scope": [],
}


def _walk(unit_filter=None):
    return user_units_in_tree(MANAGER, 1500, lambda cg: TREE.get(cg, []), unit_filter or UnitFilter.build())


def test_every_unit_below_the_manager_is_found_with_its_uid_and_cgroup():
    units = {u.name: u for u in _walk()}
    assert set(units) == {
        "app.slice", "init.scope", "session.slice", "user.slice", "dbus.socket", "dbus.service", "x.service",
        "app-th\\x2dweb.slice", "web@1.service", "libpod-0123abcd.scope", "cpu.service",
    }
    assert all(u.uid == 1500 for u in units.values())
    assert units["x.service"].control_group == f"{MANAGER}/app.slice/x.service"
    assert units["web@1.service"].control_group == f"{MANAGER}/app.slice/app-th\\x2dweb.slice/web@1.service"
    assert units["x.service"].type == "service" and units["libpod-0123abcd.scope"].type == "scope"
    # the tree does not tell the sub-state: empty (absent), never made up
    assert {(u.active_state, u.sub_state) for u in units.values()} == {("active", "")}


def test_subtrees_of_services_and_scopes_are_not_units():
    names = {u.name for u in _walk()}
    assert "worker" not in names and "container" not in names


def test_escaped_cgroup_name_is_the_unit_name():
    # systemd's cg_escape prefixes "_" to names that could clash with kernel files (cpu.*)
    unit = next(u for u in _walk() if u.name == "cpu.service")
    assert unit.control_group.endswith("/_cpu.service")
    assert unit_name_of_cgroup("_cpu.service") == "cpu.service"
    assert unit_name_of_cgroup("x.service") == "x.service"


def test_unit_filter_applies_to_user_units_but_slices_are_still_walked():
    units = _walk(UnitFilter.build(include=r"web@.*", types=("service",)))
    assert [u.name for u in units] == ["web@1.service"]


def test_user_manager_uid():
    assert user_manager_uid("user@1500.service") == 1500
    assert user_manager_uid("user@0.service") == 0
    for name in ("user-1500.slice", "user@.service", "user@15x.service", "user-runtime-dir@1500.service"):
        assert user_manager_uid(name) is None


def test_names_a_user_could_mkdir_that_systemd_never_would_are_counted_not_units(tmp_path):
    """The tree below user@UID.service is the user's (delegated): a real directory tree with
    names systemd's unit_name_is_valid() refuses, and one name in two slices."""
    from exporter.systemd import cgroup_subdirectories

    root = tmp_path / "m"
    for path in ("app.slice/x.service", "app.slice/ok@1.service", "b.slice/x.service", "app.slice/a b.service",
                 "app.slice/grüß.service"):
        (root / path).mkdir(parents=True)
    os.mkdir(os.fsencode(str(root / "app.slice")) + b"/a\xff.service")  # not UTF-8: scandir gives 'a\udcff.service'
    failures: list = []
    units = user_units_in_tree("/m", 1500, cgroup_subdirectories(str(tmp_path), failures), UnitFilter.build(), failures)
    assert sorted(u.name for u in units) == ["app.slice", "b.slice", "ok@1.service", "x.service"]
    assert [u.control_group for u in units if u.name == "x.service"] == ["/m/app.slice/x.service"]  # the first kept
    assert len({u.key for u in units}) == len(units)
    assert sorted(f[2].split(":")[0] for f in failures) == ["a second cgroup of unit 'x.service', skipped",
                                                             "not a valid unit name", "not a valid unit name",
                                                             "not a valid unit name"]
    assert {f[0] for f in failures} == {"rejected"}
    assert all(f[2].isascii() for f in failures)  # logged and sent to the sampler as repr


def test_units_beyond_the_cap_are_skipped_and_counted_once():
    from exporter.systemd import MAX_USER_UNITS

    tree = {MANAGER: ["app.slice"], f"{MANAGER}/app.slice": [f"s{i:05}.service" for i in range(MAX_USER_UNITS + 50)]}
    failures: list = []
    units = user_units_in_tree(MANAGER, 1500, lambda cg: tree.get(cg, []), UnitFilter.build(), failures)
    assert len(units) == MAX_USER_UNITS and units[0].name == "app.slice"
    assert len(failures) == 1 and failures[0][0] == "rejected" and f"more than {MAX_USER_UNITS} units" in failures[0][2]


def test_the_cap_counts_the_units_reported_not_those_filtered_out():
    """A narrow --unit.include must not lose its units to a user's many others; the walk is
    still bounded (MAX_USER_CGROUPS) when nearly everything is filtered out."""
    from exporter.systemd import MAX_USER_CGROUPS, MAX_USER_UNITS

    names = [f"s{i:05}.service" for i in range(MAX_USER_UNITS + 50)] + ["wanted.service"]
    tree = {MANAGER: ["app.slice"], f"{MANAGER}/app.slice": names}
    failures: list = []
    units = user_units_in_tree(MANAGER, 1500, lambda cg: tree.get(cg, []), UnitFilter.build(include="wanted.service"), failures)
    assert [u.name for u in units] == ["wanted.service"] and failures == []
    flood = {MANAGER: ["app.slice"], f"{MANAGER}/app.slice": [f"s{i:06}.service" for i in range(MAX_USER_CGROUPS + 5)]}
    units = user_units_in_tree(MANAGER, 1500, lambda cg: flood.get(cg, []), UnitFilter.build(include="wanted.service"), failures)
    assert units == [] and len(failures) == 1 and failures[0][0] == "rejected"


def scrape_with_tree_failures(failures: list):
    """/metrics of one cycle over the v2 fixture tree, as if the discovery child's user-unit walk
    had met ``failures`` (reason, where, message)."""
    from exporter.render import render
    from exporter.sampler import Sampler, SamplerConfig
    from exporter.systemd import DiscoveryResult
    from tests.test_sampler import FIXTURES, load_units
    from tests.truth import Scrape

    tree = FIXTURES / "v2"
    found = DiscoveryResult(load_units(tree), True, "", 1.0, "system_bus", tree_failures=tuple(failures))
    sampler = Sampler(SamplerConfig(procfs=str(tree / "proc"), cgroupfs=str(tree / "sys/fs/cgroup")), lambda: found)
    return Scrape.parse(render(sampler.sample()).decode())


def test_rejected_names_are_counted_and_leave_the_cgroup_source_up(tmp_path):
    """Any user can mkdir a name systemd would never give a unit in their delegated tree: it is
    counted (reason rejected), but the cgroup source stays up, so SystemdMemoryExporterSourceDown
    cannot be fired by a user's mkdir."""
    from exporter.systemd import cgroup_subdirectories

    (tmp_path / "m" / "app.slice" / "a b.service").mkdir(parents=True)
    failures: list = []
    user_units_in_tree("/m", 1500, cgroup_subdirectories(str(tmp_path), failures), UnitFilter.build(), failures)
    m = scrape_with_tree_failures(failures)
    assert m.value("systemd_memory_exporter_errors_total", source="cgroup", reason="rejected") == 1
    assert m.value("systemd_memory_exporter_source_up", source="cgroup") == 1


LOCKED_TREE_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from exporter.sampler import Sampler, SamplerConfig
from exporter.systemd import DiscoveryResult, UnitFilter, cgroup_subdirectories, user_units_in_tree
root, procfs, manager = sys.argv[2:5]
failures = []
units = user_units_in_tree(manager, 1500, cgroup_subdirectories(root, failures), UnitFilter.build(), failures)
found = DiscoveryResult(tuple(units), True, "", 1.0, "system_bus", tree_failures=tuple(failures))
snapshot = Sampler(SamplerConfig(procfs=procfs, cgroupfs=root, kept_files=0), lambda: found).sample()
print(json.dumps({"units": [u.name for u in units], "up": snapshot.sources["cgroup"].up,
                  "errors": {"/".join(k): v for k, v in snapshot.errors.items()}}))
"""


def test_a_users_locked_cgroups_are_counted_and_leave_the_cgroup_source_up(tmp_path):
    """systemd chowns user@UID.service's tree to the user, who may chmod 000 a slice or a file
    of it; the exporter runs unprivileged (deploy/systemd), so the walk and the reads there get
    EACCES. Counted (reason permission), but source_up{cgroup} stays 1: else any user could fire
    SourceDown. The refusals are the kernel's: the v2 fixture copied, the user's tree built in it,
    locked, and walked as nobody (root reads through the lock)."""
    import json
    import shutil
    import subprocess
    import tempfile

    from exporter.memory import V2_FILES
    from tests.test_sampler import FIXTURES

    assert os.geteuid() == 0, "needs root, to walk the tree as nobody (setpriv)"

    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:  # not tmp_path: its parent is 0700
        base = os.path.join(scratch, "t")
        shutil.copytree(FIXTURES / "v2", base, symlinks=True)
        shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "exporter"), os.path.join(base, "pkg", "exporter"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        root = os.path.join(base, "sys", "fs", "cgroup")
        user_tree = root + MANAGER
        for unit in ("app.slice/open.service", "app.slice/locked.slice/inner.service"):
            os.makedirs(os.path.join(user_tree, unit))
        for name in ("memory.current", "memory.stat", "cgroup.procs"):
            shutil.copy(os.path.join(root, "init.scope", name), os.path.join(user_tree, "app.slice/open.service", name))
        os.chmod(os.path.join(user_tree, "app.slice/open.service/memory.stat"), 0)
        os.chmod(os.path.join(user_tree, "app.slice/locked.slice"), 0)
        for directory, _, _ in os.walk(scratch):
            if not directory.endswith("locked.slice"):
                os.chmod(directory, 0o755)
        try:
            ran = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
                                  "-c", LOCKED_TREE_SCRIPT, os.path.join(base, "pkg"), root, os.path.join(base, "proc"),
                                  MANAGER], capture_output=True, text=True, timeout=60, cwd=scratch)
        finally:
            os.chmod(os.path.join(user_tree, "app.slice/locked.slice"), 0o755)  # so the directory can be removed
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert "open.service" in result["units"] and "locked.slice" in result["units"]
    # At least the locked slice's memory files and memory.pressure, and open.service's memory.stat
    # (its listing and cgroup.procs are refused too).
    assert result["errors"].get("cgroup/permission", 0) >= len(V2_FILES) + 2, result
    assert result["up"], result


# --------------------------------------------------------------------------- a real user manager
# In the test host (systemd 252, cgroup v1 hybrid): useradd, user@1500.service, units started
# with `systemd-run --user -M u@`, every figure checked against `systemctl --user -M u@ show`
# and /proc. The v2 counterpart is tests/vm/test_v2_user_units.py.

import pytest  # noqa: E402

from tests.testhost import workloads  # noqa: E402
from tests.truth import MiB, check_rss_is_proc_sums, exporter_in_host, proc_sums  # noqa: E402

USER, UID = "u", 1500
INTERVAL = 1.0


@pytest.fixture(scope="module")
def user_units(testhost):
    workloads.user_manager(testhost, USER, UID)
    units = {"hog": workloads.user_payload(testhost, USER, "th-user-hog.service", "anon", 60),
             "multi": workloads.user_payload(testhost, USER, "th-user-multi.service", "multi", 2, 10),
             # rootless podman's shape: user@UID.service/user.slice/libpod-<id>.scope
             "podman": workloads.user_scope(testhost, USER, UID, f"libpod-{workloads.container_id()}.scope")}
    # the user's own dbus.service, started by socket activation, named like the system's
    workloads.user_systemctl(testhost, USER, "start", "dbus.service")
    yield units
    workloads.stop_user_units(testhost, USER, units.values())
    testhost.systemctl("stop", f"user@{UID}.service", check=False)


@pytest.fixture(scope="module")
def exporter(testhost, user_units):
    with exporter_in_host(testhost, INTERVAL) as client:
        client.next_sample()
        yield client


@pytest.mark.e2e
def test_user_unit_is_reported_with_its_uid(testhost, exporter, user_units):
    m = exporter.scrape()
    unit = user_units["hog"]
    show = workloads.user_show(testhost, USER, unit, "ControlGroup", "MemoryCurrent", "ActiveState")
    [info] = m.series("systemd_unit_info", unit=unit, uid=str(UID))
    assert info.labels["control_group"] == show["ControlGroup"] == f"/user.slice/user-{UID}.slice/user@{UID}.service/app.slice/{unit}"
    assert info.labels["unit_type"] == "service" and info.labels["active_state"] == show["ActiveState"] == "active"
    assert m.value("systemd_unit_memory_bytes", unit=unit, uid=str(UID), type="rss_anon") >= 60 * MiB


@pytest.mark.e2e
def test_rootless_container_scope_is_a_user_unit(testhost, exporter, user_units):
    m = exporter.scrape()
    scope = user_units["podman"]
    [info] = m.series("systemd_unit_info", unit=scope, uid=str(UID))
    assert info.labels["unit_type"] == "scope"
    assert info.labels["control_group"] == f"/user.slice/user-{UID}.slice/user@{UID}.service/user.slice/{scope}" \
        == workloads.user_show(testhost, USER, scope, "ControlGroup")["ControlGroup"]
    assert m.value("systemd_unit_memory_bytes", unit=scope, uid=str(UID), type="rss_anon") >= 20 * MiB


@pytest.mark.e2e
def test_user_unit_figures_match_systemctl_user_and_proc(testhost, exporter, user_units):
    """RSS sums equal /proc's; on v1/hybrid no cgroup figure at all, as systemctl --user shows."""
    for unit in user_units.values():
        show = workloads.user_show(testhost, USER, unit, "ControlGroup", "MemoryCurrent")
        assert show["MemoryCurrent"] == "[not set]"  # no memory delegation to user managers on v1
        m = exporter.scrape()
        check_rss_is_proc_sums(m, unit, proc_sums(testhost, f"/sys/fs/cgroup/unified{show['ControlGroup']}"), uid=str(UID))
        for kind in ("cgroup_usage", "page_cache", "swap"):
            assert not m.series("systemd_unit_memory_bytes", unit=unit, type=kind), (unit, kind)
        for family in ("systemd_unit_memory_stat_bytes", "systemd_unit_memory_working_set_bytes",
                       "systemd_unit_memory_limit_bytes", "systemd_unit_memory_events_total"):
            assert not m.series(family, unit=unit), (unit, family)
    assert m.value("systemd_unit_processes", unit=user_units["multi"], uid=str(UID)) == 3
    assert m.value("systemd_unit_processes", unit=user_units["podman"], uid=str(UID)) == 1


@pytest.mark.e2e
def test_a_users_dbus_service_never_collides_with_the_systems(testhost, exporter, user_units):
    m = exporter.scrape()
    system = m.series("systemd_unit_info", unit="dbus.service", uid=None)
    user = m.series("systemd_unit_info", unit="dbus.service", uid=str(UID))
    assert len(system) == 1 and len(user) == 1
    assert system[0].labels["control_group"] == testhost.unit_cgroup("dbus.service") == "/system.slice/dbus.service"
    assert user[0].labels["control_group"] == workloads.user_show(testhost, USER, "dbus.service", "ControlGroup")["ControlGroup"]
    # the system's keeps its cgroup figures, the user's has none (hybrid)
    assert m.value("systemd_unit_memory_bytes", unit="dbus.service", uid=None, type="cgroup_usage") > 0
    assert not m.series("systemd_unit_memory_bytes", unit="dbus.service", uid=str(UID), type="cgroup_usage")
    # so do the two init.scopes: PID 1's, and the user manager's own (systemd --user, sd-pam)
    assert m.value("systemd_unit_processes", unit="init.scope", uid=None) == 1
    user_init = testhost.path(f"/sys/fs/cgroup/unified/user.slice/user-{UID}.slice/user@{UID}.service/init.scope/cgroup.procs")
    assert m.value("systemd_unit_processes", unit="init.scope", uid=str(UID)) == len(user_init.read_text().split()) >= 1


@pytest.mark.e2e
def test_a_user_managers_rss_covers_its_units_and_system_units_fit_in_the_host(testhost, exporter, user_units):
    """User units lie below user@UID.service, which holds their processes already: the manager's
    rss_anon covers its units', and the units without uid hold no more processes than -.slice.
    That host totals count no user unit twice is the recording rules' business, tested with
    promtool on a host with user units in tests/rules/recording-rules.test.yml ("Host totals
    with user units")."""
    m = exporter.scrape()
    manager = m.value("systemd_unit_memory_bytes", unit=f"user@{UID}.service", uid=None, type="rss_anon")
    inside = sum(s.value for s in m.series("systemd_unit_memory_bytes", uid=str(UID), type="rss_anon")
                 if s.labels["unit"] in user_units.values())
    assert manager >= inside >= 80 * MiB
    every_pid = m.value("systemd_unit_processes", unit="-.slice", uid=None)
    system_non_slices = sum(s.value for s in m.series("systemd_unit_processes", uid=None)
                            if not s.labels["unit"].endswith(".slice"))
    assert system_non_slices <= every_pid  # units without uid partition the machine's processes


@pytest.mark.e2e
def test_promtool_is_clean_with_user_units(exporter, user_units):
    import subprocess
    body = exporter.scrape_text()
    assert 'uid="1500"' in body
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.e2e
def test_explain_names_the_user(testhost, user_units):
    out = testhost.run(["python3", "-m", "exporter", "explain", user_units["hog"]]).stdout
    assert f"{user_units['hog']} (uid {UID})  (active, 1 process" in out, out
    assert "MemoryCurrent [not set]" in out


@pytest.mark.e2e
def test_no_collector_user_units_turns_them_off(testhost, user_units):
    with exporter_in_host(testhost, INTERVAL, "--no-collector.user-units") as client:
        client.next_sample()
        m = client.scrape()
    assert not [s for s in m.samples if "uid" in s.labels]
    assert m.value("systemd_unit_processes", unit=f"user@{UID}.service") >= 3  # the manager still, as a whole


from tests.test_deploy_unit import installed_unit  # noqa: E402,F401  (the hardened unit, installed in the host)


@pytest.mark.e2e
def test_the_hardened_unit_reports_user_units(testhost, user_units, installed_unit):
    """Why the cgroup tree and not the users' buses: the shipped unit (no root, no capabilities,
    ProtectHome=yes) cannot open /run/user/UID/bus, yet it reports every user's units."""
    import time
    import urllib.request

    from tests.truth import Scrape

    unit = user_units["hog"]
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{installed_unit}/metrics", timeout=10) as r:
                m = Scrape.parse(r.read().decode())
        except OSError:  # still starting
            m = Scrape([])
        found = m.series("systemd_unit_memory_bytes", unit=unit, uid=str(UID), type="rss_anon")
        if found and found[0].value >= 60 * MiB:
            break
        assert time.monotonic() < deadline, "the hardened unit did not report the user's unit"
        time.sleep(0.5)
    main_pid = testhost.systemctl("show", "-P", "MainPID", "systemd-memory-exporter.service").strip()
    status = testhost.run(["cat", f"/proc/{main_pid}/status"]).stdout
    assert "CapEff:\t0000000000000000" in status
    # and the user's bus is out of its reach: the sandbox hides /run/user
    probe = testhost.run(["systemd-run", "--wait", "--pipe", "--quiet", "-p", "User=systemd-memory-exporter",
                          "-p", "ProtectHome=yes", "test", "-e", f"/run/user/{UID}/bus"], check=False)
    assert probe.returncode != 0


# --------------------------------------------------------------------------- sampler and render
def test_a_user_unit_named_like_a_system_unit_keeps_its_own_figures():
    """Samples are keyed by Unit.key: a user's dbus.service never takes the system's figures.
    The v2 fixture tree, with smx-anon-1.service's cgroup standing in for a user's dbus.service."""
    import dataclasses
    import subprocess

    from exporter.render import render
    from tests.test_sampler import FIXTURES, load_units, sample_tree
    from tests.truth import Scrape

    tree = FIXTURES / "v2"
    units = load_units(tree)
    anon = next(u for u in units if u.name == "smx-anon-1.service")
    user_dbus = dataclasses.replace(anon, name="dbus.service", uid=1500)
    snapshot = sample_tree(tree, units + (user_dbus,))
    system, user = (next(s for s in snapshot.units if s.unit.key == k) for k in ("dbus.service", "dbus.service (uid 1500)"))
    assert user.memory.usage == snapshot.unit("smx-anon-1.service").memory.usage != system.memory.usage
    text = render(snapshot).decode()
    m = Scrape.parse(text)
    assert m.value("systemd_unit_memory_bytes", unit="dbus.service", uid="1500", type="cgroup_usage") == user.memory.usage
    assert m.value("systemd_unit_memory_bytes", unit="dbus.service", uid=None, type="cgroup_usage") == system.memory.usage
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_explain_names_a_user_unit_and_why_it_has_no_cgroup_figures():
    from exporter.explain import explain_text, reconcile
    from exporter.procfs import ProcessTotals
    from exporter.snapshot import UnitSample
    from exporter.systemd import Unit

    unit = Unit("x.service", "service", "active", "", f"{MANAGER}/app.slice/x.service", 1500)
    text = explain_text(reconcile(UnitSample(unit, ProcessTotals(1, 60 << 20, 6 << 20, 0, 0), None)))
    assert text.splitlines()[0] == f"x.service (uid 1500)  (active, 1 process, cgroup {MANAGER}/app.slice/x.service)"
    assert "no memory controller" in text and "MemoryCurrent [not set]" in text
    system = explain_text(reconcile(UnitSample(Unit("x.service", "service", "active", "running", "/system.slice/x.service"),
                                               ProcessTotals(1, 60 << 20, 6 << 20, 0, 0), None)))
    assert system.splitlines()[0].startswith("x.service  (active/running, 1 process")
    assert "MemoryAccounting=no" in system


def test_a_cgroup_the_walk_cannot_list_is_counted_not_fatal(tmp_path):
    """The walk's reader maps errno at the error boundary: gone is nothing, anything else is a
    failure the sampler counts as errors_total{source="cgroup"}; the other units stay."""
    from exporter.systemd import cgroup_subdirectories

    (tmp_path / "m" / "app.slice" / "x.service").mkdir(parents=True)
    # As root nothing is unreadable: a file where a directory should be fails with ENOTDIR.
    (tmp_path / "m" / "broken.slice").write_text("not a directory")
    failures: list = []
    listing = cgroup_subdirectories(str(tmp_path), failures)
    assert [u.name for u in user_units_in_tree("/m", 1500, listing, UnitFilter.build())] == ["app.slice", "x.service"]
    assert listing("/gone") == [] and not failures  # vanished: missing data, not an error
    assert listing("/m/broken.slice") == []
    assert len(failures) == 1 and failures[0][0] == "io" and failures[0][1].endswith("/m/broken.slice")

    m = scrape_with_tree_failures(failures)
    assert m.value("systemd_memory_exporter_errors_total", source="cgroup", reason="io") == 1
    assert m.value("systemd_memory_exporter_source_up", source="cgroup") == 0
    assert m.value("systemd_unit_memory_bytes", unit="dbus.service", type="cgroup_usage") > 0
