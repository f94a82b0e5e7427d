"""Why systemctl and top disagree, unit by unit: the reconciliation as data (``reconcile``),
and its renderings as text (`explain`) and JSON (`explain --format json`). The landing page
and /unit/<name> (exporter/page.py) draw the same records.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence

from .memory import CgroupMemory
from .records import record
from .snapshot import Breakdown, Snapshot, UnitSample
from .systemd import unit_key

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    sign = "-" if value < 0 else ""
    size = float(abs(value))
    for unit in _UNITS:
        if size < 1024 or unit == _UNITS[-1]:
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def percent(part: int | None, whole: int | None) -> str:
    if part is None or not whole:
        return ""
    return f"{100 * part / whole:.0f} %"


@record
class Part:
    """One piece of the cgroup figure."""

    key: str  # stable name for scripts and CSS: anon, mapped_file, unmapped_cache, shmem, kernel, remainder
    label: str
    bytes: int | None  # None: the kernel does not say (e.g. no kernel figure on this v1 host)
    why: str


# The parts of the cgroup figure, in the order they are shown. Breakdown attribute = key.
PARTS = (
    ("anon", "anonymous memory", "heap and stacks; top counts it too"),
    ("mapped_file", "mapped files", "code and mmapped files; in top as RssFile"),
    ("unmapped_cache", "unmapped page cache", "files read or written: reclaimable, harmless"),
    ("shmem", "shmem / tmpfs", "looks like cache, cannot be dropped without swap"),
    # Not sockets: v2 charges them to usage beside kernel (the remainder), v1 to memory.kmem.tcp.*.
    ("kernel", "kernel", "slab, kernel stacks, page tables charged to the unit"),
    ("remainder", "unexplained remainder", "v1 usage fuzz, per-CPU charge batching; v2 swap cache, sockets"),
)
KERNEL_SUMMED = "summed from memory.stat's kernel parts: this kernel (before 5.18) prints no total"
NEGATIVE_REMAINDER = "below zero: v1's usage_in_bytes lags memory.stat (per-CPU charge batching)"


def _why(key: str, why: str, value: int | None, memory: CgroupMemory) -> str:
    if key == "kernel" and memory.kernel_summed:
        return KERNEL_SUMMED
    if key == "remainder" and value is not None and value < 0:
        return NEGATIVE_REMAINDER
    return why


@record
class Reconciliation:
    """Everything `explain` says about one unit, as figures (bytes; None where unknown)."""

    unit: str  # exactly as systemd spells it
    type: str
    active_state: str
    sub_state: str
    control_group: str
    slice: str  # the slice the unit sits in ("-.slice" for the root's children)
    uid: int | None  # user manager's UID; None for the system manager's units
    processes: int
    systemctl: int | None  # cgroup usage: MemoryCurrent
    top: int  # summed RSS = rss_anon + rss_file + rss_shmem
    rss_anon: int
    rss_file: int
    rss_shmem: int
    gap: int | None  # systemctl - top
    parts: tuple[Part, ...]  # empty without a memory cgroup
    swap: int | None  # outside usage
    working_set: int | None
    peak: int | None
    limits: Mapping[str, int]  # only the limits that are set: max, high, low, min, swap_max
    events: Mapping[str, int]  # hierarchical: low, high, max, oom, oom_kill, oom_group_kill
    pressure_some_seconds: float | None  # PSI totals, cgroup v2 only
    pressure_full_seconds: float | None
    pss: int | None  # --collector.pss only
    uss: int | None
    verdict: str

    @property
    def has_memory_cgroup(self) -> bool:
        return bool(self.parts)

    def to_json(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["parts"] = [{"key": p.key, "label": p.label, "bytes": p.bytes, "why": p.why} for p in self.parts]
        out["limits"], out["events"] = dict(self.limits), dict(self.events)
        return out


def slice_of(control_group: str) -> str:
    """The slice a cgroup path sits in: /system.slice/foo.service -> system.slice;
    /init.scope -> -.slice (the root slice, whose cgroup is /)."""
    parents = [part for part in control_group.strip("/").split("/")[:-1] if part.endswith(".slice")]
    return parents[-1] if parents else "-.slice"


def reconcile(sample: UnitSample) -> Reconciliation:
    b = Breakdown.of(sample)
    unit, totals, memory = sample.unit, sample.processes, sample.memory
    parts: tuple[Part, ...] = ()
    limits: Mapping[str, int] = {}
    events: Mapping[str, int] = {}
    pressure = None
    if memory is not None:
        shown = []
        for key, label, why in PARTS:
            value = getattr(b, key)
            shown.append(Part(key, label, value, _why(key, why, value, memory)))
        parts = tuple(shown)
        limits, events, pressure = memory.limits, memory.events, memory.pressure
    return Reconciliation(
        unit=unit.name,
        type=unit.type,
        active_state=unit.active_state,
        sub_state=unit.sub_state,
        control_group=unit.control_group,
        slice=slice_of(unit.control_group),
        uid=unit.uid,
        processes=totals.processes,
        systemctl=b.systemctl,
        top=b.top,
        rss_anon=totals.rss_anon,
        rss_file=totals.rss_file,
        rss_shmem=totals.rss_shmem,
        gap=b.gap,
        parts=parts,
        swap=b.swap,
        working_set=memory.working_set if memory else None,
        peak=memory.peak if memory else None,
        limits=dict(limits),
        events=dict(events),
        pressure_some_seconds=pressure.some_total_us / 1e6 if pressure else None,
        pressure_full_seconds=(
            pressure.full_total_us / 1e6 if pressure and pressure.full_total_us is not None else None
        ),
        pss=sample.pss,
        uss=sample.uss,
        verdict=verdict(b),
    )


def no_memory_cgroup(r: Reconciliation) -> str:
    """Why a unit has top's view only, for explain and the unit page. The reconciliation does
    not know the hierarchy, so the sentence holds on cgroup v1 and v2 alike."""
    if r.uid is not None:
        return ("No memory cgroup: this user manager was given no memory controller (cgroup v1 never"
                " delegates it; on v2 user@.service lacks Delegate=memory), so systemctl --user shows"
                " MemoryCurrent [not set] and only top's view exists.")
    return ("No memory cgroup: memory accounting is off for this unit (MemoryAccounting=no, or on"
            " cgroup v2 no memory controller enabled above it), so systemd reports no figure and only"
            " top's view exists.")


def explain_text(r: Reconciliation) -> str:
    name = unit_key(r.unit, r.uid)
    state = f"{r.active_state}/{r.sub_state}" if r.sub_state else r.active_state
    lines = [
        f"{name}  ({state}, {r.processes} process{'es' if r.processes != 1 else ''}, cgroup {r.control_group})"
    ]

    def row(label: str, value: str, note: str) -> str:
        return f"  {label:<34}{value:>11}  {note}".rstrip()

    lines.append(row("systemctl says (cgroup usage)", human_bytes(r.systemctl), "MemoryCurrent, systemd-cgtop"))
    lines.append(
        row(
            "top says (RSS of its processes)",
            human_bytes(r.top),
            f"= anon {human_bytes(r.rss_anon)} + file {human_bytes(r.rss_file)} + shmem {human_bytes(r.rss_shmem)}",
        )
    )
    if not r.has_memory_cgroup:
        lines.append(textwrap.fill(no_memory_cgroup(r), 100, initial_indent="  ", subsequent_indent="  "))
        return "\n".join(lines)
    if r.control_group == "/" and r.systemctl is not None:
        # v2's root has no memory.current, so only v1 gets here. systemd asks /proc/meminfo for
        # the host's root slice before it asks which hierarchy it is on (unit_get_memory_current).
        lines.append("  (-.slice: this is the root memory cgroup's usage; on a host, not in a container,"
                     " systemctl shows MemTotal - MemAvailable instead)")
    lines.append("  What the cgroup figure is made of:")
    for part in r.parts:
        if part.bytes is not None:
            lines.append(row("  " + part.label, human_bytes(part.bytes), f"{percent(part.bytes, r.systemctl):>5}  {part.why}"))
    if r.swap is not None:
        lines.append(row("swap (outside usage)", human_bytes(r.swap), ""))
    max_limit = r.limits.get("max")
    if max_limit is not None:
        share = percent(r.working_set, max_limit)  # "" without a working set or with MemoryMax=0
        lines.append(row("MemoryMax", human_bytes(max_limit), f"working set {human_bytes(r.working_set)}"
                         + (f" = {share} of it" if share else "")))
    oom = r.events.get("oom_kill")
    if oom:
        lines.append(f"  OOM kills so far: {oom}")
    lines.append("  " + r.verdict)
    return "\n".join(lines)


def verdict(b: Breakdown) -> str:
    """One sentence an operator can act on."""
    if b.systemctl is None or b.gap is None:
        return "No cgroup figure to compare."
    cache = b.unmapped_cache or 0
    if b.systemctl and cache / b.systemctl >= 0.5:
        return (
            f"Verdict: {percent(cache, b.systemctl)} of systemctl's figure is reclaimable page cache; "
            f"the processes themselves hold {human_bytes(b.top)}. Not a leak."
        )
    if b.shmem and b.systemctl and b.shmem / b.systemctl >= 0.3:
        return (
            f"Verdict: {human_bytes(b.shmem)} is tmpfs/shared memory ({percent(b.shmem, b.systemctl)}): "
            "it is real memory use that page-cache reclaim cannot free. Check files in /dev/shm or tmpfs."
        )
    if abs(b.gap) <= max(b.systemctl // 10, 16 << 20):
        return "Verdict: systemctl and top are close (within 10 % or 16 MiB): the processes' memory is the unit's."
    if b.gap < 0:
        return (
            f"Verdict: top counts {human_bytes(-b.gap)} more than the cgroup holds: summed RSS counts pages shared "
            "between processes (forks, libraries) once per process, and file pages first read by another cgroup "
            "are charged there. PSS (--collector.pss) counts shared pages once."
        )
    return f"Verdict: systemctl counts {human_bytes(b.gap)} more than top; the parts above say where it is."


def select(snapshot: Snapshot, names: Sequence[str] | None = None, top: int = 10) -> list[UnitSample]:
    """The named units, or the ``top`` non-slice units by cgroup usage (RSS without a cgroup)."""
    if names:
        return [s for s in snapshot.units if s.unit.name in names]
    ranked = sorted(
        (s for s in snapshot.units if s.unit.type != "slice"),
        key=lambda s: (s.memory.usage or 0) if s.memory else s.processes.rss,
        reverse=True,
    )
    return ranked[:top]


def layout_summary(snapshot: Snapshot) -> dict:
    version = snapshot.layout.memory_version
    return {
        "layout": snapshot.layout.name,
        "memory_controller": version.value if version else None,
        "units_with_cgroup": len(snapshot.units),
        "taken_at": snapshot.taken_at,
    }


def explain(snapshot: Snapshot, names: Sequence[str] | None = None, top: int = 10, format: str = "text") -> str:
    """`explain`'s output: ``format`` "text" for people, "json" for scripts (one object)."""
    reconciliations = [reconcile(s) for s in select(snapshot, names, top)]
    summary = layout_summary(snapshot)
    if format == "json":
        return json.dumps({**summary, "units": [r.to_json() for r in reconciliations]}, indent=2) + "\n"
    header = (
        f"cgroup {summary['layout']} layout, memory controller on {summary['memory_controller'] or 'none'}; "
        f"{summary['units_with_cgroup']} units with a control group"
    )
    return "\n\n".join([header] + [explain_text(r) for r in reconciliations]) + "\n"
