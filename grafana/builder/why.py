"""Why does systemctl disagree with top? — per unit, the two numbers and the parts that reconcile them."""

from __future__ import annotations

from . import panels as p
from .frame import dashboard, unit_link
from .promql import Queries

FILE = "systemd-memory-why.json"

TEXT = """\
**systemctl's number** (`systemctl status` → *Memory:*, `MemoryCurrent`, `systemd-cgtop`) is the unit's
**cgroup usage**: every page charged to the unit's cgroup, whoever touched it and whether or not a process
still maps it.

**top's number** (*RES*, `ps` RSS) is per process: RssAnon + RssFile + RssShmem. Summed over the unit's
processes it is the second column above.

The gap is made of:

* **page cache nobody maps** — files the unit read or wrote (logs, databases, backups). Charged to the
  unit, invisible in top. Mostly **reclaimable**: the kernel drops it when memory is needed.
* **tmpfs / shm** — files in /dev/shm, tmpfs /tmp, PrivateTmp and shared memory. Looks like cache but
  can't be dropped: it leaves RAM only by being deleted or swapped.
* **kernel** — slab, kernel stacks, page tables, socket buffers charged to the unit.
* **anon + mapped − top** — what remains: negative when processes share pages (top counts a shared page
  once per process; fork()ed workers), positive for pages charged to the unit that no live process holds.

Pages stay charged to the cgroup that first touched them, also after the process exits, and move to
the parent slice when the unit stops: see *Memory charged to slices themselves*. A user's own units
(the User variable) sit inside user@UID.service, so sums leave them out.
Swap is in neither number.
"""


def units_table(q: Queries) -> dict:
    columns = [
        ("systemctl's number", q.usage()),
        ("top's number", q.rss()),
        ("gap: systemctl − top", q.gap()),
        ("page cache nobody maps", q.unmapped_cache()),
        ("tmpfs / shm", q.stat("shmem")),
        ("kernel", q.kernel()),
        ("anon + mapped − top", q.mapped_and_anon_minus_top()),
        ("reclaimable cache", q.reclaimable()),
        ("reclaimable share", q.reclaimable_share()),
        ("swap (in neither)", q.mem("swap")),
    ]
    return p.table(
        "Per unit: systemctl's number, top's number, and what makes up the difference",
        "One row per unit with memory (slices left out: the table below covers them), sorted by the gap. "
        "gap ≈ page cache nobody maps + tmpfs/shm + kernel + (anon + mapped − top). Reclaimable cache = "
        "page cache − tmpfs/shm − dirty − writeback: what the kernel can drop by itself. Click a unit for its "
        "dashboard.",
        p.pos(0, 0, 24, 14),
        [(name, q.per_unit(expr, nonzero=True)) for name, expr in columns],
        sort_by="gap: systemctl − top",
        overrides=[
            p.by_name("reclaimable share", p.prop("unit", "percentunit"),
                      p.prop("custom.cellOptions", {"type": "gauge", "mode": "basic"}), p.prop("min", 0), p.prop("max", 1)),
            p.by_name("unit", p.prop("links", unit_link(q.sel, "__value.raw")), p.prop("custom.width", 280)),
            p.by_name("gap: systemctl − top", p.prop("custom.cellOptions", {"type": "color-text"}), p.fixed("orange")),
        ],
    )


def slices_table(q: Queries) -> dict:
    # A slice's own pages: its usage minus the usage of the cgroups directly below it. The parent of
    # a cgroup comes from its control_group path; the root "/" and its children's parent "" match.
    slice_cgroup = (
        f'label_replace(systemd_unit_info{{unit_type="slice", {q.units}}}, "cgroup", "$1", "control_group", "(.*[^/])?/?")'
    )
    children_by_parent = (
        "sum by (instance, job, cgroup) (\n  label_replace(\n"
        f"    {q.usage(q.host)}\n    * on (instance, job, unit, uid) group_left (control_group)\n"
        f'    systemd_unit_info{{control_group=~"/.+", {q.host}}},\n'
        '    "cgroup", "$1", "control_group", "(.*)/[^/]+"\n  )\n)'
    )
    slice_usage = f"sum by (instance, job, unit, uid) (\n{q.usage()}\nand on (instance, job, unit, uid) {q.slice_info}\n)"
    children = (
        f"sum by (instance, job, unit, uid) (\n{slice_cgroup}\n* on (instance, job, cgroup) group_left ()\n{children_by_parent}\n)"
    )
    return p.table(
        "Memory charged to slices themselves",
        "For each slice: its cgroup usage, the usage of the units and slices directly below it, and "
        "the difference: pages charged to the slice itself. Those were left by units that have stopped "
        "(a stopped unit's cgroup is removed and its remaining page cache and tmpfs pages move to the "
        "parent) — memory that no running unit and no process shows. Sorted by that difference.",
        p.pos(12, 14, 12, 10),
        [
            ("slice usage", slice_usage),
            ("units directly below", children),
            ("charged to the slice itself", f"(\n{slice_usage}\n)\n-\n(\n{children}\n)"),
        ],
        sort_by="charged to the slice itself",
        key_name="slice",
    )


def gap_parts(q: Queries) -> dict:
    return p.timeseries(
        "The gap over time, split into its parts",
        "Summed over the selected units, each page once (slices and users' own units left out: their slices and "
        "user@UID.service hold them). Stacked: page cache nobody maps, tmpfs/shm, kernel. Lines: anon + mapped − "
        "top (often negative: top counts shared pages once per process, so it is not stacked) and, orange, the "
        "gap itself, systemctl's number minus top's number.",
        p.pos(0, 14, 12, 10),
        p.targets(
            (q.sum_units(q.unmapped_cache()), "page cache nobody maps"),
            (q.sum_units(q.stat("shmem")), "tmpfs / shm"),
            (q.sum_units(q.kernel()), "kernel"),
            (q.sum_units(q.mapped_and_anon_minus_top()), "anon + mapped − top"),
            (q.sum_units(q.gap()), "gap: systemctl − top"),
        ),
        stack=True,
        min0=False,
        overrides=[p.by_ref("D", *p.LINE_ON_TOP, p.fixed("text")), p.by_ref("E", *p.LINE_ON_TOP, p.fixed("orange"))],
    )


def build(q: Queries) -> dict:
    return dashboard(
        "systemd-memory-why",
        "Why does systemctl disagree with top?",
        "Per unit: systemctl's memory number, top's number, and the parts that reconcile them.",
        # The table first: the answer above the fold, the explanation below it.
        [units_table(q), gap_parts(q), slices_table(q), p.text("Two numbers, two definitions", p.pos(0, 24, 24, 9), TEXT)],
        q.sel,
        time_from="now-3h",
    )
