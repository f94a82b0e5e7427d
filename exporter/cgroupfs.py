"""cgroup files: layout detection, the pure parsers of the memory control files, and the
cgroup tree (paths, child cgroups, the minimal set of subtrees to walk).

Parsers take the text of one control file and return values; they never touch the
filesystem, so fixture strings and property tests exercise them directly (the shape of
prometheus/procfs). Reading goes through exporter/kernelfiles.py, the error boundary.

Semantics (Documentation/admin-guide/cgroup-v1/memory.rst, cgroup-v2.rst):
- v1 memory.usage_in_bytes and v2 memory.current are what systemd reports as MemoryCurrent.
- v1 memory.stat ``total_*`` keys are hierarchical; the bare keys are this cgroup alone.
- "max" (v2) and the page-rounded LONG_MAX (v1) both mean "no limit".
"""

from __future__ import annotations

import errno
import operator
import os
import re
from collections.abc import Callable, Iterable, Mapping
from enum import Enum

from .kernelfiles import ParseError, parse_uint, read_text
from .records import record

# v1 reports "unlimited" as LONG_MAX rounded down to the page size; anything at or above
# this is treated as no limit (memory.rst: "-1" writes become this value).
V1_UNLIMITED_THRESHOLD = 1 << 62


def parse_single_value(text: str) -> int:
    """A one-number file (memory.current, memory.usage_in_bytes, memory.failcnt...)."""
    return parse_uint(text.strip())


def parse_limit(text: str) -> int | None:
    """A v2 limit (memory.max, memory.high, memory.swap.max...): None for "max", no limit."""
    value = text.strip()
    return None if value == "max" else parse_uint(value)


def parse_v1_limit(text: str) -> int | None:
    """memory.limit_in_bytes: None when unlimited (the page-rounded LONG_MAX)."""
    number = parse_single_value(text)
    return None if number >= V1_UNLIMITED_THRESHOLD else number


# A flat keyed file as the kernel prints it: "key value" lines, keys of [A-Za-z0-9_], values of
# ASCII digits. Only such a text takes parse_flat_keyed's fast path (one split, one dict).
_WELL_FORMED_FLAT_KEYED = re.compile(r"(?:[A-Za-z0-9_]+ [0-9]+\n)*(?:[A-Za-z0-9_]+ [0-9]+)?")


def parse_flat_keyed(text: str, skipped: list[str] | None = None) -> dict[str, int]:
    """Flat keyed files: one "key value" pair a line (memory.stat, memory.events, oom_control).

    A malformed line raises ParseError, or, when ``skipped`` is given, is appended to it and
    left out: one odd key (a wrapped counter, say) must not hide the rest of memory.stat.
    """
    # memory.stat (42 lines on v1) for every unit each cycle: the line loop below cost ~15 us a
    # file; a text the pattern accepts gives the loop's result in one split (tests/bench).
    if _WELL_FORMED_FLAT_KEYED.fullmatch(text):
        parts = text.split()
        return dict(zip(parts[::2], map(int, parts[1::2])))
    values: dict[str, int] = {}
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition(" ")
        try:
            if not sep or not key:
                raise ParseError(f"malformed line {line[:60]!r}")
            values[key] = parse_uint(value)
        except ParseError as e:
            if skipped is None:
                raise ParseError(f"malformed line {line[:60]!r}") from e
            skipped.append(line[:60])
    return values


