"""Unit discovery over D-Bus with pystemd, and of user managers' units in the cgroup tree.

Cost model (node_exporter #1201/#1254 made one call per unit per scrape): one ListUnits per
cycle, plus one Get of ControlGroup for a unit only when it is new, its state changed or its
cached cgroup directory went away (one stat per unit per cycle, no D-Bus).
Everything here runs in the discovery child process (exporter/discovery_process.py), on one
thread that owns the one bus connection: sd-bus is not thread-safe. Every method call is bounded by $SYSTEMD_BUS_TIMEOUT, which sd-bus reads
when a bus makes its first call (systemd docs/ENVIRONMENT.md); pystemd passes timeout 0,
meaning "that default".
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import re
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .kernelfiles import REJECTED, VANISHED, describe, failure_reason
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

    @property
    def key(self) -> str:
        """Unique among the units of one sample: the name, and for a user's unit its user too
        ("dbus.service (uid 1500)"; a valid unit name has no spaces, and user units are
        checked against UNIT_NAME). Also how explain names it."""
        return unit_key(self.name, self.uid)


def unit_key(name: str, uid: int | None) -> str:
    """Unit.key for a unit known by name and uid only (explain's reconciliations)."""
    return name if uid is None else f"{name} (uid {uid})"


# --------------------------------------------------------------------------- user units
# Units of every user manager (systemd --user, running as user@UID.service) are found in the
# cgroup tree below that service, not over each manager's own bus. Why:
# - The hardened unit (deploy/systemd/systemd-memory-exporter.service) runs as an unprivileged
#   system user with no capabilities and ProtectHome=yes. A user manager answers only on
#   /run/user/UID/bus and /run/user/UID/systemd/private, inside a 0700 directory of that user;
#   ProtectHome= hides /run/user altogether, and without CAP_DAC_OVERRIDE the directory is shut
#   anyway. The user buses are out of reach; only root could open them, one connection per user.
# - The cgroup tree is readable by anyone. systemd names each unit's cgroup after the unit
#   (cg_escape: a leading "_" is added to names that could clash with kernel files, so one
#   leading "_" is removed here), and nests units in their slices, as the system manager does:
#   user@1500.service/app.slice/x.service. One directory walk per manager per cycle, no bus.
# What the tree cannot tell: ActiveState and SubState. A unit's cgroup exists while the unit
# is active (or deactivating, or failed with processes left), so user units are reported as
# active_state "active" with an empty sub_state: unknown, not invented.
# systemd 252 user@.service sets Delegate=pids memory cpu. On cgroup v2 the user manager then
# has the memory controller and its units their own memory.current; on v1/hybrid memory is not
# delegated (the user's units exist in name=systemd and unified only, MemoryCurrent [not set]),
# so they get RSS figures and no cgroup figures, exactly as systemctl --user shows them.
USER_MANAGER = re.compile(r"user@([0-9]+)\.service")
# The subtree below user@UID.service is delegated: the user can mkdir any name there. Only
# names systemd could have given a unit become units (unit_name_is_valid() in systemd's
# src/basic/unit-name.c: at most 255 of these characters, a known suffix), and at most
# MAX_USER_UNITS per user manager, so one user cannot break rendering (a non-UTF-8 name),
# mix two units' figures (the same name in two slices) or flood the series.
UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}")
MAX_USER_UNITS = 1000  # reported, per user manager: what --unit.include/--unit.types keep
MAX_USER_CGROUPS = 10 * MAX_USER_UNITS  # unit-named cgroups walked, wanted or not: bounds the walk


def user_manager_uid(unit_name: str) -> int | None:
    """1500 for user@1500.service; None for any other unit."""
    match = USER_MANAGER.fullmatch(unit_name)
    return int(match.group(1)) if match else None


def unit_name_of_cgroup(directory_name: str) -> str:
    """systemd's cg_unescape: one leading underscore is escaping, never part of the name."""
    return directory_name[1:] if directory_name.startswith("_") else directory_name


