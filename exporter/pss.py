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

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .cgroupfs import VANISHED_ERRNOS, ParseError, parse_procs_bytes, parse_uint, read_bytes
from .records import record
from .systemd import Unit

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
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
    """One cycle: unit name -> (pss, uss) bytes, or None where absent this cycle."""

    values: dict[str, tuple[int, int] | None]
    read: int = 0  # smaps_rollup files read this cycle
    skipped: Counter = field(default_factory=Counter)  # processes not read, by reason, this cycle
    deferred_units: int = 0  # units left for a later cycle by the budget


# Outcomes of one process, besides a Rollup.
_SKIPPED = "skipped"


class PssCollector:
    """Keeps the round-robin position and the cumulative counters between cycles.

    ``skipped_total``: processes not read, by reason: ``max_rss`` (over the cap), ``error``
    (unreadable or unparsable). ``deferred_units_total``: units left for a later cycle by the
    budget. Call ``collect`` from one thread.
    """

    def __init__(
        self,
        procs_root: str | None,
        procfs: str = "/proc",
        budget: float = 2.0,
        max_rss: int = 4 << 30,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.procs_root = procs_root
        self.procfs = procfs
        self.budget = budget
        self.max_rss = max_rss
        self.clock = clock
        self.skipped_total: Counter = Counter()
        self.deferred_units_total = 0
        self._resume_at: tuple[int, str] | None = None  # order key of the first unit next cycle
        self._statm = os.fsencode(procfs) + b"/%d/statm"
        self._rollup = os.fsencode(procfs) + b"/%d/smaps_rollup"

    def collect(self, units: Iterable[Unit], procs_root: str | None = None) -> PssResult:
        root = procs_root if procs_root is not None else self.procs_root
        # Deepest cgroups first: a service before the slice holding it, so a slice costs only
        # the processes its children did not already read this cycle.
        order = sorted(
            (u for u in units if u.control_group),
            key=lambda u: self._key(u),
        )
        result = PssResult({u.name: None for u in order})
        if root is None or not order:
            return result
        start = 0
        if self._resume_at is not None:
            start = next((i for i, u in enumerate(order) if self._key(u) >= self._resume_at), 0)
        rotated = order[start:] + order[:start]
        deadline = self.clock() + self.budget
        processes: dict[int, Rollup | str] = {}  # this cycle's reads, shared by nested units
        listings: dict[str, tuple[list[int], list[str]] | None] = {}
        self._resume_at = None
        for position, unit in enumerate(rotated):
            pids = self._subtree_pids(root, unit.control_group, listings)
            finished = True
            for pid in pids:
                if pid in processes:
                    continue
                if self.clock() > deadline:
                    finished = False
                    break
                processes[pid] = self._read(pid, result)
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
            result.values[unit.name] = (
                sum(outcome.pss for outcome in outcomes),
                sum(outcome.uss for outcome in outcomes),
            )
        self.skipped_total.update(result.skipped)
        self.deferred_units_total += result.deferred_units
        return result

    @staticmethod
    def _key(unit: Unit) -> tuple[int, str]:
        return (-unit.control_group.count("/"), unit.name)

    def _read(self, pid: int, result: PssResult) -> Rollup | str:
        try:
            if parse_statm_resident(read_bytes(self._statm % pid)) > self.max_rss:
                result.skipped["max_rss"] += 1
                return _SKIPPED
            rollup = parse_smaps_rollup(read_bytes(self._rollup % pid).decode("ascii", errors="replace"))
        except OSError as e:
            # Gone since the listing, or a kernel thread (ESRCH: no address space to walk).
            if e.errno in VANISHED_ERRNOS:
                return NO_MAPPINGS
            result.skipped["error"] += 1
            return _SKIPPED
        except ParseError:
            result.skipped["error"] += 1
            return _SKIPPED
        result.read += 1
        return rollup

    def _subtree_pids(
        self, root: str, cgroup: str, listings: dict[str, tuple[list[int], list[str]] | None]
    ) -> list[int]:
        """Every PID in the cgroup and below (PID 0, outside our namespace, left out)."""
        pids: list[int] = []
        stack = [cgroup]
        while stack:
            current = stack.pop()
            if current not in listings:
                listings[current] = _listing(root, current)
            listing = listings[current]
            if listing is None:
                continue
            own, children = listing
            pids.extend(own)
            prefix = "" if current == "/" else current
            stack.extend(f"{prefix}/{child}" for child in children)
        return [pid for pid in pids if pid]


def _listing(root: str, cgroup: str) -> tuple[list[int], list[str]] | None:
    directory = root + cgroup if cgroup != "/" else root
    try:
        pids = parse_procs_bytes(read_bytes(directory + "/cgroup.procs"))
        children = [entry.name for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False)]
    except (OSError, ParseError):
        return None  # the cgroup went away (or is unreadable): no processes to read there
    return pids, children

