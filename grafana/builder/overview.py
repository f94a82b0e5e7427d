"""systemd memory: overview — which units use memory, how much of it is cache, which are near their limits."""

from __future__ import annotations

from . import panels as p
from .frame import dashboard, unit_link
from .promql import Queries

FILE = "systemd-memory-overview.json"
PRESSURE, FULL = "systemd_unit_memory_pressure_seconds_total", 'kind="full"'
SYSTEMCTL = "systemctl's number (cgroup usage)"
TOP = "top's number (Σ RSS of its processes)"
HOST = (
    "Whole host: the root slice (-.slice) if the exporter reports its usage (cgroup v1), otherwise the sum of the "
    "top-level cgroups (system.slice, user.slice, machine.slice, init.scope…). Memory charged to no cgroup (most "
    "kernel memory outside cgroups) is not included: compare with node_exporter's MemTotal − MemAvailable for the "
    "whole machine."
)


def host_tiles(q: Queries) -> list[dict]:
    tiles = [
        ("systemctl's number", "What systemd reports for all units together (cgroup usage: processes' memory, page "
         "cache, tmpfs/shm, kernel memory charged to cgroups). ", q.host_total(q.usage), "red"),
        ("top's number", "RES of every process, summed: what top/ps add up to. Shared pages are counted once per "
         "process. ", q.host_total(q.rss_parts), "green"),
        ("Gap", "systemctl's number minus top's number for the whole host: page cache, tmpfs/shm and kernel memory, "
         "minus pages top counts more than once. ", q.host_gap(), "orange"),
        ("Page cache", "All file pages charged to cgroups, tmpfs/shm included (memory.stat file). ",
         q.host_stat("file"), "blue"),
        ("Reclaimable cache", "Page cache the kernel can drop when memory runs short: file minus tmpfs/shm minus "
         "dirty and writeback pages. ", q.host_reclaimable(), "blue"),
        ("tmpfs / shm", "Pages of tmpfs files and shared memory (memory.stat shmem). They count as page cache but can "
         "only leave RAM by being deleted or swapped. ", q.host_stat("shmem"), "purple"),
        ("Kernel", "Kernel memory charged to cgroups: slab, kernel stacks, page tables (socket buffers are not in it). ",
         q.host_total(q.kernel), "yellow"),
        ("Swap", "Swap used by units (not part of systemctl's memory number). Absent on cgroup v1 without swap "
         "accounting. ", q.host_total(lambda s: q.mem("swap", s)), "dark-red"),
    ]
    return [
        p.stat(title, description + HOST, p.pos(3 * i, 0, 3, 4), expr, color=color)
        for i, (title, description, expr, color) in enumerate(tiles)
    ]


def trouble_table(q: Queries, links: list[dict]) -> dict:
    """Only units with a problem in the time range: kills, stalls, unreclaimable memory at a limit."""
    columns = [
        ("OOM kills", q.per_unit_any(q.counted_in_range("oom_kill")) + " > 0"),
        ("stalled (PSI full)", q.per_unit(q.rate_of(PRESSURE, FULL, "$__range")) + " > 0.01"),
        ("unreclaimable / MemoryMax", q.per_unit_any(q.to_limit(q.unreclaimable(), "max")) + " > 0.8"),
    ]
    return p.table(
        "Units in trouble",
        "Only units with a problem in the time range: OOM kills (memory.events oom_kill, counted exactly; a "
        "slice counts its children's, and keeps the count of a unit that is gone), the share of time all of "
        "their processes stalled on memory (PSI full, cgroup v2, above 1 %), and unreclaimable memory "
        "(usage − reclaimable cache) above 80 % of MemoryMax. Empty: no unit is in trouble. Click a unit.",
        p.pos(16, 4, 8, 11),
        columns,
        sort_by="OOM kills",
        overrides=[
            p.by_name("OOM kills", p.prop("unit", "short"), p.prop("decimals", 0)),
            p.by_name("stalled (PSI full)", p.prop("unit", "percentunit")),
            p.by_name("unreclaimable / MemoryMax", p.prop("unit", "percentunit")),
            p.by_name("unit", p.prop("links", links)),
        ],
    )