class SelectedKeys:
    """Chosen keys of a flat keyed file, as ``parse_flat_keyed`` would give them, renamed, in the
    order they were chosen in.

    Every cgroup of a running kernel prints the same keys of memory.stat (memory.events,
    oom_control) in the same order, so the layout of the last well-formed text is learned as one
    regex of its literal keys that captures only the wanted values: one fullmatch checks the
    whole file and finds them (3.4 us for v1's 42 lines, where splitting it and converting every
    value cost 10 us: tests/bench). A text of another layout takes parse_flat_keyed (same values,
    same skipped lines) and teaches its layout to the next call. The learned layout changes how
    fast a text is parsed, never what it parses to.
    """

    def __init__(self, wanted: Mapping[str, str]):
        self._wanted = dict(wanted)  # key in the file -> name in the result
        # The learned regex, the names it finds (in the wanted order), and how to pick their
        # values out of its groups (which come in the file's order).
        self._layout: tuple[re.Pattern[str], tuple[str, ...], Callable[[tuple], Iterable[str]]] | None = None

    def parse(self, text: str, skipped: list[str] | None = None) -> dict[str, int]:
        layout = self._layout
        if layout is not None:
            match = layout[0].fullmatch(text)
            if match is not None:
                # [0-9]+ groups: ASCII digits, on which int() agrees with parse_uint.
                return dict(zip(layout[1], map(int, layout[2](match.groups()))))
        values = parse_flat_keyed(text, skipped)
        if text.endswith("\n") and _WELL_FORMED_FLAT_KEYED.fullmatch(text):
            self._learn(text.split()[::2])
        return {name: values[key] for key, name in self._wanted.items() if key in values}

    def _learn(self, keys: list[str]) -> None:
        if len(set(keys)) != len(keys):
            return  # a repeated key: parse_flat_keyed keeps the last, so no shortcut for it
        wanted = self._wanted
        pattern = "".join(f"{re.escape(k)} ([0-9]+)\n" if k in wanted else f"{re.escape(k)} [0-9]+\n" for k in keys)
        group_of = {k: i for i, k in enumerate(k for k in keys if k in wanted)}
        found = [k for k in wanted if k in group_of]
        picks = [group_of[k] for k in found]
        pick = operator.itemgetter(*picks) if len(picks) > 1 else (lambda groups: [groups[i] for i in picks])
        self._layout = (re.compile(pattern), tuple(wanted[k] for k in found), pick)


@record
class Pressure:
    """One PSI line's cumulative stall time; the avg* fields are derivable from it in PromQL."""

    some_total_us: int
    full_total_us: int | None  # memory.pressure always has "full"; kept optional for cpu-like files


# memory.pressure as every kernel since 4.20 prints it: the one-regex path of parse_pressure.
_PRESSURE_LINES = re.compile(
    r"some avg10=[0-9.]+ avg60=[0-9.]+ avg300=[0-9.]+ total=([0-9]+)\n"
    r"full avg10=[0-9.]+ avg60=[0-9.]+ avg300=[0-9.]+ total=([0-9]+)\n"
)


def parse_pressure(text: str) -> Pressure:
    """memory.pressure: "some avg10=0.00 avg60=0.00 avg300=0.00 total=123" (+ a "full" line)."""
    lines = _PRESSURE_LINES.fullmatch(text)
    if lines is not None:  # once per unit per cycle: a fifth of the loop below
        return Pressure(int(lines[1]), int(lines[2]))
    totals: dict[str, int] = {}
    for line in text.splitlines():
        if not line:
            continue
        kind, _, fields = line.partition(" ")
        for field in fields.split():
            name, _, value = field.partition("=")
            if name == "total":
                totals[kind] = parse_uint(value)
        if kind not in totals:  # a truncated line must not pass for a kind the kernel lacks
            raise ParseError(f"no total= in the {kind[:20]!r} line")
    if "some" not in totals:
        raise ParseError("no 'some ... total=' line")
    return Pressure(totals["some"], totals.get("full"))


def parse_procs(text: str) -> list[int]:
    """cgroup.procs: one PID a line."""
    return [parse_uint(line) for line in text.split()]


def parse_procs_bytes(data: bytes) -> list[int]:
    """parse_procs on the file's raw bytes, without decoding (the walker's hot path).

    When every token is ASCII digits (bytes.isdigit() is ASCII-only) int() agrees with
    parse_uint; anything else goes to parse_procs for the same result or the same ParseError.
    """
    tokens = data.split()
    if tokens and not b"".join(tokens).isdigit():
        return parse_procs(data.decode("ascii", errors="replace"))
    return list(map(int, tokens))


def read_procs(read: Callable[[str], bytes], directory: str) -> list[int]:
    """The PIDs in a cgroup directory's cgroup.procs, read with ``read``. A threaded cgroup (v2;
    libvirt makes a VM's emulator, vcpuN and iothreadN so) refuses the read with EOPNOTSUPP: it
    has no processes of its own, its threaded domain lists them all (cgroup_procs_start in
    kernel/cgroup/cgroup.c)."""
    try:
        return parse_procs_bytes(read(directory + "/cgroup.procs"))
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        return []


