"""Discovery.refresh (exporter/systemd.py) against the real systemd and D-Bus of the test host:
its ControlGroup cache (one Get per new, changed or moved unit, none for a unit seen before), a
unit whose object is gone by the time of its Get (skipped, the rest still returned), running
units whose unit file is gone, masked or broken (still reported), and a frozen systemd (a
timeout, as errors_total counts it)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess

import pytest

from tests.testhost import workloads
from tests.truth import exporter_in_host

pytestmark = pytest.mark.e2e

# Runs inside the host: the real Discovery, on the real bus. It only records the ControlGroup
# reads it makes (a spy: each still goes to systemd) and, when asked, adds to ListUnits' answer a
# unit whose object does not exist, as a unit that went away between ListUnits and Get looks.
# With a cgroup hierarchy as its argument (the exporter's cgroup_root, and user_units_root unless
# "no-user-units" follows, as --no-collector.user-units), it also checks its cached control
# groups there and answers each unit's.
SESSION = r"""
import json, sys
from exporter.systemd import Discovery, ListedUnit, UnitFilter

root = sys.argv[1] if len(sys.argv) > 1 else None
user_units = sys.argv[2:] != ["no-user-units"]

class Recording(Discovery):
    ghost = False
    gets = []

    def _list_units(self, bus):
        listed = Discovery._list_units(bus)
        if self.ghost:
            listed.append(ListedUnit("th-disc-ghost.service", "active", "running",
                                     b"/org/freedesktop/systemd1/gone/th_2ddisc_2dghost_2eservice"))
        return listed

    def _control_group(self, bus, unit):
        self.gets.append(unit.name)
        return super()._control_group(bus, unit)

discovery = Recording(UnitFilter.build("th-disc-.*"), user_units_root=root if user_units else None, cgroup_root=root)
for line in sys.stdin:
    discovery.ghost = line.strip() == "ghost"
    discovery.gets.clear()
    units = discovery.refresh()
    answer = {"units": sorted(u.name for u in units), "gets": sorted(discovery.gets),
              "connected": discovery._bus is not None}
    if root:
        answer["cgroups"] = {u.name: u.control_group for u in units if u.uid is None}
    print(json.dumps(answer), flush=True)
