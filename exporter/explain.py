"""`systemd-memory-exporter explain`: why systemctl and top disagree, unit by unit, in words."""

from __future__ import annotations

from .snapshot import Breakdown, Snapshot, UnitSample

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


def _percent(part: int | None, whole: int | None) -> str:
    if part is None or not whole:
        return ""
    return f"{100 * part / whole:.0f} %"


def explain_unit(sample: UnitSample) -> str:
    b = Breakdown.of(sample)
    unit, totals, memory = sample.unit, sample.processes, sample.memory
    state = f"{unit.active_state}/{unit.sub_state}" if unit.sub_state else unit.active_state
    lines = [
        f"{unit.key}  ({state}, {totals.processes} "
        f"process{'es' if totals.processes != 1 else ''}, cgroup {unit.control_group})"
    ]
    def row(label: str, value: str, note: str) -> str:
        return f"  {label:<34}{value:>11}  {note}".rstrip()

    lines.append(row("systemctl says (cgroup usage)", human_bytes(b.systemctl), "MemoryCurrent, systemd-cgtop"))
    lines.append(
        row(
            "top says (RSS of its processes)",
            human_bytes(b.top),
            f"= anon {human_bytes(totals.rss_anon)} + file {human_bytes(totals.rss_file)}"
            f" + shmem {human_bytes(totals.rss_shmem)}",
        )
    )
    if memory is None and unit.uid is not None:
        lines.append("  No memory cgroup: on cgroup v1 systemd gives user managers no memory controller,")
        lines.append("  so systemctl --user shows MemoryCurrent [not set] and only top's view exists.")
        return "\n".join(lines)
    if memory is None:
        lines.append("  No memory cgroup: memory accounting is off for this unit (MemoryAccounting=no on cgroup v1),")
        lines.append("  so systemd reports no figure and only top's view exists.")
        return "\n".join(lines)
    lines.append("  What the cgroup figure is made of:")
    parts = (
        ("anonymous memory", b.anon, "heap and stacks; top counts it too"),
        ("mapped files", b.mapped_file, "code and mmapped files; in top as RssFile"),
        ("unmapped page cache", b.unmapped_cache, "files read or written: reclaimable, harmless"),
        ("shmem / tmpfs", b.shmem, "looks like cache, cannot be dropped without swap"),
        ("kernel", b.kernel, "slab, sockets, page tables charged to the unit"),
        ("unexplained remainder", b.remainder, "v1 usage fuzz, per-CPU charge batching"),
    )
    for label, value, why in parts:
        if value is not None:
            lines.append(row("  " + label, human_bytes(value), f"{_percent(value, b.systemctl):>5}  {why}"))
    if b.swap is not None:
        lines.append(row("swap (outside usage)", human_bytes(b.swap), ""))
    max_limit = memory.limits.get("max")
    if max_limit is not None:
        lines.append(
            row("MemoryMax", human_bytes(max_limit), f"working set {human_bytes(memory.working_set)}"
                f" = {_percent(memory.working_set, max_limit)} of it")
        )
    oom = memory.events.get("oom_kill")
    if oom:
        lines.append(f"  OOM kills so far: {oom}")
    lines.append("  " + verdict(b))
    return "\n".join(lines)


def verdict(b: Breakdown) -> str:
    """One sentence an operator can act on."""
    if b.systemctl is None or b.gap is None:
        return "No cgroup figure to compare."
    cache = b.unmapped_cache or 0
    if b.systemctl and cache / b.systemctl >= 0.5:
        return (
            f"Verdict: {_percent(cache, b.systemctl)} of systemctl's figure is reclaimable page cache; "
            f"the processes themselves hold {human_bytes(b.top)}. Not a leak."
        )
    if b.shmem and b.systemctl and b.shmem / b.systemctl >= 0.3:
        return (
            f"Verdict: {human_bytes(b.shmem)} is tmpfs/shared memory ({_percent(b.shmem, b.systemctl)}): "
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


def explain(snapshot: Snapshot, names: list[str] | None = None, top: int = 10) -> str:
    if names:
        samples = [s for s in snapshot.units if s.unit.name in names]
    else:
        ranked = sorted(
            (s for s in snapshot.units if s.unit.type != "slice"),
            key=lambda s: (s.memory.usage or 0) if s.memory else s.processes.rss,
            reverse=True,
        )
        samples = ranked[:top]
    header = (
        f"cgroup {snapshot.layout.name} layout, memory controller on "
        f"{snapshot.layout.memory_version.value if snapshot.layout.memory_version else 'none'}; "
        f"{len(snapshot.units)} units with a control group"
    )
    return "\n\n".join([header] + [explain_unit(s) for s in samples]) + "\n"