class MemoryVersion(Enum):
    V1 = "v1"
    V2 = "v2"


@record
class Layout:
    """Where the memory controller lives and where to find each unit's processes.

    ``memory_root``: the hierarchy holding memory.* files (v1 memory, or the v2 unified root).
    ``procs_root``: the hierarchy systemd names units in (v2 unified, hybrid's unified, or v1
    name=systemd). A unit's processes are found there even when it has no memory cgroup.
    ``pressure_root``: a cgroup2 hierarchy with per-cgroup memory.pressure, if any. On the
    hybrid layout the unified tree carries PSI files although the memory controller is on v1.
    """

    name: str  # "unified", "hybrid" or "legacy"
    memory_version: MemoryVersion | None
    memory_root: str | None
    procs_root: str | None
    pressure_root: str | None


def detect_layout(cgroupfs: str) -> Layout:
    """Decide per controller, from the files under the cgroup mount point (default /sys/fs/cgroup).

    Detection looks at files, not at /proc/mounts, so a fixture tree or a host's cgroupfs
    bind-mounted elsewhere (--path.cgroupfs) is detected the same way.
    """
    unified_controllers = _read_optional(os.path.join(cgroupfs, "cgroup.controllers"))
    if unified_controllers is not None:
        has_memory = "memory" in unified_controllers.split()
        return Layout(
            name="unified",
            memory_version=MemoryVersion.V2 if has_memory else None,
            memory_root=cgroupfs if has_memory else None,
            procs_root=cgroupfs,
            pressure_root=cgroupfs,
        )
    v1_memory = os.path.join(cgroupfs, "memory")
    memory_root = v1_memory if os.path.exists(os.path.join(v1_memory, "memory.usage_in_bytes")) else None
    unified = os.path.join(cgroupfs, "unified")
    if os.path.exists(os.path.join(unified, "cgroup.procs")):
        return Layout(
            name="hybrid",
            memory_version=MemoryVersion.V1 if memory_root else None,
            memory_root=memory_root,
            procs_root=unified,
            pressure_root=unified,
        )
    systemd_v1 = os.path.join(cgroupfs, "systemd")
    return Layout(
        name="legacy",
        memory_version=MemoryVersion.V1 if memory_root else None,
        memory_root=memory_root,
        procs_root=systemd_v1 if os.path.isdir(systemd_v1) else memory_root,
        pressure_root=None,
    )


def _read_optional(path: str) -> str | None:
    try:
        return read_text(path)
    except FileNotFoundError:
        return None


def cgroup_path(root: str, cgroup: str) -> str:
    """The directory of ``cgroup`` (systemd's "/system.slice/x.service", or "/") under a hierarchy."""
    return root + cgroup if cgroup != "/" else root


def minimal_roots(paths: Iterable[str]) -> list[str]:
    """The paths not inside another one: walking these covers every unit's subtree once."""
    roots: list[str] = []
    # Sorted by components, so a subtree follows its root: as plain strings "/a.slice-x" would
    # come between "/a.slice" and "/a.slice/b.service" ("-" sorts before "/").
    for path in sorted(set(paths), key=lambda p: p.split("/")):
        parent = roots[-1] if roots else None
        if parent is not None and (parent == "/" or path.startswith(parent + "/")):
            continue
        roots.append(path)
    return roots


def child_cgroups(directory: str) -> list[str]:
    """Names of the child cgroups of a cgroup directory.

    Most unit cgroups have no children. cgroupfs (kernfs) keeps a directory's link count at
    2 + its number of subdirectories (kernfs_refresh_inode), as ext4 and tmpfs do for the
    fixture trees, so one stat() answers "none" where a listing costs an open, two
    getdents64 over a dozen control files, and a close: 2 us instead of 13 us per cgroup.
    A file system that does not count links (btrfs reports 1) is simply listed.
    """
    if os.stat(directory).st_nlink == 2:
        return []
    return [entry.name for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False)]
