"""One sample cycle: units from discovery, then each cgroup and each process read once.

Threads: the discovery thread owns the D-Bus connection; the sampler thread reads files and
publishes an immutable Snapshot. A hung D-Bus therefore never stops fresh cgroup figures for
the units already known; the snapshot marks the dbus source down instead.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType

from . import memory as memfiles
from .cgroupfs import (
    VANISHED_ERRNOS,
    Layout,
    MemoryVersion,
    ParseError,
    detect_layout,
    parse_procs_bytes,
    read_bytes,
    read_text,
)
from .procfs import parse_status_bytes
from .pss import PssCollector
from .snapshot import ProcessTotals, Snapshot, SourceHealth, UnitSample
from .systemd import DiscoveryResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerConfig:
    procfs: str = "/proc"
    cgroupfs: str = "/sys/fs/cgroup"
    interval: float = 15.0
    # --collector.pss: per-unit PSS/USS from smaps_rollup, bounded (exporter/pss.py).
    pss: bool = False
    pss_budget: float = 2.0
    pss_max_rss: int = 4 << 30


class ErrorLog:
    """Counts errors by (source, reason) and logs each distinct kind of problem once a while.

    A bad file seen every cycle would otherwise flood the journal; the counter carries the rate.
    """

    def __init__(self, repeat_after: float = 600.0):
        self.counts: Counter[tuple[str, str]] = Counter()
        self.vanished: Counter[str] = Counter()
        self._last_logged: dict[tuple[str, str, str], float] = {}
        self._repeat_after = repeat_after

    def error(self, source: str, reason: str, where: str, message: str) -> None:
        self.counts[source, reason] += 1
        key = (source, reason, os.path.basename(where))
        now = time.monotonic()
        if now - self._last_logged.get(key, -self._repeat_after) >= self._repeat_after:
            self._last_logged[key] = now
            log.warning("%s error (%s) at %s: %s", source, reason, where, message)

    def os_error(self, source: str, where: str, error: OSError) -> None:
        reason = "permission" if error.errno in (errno.EACCES, errno.EPERM) else "io"
        message = error.strerror or str(error)
        if source == "procfs" and reason == "permission":
            message += HIDEPID_HINT
        self.error(source, reason, where, message)


HIDEPID_HINT = (
    " (other users' processes are hidden: is /proc mounted with hidepid? Their RSS is missing from"
    " the per-unit sums; see deploy/systemd/README.md for the group or capability that restores them)"
)


def minimal_roots(paths: Iterable[str]) -> list[str]:
    """The paths not inside another one: walking these covers every unit's subtree once."""
    roots: list[str] = []
    for path in sorted(set(paths)):
        parent = roots[-1] if roots else None
        if parent is not None and (parent == "/" or path.startswith(parent + "/")):
            continue
        roots.append(path)
    return roots


def _join(root: str, cgroup: str) -> str:
    return root + cgroup if cgroup != "/" else root


class ProcessWalker:
    """Sums /proc/PID/status over cgroup subtrees: every cgroup.procs and status read once.

    The hot loop of a cycle: one status file per process. It reads bytes through raw fds and
    parses them without decoding (procfs.parse_status_bytes), and sums plain ints.
    """

    def __init__(self, procs_root: str, procfs: str, errors: ErrorLog):
        self.procs_root = procs_root
        self.procfs = procfs
        self.errors = errors
        self._status = os.fsencode(procfs) + b"/%d/status"
        # hidepid=invisible makes another user's /proc/PID look like a process that exited.
        # kill(pid, 0) tells them apart, but only for a procfs of our own PID namespace.
        try:
            self._own_pid_namespace = os.readlink(os.path.join(procfs, "self")) == str(os.getpid())
        except OSError:
            self._own_pid_namespace = False

    def _hidden(self, pid: int) -> bool:
        """A PID listed in cgroup.procs with no /proc entry: hidden from us, or gone?"""
        if not self._own_pid_namespace:
            return False
        try:
            os.kill(pid, 0)
        except PermissionError:
            return True  # alive, and not ours: hidepid hid it
        except OSError:
            return False
        return False  # ours, so not hidden: it exited between the listing and the read

    def totals(self, cgroups: Iterable[str]) -> dict[str, ProcessTotals]:
        """cgroup path -> totals of its subtree, for every cgroup at or below ``cgroups``."""
        result: dict[str, ProcessTotals] = {}
        for root in minimal_roots(cgroups):
            self._walk(root, result, listed=False)
        return result

    def _walk(self, cgroup: str, result: dict[str, ProcessTotals], listed: bool = True) -> ProcessTotals | None:
        """``listed``: the directory was seen in its parent's listing, so its absence now means
        it vanished mid-walk. A unit's own path may never have existed (systemd names a
        ControlGroup for idle sockets and mounts that have no directory): no cgroup, no count."""
        directory = _join(self.procs_root, cgroup)
        try:
            pids = parse_procs_bytes(read_bytes(directory + "/cgroup.procs"))
            children = _subdirectories(directory)
        except OSError as e:
            if e.errno not in VANISHED_ERRNOS:
                self.errors.os_error("cgroup", directory, e)
            elif listed:
                self.errors.vanished["cgroup"] += 1
            return None
        except ParseError as e:
            self.errors.error("cgroup", "parse", directory + "/cgroup.procs", str(e))
            return None
        count, anon, file, shmem, swap = 0, 0, 0, 0, 0
        status = self._status
        for pid in pids:
            # PID 0: a process outside our PID namespace (a container's launcher); it has no
            # /proc entry here, so it is not one of the processes we can see.
            if not pid:
                continue
            count += 1
            try:
                pid_anon, pid_file, pid_shmem, pid_swap = parse_status_bytes(read_bytes(status % pid))
            except OSError as e:
                if e.errno in VANISHED_ERRNOS and self._hidden(pid):
                    self.errors.os_error("procfs", f"{self.procfs}/PID/status", PermissionError(errno.EACCES, "hidden"))
                elif e.errno in VANISHED_ERRNOS:
                    self.errors.vanished["process"] += 1
                    count -= 1
                else:
                    self.errors.os_error("procfs", f"{self.procfs}/PID/status", e)
                continue
            except ParseError as e:
                self.errors.error("procfs", "parse", f"{self.procfs}/PID/status", str(e))
                continue
            anon += pid_anon
            file += pid_file
            shmem += pid_shmem
            swap += pid_swap
        prefix = "" if cgroup == "/" else cgroup
        for child in children:
            sub = self._walk(f"{prefix}/{child}", result)
            if sub is not None:
                count += sub.processes
                anon += sub.rss_anon
                file += sub.rss_file
                shmem += sub.rss_shmem
                swap += sub.swap
        totals = ProcessTotals(count, anon, file, shmem, swap)
        result[cgroup] = totals
        return totals


