"""Discovery (exporter/systemd.py) on a stand-in bus, no systemd needed: which ControlGroup
reads a refresh makes, and how a failure to reach systemd is classified. The real bus and
systemd are in tests/test_discovery.py."""

from __future__ import annotations

import errno

import pytest
from pystemd.dbusexc import DBusError

from exporter import systemd

UNIT_PATH = b"/org/freedesktop/systemd1/unit/"


class Reply:
    def __init__(self, body):
        self.body = body


class Bus:
    """The calls Discovery makes, answered from ``units``: name -> (active, sub, ControlGroup).
    ``gets`` records the ControlGroup reads."""

    units: dict[str, tuple[str, str, str]] = {}
    gets: list[str] = []

    def __init__(self, *args, **kwargs):
        pass

    def open(self):
        pass

    def call_method(self, destination, path, interface, method, args):
        assert method == b"ListUnits"
        return Reply([[(name.encode(), b"", b"loaded", active.encode(), sub.encode(), b"",
                        UNIT_PATH + name.encode(), 0, b"", b"/") for name, (active, sub, _) in self.units.items()]])

    def get_property(self, destination, path, interface, name, signature):
        if name == b"Version":
            return b"252"
        unit = path[len(UNIT_PATH):].decode()
        self.gets.append(unit)
        return self.units[unit][2].encode()

    def close(self):
        pass


@pytest.fixture
def bus(monkeypatch):
    monkeypatch.setenv("SYSTEMD_BUS_TIMEOUT", "")  # Discovery sets it; restored afterwards
    monkeypatch.setattr(systemd, "_dbuslib", lambda: (Bus, Bus))
    Bus.units, Bus.gets = {}, []
    return Bus


def cgroups(units) -> dict[str, str]:
    return {u.name: u.control_group for u in units}


def test_a_unit_restarted_into_another_cgroup_in_one_interval_has_its_control_group_read_again(bus, tmp_path):
    """Stopped and started again into another slice between two refreshes, the unit is
    active/running both times: the state pair alone kept the old path. Its old directory is
    gone, and that, not the state, costs one Get."""
    (tmp_path / "a.slice/job.service").mkdir(parents=True)
    bus.units["job.service"] = ("active", "running", "/a.slice/job.service")
    discovery = systemd.Discovery(systemd.UnitFilter.build(), "/nonexistent/private", 0.2, str(tmp_path))
    assert cgroups(discovery.refresh()) == {"job.service": "/a.slice/job.service"}
    assert cgroups(discovery.refresh()) == {"job.service": "/a.slice/job.service"}
    assert bus.gets == ["job.service"]  # once: the directory is still there
    (tmp_path / "a.slice/job.service").rmdir()
    (tmp_path / "b.slice/job.service").mkdir(parents=True)
    bus.units["job.service"] = ("active", "running", "/b.slice/job.service")
    assert cgroups(discovery.refresh()) == {"job.service": "/b.slice/job.service"}
    assert cgroups(discovery.refresh()) == {"job.service": "/b.slice/job.service"}
    assert bus.gets == ["job.service", "job.service"]


def test_a_control_group_with_no_directory_is_not_read_again_every_cycle(bus, tmp_path):
    """A path whose directory is not there at its Get (a unit stopping meanwhile, a hierarchy
    systemd does not use) is not asked for at every cycle: one Get per unit per cycle is what
    node_exporter #1201 measured."""
    bus.units["job.service"] = ("active", "running", "/elsewhere.slice/job.service")
    discovery = systemd.Discovery(systemd.UnitFilter.build(), "/nonexistent/private", 0.2, str(tmp_path))
    for _ in range(3):
        assert cgroups(discovery.refresh()) == {"job.service": "/elsewhere.slice/job.service"}
    assert bus.gets == ["job.service"]


@pytest.mark.parametrize("bus_error, failure", [(-errno.ETIMEDOUT, "timeout"), (-errno.ENOENT, "unavailable")],
                         ids=["bus-timed-out", "no-bus"])
def test_connecting_fails_as_a_timeout_when_the_bus_timed_out(monkeypatch, bus, bus_error, failure):
    """Systemd frozen, exporter unprivileged: the system bus takes no answer in time and the
    private socket is refused. That is systemd hung (timeout), not absent (unavailable)."""

    class FailingBus(Bus):
        def __init__(self, *args, **kwargs):
            self.private = bool(args)  # DBusAddress(address, peer_to_peer=True); DBus()

        def open(self):
            if self.private:
                raise DBusError(-errno.EACCES, None, b"Permission denied")

        def get_property(self, *args):
            raise DBusError(bus_error, None, b"system bus failed")

    monkeypatch.setattr(systemd, "_dbuslib", lambda: (FailingBus, FailingBus))
    with pytest.raises(systemd.DiscoveryError) as caught:
        systemd.Discovery(systemd.UnitFilter.build(), "/nonexistent/private", 0.2).refresh()
    assert caught.value.failure == failure, caught.value
