"""The immutable result of one sample cycle: what /metrics, `explain` and the landing page show.

A raw sample (optional figures as read) kept apart from what is derived from it, as in
below's sample/model split: the derivations live in ``Breakdown``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .cgroupfs import Layout
from .memory import CgroupMemory
from .procfs import ProcessTotals
from .records import record
from .systemd import Unit

SOURCES = ("dbus", "cgroup", "procfs")


@record
class UnitSample:
    unit: Unit
    processes: ProcessTotals
    memory: CgroupMemory | None  # None: no memory cgroup (accounting off on v1, or vanished)
    pss: int | None = None  # only with --collector.pss
    uss: int | None = None


@record
class SourceHealth:
    up: bool
    last_success: float | None  # unix time
    message: str = ""


@record
class Snapshot:
    taken_at: float  # unix time the cycle started
    interval: float
    layout: Layout
    units: tuple[UnitSample, ...]
    phase_seconds: Mapping[str, float]  # wall time per phase of this cycle
    cpu_seconds: float  # CPU time of this cycle (sampler thread)
    sources: Mapping[str, SourceHealth]
    errors: Mapping[tuple[str, str], int]  # (source, reason) -> count since start
    vanished: Mapping[str, int]  # "process"/"cgroup" -> count since start
    samples_total: int
    dbus_transport: str
    # --collector.pss only (None without it): processes not read by reason (max_rss, error),
    # and units left for a later cycle by the time budget; both counted since start.
    pss_skipped: Mapping[str, int] | None = None
    pss_deferred_units: int | None = None

    def unit(self, name: str) -> UnitSample | None:
        return next((u for u in self.units if u.unit.name == name), None)


@record
class Breakdown:
    """Why systemctl's figure differs from top's, for one unit. Bytes; None where unknown.

    cgroup side: usage ~= anon + file + kernel (+ a remainder the kernel does not itemise,
    and v1's usage_in_bytes "fuzz"). file = shmem + mapped file + unmapped page cache.
    """

    systemctl: int | None  # cgroup usage, what `systemctl status` shows as Memory:
    top: int  # summed RSS of the unit's processes
    anon: int | None
    mapped_file: int | None
    unmapped_cache: int | None  # reclaimable page cache nobody maps
    shmem: int | None  # tmpfs/shm: looks like cache, cannot be dropped without swap
    kernel: int | None
    remainder: int | None  # usage minus the parts above
    swap: int | None  # not part of usage

    @classmethod
    def of(cls, sample: UnitSample) -> "Breakdown":
        memory = sample.memory
        top = sample.processes.rss
        if memory is None:
            return cls(None, top, None, None, None, None, None, None, None)
        stat = memory.stat
        anon, file, shmem, file_mapped = stat.get("anon"), stat.get("file"), stat.get("shmem"), stat.get("file_mapped")
        mapped_file = unmapped = None
        if None not in (file, shmem, file_mapped):
            # file_mapped counts mapped shmem too, which shmem already holds. The unit's processes
            # map at most their summed RssShmem of it (less when they share pages), so what is
            # left of file_mapped is mapped regular files: a database's 4 GiB of mapped
            # shared_buffers no longer hides its unmapped page cache. Capped: parts never exceed file.
            mapped_shmem = min(shmem, sample.processes.rss_shmem)
            mapped_file = min(max(file_mapped - mapped_shmem, 0), max(file - shmem, 0))
            unmapped = max(file - shmem - mapped_file, 0)
        kernel = stat.get("kernel")
        remainder = None
        # Only where file's split is known: otherwise the page cache would be in no part at all.
        if memory.usage is not None and None not in (anon, mapped_file):
            remainder = memory.usage - anon - file - (kernel or 0)
        return cls(memory.usage, top, anon, mapped_file, unmapped, shmem, kernel, remainder, memory.swap)

    @property
    def gap(self) -> int | None:
        return None if self.systemctl is None else self.systemctl - self.top