def user_units_in_tree(manager_cgroup: str, uid: int, subdirectories: Callable[[str], Iterable[str]],
                       unit_filter: "UnitFilter", rejects: list[tuple[str, str, str]] | None = None) -> list[Unit]:
    """The units of the user manager whose cgroup is ``manager_cgroup``, from the tree below it.

    ``subdirectories(cgroup)`` lists the child cgroup names of a cgroup path (the thin reader;
    fixtures and tests pass their own). Only slices are descended into: what lies below a
    service or scope is that unit's own business (a delegated subtree such as rootless
    podman's, or the manager's own init.scope), never other units. A directory whose name has
    no unit suffix of a cgroup-owning type is not a unit and is skipped with its subtree.
    A directory with such a suffix that is no valid unit name, a second one of a name already
    found, and those beyond MAX_USER_UNITS reported units (or MAX_USER_CGROUPS found) are
    skipped and appended to ``rejects`` as (REJECTED, path, message), which the sampler counts
    as errors_total{source="cgroup",reason="rejected"} without marking the source down.
    """
    units = []
    names = set()  # every name found, filtered out or not: the first directory keeps it
    pending = [manager_cgroup]
    while pending:
        parent = pending.pop(0)  # breadth-first, sorted: which of two same-named cgroups is first is stable
        for child in sorted(subdirectories(parent)):
            name = unit_name_of_cgroup(child)
            unit_type = name.rpartition(".")[2]
            if "." not in name or unit_type not in CGROUP_UNIT_TYPES:
                continue
            problem = ""
            if not UNIT_NAME.fullmatch(name):
                problem = f"not a valid unit name: {ascii(name[:80])}"
            elif name in names:
                problem = f"a second cgroup of unit {name!r}, skipped"
            elif len(units) >= MAX_USER_UNITS or len(names) >= MAX_USER_CGROUPS:
                problem = (f"more than {MAX_USER_UNITS} units (or {MAX_USER_CGROUPS} unit cgroups) below"
                           f" {manager_cgroup!r}: the rest are skipped")
            if problem:
                if rejects is not None:
                    # the parent as the place: ErrorLog logs once per kind and file name
                    rejects.append((REJECTED, parent, problem))
                if len(units) >= MAX_USER_UNITS or len(names) >= MAX_USER_CGROUPS:
                    return units
                continue
            names.add(name)
            cgroup = f"{parent}/{child}"
            if unit_type == "slice":
                pending.append(cgroup)
            if unit_filter.wants(name):
                units.append(Unit(name, unit_type, "active", "", cgroup, uid))
    return units


def cgroup_subdirectories(root: str, failures: list[tuple[str, str, str]]) -> Callable[[str], list[str]]:
    """The reader for user_units_in_tree: child directories of root + cgroup. A cgroup that
    went away meanwhile (the user logged out) has none; one that cannot be listed has none
    either, and is appended to ``failures`` as (reason, path, message) for the sampler to
    count as errors_total{source="cgroup"} (this runs in the discovery child)."""
    def subdirectories(cgroup: str) -> list[str]:
        try:
            return [e.name for e in os.scandir(root + cgroup) if e.is_dir(follow_symlinks=False)]
        except OSError as e:
            reason = failure_reason(e)
            if reason != VANISHED:
                failures.append((reason, root + cgroup, describe(e)))
            return []
    return subdirectories


