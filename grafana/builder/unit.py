"""systemd unit memory — one unit: what its memory is made of, systemctl against top, limits, OOM, pressure."""

from __future__ import annotations

from . import panels as p
from .frame import dashboard
from .overview import SYSTEMCTL, TOP
from .panels import BYTES
from .promql import Queries

FILE = "systemd-memory-unit.json"


def unit_tiles(q: Queries) -> list[dict]:
    tiles = [
        ("systemctl's number", "Cgroup usage: what `systemctl status` shows as Memory: (MemoryCurrent). Includes "
         "page cache, tmpfs/shm and kernel memory.", q.usage(), "red", BYTES),
        ("top's number", "RES of the unit's processes, summed (RssAnon + RssFile + RssShmem from /proc/PID/status). "
         "Shared pages are counted once per process.", q.rss(), "green", BYTES),
        ("Gap", "systemctl's number minus top's number. Negative when processes share many pages (top counts them "
         "in each process).", q.gap(), "orange", BYTES),
        ("Reclaimable cache", "Page cache the kernel can drop when memory runs short: file − tmpfs/shm − dirty − "
         "writeback.", q.reclaimable(), "blue", BYTES),
        ("Swap", "Swap used by the unit; not part of systemctl's memory number. Absent on cgroup v1 without swap "
         "accounting.", q.mem("swap"), "dark-red", BYTES),
        ("Processes", "Processes in the unit's cgroup, child cgroups included.", q.metric("systemd_unit_processes"),
         "text", "none"),
    ]
    return [
        p.stat(title, description, p.pos(4 * i, 1, 4, 4), expr, unit=unit, color=color)
        for i, (title, description, expr, color, unit) in enumerate(tiles)
    ]


