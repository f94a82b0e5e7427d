"""systemd unit memory — one unit: what its memory is made of, systemctl against top, limits, OOM, pressure."""

from __future__ import annotations

from . import panels as p
from .frame import dashboard
from .overview import SYSTEMCTL, TOP
from .panels import BYTES
from .promql import Queries

FILE = "systemd-memory-unit.json"


VERDICTS = {  # explain's verdicts (exporter/explain.py), by the number q.verdict() gives
    1: ("Mostly unmapped page cache: the kernel drops it when needed. Not a leak.", "green"),
    2: ("tmpfs/shared memory: real memory use that reclaim cannot free. Check /dev/shm and tmpfs.", "purple"),
    3: ("systemctl and top are close: the processes' memory is the unit's.", "blue"),
    4: ("top counts shared pages once per process: it shows more than the cgroup holds.", "blue"),
    5: ("systemctl counts more than top: see \"Where the memory is\" for the parts.", "orange"),
}


def verdict_tile(q: Queries) -> dict:
    tile = p.stat(
        "Verdict",
        "What `systemd-memory-exporter explain UNIT` concludes, first match wins: ≥ 50 % of systemctl's number "
        "is page cache nobody maps; ≥ 30 % is tmpfs/shm; systemctl and top within 10 % or 16 MiB; top above "
        "systemctl (shared pages); else systemctl above top. No value: the unit has no cgroup figure.",
        p.pos(0, 0, 8, 4), q.verdict(), unit="none",
    )
    tile["fieldConfig"]["defaults"]["mappings"] = [
        {"type": "value", "options": {str(n): {"text": text, "color": color, "index": n - 1}
                                      for n, (text, color) in VERDICTS.items()}},
        {"type": "special", "options": {"match": "null", "result": {"text": "No cgroup figure to compare", "index": 5}}},
    ]
    tile["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
    tile["options"].update(graphMode="none", textMode="value", colorMode="background")
    return tile


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
    ]
    small = [
        ("Swap", "Swap used by the unit; not part of systemctl's memory number. Absent on cgroup v1 without swap "
         "accounting.", q.mem("swap"), "dark-red", BYTES),
        ("Processes", "Processes in the unit's cgroup, child cgroups included.", q.metric("systemd_unit_processes"),
         "text", "none"),
    ]
    return [verdict_tile(q)] + [
        p.stat(title, description, p.pos(8 + 3 * i, 0, 3, 4), expr, unit=unit, color=color)
        for i, (title, description, expr, color, unit) in enumerate(tiles)
    ] + [
        p.stat(title, description, p.pos(20 + 2 * i, 0, 2, 4), expr, unit=unit, color=color)
        for i, (title, description, expr, color, unit) in enumerate(small)
    ]


def events_panel(q: Queries, title: str, events: str, legend: str, x: int, description: str) -> dict:
    """Bars of memory.events increments; OOM kills get their own axis, apart from thousands of max events."""
    return p.timeseries(title, description, p.pos(x, 22, 8, 8), [p.target(q.counted(events), legend)],
                        unit="short", bars=True, legend_calcs=("sum",))