@record
class UnitFilter:
    """--unit.include / --unit.exclude (anchored, like node_exporter's) and --unit.types."""

    include: re.Pattern[str]
    exclude: re.Pattern[str] | None
    types: frozenset[str]

    @classmethod
    def build(cls, include: str = ".+", exclude: str = "", types: Iterable[str] = CGROUP_UNIT_TYPES) -> "UnitFilter":
        # Compiled as given, and applied with fullmatch: no (?:...) wrapper to anchor them, which
        # would put a leading global flag such as (?i) mid-pattern, an error since Python 3.11.
        return cls(
            include=re.compile(include),
            exclude=re.compile(exclude) if exclude else None,
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
    object path, job id, job type, job path. pystemd hands strings over as bytes.

    Every load state is kept: a unit still running after its file was removed (not-found),
    masked while running (masked) or edited into a broken file (bad-setting, error) keeps its
    cgroup and its memory, as systemctl list-units shows. Units listed only because something
    refers to them are inactive, and refresh() drops those by their active state."""
    units = []
    for entry in body:
        name, _description, _load_state, active, sub, _following, path = entry[:7]
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
    # (reason, path, message) of cgroup directories the user-unit walk could not list.
    tree_failures: tuple[tuple[str, str, str], ...] = ()


class DiscoveryError(Exception):
    """D-Bus or systemd could not be reached or answered with an error.

    ``failure``: DiscoveryResult's kind, "timeout" when a call got no answer within
    $SYSTEMD_BUS_TIMEOUT (--dbus.timeout), else "unavailable"."""

    def __init__(self, message: str, failure: str = "unavailable"):
        super().__init__(message)
        self.failure = failure


class Discovery:
    """Lists units and their control groups. Not thread-safe: owned by one thread."""

    def __init__(
        self, unit_filter: UnitFilter, private_socket: str = DEFAULT_PRIVATE_SOCKET, timeout: float = DEFAULT_DBUS_TIMEOUT,
        user_units_root: str | None = None, cgroup_root: str | None = None,
    ):
        """``user_units_root``: the cgroup hierarchy systemd names units in (cgroupfs.Layout's
        procs_root), to find user managers' units below user@UID.service; None: no user units.
        ``cgroup_root``: that hierarchy, where a cached ControlGroup is checked for still
        existing (user_units_root when not given); None: no such check."""
        self.unit_filter = unit_filter
        self.private_socket = private_socket
        self.user_units_root = user_units_root
        self.cgroup_root = cgroup_root if cgroup_root is not None else user_units_root
        self.tree_failures: list[tuple[str, str, str]] = []  # of the latest refresh
        self.transport = "none"  # "system_bus", "private_socket" or "none"
        self._bus = None
        # name -> ((active, sub), control group, whether its directory existed when last looked
        # at): refetched when the state pair changes or that directory went away (refresh()).
        self._cgroup_cache: dict[str, tuple[tuple[str, str], str, bool]] = {}
        # sd-bus reads this once per bus, at its first call; set it before any bus exists.
        os.environ["SYSTEMD_BUS_TIMEOUT"] = f"{int(timeout * 1_000_000)}us"

    def _connect(self):
        try:
            DBus, DBusAddress = _dbuslib()
        except ImportError as e:  # pystemd missing or built against another libsystemd
            raise DiscoveryError(f"pystemd is not importable: {e}") from e
        errors = []
        timed_out = False
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
                timed_out = timed_out or _timed_out(e)
                _close_quietly(bus)
                continue
            if transport != self.transport:
                log.info("connected to systemd over the %s", transport.replace("_", " "))
            self.transport = transport
            return bus
        self.transport = "none"
        # A bus that took no answer in time, beside a private socket that is not there (or not
        # ours, unprivileged): systemd is hung, not absent.
        raise DiscoveryError("cannot reach systemd over D-Bus (" + "; ".join(errors) + ")",
                             "timeout" if timed_out else "unavailable")

    @staticmethod
    def _list_units(bus) -> list[ListedUnit]:
        reply = bus.call_method(SYSTEMD_DESTINATION, MANAGER_PATH, MANAGER_INTERFACE, b"ListUnits", [])
        return parse_list_units(reply.body[0] if reply.body and isinstance(reply.body[0], list) else reply.body)

    def _control_group(self, bus, unit: ListedUnit) -> str:
        interface = b"org.freedesktop.systemd1." + unit.name.rpartition(".")[2].capitalize().encode()
        value = bus.get_property(SYSTEMD_DESTINATION, unit.object_path, interface, b"ControlGroup", b"s")
        return _text(value)

    def _cgroup_exists(self, cgroup: str) -> bool:
        return bool(cgroup) and self.cgroup_root is not None and os.path.isdir(self.cgroup_root + cgroup)

    def refresh(self) -> tuple[Unit, ...]:
        """One ListUnits, plus one ControlGroup read per new, changed or moved unit.

        On any D-Bus failure the connection is dropped, so the next call reconnects
        (dbus-daemon restarts, daemon-reexec and timeouts all look the same from here).
        """
        try:
            if self._bus is None:
                self._bus = self._connect()
            listed = self._list_units(self._bus)
            units = []
            seen = set()
            managers = []  # (uid, control group) of running user managers
            for entry in listed:
                if entry.active_state in _STATES_WITHOUT_CGROUP:
                    continue
                wanted = self.unit_filter.wants(entry.name)
                uid = user_manager_uid(entry.name) if self.user_units_root is not None else None
                if not wanted and uid is None:
                    continue
                seen.add(entry.name)
                state = (entry.active_state, entry.sub_state)
                cached = self._cgroup_cache.get(entry.name)
                # The state pair misses a unit stopped and started again between two cycles
                # (a Slice= change and a restart, systemd-run --unit=X --slice=Y once more): it
                # is active/running both times, but its cgroup is elsewhere. Its old directory
                # is gone then (systemd removes a stopped unit's cgroup), which one stat shows;
                # a path whose directory was missing already at its Get is not asked for again.
                if cached is None or cached[0] != state or (cached[2] and not self._cgroup_exists(cached[1])):
                    try:
                        cgroup = self._control_group(self._bus, entry)
                    except Exception as e:
                        if _unit_gone(e):  # it went away between ListUnits and Get: skip it this cycle
                            continue
                        raise
                    cached = (state, cgroup, self._cgroup_exists(cgroup))
                    self._cgroup_cache[entry.name] = cached
                if cached[1] and wanted:
                    units.append(Unit(entry.name, entry.name.rpartition(".")[2], *state, cached[1]))
                if cached[1] and uid is not None and entry.active_state == "active":
                    managers.append((uid, cached[1]))
            for gone in self._cgroup_cache.keys() - seen:
                del self._cgroup_cache[gone]
            self.tree_failures = []
            if managers:
                subdirectories = cgroup_subdirectories(self.user_units_root, self.tree_failures)
                for uid, cgroup in managers:
                    units.extend(user_units_in_tree(cgroup, uid, subdirectories, self.unit_filter, self.tree_failures))
            return tuple(units)
        except DiscoveryError:
            raise
        except Exception as e:
            self.close()
            raise DiscoveryError(f"D-Bus call failed: {e}", "timeout" if _timed_out(e) else "unavailable") from e

    def close(self) -> None:
        if self._bus is not None:
            _close_quietly(self._bus)
            self._bus = None


def _dbuslib():
    """pystemd.dbuslib's DBus and DBusAddress, without running pystemd/__init__.py.

    The package's __init__ imports the whole library (systemd1, machine1, and lxml through
    pystemd.base) although discovery needs only the bus binding: in the discovery child that
    was 1.9 MiB of anonymous memory and 3.9 MiB of mapped .so files, against 0.5 and 1.0 MiB
    for dbuslib alone (dbusexc and utils come along). So, unless pystemd is imported already,
    a bare package module stands in for it: submodules still load from its directory.
    """
    if "pystemd" not in sys.modules:
        spec = importlib.util.find_spec("pystemd")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("No module named 'pystemd'")
        package = types.ModuleType("pystemd")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["pystemd"] = package
    from pystemd.dbuslib import DBus, DBusAddress

    return DBus, DBusAddress


def _unit_gone(error: Exception) -> bool:
    """NoSuchUnit or UnknownObject, by pystemd's error classes: their str() holds the message
    ("Unknown object '/org/...'"), not the D-Bus error name."""
    from pystemd.dbusexc import DBusNoSuchUnitError, DBusUnknownObjectError  # there since a bus exists

    return isinstance(error, (DBusNoSuchUnitError, DBusUnknownObjectError))


def _timed_out(error: Exception) -> bool:
    """sd-bus's own method-call timeout: sd_bus_call returns -ETIMEDOUT, which pystemd raises as
    DBusTimeoutError (the error name sd-bus sets for it, org.freedesktop.DBus.Error.Timeout)
    or, by errno, as a DBusBaseError "[err -110]: b'Connection timed out'"."""
    from pystemd.dbusexc import DBusTimedOutError, DBusTimeoutError  # there since a bus exists

    # pystemd's errno is sd-bus's negative return code; an OSError's is positive.
    return isinstance(error, (DBusTimeoutError, DBusTimedOutError)) or getattr(error, "errno", None) in (
        errno.ETIMEDOUT, -errno.ETIMEDOUT)


def _close_quietly(bus) -> None:
    try:
        bus.close()
    except Exception:  # closing a broken connection can fail; nothing to do about it
        pass
