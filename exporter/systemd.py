"""Unit discovery over D-Bus with pystemd.

Cost model (node_exporter #1201/#1254 made one call per unit per scrape): one ListUnits per
cycle, plus one Get of ControlGroup for a unit only when it is new or its state changed.
Everything here runs in the discovery child process (exporter/discovery_process.py), on one
thread that owns the one bus connection: sd-bus is not thread-safe. Every method call is bounded by $SYSTEMD_BUS_TIMEOUT, which sd-bus reads
when a bus makes its first call (systemd docs/ENVIRONMENT.md); pystemd passes timeout 0,
meaning "that default".
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .records import record

log = logging.getLogger(__name__)

# Unit types that own a control group (systemd.unit(5)); targets, timers, paths, devices
# and automounts never do.
CGROUP_UNIT_TYPES = ("service", "scope", "slice", "socket", "mount", "swap")
# States in which a unit can have processes or charged memory. "inactive" units have no
# cgroup; "failed" ones may still hold one (e.g. KillMode=none leftovers).
_STATES_WITHOUT_CGROUP = frozenset({"inactive"})

# --systemd.private-socket and --dbus.timeout.
DEFAULT_PRIVATE_SOCKET = "/run/systemd/private"
DEFAULT_DBUS_TIMEOUT = 5.0

SYSTEMD_DESTINATION = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER_INTERFACE = b"org.freedesktop.systemd1.Manager"


@record
class Unit:
    name: str  # exactly as systemd spells it, escapes such as \x2d included
    type: str
    active_state: str
    sub_state: str
    control_group: str  # e.g. /system.slice/foo.service; "" when it has none
    # The UID of the user manager (user@UID.service) the unit belongs to; None for the system
    # manager's units. Exported as the `uid` label, so a user's dbus.service never collides
    # with the system's.
    uid: int | None = None


@record
class UnitFilter:
    """--unit.include / --unit.exclude (anchored, like node_exporter's) and --unit.types."""

    include: re.Pattern[str]
    exclude: re.Pattern[str] | None
    types: frozenset[str]

    @classmethod
    def build(cls, include: str = ".+", exclude: str = "", types: Iterable[str] = CGROUP_UNIT_TYPES) -> "UnitFilter":
        return cls(
            include=re.compile(f"(?:{include})"),
            exclude=re.compile(f"(?:{exclude})") if exclude else None,
            types=frozenset(types),
        )

    def wants(self, name: str) -> bool:
        unit_type = name.rpartition(".")[2]
        if unit_type not in self.types:
            return False
        if not self.include.fullmatch(name):
            return False
        return not (self.exclude and self.exclude.fullmatch(name))


@record
class ListedUnit:
    """The fields of one ListUnits entry that discovery uses."""

    name: str
    active_state: str
    sub_state: str
    object_path: bytes


def parse_list_units(body: Sequence[Sequence]) -> list[ListedUnit]:
    """ListUnits returns a(ssssssouso): name, description, load, active, sub, following,
    object path, job id, job type, job path. pystemd hands strings over as bytes."""
    units = []
    for entry in body:
        name, _description, load_state, active, sub, _following, path = entry[:7]
        if _text(load_state) != "loaded":
            continue
        units.append(ListedUnit(_text(name), _text(active), _text(sub), path if isinstance(path, bytes) else path.encode()))
    return units


def _text(value) -> str:
    return value.decode("utf-8", errors="surrogateescape") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DiscoveryResult:
    units: tuple[Unit, ...]
    ok: bool  # False: these are the last good units (or none), D-Bus failed this time
    message: str
    refreshed_at: float | None  # unix time of the last successful refresh
    transport: str
    # Why it failed, as errors_total{source="dbus"} counts it: "timeout" (no answer in time)
    # or "unavailable" (no bus or systemd, or an error reply). "" when ok.
    failure: str = ""


class DiscoveryError(Exception):
    """D-Bus or systemd could not be reached or answered with an error."""


class Discovery:
    """Lists units and their control groups. Not thread-safe: owned by one thread."""

    def __init__(
        self, unit_filter: UnitFilter, private_socket: str = DEFAULT_PRIVATE_SOCKET, timeout: float = DEFAULT_DBUS_TIMEOUT
    ):
        self.unit_filter = unit_filter
        self.private_socket = private_socket
        self.transport = "none"  # "system_bus", "private_socket" or "none"
        self._bus = None
        # name -> ((active, sub), control group): refetched only when the state pair changes.
        self._cgroup_cache: dict[str, tuple[tuple[str, str], str]] = {}
        # sd-bus reads this once per bus, at its first call; set it before any bus exists.
        os.environ["SYSTEMD_BUS_TIMEOUT"] = f"{int(timeout * 1_000_000)}us"

    def _connect(self):
        try:
            from pystemd.dbuslib import DBus, DBusAddress
        except ImportError as e:  # pystemd missing or built against another libsystemd
            raise DiscoveryError(f"pystemd is not importable: {e}") from e
        errors = []
        for transport, make in (
            ("system_bus", lambda: DBus()),
            # systemd's own socket answers the Manager API without dbus-daemon (root only).
            ("private_socket", lambda: DBusAddress(b"unix:path=" + os.fsencode(self.private_socket), peer_to_peer=True)),
        ):
            bus = make()
            try:
                bus.open()
                # A connect can succeed where nothing answers: ask for something small.
                bus.get_property(SYSTEMD_DESTINATION, MANAGER_PATH, MANAGER_INTERFACE, b"Version", b"s")
            except Exception as e:  # pystemd raises DBusError subclasses and OSErrors
                errors.append(f"{transport}: {e}")
                _close_quietly(bus)
                continue
            if transport != self.transport:
                log.info("connected to systemd over the %s", transport.replace("_", " "))
            self.transport = transport
            return bus
        self.transport = "none"
        raise DiscoveryError("cannot reach systemd over D-Bus (" + "; ".join(errors) + ")")

    @staticmethod
    def _list_units(bus) -> list[ListedUnit]:
        reply = bus.call_method(SYSTEMD_DESTINATION, MANAGER_PATH, MANAGER_INTERFACE, b"ListUnits", [])
        return parse_list_units(reply.body[0] if reply.body and isinstance(reply.body[0], list) else reply.body)

    def _control_group(self, bus, unit: ListedUnit) -> str:
        interface = b"org.freedesktop.systemd1." + unit.name.rpartition(".")[2].capitalize().encode()
        value = bus.get_property(SYSTEMD_DESTINATION, unit.object_path, interface, b"ControlGroup", b"s")
        return _text(value)

    def refresh(self) -> tuple[Unit, ...]:
        """One ListUnits, plus one ControlGroup read per new or changed unit.

        On any D-Bus failure the connection is dropped, so the next call reconnects
        (dbus-daemon restarts, daemon-reexec and timeouts all look the same from here).
        """
        try:
            if self._bus is None:
                self._bus = self._connect()
            listed = self._list_units(self._bus)
            units = []
            seen = set()
            for entry in listed:
                if entry.active_state in _STATES_WITHOUT_CGROUP or not self.unit_filter.wants(entry.name):
                    continue
                seen.add(entry.name)
                state = (entry.active_state, entry.sub_state)
                cached = self._cgroup_cache.get(entry.name)
                if cached is None or cached[0] != state:
                    try:
                        cached = (state, self._control_group(self._bus, entry))
                    except Exception as e:
                        if _unit_gone(e):  # it went away between ListUnits and Get: skip it this cycle
                            continue
                        raise
                    self._cgroup_cache[entry.name] = cached
                if cached[1]:
                    units.append(Unit(entry.name, entry.name.rpartition(".")[2], *state, cached[1]))
            for gone in self._cgroup_cache.keys() - seen:
                del self._cgroup_cache[gone]
            return tuple(units)
        except DiscoveryError:
            raise
        except Exception as e:
            self.close()
            raise DiscoveryError(f"D-Bus call failed: {e}") from e

    def close(self) -> None:
        if self._bus is not None:
            _close_quietly(self._bus)
            self._bus = None


def _unit_gone(error: Exception) -> bool:
    """NoSuchUnit or UnknownObject, by pystemd's error classes: their str() holds the message
    ("Unknown object '/org/...'"), not the D-Bus error name."""
    from pystemd.dbusexc import DBusNoSuchUnitError, DBusUnknownObjectError  # there since a bus exists

    return isinstance(error, (DBusNoSuchUnitError, DBusUnknownObjectError))


def _close_quietly(bus) -> None:
    try:
        bus.close()
    except Exception:  # closing a broken connection can fail; nothing to do about it
        pass