def build(q: Queries) -> dict:
    leaves = q.not_slice(q.usage())
    links = unit_link(q.sel, "__field.labels.unit")
    table_links = unit_link(q.sel, "__value.raw")
    panels = host_tiles(q) + [
        # First screen: which unit, and is it a problem.
        p.bargauge(
            "Biggest units: systemctl's number",
            "Cgroup usage now, largest first (slices left out). Includes page cache, tmpfs/shm and kernel memory, "
            "so it can be far above what top shows for the unit's processes. Click a bar for the unit's dashboard.",
            p.pos(0, 4, 8, 11), q.top(15, leaves), links,
        ),
        p.bargauge(
            "Biggest gaps: systemctl − top",
            "systemctl's number minus top's number, largest first (slices left out). A big gap is page cache, "
            "tmpfs/shm, kernel memory or pages of exited processes; the \"Why does systemctl disagree with top?\" "
            "dashboard splits it.",
            p.pos(8, 4, 8, 11), q.top(15, q.not_slice(q.gap())), links,
        ),
        trouble_table(q, table_links),
        p.timeseries(
            "Whole host: where the memory is",
            "Stacked: the parts that make up systemctl's number for the whole host. anon = process memory "
            "(heap, stacks); mapped file = files processes have mapped (binaries, libraries, mmap); "
            "unmapped cache = page cache nobody maps (files read or written earlier: top never shows it); "
            "tmpfs/shm; kernel. Lines: systemctl's number and top's number. " + HOST,
            p.pos(0, 15, 12, 10),
            p.targets(*q.layers(of_host=True), (q.host_total(q.usage), SYSTEMCTL), (q.host_total(q.rss_parts), TOP)),
            stack=True,
            overrides=[p.by_ref("F", *p.LINE_ON_TOP, p.fixed("red")), p.by_ref("G", *p.LINE_ON_TOP, p.fixed("green"))],
        ),
        p.bargauge(
            "Closest to their limit",
            "Unreclaimable memory (usage − reclaimable page cache: anon, tmpfs/shm, kernel, dirty pages) as a share "
            "of MemoryMax (max) or MemoryHigh (high), highest first. Active page cache is left out: the kernel "
            "reclaims it at the limit. At MemoryHigh the kernel throttles; at MemoryMax it OOM-kills. Units "
            "without limits are not listed; slices are (a limit on a slice holds for everything below it).",
            p.pos(12, 15, 6, 10),
            q.top(15, q.to_limit(q.unreclaimable())),
            links, unit="percentunit", legend="{{unit}} ({{limit}})", max_value=1,
            thresholds=[{"color": "green", "value": None}, {"color": "#EAB839", "value": 0.8}, {"color": "red", "value": 0.9}],
        ),
        p.timeseries(
            "Memory pressure: most stalled units",
            "The 10 units (slices left out) whose processes were all stalled on memory the longest share of the "
            "time range (PSI full, cgroup v2): no progress at all while the kernel reclaims, swaps in or "
            "throttles at MemoryHigh. A few percent sustained means the unit is short of memory.",
            p.pos(18, 15, 6, 10),
            [p.target(
                # The 10 are chosen once, over the whole range: @ end() on the range selector. After
                # topk(...) it bound to the last selector inside only, and topk chose anew each step.
                q.not_slice(q.rate_of(PRESSURE, FULL)) + "\nand on (instance, job, unit, uid)\n"
                + "topk(10, " + q.not_slice(q.rate_of(PRESSURE, FULL, "$__range", at="end()")) + ")",
                "{{unit}}",
            )],
            unit="percentunit",
        ),
        p.bargauge(
            "Biggest units: anonymous memory",
            "memory.stat anon now, largest first (slices left out): heap, stacks and private mappings of the "
            "unit's processes. This memory cannot be dropped like cache; it only shrinks when processes free it, "
            "exit, or are swapped out.",
            p.pos(0, 25, 8, 11), q.top(15, q.not_slice(q.stat("anon"))), links,
        ),
        p.bargauge(
            "Share of systemctl's number that is droppable cache",
            "For the 15 biggest units (slices left out): reclaimable page cache (file − tmpfs/shm − dirty − "
            "writeback) divided by cgroup usage. 80 % means systemctl's number would shrink to a fifth if the "
            "kernel needed the memory: healthy, not a leak (this replaces the MostlyCache alert).",
            p.pos(8, 25, 8, 11),
            f"sort_desc(\n  {q.reclaimable_share()}\n  and on (instance, job, unit, uid) topk(15, {leaves})\n)",
            links, unit="percentunit", max_value=1,
        ),
        p.bargauge(
            "Slices",
            "Cgroup usage of each slice. A slice includes every unit below it, and also pages still charged to "
            "it by units that have stopped; -.slice (the root) is the whole host where it is reported.",
            p.pos(16, 25, 8, 11),
            q.top(30, f"{q.usage()}\nand on (instance, job, unit, uid) {q.slice_info}"),
            links,
        ),
    ]
    return dashboard(
        "systemd-memory-overview",
        "systemd memory: overview",
        "Per-unit memory from systemd-memory-exporter: which units use memory, which are in trouble (OOM kills, "
        "memory pressure, unreclaimable memory at their limit), how much of it is page cache.",
        panels,
        q.sel,
    )
