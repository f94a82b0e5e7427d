"""Opt-in per-unit PSS and USS from /proc/PID/smaps_rollup (--collector.pss), bounded.

PSS (proportional set size) charges each shared page to the processes mapping it in equal
parts, so summed over a unit's processes it does not over-count what forked children share
the way summed RSS does; USS (Private_Clean + Private_Dirty) is what the unit alone holds.

Why opt-in and bounded: reading smaps_rollup makes the kernel walk every page table of the
process while holding its mmap_lock for reading (fs/proc/task_mmu.c, show_smaps_rollup), and
the process's own page faults and mmap calls wait behind it: process-exporter #246 stalled a
200 GB process for 4.4 s; #142 tripled that exporter's CPU. So:

- ``max_rss``: a process whose RSS (from /proc/PID/statm, a cheap read that takes no lock) is
  above it is not read; its unit gets no PSS, and the skip is counted;
- ``budget``: a cycle stops reading once it has spent ``budget`` seconds; the units it did
  not finish get no PSS this cycle, and the next cycle starts with them (round-robin), so
  every unit has its turn.

A unit's PSS/USS is reported only when every process of its cgroup subtree was read in this
cycle: a partial sum would pass for a real, smaller figure ("absent, not 0").
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field

from .cgroupfs import cgroup_path, child_cgroups, read_procs
from .errorlog import ErrorLog
from .kernelfiles import PERMISSION, VANISHED, ParseError, describe, failure_reason, parse_uint, read_bytes
from .procfs import hidden_by_hidepid, in_own_pid_namespace, live_thread_dir
from .records import record
from .systemd import Unit

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# --collector.pss.budget and --collector.pss.max-rss.
DEFAULT_BUDGET = 2.0
DEFAULT_MAX_RSS = 4 << 30
_FIELDS = ("Pss:", "Private_Clean:", "Private_Dirty:")


@record
class Rollup:
    """Bytes, for one process."""

    pss: int
    uss: int  # Private_Clean + Private_Dirty


NO_MAPPINGS = Rollup(0, 0)


def parse_smaps_rollup(text: str) -> Rollup:
    """/proc/PID/smaps_rollup: a "[rollup]" header line, then "Key:   1234 kB" lines."""
    if not text:
        return NO_MAPPINGS  # a process without an address space (it exited, or a zombie)
    values = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(" ")
        if key in _FIELDS:
            parts = rest.split()
            if len(parts) != 2 or parts[1] != "kB":
                raise ParseError(f"malformed {key} line")
            values[key] = parse_uint(parts[0]) * 1024
    missing = [f for f in _FIELDS if f not in values]
    if missing:
        raise ParseError(f"smaps_rollup lacks {', '.join(missing)}")
    return Rollup(values["Pss:"], values["Private_Clean:"] + values["Private_Dirty:"])


def parse_statm_resident(data: bytes) -> int:
    """/proc/PID/statm "size resident shared text lib data dt" in pages: resident, in bytes."""
    fields = data.split()
    if len(fields) < 2 or not fields[1].isdigit():
        raise ParseError("malformed statm")
    return int(fields[1]) * PAGE_SIZE


@dataclass
class PssResult:
    """One cycle: Unit.key (the name; a user's unit also names its uid) -> (pss, uss) bytes,
    or None where absent this cycle."""

    values: dict[str, tuple[int, int] | None]
    read: int = 0  # smaps_rollup files read this cycle
    skipped: Counter = field(default_factory=Counter)  # processes not read, by reason, this cycle
    deferred_units: int = 0  # units left for a later cycle by the budget


# Outcomes of one process, besides a Rollup.
_SKIPPED = "skipped"
# A cgroup of the subtree whose listing failed (not vanished): its processes are unknown.
_UNREADABLE = None


class PssCollector:
    """Keeps the round-robin position and the cumulative counters between cycles.

    ``skipped_total``: processes not read, by reason: ``max_rss`` (over the cap), ``error``
    (unreadable or unparsable). ``deferred_units_total``: units left for a later cycle by the
    budget. Call ``collect`` from one thread.
    """

    def __init__(
        self,
        procfs: str,
        budget: float = DEFAULT_BUDGET,
        max_rss: int = DEFAULT_MAX_RSS,
        clock: Callable[[], float] = time.monotonic,
        errors: ErrorLog | None = None,
    ):
        self.procfs = procfs
        self.budget = budget
        self.max_rss = max_rss
        self.clock = clock
        # Only to log why a process was skipped: pss_skipped_processes_total counts it.
        self.errors = errors or ErrorLog()
        self.skipped_total: Counter = Counter()
        self.deferred_units_total = 0
        self._resume_at: tuple[int, str] | None = None  # order key of the first unit next cycle
        self._own_pid_namespace = in_own_pid_namespace(procfs)
        self._statm = os.fsencode(procfs) + b"/%d/statm"
        self._rollup = os.fsencode(procfs) + b"/%d/smaps_rollup"

    def collect(self, units: Iterable[Unit], procs_root: str | None,
                listings: Mapping[str, tuple[list[int], list[str]] | None] | None = None,
                leaders_gone: Set[int] = frozenset()) -> PssResult:
        """``procs_root``: the hierarchy holding the units' cgroup.procs (Layout.procs_root).
        ``listings``: the process walk's of this cycle (ProcessWalker.listings), so its
        cgroup.procs files are not read twice; a cgroup it did not list is read here.
        ``leaders_gone``: the walk's processes whose main thread exited while others run
        (ProcessWalker.leaders_gone): read through a live thread, as the walk read them."""
        # Deepest cgroups first: a service before the slice holding it, so a slice costs only
        # the processes its children did not already read this cycle.
        order = sorted(
            (u for u in units if u.control_group),
            key=lambda u: self._key(u),
        )
        result = PssResult({u.key: None for u in order})
        if procs_root is None or not order:
            return result
        start = 0
        if self._resume_at is not None:
            start = next((i for i, u in enumerate(order) if self._key(u) >= self._resume_at), 0)
        rotated = order[start:] + order[:start]
        deadline = self.clock() + self.budget
        processes: dict[int, Rollup | str] = {}  # this cycle's reads, shared by nested units
        listings = dict(listings or {})
        self._resume_at = None
        for position, unit in enumerate(rotated):
            pids = self._subtree_pids(procs_root, unit.control_group, listings)
            if pids is None:
                continue  # part of its subtree could not be listed: no PSS rather than a partial one
            finished = True
            for pid in pids:
                if pid in processes:
                    continue
                if self.clock() > deadline:
                    finished = False
                    break
                processes[pid] = self._read(pid, result, pid in leaders_gone)
            if not finished:
                left = rotated[position:]
                result.deferred_units = len(left)
                # Resume with this unit; if it alone outlasted a whole budget, with the next one,
                # or a unit too big for the budget would starve every other.
                resume = rotated[(position + 1) % len(rotated)] if position == 0 else unit
                self._resume_at = self._key(resume)
                break
            outcomes = [processes[pid] for pid in pids]
            if any(outcome is _SKIPPED for outcome in outcomes):
                continue
            result.values[unit.key] = (
                sum(outcome.pss for outcome in outcomes),
                sum(outcome.uss for outcome in outcomes),
            )
        self.skipped_total.update(result.skipped)
        self.deferred_units_total += result.deferred_units
        return result

    @staticmethod
    def _key(unit: Unit) -> tuple[int, str]:
        return (-unit.control_group.count("/"), unit.key)

    def _read(self, pid: int, result: PssResult, through_thread: bool = False) -> Rollup | str:
        statm, rollup_path = self._statm % pid, self._rollup % pid
        if through_thread:
            # Its leader has no address space to walk (statm all 0, smaps_rollup ESRCH); a live
            # thread's files show the one they share, the max-rss cap's figure included.
            thread = live_thread_dir(self.procfs, pid)
            if thread is None:
                return NO_MAPPINGS
            statm, rollup_path = f"{thread}/statm", f"{thread}/smaps_rollup"
        try:
            if parse_statm_resident(read_bytes(statm)) > self.max_rss:
                result.skipped["max_rss"] += 1
                return _SKIPPED
            rollup = parse_smaps_rollup(read_bytes(rollup_path).decode("ascii", errors="replace"))
        except (OSError, ParseError) as e:
            reason = failure_reason(e)
            # Gone since the listing (ENOENT at open; ESRCH from the read: no address space left
            # to walk). But hidepid=invisible hides a live process as ENOENT too, and a 0 for it
            # would understate the unit's PSS. Not ESRCH: that entry was there to open (and
            # kill(pid, 0) is refused to an unprivileged exporter for any other user's process);
            # nor a thread's entry, which the walk just saw.
            if reason == VANISHED:
                if not (e.errno == errno.ENOENT and not through_thread and self._own_pid_namespace
                        and hidden_by_hidepid(pid)):
                    return NO_MAPPINGS
                reason, e = PERMISSION, PermissionError(errno.EACCES, "hidden by hidepid")
            self.errors.warn("pss", reason, f"{self.procfs}/PID/smaps_rollup", describe(e))
            result.skipped["error"] += 1
            return _SKIPPED
        result.read += 1
        return rollup

    def _subtree_pids(
        self, root: str, cgroup: str, listings: dict[str, tuple[list[int], list[str]] | None]
    ) -> list[int] | None:
        """Every PID in the cgroup and below (PID 0, outside our namespace, left out); None
        when a cgroup of the subtree could not be listed."""
        pids: list[int] = []
        stack = [cgroup]
        while stack:
            current = stack.pop()
            if current not in listings:
                listings[current] = _VANISHED_LISTING if _not_in_parent(current, listings) else _listing(root, current)
            listing = listings[current]
            if listing is _UNREADABLE:
                return None
            own, children = listing
            pids.extend(own)
            prefix = "" if current == "/" else current
            stack.extend(f"{prefix}/{child}" for child in children)
        return [pid for pid in pids if pid]


_VANISHED_LISTING: tuple[list[int], list[str]] = ([], [])


def _not_in_parent(cgroup: str, listings: Mapping[str, tuple[list[int], list[str]] | None]) -> bool:
    """The cycle's listing of the parent directory has no such child: the cgroup does not exist
    (systemd names a ControlGroup for idle sockets and mounts that have no directory)."""
    parent, _, name = cgroup.rpartition("/")
    listing = listings.get(parent or "/", _UNREADABLE)
    return listing is not _UNREADABLE and name not in listing[1]


def _listing(root: str, cgroup: str) -> tuple[list[int], list[str]] | None:
    """(PIDs, child cgroups); no processes for a cgroup that went away; _UNREADABLE for one that
    cannot be read (the process walker counts and logs that same cgroup.procs in errors_total)."""
    directory = cgroup_path(root, cgroup)
    try:
        return read_procs(read_bytes, directory), child_cgroups(directory)
    except (OSError, ParseError) as e:
        return _VANISHED_LISTING if failure_reason(e) == VANISHED else _UNREADABLE