def build(q: Queries) -> dict:
    # Panels are inside a row repeated once per selected unit, so $unit is a single unit here.
    row = {"type": "row", "title": "$unit", "collapsed": False, "repeat": "unit", "gridPos": p.pos(0, 0, 24, 1),
           "panels": []}
    panels = [row] + unit_tiles(q) + [
        p.timeseries(
            "Where the memory is",
            "Stacked, the parts of the unit's cgroup memory: anon = process memory (heap, stacks, private "
            "mappings); mapped file = file pages processes have mapped (binaries, libraries, mmap); unmapped "
            "cache = file − mapped file − tmpfs/shm, page cache no process maps (files read or written earlier, "
            "also by processes that have exited): top never shows it; tmpfs/shm = files in tmpfs and shared "
            "memory, cache that cannot be dropped; kernel = slab, kernel stacks, page tables, socket buffers. "
            "The red line is systemctl's number: the stack adds up to about it (mapped tmpfs pages are in both "
            "mapped file and tmpfs/shm). Swap (dashed, stacked apart) is not part of systemctl's number.",
            p.pos(0, 5, 24, 10),
            p.targets(*q.layers(), (q.mem("swap"), "swap"), (q.usage(), SYSTEMCTL)),
            stack=True,
            overrides=[
                p.by_ref("F", p.prop("custom.stacking", {"mode": "normal", "group": "swap"}), p.NO_FILL, p.DASH,
                         p.fixed("dark-red")),
                p.by_ref("G", *p.LINE_ON_TOP, p.fixed("red")),
            ],
        ),
        p.timeseries(
            "systemctl vs top",
            "Red: systemctl's number (cgroup usage). Green: top's number (RES of every process in the unit, "
            "summed). The distance between them is page cache, tmpfs/shm, kernel memory and pages left by "
            "exited processes; see \"Where the memory is\".",
            p.pos(0, 15, 12, 8),
            p.targets((q.usage(), SYSTEMCTL), (q.rss(), TOP)),
            overrides=[p.by_ref("A", p.fixed("red")), p.by_ref("B", p.fixed("green"))],
        ),
        p.timeseries(
            "Working set vs MemoryMax / MemoryHigh",
            "Working set = cgroup usage − inactive page cache (the kubelet/cAdvisor definition): the memory the "
            "unit is actively using. Dashed: MemoryMax (the kernel OOM-kills above it) and MemoryHigh (the "
            "kernel throttles and reclaims above it); no line when the unit has no such limit. Dotted: the "
            "highest usage the kernel has recorded (memory.peak, kernel 5.19+ on v2).",
            p.pos(12, 15, 12, 8),
            p.targets(
                (q.metric("systemd_unit_memory_working_set_bytes"), "working set"),
                (q.metric("systemd_unit_memory_limit_bytes", 'limit="max"'), "MemoryMax"),
                (q.metric("systemd_unit_memory_limit_bytes", 'limit="high"'), "MemoryHigh"),
                (q.metric("systemd_unit_memory_peak_bytes"), "peak"),
            ),
            overrides=[
                p.by_ref("A", p.fixed("blue")),
                p.by_ref("B", *p.dashed("red")),
                p.by_ref("C", *p.dashed("orange")),
                p.by_ref("D", p.prop("custom.lineStyle", {"fill": "dot", "dash": [0, 10]}), p.NO_FILL, p.fixed("text")),
            ],
        ),
        p.timeseries(
            "OOM kills and limit events",
            "memory.events, per interval. oom_kill: processes killed by the OOM killer. oom: the OOM killer was "
            "invoked because of the unit's limit. max: usage hit MemoryMax and the kernel had to reclaim (v1: "
            "memory.failcnt). high: usage went over MemoryHigh and the unit was throttled. low: memory protected "
            "by MemoryLow was reclaimed anyway. Counts include child cgroups (cgroup v2).",
            p.pos(0, 23, 12, 8),
            [p.target(f"increase({q.metric('systemd_unit_memory_events_total')}[$__rate_interval])", "{{event}}")],
            unit="short", bars=True, legend_calcs=("sum",),
        ),
        p.timeseries(
            "Memory pressure (cgroup v2 only)",
            "Share of time the unit's processes were stalled waiting for memory (PSI, memory.pressure). some: "
            "at least one process waited; full: all of them did, no progress at all. Sustained values above a "
            "few percent mean the unit is short of memory (reclaim, swap-in, throttling at MemoryHigh). Needs a "
            "cgroup2 hierarchy (pure v2, or the unified tree of a hybrid setup): empty on pure cgroup v1.",
            p.pos(12, 23, 12, 8),
            [p.target(f"rate({q.metric('systemd_unit_memory_pressure_seconds_total')}[$__rate_interval])", "{{kind}}")],
            unit="percentunit",
        ),
        p.timeseries(
            "Page cache in detail",
            "memory.stat file items. active_file/inactive_file: cache the kernel sees as recently used or not "
            "(inactive goes first; the working set leaves inactive_file out). file_mapped: mapped by processes. "
            "file_dirty/file_writeback: written but not yet on disk, cannot be dropped until written. shmem: "
            "tmpfs and shared memory.",
            p.pos(0, 31, 12, 8),
            [p.target(q.stat("active_file|inactive_file|file_mapped|file_dirty|file_writeback|shmem"), "{{item}}")],
        ),
        p.timeseries(
            "Kernel memory in detail",
            "memory.stat kernel items charged to the unit: kernel (all of it; v2 5.18+, v1 kmem usage), "
            "slab_reclaimable (dentries and inodes, shrinks under pressure), slab_unreclaimable, kernel_stack, "
            "pagetables (grows with mapped memory), percpu, sock (network buffers), vmalloc.",
            p.pos(12, 31, 12, 8),
            [p.target(q.stat("kernel|kernel_stack|pagetables|percpu|sock|vmalloc|slab_reclaimable|slab_unreclaimable"),
                      "{{item}}")],
        ),
    ]
    oom_annotation = {
        "name": "OOM kills",
        "datasource": p.DS,
        "enable": True,
        "hide": False,
        "iconColor": "red",
        "expr": "increase(" + q.metric("systemd_unit_memory_events_total", 'event="oom_kill"') + "[2m]) > 0",
        "titleFormat": "OOM kill",
        "textFormat": "{{unit}}",
    }
    return dashboard(
        "systemd-memory-unit",
        "systemd unit memory",
        "One systemd unit (a row per selected unit): what its memory is made of, systemctl's number against "
        "top's, limits, OOM kills and memory pressure.",
        panels,
        q.sel,
        default_unit="systemd-journald.service",
        annotations=[oom_annotation],
    )
