"""One sample cycle: units from discovery, then each cgroup and each process read once, into an
immutable Snapshot whose source health comes from that cycle's reads.

Discovery runs in a child process (exporter/discovery_process.py) that owns the D-Bus
connection; the sampler thread reads files and publishes the snapshot. A hung D-Bus therefore
never stops fresh cgroup figures for the units already known; the snapshot marks the dbus
source down instead.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from .cgroupfs import Layout, detect_layout
from .cgroupreader import CgroupReader
from .errorlog import CycleErrors, ErrorLog
from .keptfiles import DEFAULT_KEPT_FILES, KeptFiles, default_limit
from .kernelfiles import describe, read_bytes
from .procfs import ProcessTotals, ProcessWalker
from .pss import DEFAULT_BUDGET, DEFAULT_MAX_RSS, PssCollector
from .snapshot import Snapshot, SourceHealth, UnitSample
from .systemd import DiscoveryResult


@dataclass(frozen=True)
class SamplerConfig:
    """The one place for these defaults: the command line's flags take theirs from here."""

    procfs: str = "/proc"
    cgroupfs: str = "/sys/fs/cgroup"
    interval: float = 15.0
    # --collector.pss: per-unit PSS/USS from smaps_rollup, bounded (exporter/pss.py).
    pss: bool = False
    pss_budget: float = DEFAULT_BUDGET
    pss_max_rss: int = DEFAULT_MAX_RSS
    # --sample.kept-files: descriptors of cgroup and status files kept open across cycles,
    # within the descriptor limit (exporter/keptfiles.py); 0 opens and closes every file.
    kept_files: int = DEFAULT_KEPT_FILES


class Sampler:
    """Builds snapshots. ``sample()`` must always be called from the same thread."""

    def __init__(self, config: SamplerConfig, discover: Callable[[], DiscoveryResult],
                 pause: Callable[[], None] = lambda: None):
        self.config = config
        self.discover = discover
        # Called between units and cgroups: where a running scrape goes first (service.py).
        self.pause = pause
        self.errors = ErrorLog()
        self.samples_total = 0
        self._last_success: dict[str, float] = {}
        self.pss = (
            PssCollector(config.procfs, config.pss_budget, config.pss_max_rss, errors=self.errors) if config.pss else None
        )
        self.files = KeptFiles(default_limit(config.kept_files, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        self._psi_off = False  # memory.pressure reads were refused: PSI is off until a reboot

    def sample(self) -> Snapshot:
        started_wall, started_cpu = time.time(), time.thread_time()
        phases: dict[str, float] = {}
        mark = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = now - mark
            mark = now

        sources: dict[str, SourceHealth] = {}
        found = self.discover()
        if not found.ok:
            self.errors.error("dbus", found.failure or "unavailable", "systemd", found.message)
        sources["dbus"] = self._health("dbus", found.ok, found.message, started_wall, found.refreshed_at)
        phase("discovery")

        cycle = CycleErrors(self.errors)
        for reason, where, message in found.tree_failures:  # the user-unit walk's, in discovery
            cycle.error("cgroup", reason, where, message)  # a rejected name fails no source (errorlog)
        layout_message = None
        try:
            layout = detect_layout(self.config.cgroupfs)
        except OSError as e:  # --path.cgroupfs unreadable (EACCES, ENOTDIR): this cycle has no cgroups
            cycle.read_failed("cgroup", self.config.cgroupfs, e)
            layout, layout_message = NOTHING_FOUND, f"cannot read {self.config.cgroupfs}: {describe(e)}"
        reader = CgroupReader(layout, cycle, self.files.read_many, pressure=not self._psi_off)
        # Keyed by Unit.key: a user's dbus.service is not the system's.
        memories = {}
        pause = self.pause
        for u in found.units:
            pause()
            memories[u.key] = reader.memory(u.control_group)
        # Once refused, never read again: 1,000 units made 1,000 failed opens and reads a cycle.
        self._psi_off = self._psi_off or reader.pressure_refused
        phase("cgroup")

        # v1 hands a cgroup.procs descriptor read again within a second the PID list it built for
        # the previous read (cgroup_pidlist_start; CGROUP_PIDLIST_DESTROY_DELAY is HZ): kept, it
        # would never show a new process at intervals under a second. cgroup2 lists afresh.
        procs_read = read_bytes if layout.name == "legacy" else self.files.read_bytes
        walker = ProcessWalker(layout.procs_root or "", self.config.procfs, cycle, procs_read,
                               self.files.read_many, pause)
        totals = walker.totals(u.control_group for u in found.units) if layout.procs_root else {}
        self.files.end_cycle()
        phase("procfs")

        pss: dict[str, tuple[int, int] | None] = {}
        if self.pss is not None:
            pss = self.pss.collect(found.units, layout.procs_root, walker.listings, walker.leaders_gone).values
            phase("pss")

        units = []
        for unit in found.units:
            processes = totals.get(unit.control_group)
            memory = memories[unit.key]
            if processes is None and memory is None:
                continue  # the cgroup is gone: the unit stopped since discovery
            pss_uss = pss.get(unit.key) or (None, None)
            units.append(UnitSample(unit, processes or ProcessTotals(), memory, *pss_uss))
        cgroup_ok = layout.memory_root is not None and not cycle.failed["cgroup"]
        sources["cgroup"] = self._health("cgroup", cgroup_ok, layout_message or _layout_message(layout), started_wall)
        procfs_ok = layout.procs_root is not None and not cycle.failed["procfs"]
        sources["procfs"] = self._health("procfs", procfs_ok, "", started_wall)
        self.samples_total += 1
        phase("build")
        phases["total"] = sum(phases.values())
        return Snapshot(
            taken_at=started_wall,
            interval=self.config.interval,
            layout=layout,
            units=tuple(sorted(units, key=lambda s: (s.unit.name, -1 if s.unit.uid is None else s.unit.uid))),
            phase_seconds=MappingProxyType(phases),
            cpu_seconds=time.thread_time() - started_cpu,
            sources=MappingProxyType(sources),
            errors=MappingProxyType(dict(self.errors.counts)),
            vanished=MappingProxyType(dict(self.errors.vanished)),
            samples_total=self.samples_total,
            dbus_transport=found.transport,
            pss_skipped=None if self.pss is None else MappingProxyType(dict(self.pss.skipped_total)),
            pss_deferred_units=None if self.pss is None else self.pss.deferred_units_total,
        )

    def _health(self, source: str, ok: bool, message: str, now: float, success_at: float | None = None) -> SourceHealth:
        if ok:
            self._last_success[source] = success_at or now
        return SourceHealth(ok, self._last_success.get(source), message)


# What detect_layout gives for a cgroupfs with no hierarchy in it.
NOTHING_FOUND = Layout("legacy", None, None, None, None)


def _layout_message(layout: Layout) -> str:
    if layout.memory_root is None:
        return "no cgroup memory controller found"
    return f"{layout.name} layout, memory controller on cgroup {layout.memory_version.value}"