def build(q: Queries) -> dict:
    q = Queries(q.sel, single_unit=True)  # one unit: no repeated rows, no "All"
    panels = unit_tiles(q) + [
        p.timeseries(
            "Where the memory is",
            "Stacked, the parts of the unit's cgroup memory: anon = process memory (heap, stacks, private "
            "mappings); mapped file = file pages processes have mapped (binaries, libraries, mmap); unmapped "
            "cache = file − mapped file − tmpfs/shm, page cache no process maps (files read or written earlier, "
            "also by processes that have exited): top never shows it; tmpfs/shm = files in tmpfs and shared "
            "memory, cache that cannot be dropped; kernel = slab, kernel stacks, page tables, socket buffers. "
            "The red line is systemctl's number: the stack adds up to about it (mapped tmpfs pages are in both "
            "mapped file and tmpfs/shm). Swap (dashed, stacked apart) is not part of systemctl's number.",
            p.pos(0, 4, 24, 10),
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
            "summed). Purple: PSS, top's number with each shared page split between the processes sharing it "
            "(only with --collector.pss). Dotted: the highest usage the kernel recorded (memory.peak, page cache "
            "included). The distance between red and green is page cache, tmpfs/shm, kernel memory and pages "
            "left by exited processes; see \"Where the memory is\". The peak line needs --collector.peak (the "
            "series budget leaves it out by default).",
            p.pos(0, 14, 12, 8),
            p.targets((q.usage(), SYSTEMCTL), (q.rss(), TOP), (q.mem("pss"), "PSS (shared pages split)"),
                      (q.metric("systemd_unit_memory_peak_bytes"), "peak usage")),
            overrides=[p.by_ref("A", p.fixed("red")), p.by_ref("B", p.fixed("green")), p.by_ref("C", p.fixed("purple")),
                       p.by_ref("D", p.prop("custom.lineStyle", {"fill": "dot", "dash": [0, 10]}), p.NO_FILL,
                                p.fixed("text"))],
        ),
        p.timeseries(
            "Unreclaimable memory vs MemoryMax / MemoryHigh",
            "Unreclaimable = cgroup usage − reclaimable page cache (anon, tmpfs/shm, kernel, dirty pages): what the "
            "kernel cannot drop when the unit reaches a limit. The working set (usage − inactive cache, the "
            "kubelet's figure) still holds active cache, so it sits near the limit on healthy file-heavy units. "
            "Dashed: MemoryMax (the kernel OOM-kills above it) and MemoryHigh (it throttles above it).",
            p.pos(12, 14, 12, 8),
            p.targets(
                (q.unreclaimable(), "unreclaimable"),
                (q.metric("systemd_unit_memory_working_set_bytes"), "working set"),
                (q.metric("systemd_unit_memory_limit_bytes", 'limit="max"'), "MemoryMax"),
                (q.metric("systemd_unit_memory_limit_bytes", 'limit="high"'), "MemoryHigh"),
            ),
            overrides=[
                p.by_ref("A", p.fixed("blue")),
                p.by_ref("B", p.prop("custom.lineStyle", {"fill": "dot", "dash": [0, 10]}), p.NO_FILL, p.fixed("text")),
                p.by_ref("C", *p.dashed("red")),
                p.by_ref("D", *p.dashed("orange")),
            ],
        ),
        events_panel(
            q, "OOM kills", "oom_kill", "oom_kill", 0,
            "Processes of the unit killed by the OOM killer (memory.events oom_kill; on cgroup v2 kills in child "
            "cgroups count too), per graph step and exactly: each bar is the counter's increase since the step "
            "before, the legend's sum is the total in the time range.",
        ),
        events_panel(
            q, "Limit events", "max|high|low|oom", "{{event}}", 8,
            "memory.events per graph step (exact increases). max: usage hit MemoryMax and the kernel had to reclaim "
            "(v1: memory.failcnt). high: usage went over MemoryHigh and the unit was throttled. low: memory "
            "protected by MemoryLow was reclaimed anyway. oom: the OOM killer was invoked. Thousands of max or "
            "high events are normal for a unit that lives at its limit. low (and oom_group_kill) need "
            "--collector.events.fields: the series budget leaves them out by default.",
        ),
        p.timeseries(
            "Memory pressure (cgroup v2 only)",
            "Share of time the unit's processes were stalled waiting for memory (PSI, memory.pressure). some: "
            "at least one process waited; full: all of them did, no progress at all. Sustained values above a "
            "few percent mean the unit is short of memory (reclaim, swap-in, throttling at MemoryHigh). Needs a "
            "cgroup2 hierarchy (pure v2, or the unified tree of a hybrid setup): empty on pure cgroup v1.",
            p.pos(16, 22, 8, 8),
            [p.target(q.rate_of("systemd_unit_memory_pressure_seconds_total", ""), "{{kind}}")],
            unit="percentunit",
        ),
        p.timeseries(
            "Page cache in detail",
            "memory.stat file items. active_file/inactive_file: cache the kernel sees as recently used or not "
            "(inactive goes first; the working set leaves inactive_file out). file_mapped: mapped by processes. "
            "file_dirty/file_writeback: written but not yet on disk, cannot be dropped until written. shmem: "
            "tmpfs and shared memory. active_file and inactive_file need --collector.stat.fields (the series "
            "budget leaves them out by default).",
            p.pos(0, 30, 12, 8),
            [p.target(q.stat("active_file|inactive_file|file_mapped|file_dirty|file_writeback|shmem"), "{{item}}")],
        ),
        p.timeseries(
            "Kernel memory in detail",
            "memory.stat kernel items charged to the unit: kernel (all of it; v1 kmem usage; on v2 before 5.18 "
            "the exporter's sum of kernel_stack, pagetables, percpu, vmalloc and slab), "
            "slab_reclaimable (dentries and inodes, shrinks under pressure), slab_unreclaimable, kernel_stack, "
            "pagetables (grows with mapped memory), percpu, sock (network buffers), vmalloc. By default the "
            "series budget exports only kernel; the other items need --collector.stat.fields.",
            p.pos(12, 30, 12, 8),
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
        "One systemd unit (service, scope of a VM or container, slice): a verdict like `explain`'s, what its memory "
        "is made of, systemctl's number against top's and PSS, limits, OOM kills and memory pressure.",
        panels,
        q.sel,
        single_unit="systemd-journald.service",
        annotations=[oom_annotation],
    )