def _subdirectories(directory: str) -> list[str]:
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


def read_files(directory: str, names: Iterable[str], source: str, errors: ErrorLog) -> dict[str, str] | None:
    """Texts of the files that exist; None when the directory itself is gone."""
    texts = {}
    for name in names:
        path = f"{directory}/{name}"
        try:
            texts[name] = read_text(path)
        except OSError as e:
            if e.errno not in VANISHED_ERRNOS:
                errors.os_error(source, path, e)
            elif not os.path.isdir(directory):
                return None
            # else: this kernel has no such file (memory.peak before 5.19...): absent.
    return texts


class CgroupReader:
    def __init__(self, layout: Layout, errors: ErrorLog):
        self.layout = layout
        self.errors = errors
        if layout.memory_version is MemoryVersion.V2:
            self._files, self._build = memfiles.V2_FILES, memfiles.memory_from_v2
        else:
            self._files, self._build = memfiles.V1_FILES, memfiles.memory_from_v1

    def memory(self, cgroup: str) -> memfiles.CgroupMemory | None:
        if self.layout.memory_root is None:
            return None
        directory = _join(self.layout.memory_root, cgroup)
        texts = read_files(directory, self._files, "cgroup", self.errors)
        if texts is None or not texts:
            # v1: no memory cgroup for units without MemoryAccounting; or the unit just went.
            return None
        problems: memfiles.Problems = []
        memory = self._build(texts, problems)
        if self.layout.pressure_root is not None:
            pressure_texts = read_files(
                _join(self.layout.pressure_root, cgroup), (memfiles.PRESSURE_FILE,), "cgroup", self.errors
            )
            memory = memory.with_pressure(memfiles.parse_pressure_file(pressure_texts or {}, problems))
        # One count per bad file, however many of its lines were bad.
        for name, message in dict(reversed(problems)).items():
            self.errors.error("cgroup", "parse", f"{directory}/{name}", message)
        return memory


class Sampler:
    """Builds snapshots. ``sample()`` must always be called from the same thread."""

    def __init__(self, config: SamplerConfig, discover: Callable[[], DiscoveryResult]):
        self.config = config
        self.discover = discover
        self.errors = ErrorLog()
        self.samples_total = 0
        self._last_success: dict[str, float] = {}
        self.pss = PssCollector(None, config.procfs, config.pss_budget, config.pss_max_rss) if config.pss else None

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

        layout = detect_layout(self.config.cgroupfs)
        reader = CgroupReader(layout, self.errors)
        errors_before = sum(self.errors.counts.values())
        memories = {u.name: reader.memory(u.control_group) for u in found.units}
        cgroup_ok = layout.memory_root is not None and sum(self.errors.counts.values()) == errors_before
        phase("cgroup")

        errors_before = self.errors.counts["procfs", "io"] + self.errors.counts["procfs", "permission"]
        walker = ProcessWalker(layout.procs_root or "", self.config.procfs, self.errors)
        totals = walker.totals(u.control_group for u in found.units) if layout.procs_root else {}
        procfs_ok = (
            layout.procs_root is not None
            and self.errors.counts["procfs", "io"] + self.errors.counts["procfs", "permission"] == errors_before
        )
        phase("procfs")

        pss: dict[str, tuple[int, int] | None] = {}
        if self.pss is not None:
            pss = self.pss.collect(found.units, layout.procs_root).values
            phase("pss")

        units = []
        for unit in found.units:
            processes = totals.get(unit.control_group)
            memory = memories[unit.name]
            if processes is None and memory is None:
                continue  # the cgroup is gone: the unit stopped since discovery
            pss_uss = pss.get(unit.name) or (None, None)
            units.append(UnitSample(unit, processes or ProcessTotals(), memory, *pss_uss))
        sources["cgroup"] = self._health("cgroup", cgroup_ok, _layout_message(layout), started_wall)
        sources["procfs"] = self._health("procfs", procfs_ok, "", started_wall)
        self.samples_total += 1
        phase("build")
        phases["total"] = sum(phases.values())
        return Snapshot(
            taken_at=started_wall,
            interval=self.config.interval,
            layout=layout,
            units=tuple(sorted(units, key=lambda s: s.unit.name)),
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


def _layout_message(layout: Layout) -> str:
    if layout.memory_root is None:
        return "no cgroup memory controller found"
    return f"{layout.name} layout, memory controller on cgroup {layout.memory_version.value}"