"""


class Session:
    def __init__(self, host, *args: str, script: str = SESSION):
        self.proc = host.popen(["python3", "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    def refresh(self, command: str = "refresh") -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        # Every D-Bus call has $SYSTEMD_BUS_TIMEOUT (5 s); the deadline is for a child stuck elsewhere.
        # One line per request, so nothing waits in stdout's buffer when select() is asked.
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, "the discovery session did not answer within 60 s"
        line = self.proc.stdout.readline()
        assert line, f"the discovery session ended: {self.proc.stderr.read()}"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_control_groups_are_read_once_per_new_or_changed_unit(testhost):
    first = workloads.start_unit(testhost, "th-disc-1.service", ["sleep", "600"])
    session = Session(testhost)
    started = [first]
    try:
        assert session.refresh() == {"units": [first], "gets": [first], "connected": True}
        assert session.refresh()["gets"] == []  # nothing new, nothing changed: no Get at all
        second = workloads.start_unit(testhost, "th-disc-2.service", ["sleep", "600"])
        started.append(second)
        assert session.refresh() == {"units": [first, second], "gets": [second], "connected": True}
        workloads.stop_units(testhost, [first])
        assert session.refresh() == {"units": [second], "gets": [], "connected": True}
        # Started again under the same name, it is new again: its entry left with it.
        workloads.start_unit(testhost, first, ["sleep", "600"])
        assert session.refresh() == {"units": [first, second], "gets": [first], "connected": True}
    finally:
        session.close()
        workloads.stop_units(testhost, started)


def test_a_unit_gone_before_its_get_is_skipped_and_the_rest_returned(testhost):
    unit = workloads.start_unit(testhost, "th-disc-3.service", ["sleep", "600"])
    session = Session(testhost)
    try:
        answer = session.refresh("ghost")  # systemd answers UnknownObject for the ghost's Get
        assert answer == {"units": [unit], "gets": [unit, "th-disc-ghost.service"], "connected": True}
        assert session.refresh()["units"] == [unit]  # the connection was kept, not dropped
    finally:
        session.close()
        workloads.stop_units(testhost, [unit])


@pytest.mark.parametrize("user_units", [True, False], ids=["user-units", "no-user-units"])
def test_a_unit_restarted_into_another_slice_between_two_refreshes_has_its_new_cgroup(testhost, user_units):
    """Stopped and started again into another slice (systemd-run --unit=X --slice=Y once more)
    between two refreshes, the unit is active/running both times: the state pair alone kept the
    old path, whose reads find nothing, so the sampler dropped the unit. Its old directory is
    gone, which one stat shows, and that costs one Get; with --no-collector.user-units too."""
    unit = "th-disc-moved.service"
    session = Session(testhost, f"/sys/fs/cgroup/{testhost.procs_hierarchy}", *([] if user_units else ["no-user-units"]))
    try:
        workloads.start_unit(testhost, unit, ["sleep", "600"], slice="thmoveda.slice")
        before = testhost.unit_cgroup(unit)
        first = session.refresh()
        assert unit in first["gets"] and first["cgroups"][unit] == before
        assert unit not in session.refresh()["gets"]  # seen before, still there: no Get
        workloads.stop_units(testhost, [unit])
        workloads.start_unit(testhost, unit, ["sleep", "600"], slice="thmovedb.slice")
        after = testhost.unit_cgroup(unit)
        assert after != before
        moved = session.refresh()
        assert moved["cgroups"][unit] == after, f"still the old cgroup {before}"
        assert unit in moved["gets"]
        assert unit not in session.refresh()["gets"]  # once, not every cycle
    finally:
        session.close()
        workloads.stop_units(testhost, [unit, "thmoveda.slice", "thmovedb.slice"])


# Holds 8 MiB it wrote (bytes multiplied, so every page is touched): a unit with memory to show.
HOLDER = "import time; held = bytes(range(256)) * 32768; time.sleep(600)"


def test_running_units_whose_file_is_gone_masked_or_broken_are_reported_with_their_memory(testhost):
    """A running unit whose file was removed (not-found), that was masked (masked) or edited
    into a broken file (bad-setting) and daemon-reloaded keeps its cgroup and its memory, and
    systemctl list-units shows it: the exporter dropped every unit whose load state was not
    "loaded"."""
    units = {"th-disc-removed.service": "not-found", "th-disc-masked.service": "masked",
             "th-disc-broken.service": "bad-setting"}
    files = {unit: f"/run/systemd/system/{unit}" for unit in units}
    for unit, path in files.items():
        testhost.write_file(path, f"[Service]\nExecStart={testhost.python} -c \"{HOLDER}\"\n")
    testhost.systemctl("daemon-reload")
    try:
        testhost.systemctl("start", *units)
        testhost.path(files["th-disc-removed.service"]).unlink()
        testhost.systemctl("mask", "th-disc-masked.service")  # /etc/systemd/system/… -> /dev/null
        testhost.write_file(files["th-disc-broken.service"], "[Service]\n")  # no ExecStart=: bad-setting
        testhost.systemctl("daemon-reload")
        shown = {unit: testhost.show(unit, "LoadState", "ActiveState", "MemoryCurrent", "ControlGroup") for unit in units}
        for unit, load_state in units.items():
            assert (shown[unit]["LoadState"], shown[unit]["ActiveState"]) == (load_state, "active"), shown[unit]
        # At that daemon-reload, systemd 252 takes the memory cgroup (v1) from the not-found and
        # masked units: their processes are charged to system.slice, and MemoryCurrent is
        # [not set]. The bad-setting one keeps it.
        assert shown["th-disc-broken.service"]["MemoryCurrent"] != "[not set]"
        with exporter_in_host(testhost, 0.5) as exporter:
            exporter.next_sample()
            m = exporter.scrape()
        for unit in units:
            assert m.get("systemd_unit_info", unit=unit, unit_type="service", active_state="active",
                         control_group=shown[unit]["ControlGroup"]) == 1, f"{unit} not reported"
            assert m.value("systemd_unit_memory_bytes", unit=unit, type="rss_anon") >= 8 << 20, unit
            assert m.value("systemd_unit_processes", unit=unit) == 1, unit
            usage = m.get("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage")
            if shown[unit]["MemoryCurrent"] == "[not set]":
                assert usage is None, f"{unit}: systemd has no MemoryCurrent, the exporter must not invent one"
            else:
                assert usage == pytest.approx(int(shown[unit]["MemoryCurrent"]), rel=0.05), unit
    finally:
        testhost.systemctl("stop", *units, check=False)
        testhost.systemctl("unmask", "th-disc-masked.service", check=False)
        for path in files.values():
            testhost.path(path).unlink(missing_ok=True)
        testhost.systemctl("daemon-reload")
        workloads.stop_units(testhost, units)


# Runs inside the host: the exporter's own client of the discovery child, one request per line.
FROZEN_SESSION = r"""
import json, sys
from exporter.discovery_process import DiscoveryProcess

client = DiscoveryProcess("th-disc-.*", "", ["service"], "/run/systemd/private", 1.0)
for line in sys.stdin:
    result = client.request(wait=20)
    print(json.dumps({"ok": result.ok, "failure": result.failure, "message": result.message}), flush=True)
client.stop()
"""


def test_a_frozen_systemd_is_a_timeout_not_an_unavailable_bus(testhost):
    """systemd stopped (SIGSTOP) while dbus-daemon runs: the child's ListUnits gets no answer
    within --dbus.timeout, and sd-bus hands that back as an error reply ("[err -110]:
    b'Connection timed out'"), which the parent counted as reason="unavailable". The README
    defines that as reason="timeout"."""
    session = Session(testhost, script=FROZEN_SESSION)
    try:
        assert session.refresh()["ok"], "discovery must work before the freeze"
        os.kill(testhost.pid, signal.SIGSTOP)  # the host's systemd, PID 1 of its namespaces only
        try:
            frozen = session.refresh()
        finally:
            os.kill(testhost.pid, signal.SIGCONT)
        assert (frozen["ok"], frozen["failure"]) == (False, "timeout"), frozen["message"]
        assert "timed out" in frozen["message"]
        assert session.refresh()["ok"], "discovery must recover after SIGCONT"
    finally:
        session.close()
