"""User managers' units, found in the cgroup tree below user@UID.service (exporter/systemd.py
says why not over their buses): the walk as a pure function on hand-built trees, shaped like
the tree systemd 252 made in the test host for `systemd-run --user --unit=x` as uid 1500."""

from __future__ import annotations

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
