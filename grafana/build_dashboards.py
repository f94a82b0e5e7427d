#!/usr/bin/env python3
"""Writes the Grafana dashboards in grafana/dashboards/ from the definitions below.

    python3 grafana/build_dashboards.py           # rewrite grafana/dashboards/*.json
    python3 grafana/build_dashboards.py --check   # exit 1 if a JSON file differs from this script

The JSON files are the product: Grafana imports and provisions them as they are. This script only
keeps about forty panels consistent (one definition of "top's number", the same selectors, units and
datasource everywhere). Standard library only. tests/test_dashboards.py runs --check.

Every query reads the exporter's series directly (no recording rules), so a dashboard works as soon
as Prometheus scrapes the exporter. Metric names and labels: the contract in README.md ("## Metrics")
or METRICS_DRAFT.md; tests/test_dashboards.py rejects any other name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
TAG = "systemd-memory"
SCHEMA_VERSION = 39  # Grafana 10.4 / 11.0; newer Grafana migrates it on load.

DS = {"type": "prometheus", "uid": "${datasource}"}

# Selectors. job and instance are single-valued variables (exact match: an IPv6 instance would be
# a broken regex); unit is multi-valued, so a regex. Its "All" value is ".+".
HOST = 'job="$job", instance="$instance"'
UNITS = HOST + ', unit=~"$unit"'
ROOT = HOST + ', unit="-.slice"'

# Slices contain their services and scopes: "top units" and sums over units leave them out.
NOT_SLICE = f'systemd_unit_info{{unit_type!="slice", {HOST}}}'
# Cgroups directly under the root (system.slice, user.slice, machine.slice, init.scope, ...).
TOP_LEVEL = f'systemd_unit_info{{control_group=~"/[^/]+", {HOST}}}'
RSS_TYPES = "rss_anon|rss_file|rss_shmem"
BYTES = "bytes"  # Grafana's "bytes(IEC)": KiB, MiB, GiB.


# --- PromQL building blocks ----------------------------------------------------------------------
def mem(kind: str, sel: str = UNITS) -> str:
    return f'systemd_unit_memory_bytes{{type="{kind}", {sel}}}'


def stat(item: str, sel: str = UNITS) -> str:
    op = "=~" if "|" in item else "="
    return f'systemd_unit_memory_stat_bytes{{item{op}"{item}", {sel}}}'


def usage(sel: str = UNITS) -> str:
    """systemctl's number: the cgroup's memory usage (MemoryCurrent)."""
    return mem("cgroup_usage", sel)


def rss_parts(sel: str = UNITS) -> str:
    """RssAnon, RssFile and RssShmem of the unit's processes, one series each."""
    return f'systemd_unit_memory_bytes{{type=~"{RSS_TYPES}", {sel}}}'


def rss(sel: str = UNITS) -> str:
    """top's number: RES of every process in the unit, summed."""
    return f"sum without (type) ({rss_parts(sel)})"


def gap(sel: str = UNITS) -> str:
    return f"{usage(sel)}\n- ignoring (type)\n{rss(sel)}"


def unmapped_cache(sel: str = UNITS) -> str:
    """Page cache no process maps; floored because mapped tmpfs pages are in file_mapped and shmem."""
    return (
        f'clamp_min(\n  {stat("file", sel)}\n  - ignoring (item) {stat("file_mapped", sel)}\n'
        f'  - ignoring (item) {stat("shmem", sel)},\n  0\n)'
    )


def reclaimable(sel: str = UNITS) -> str:
    """Cache the kernel can drop: file minus tmpfs/shm minus dirty and writeback pages."""
    return (
        f'clamp_min(\n  {stat("file", sel)}\n  - ignoring (item) {stat("shmem", sel)}\n'
        f'  - ignoring (item) {stat("file_dirty", sel)}\n  - ignoring (item) {stat("file_writeback", sel)},\n  0\n)'
    )


def kernel(sel: str = UNITS) -> str:
    """memory.stat kernel (v2 5.18+, v1 kmem usage), else its parts summed (older v2 kernels)."""
    return (
        f'{stat("kernel", sel)}\nor ignoring (item)\n'
        f'sum without (item) ({stat("kernel_stack|pagetables|percpu|sock|vmalloc|slab", sel)})'
    )


def mapped_and_anon_minus_top(sel: str = UNITS) -> str:
    """What is left of the gap: pages the cgroup counts once and top counts per process (or not)."""
    return f'{stat("anon", sel)}\n+ ignoring (item) {stat("file_mapped", sel)}\n- ignoring (item)\n{rss(sel)}'


def not_slice(expr: str) -> str:
    return f"(\n{expr}\n)\nand on (instance, job, unit) {NOT_SLICE}"


def per_unit(expr: str) -> str:
    """One series per unit with the same labels, so a table can merge several queries."""
    return f"sum by (instance, job, unit) (\n{not_slice(expr)}\n)"


def host_total(part) -> str:
    """Whole-host figure: the root slice if the exporter reports a usage for it, else the top-level cgroups.

    cgroup v1 has a usage for the root cgroup (-.slice); cgroup v2 has no memory.current there, and
    then every part comes from the top-level cgroups too, so the host figures add up. Summing all
    units instead would count each service again in every slice above it.
    """
    return (
        f"sum by (instance) (\n{part(ROOT)}\n)\nand on (instance) sum by (instance) ({usage(ROOT)})\nor\n"
        f"sum by (instance) (\n{part(HOST)}\nand on (instance, job, unit) {TOP_LEVEL}\n)"
    )


def top(n: int, expr: str) -> str:
    return f"sort_desc(topk({n}, {expr}))"


# --- Panels --------------------------------------------------------------------------------------
def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series") -> dict:
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "format": fmt,
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "refId": ref,
    }


def targets(*specs) -> list[dict]:
    """specs: (expr, legend) pairs; refIds A, B, C... in order."""
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(specs)]


def pos(x: int, y: int, w: int, h: int) -> dict:
    return {"h": h, "w": w, "x": x, "y": y}


def timeseries(
    title: str, description: str, grid: dict, tgts: list[dict], unit: str = BYTES, stack: bool = False,
    overrides: list | None = None, bars: bool = False, legend_calcs=("lastNotNull", "max"), min0: bool = True,
) -> dict:
    custom = {
        "drawStyle": "bars" if bars else "line",
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "fillOpacity": 80 if bars else (35 if stack else 8),
        "gradientMode": "none",
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "axisPlacement": "auto",
    }
    if min0:
        custom["axisSoftMin"] = 0
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": grid,
        "targets": tgts,
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}},
            "overrides": overrides or [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": list(legend_calcs)},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat_panel(title: str, description: str, grid: dict, expr: str, unit: str = BYTES, color: str = "blue") -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": grid,
        "targets": [target(expr)],
        "fieldConfig": {
            "defaults": {"unit": unit, "color": {"mode": "fixed", "fixedColor": color}}
            | ({"decimals": 1} if unit == BYTES else {}),
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "value",
        },
    }


def drilldown_link(unit_value: str) -> list[dict]:
    """A data link to the unit dashboard; unit_value is a Grafana data-link variable for the unit."""
    return [
        {
            "title": "Open the unit dashboard",
            # percentencode: unit names carry backslash escapes (foo\x2dbar.service).
            "url": "/d/systemd-memory-unit/systemd-unit-memory?${datasource:queryparam}&${job:queryparam}"
            "&${instance:queryparam}&var-unit=${" + unit_value + ":percentencode}&${__url_time_range}",
        }
    ]


def bargauge(
    title: str, description: str, grid: dict, expr: str, unit: str = BYTES, legend: str = "{{unit}}",
    thresholds: list | None = None, max_value: float | None = None,
) -> dict:
    defaults = {
        "unit": unit,
        "min": 0,
        "color": {"mode": "thresholds"} if thresholds else {"mode": "continuous-BlPu"},
        "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "blue", "value": None}]},
        "links": drilldown_link("__field.labels.unit"),
    }
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": grid,
        "targets": [target(expr, legend, instant=True)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "sizing": "auto",
            "minVizHeight": 16,
            "minVizWidth": 8,
            "maxVizHeight": 300,
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    }


def by_ref(ref: str, *properties) -> dict:
    return {"matcher": {"id": "byFrameRefID", "options": ref}, "properties": list(properties)}


def prop(name: str, value) -> dict:
    return {"id": name, "value": value}


LINE_ON_TOP = (
    prop("custom.stacking", {"mode": "none", "group": "A"}),
    prop("custom.fillOpacity", 0),
    prop("custom.lineWidth", 2),
)


def fixed(color: str) -> dict:
    return prop("color", {"mode": "fixed", "fixedColor": color})


def dashed(color: str) -> tuple:
    return (
        prop("custom.stacking", {"mode": "none", "group": "A"}),
        prop("custom.fillOpacity", 0),
        prop("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}),
        fixed(color),
    )


# --- Dashboard frame -----------------------------------------------------------------------------
def query_variable(name: str, label: str, metric: str, label_name: str, description: str, **extra) -> dict:
    query = f"label_values({metric}, {label_name})"
    variable = {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,  # on time range change: units come and go
        "sort": 1,
        "regex": "",
        "hide": 0,
        "multi": False,
        "includeAll": False,
        "current": {},
        "options": [],
        "skipUrlSync": False,
    }
    variable.update(extra)
    return variable


def templating(default_unit: str | None = None) -> dict:
    current = {"text": [default_unit], "value": [default_unit]} if default_unit else {"text": ["All"], "value": ["$__all"]}
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "description": "Prometheus that scrapes systemd-memory-exporter.",
                "type": "datasource",
                "query": "prometheus",
                "regex": "",
                "hide": 0,
                "multi": False,
                "includeAll": False,
                "current": {},
                "options": [],
                "refresh": 1,
                "skipUrlSync": False,
            },
            query_variable(
                "job", "Job", "systemd_memory_exporter_build_info", "job",
                "Prometheus job that scrapes systemd-memory-exporter.",
            ),
            query_variable(
                "instance", "Host", 'systemd_memory_exporter_build_info{job="$job"}', "instance",
                "Host (Prometheus instance) to show.",
            ),
            query_variable(
                "unit", "Unit", f"systemd_unit_info{{{HOST}}}", "unit",
                "systemd units to show (regex match; All = every unit the exporter reports).",
                multi=True, includeAll=True, allValue=".+", current=current,
            ),
        ]
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict], time_from: str = "now-6h",
              default_unit: str | None = None, annotations: list | None = None) -> dict:
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *(
                {"type": "panel", "id": kind, "name": name, "version": ""}
                for kind, name in sorted(
                    {(p["type"], PANEL_NAMES[p["type"]]) for p in panels if p["type"] != "row"}
                )
            ),
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                *(annotations or []),
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "type": "dashboards",
                "title": "systemd memory",
                "tags": [TAG],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "panels": panels,
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "tags": [TAG, "systemd", "memory"],
        "templating": templating(default_unit),
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


PANEL_NAMES = {"timeseries": "Time series", "stat": "Stat", "bargauge": "Bar gauge", "table": "Table", "text": "Text"}

SYSTEMCTL = "systemctl's number (cgroup usage)"
TOP = "top's number (Σ RSS of its processes)"


# --- Overview ------------------------------------------------------------------------------------
def overview() -> dict:
    host = "Whole host: the root slice (-.slice) if the exporter reports its usage (cgroup v1), otherwise the sum of the top-level cgroups (system.slice, user.slice, machine.slice, init.scope…). Memory charged to no cgroup (most kernel memory outside cgroups) is not included: compare with node_exporter's MemTotal − MemAvailable for the whole machine."
    stats = [
        ("systemctl's number", "What systemd reports for all units together (cgroup usage: processes' memory, page cache, tmpfs/shm, kernel memory charged to cgroups). " + host,
         host_total(usage), "red"),
        ("top's number", "RES of every process, summed: what top/ps add up to. Shared pages are counted once per process. " + host,
         host_total(rss_parts), "green"),
        ("Gap", "systemctl's number minus top's number for the whole host: page cache, tmpfs/shm and kernel memory, minus pages top counts more than once. " + host,
         f"(\n{host_total(usage)}\n)\n-\n(\n{host_total(rss_parts)}\n)", "orange"),
        ("Page cache", "All file pages charged to cgroups, tmpfs/shm included (memory.stat file). " + host,
         host_total(lambda s: stat("file", s)), "blue"),
        ("Reclaimable cache", "Page cache the kernel can drop when memory runs short: file minus tmpfs/shm minus dirty and writeback pages. " + host,
         f"clamp_min(\n({host_total(lambda s: stat('file', s))})\n- ({host_total(lambda s: stat('shmem', s))})\n"
         f"- ({host_total(lambda s: stat('file_dirty', s))})\n- ({host_total(lambda s: stat('file_writeback', s))}),\n0\n)", "blue"),
        ("tmpfs / shm", "Pages of tmpfs files and shared memory (memory.stat shmem). They count as page cache but can only leave RAM by being deleted or swapped. " + host,
         host_total(lambda s: stat("shmem", s)), "purple"),
        ("Kernel", "Kernel memory charged to cgroups: slab, kernel stacks, page tables, socket buffers. " + host,
         host_total(kernel), "yellow"),
        ("Swap", "Swap used by units (not part of systemctl's memory number). Absent on cgroup v1 without swap accounting. " + host,
         host_total(lambda s: mem("swap", s)), "dark-red"),
    ]
    panels = [
        stat_panel(title, description, pos(3 * i, 0, 3, 4), expr, color=color)
        for i, (title, description, expr, color) in enumerate(stats)
    ]

    biggest = not_slice(usage())
    panels += [
        timeseries(
            "Whole host: where the memory is",
            "Stacked: the parts that make up systemctl's number for the whole host. anon = process memory "
            "(heap, stacks); mapped file = files processes have mapped (binaries, libraries, mmap); "
            "unmapped cache = page cache nobody maps (files read or written earlier: top never shows it); "
            "tmpfs/shm; kernel. Lines: systemctl's number and top's number. " + host,
            pos(0, 4, 12, 10),
            targets(
                (host_total(lambda s: stat("anon", s)), "anon"),
                (host_total(lambda s: stat("file_mapped", s)), "mapped file"),
                (f"clamp_min(\n({host_total(lambda s: stat('file', s))})\n- ({host_total(lambda s: stat('file_mapped', s))})\n"
                 f"- ({host_total(lambda s: stat('shmem', s))}),\n0\n)", "unmapped cache"),
                (host_total(lambda s: stat("shmem", s)), "tmpfs / shm"),
                (host_total(kernel), "kernel"),
                (host_total(usage), SYSTEMCTL),
                (host_total(rss_parts), TOP),
            ),
            stack=True,
            overrides=[by_ref("F", *LINE_ON_TOP, fixed("red")), by_ref("G", *LINE_ON_TOP, fixed("green"))],
        ),
        timeseries(
            "Top 10 units by systemctl's number",
            "The 10 units (slices left out: they contain the others) with the largest cgroup usage at the end "
            "of the time range, over time. This is the number `systemctl status` shows as Memory:.",
            pos(12, 4, 12, 10),
            [target(
                f"{biggest}\nand on (instance, job, unit)\n"
                f"topk(10, {usage()} @ end() and on (instance, job, unit) {NOT_SLICE} @ end())",
                "{{unit}}",
            )],
            legend_calcs=("lastNotNull", "max"),
        ),
        bargauge(
            "Biggest units: systemctl's number",
            "Cgroup usage now, largest first (slices left out). Includes page cache, tmpfs/shm and kernel memory, "
            "so it can be far above what top shows for the unit's processes. Click a bar for the unit's dashboard.",
            pos(0, 14, 8, 11), top(15, biggest),
        ),
        bargauge(
            "Biggest units: anonymous memory",
            "memory.stat anon now, largest first (slices left out): heap, stacks and private mappings of the "
            "unit's processes. This memory cannot be dropped like cache; it only shrinks when processes free it, "
            "exit, or are swapped out.",
            pos(8, 14, 8, 11), top(15, not_slice(stat("anon"))),
        ),
        bargauge(
            "Biggest gaps: systemctl − top",
            "systemctl's number minus top's number, largest first (slices left out). A big gap is page cache, "
            "tmpfs/shm, kernel memory or pages of exited processes; the \"Why does systemctl disagree with top?\" "
            "dashboard splits it.",
            pos(16, 14, 8, 11), top(15, not_slice(gap())),
        ),
        bargauge(
            "Share of systemctl's number that is droppable cache",
            "For the 15 biggest units (slices left out): reclaimable page cache (file − tmpfs/shm − dirty − "
            "writeback) divided by cgroup usage. 80 % means systemctl's number would shrink to a fifth if the "
            "kernel needed the memory.",
            pos(0, 25, 8, 11),
            "sort_desc(\n"
            f"  {reclaimable()}\n  / ignoring (item, type) ({usage()} > 0)\n"
            f"  and on (instance, job, unit) topk(15, {biggest})\n)",
            unit="percentunit", max_value=1,
        ),
        bargauge(
            "Closest to their limit",
            "Working set (cgroup usage − inactive page cache, the kubelet/cAdvisor definition) as a share of "
            "MemoryMax (max) or MemoryHigh (high), highest first. At MemoryHigh the kernel throttles and "
            "reclaims; at MemoryMax it reclaims and then OOM-kills. Units without limits are not listed. "
            "Slices are included: a limit on a slice holds for everything below it.",
            pos(8, 25, 8, 11),
            top(15, f"systemd_unit_memory_working_set_bytes{{{UNITS}}}\n/ ignoring (limit) group_right\n"
                    f'systemd_unit_memory_limit_bytes{{limit=~"max|high", {UNITS}}}'),
            unit="percentunit", legend="{{unit}} ({{limit}})", max_value=1,
            thresholds=[{"color": "green", "value": None}, {"color": "#EAB839", "value": 0.8}, {"color": "red", "value": 0.9}],
        ),
        bargauge(
            "Slices",
            "Cgroup usage of each slice. A slice includes every unit below it, and also pages still charged to "
            "it by units that have stopped; -.slice (the root) is the whole host where it is reported.",
            pos(16, 25, 8, 11),
            top(30, f"{usage()}\nand on (instance, job, unit) systemd_unit_info{{unit_type=\"slice\", {HOST}}}"),
        ),
    ]
    return dashboard(
        "systemd-memory-overview",
        "systemd memory: overview",
        "Per-unit memory from systemd-memory-exporter: which units use memory, how much of it is page cache, "
        "and which are close to their limits.",
        panels,
    )


# --- Unit drill-down -----------------------------------------------------------------------------
def unit_dashboard() -> dict:
    # Panels are inside a row repeated once per selected unit, so $unit is a single unit here.
    row = {
        "type": "row",
        "title": "$unit",
        "collapsed": False,
        "repeat": "unit",
        "gridPos": pos(0, 0, 24, 1),
        "panels": [],
    }
    stats = [
        ("systemctl's number", "Cgroup usage: what `systemctl status` shows as Memory: (MemoryCurrent). Includes page cache, tmpfs/shm and kernel memory.", usage(), "red", BYTES),
        ("top's number", "RES of the unit's processes, summed (RssAnon + RssFile + RssShmem from /proc/PID/status). Shared pages are counted once per process.", rss(), "green", BYTES),
        ("Gap", "systemctl's number minus top's number. Negative when processes share many pages (top counts them in each process).", gap(), "orange", BYTES),
        ("Reclaimable cache", "Page cache the kernel can drop when memory runs short: file − tmpfs/shm − dirty − writeback.", reclaimable(), "blue", BYTES),
        ("Swap", "Swap used by the unit; not part of systemctl's memory number. Absent on cgroup v1 without swap accounting.", mem("swap"), "dark-red", BYTES),
        ("Processes", "Processes in the unit's cgroup, child cgroups included.", f"systemd_unit_processes{{{UNITS}}}", "text", "none"),
    ]
    panels = [row] + [
        stat_panel(title, description, pos(4 * i, 1, 4, 4), expr, unit=unit, color=color)
        for i, (title, description, expr, color, unit) in enumerate(stats)
    ]
    panels += [
        timeseries(
            "Where the memory is",
            "Stacked, the parts of the unit's cgroup memory: anon = process memory (heap, stacks, private "
            "mappings); mapped file = file pages processes have mapped (binaries, libraries, mmap); unmapped "
            "cache = file − mapped file − tmpfs/shm, page cache no process maps (files read or written earlier, "
            "also by processes that have exited): top never shows it; tmpfs/shm = files in tmpfs and shared "
            "memory, cache that cannot be dropped; kernel = slab, kernel stacks, page tables, socket buffers. "
            "The red line is systemctl's number: the stack adds up to about it (mapped tmpfs pages are in both "
            "mapped file and tmpfs/shm). Swap (dashed, stacked apart) is not part of systemctl's number.",
            pos(0, 5, 24, 10),
            targets(
                (stat("anon"), "anon"),
                (stat("file_mapped"), "mapped file"),
                (unmapped_cache(), "unmapped cache"),
                (stat("shmem"), "tmpfs / shm"),
                (kernel(), "kernel"),
                (mem("swap"), "swap"),
                (usage(), SYSTEMCTL),
            ),
            stack=True,
            overrides=[
                by_ref("F", prop("custom.stacking", {"mode": "normal", "group": "swap"}), prop("custom.fillOpacity", 0),
                       prop("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}), fixed("dark-red")),
                by_ref("G", *LINE_ON_TOP, fixed("red")),
            ],
        ),
        timeseries(
            "systemctl vs top",
            "Red: systemctl's number (cgroup usage). Green: top's number (RES of every process in the unit, "
            "summed). The distance between them is page cache, tmpfs/shm, kernel memory and pages left by "
            "exited processes; see \"Where the memory is\".",
            pos(0, 15, 12, 8),
            targets((usage(), SYSTEMCTL), (rss(), TOP)),
            overrides=[by_ref("A", fixed("red")), by_ref("B", fixed("green"))],
        ),
        timeseries(
            "Working set vs MemoryMax / MemoryHigh",
            "Working set = cgroup usage − inactive page cache (the kubelet/cAdvisor definition): the memory the "
            "unit is actively using. Dashed: MemoryMax (the kernel OOM-kills above it) and MemoryHigh (the "
            "kernel throttles and reclaims above it); no line when the unit has no such limit. Dotted: the "
            "highest usage the kernel has recorded (memory.peak, kernel 5.19+ on v2).",
            pos(12, 15, 12, 8),
            targets(
                (f"systemd_unit_memory_working_set_bytes{{{UNITS}}}", "working set"),
                (f'systemd_unit_memory_limit_bytes{{limit="max", {UNITS}}}', "MemoryMax"),
                (f'systemd_unit_memory_limit_bytes{{limit="high", {UNITS}}}', "MemoryHigh"),
                (f"systemd_unit_memory_peak_bytes{{{UNITS}}}", "peak"),
            ),
            overrides=[
                by_ref("A", fixed("blue")),
                by_ref("B", *dashed("red")),
                by_ref("C", *dashed("orange")),
                by_ref("D", prop("custom.lineStyle", {"fill": "dot", "dash": [0, 10]}), prop("custom.fillOpacity", 0), fixed("text")),
            ],
        ),
        timeseries(
            "OOM kills and limit events",
            "memory.events, per interval. oom_kill: processes killed by the OOM killer. oom: the OOM killer was "
            "invoked because of the unit's limit. max: usage hit MemoryMax and the kernel had to reclaim (v1: "
            "memory.failcnt). high: usage went over MemoryHigh and the unit was throttled. low: memory protected "
            "by MemoryLow was reclaimed anyway. Counts include child cgroups (cgroup v2).",
            pos(0, 23, 12, 8),
            [target(f"increase(systemd_unit_memory_events_total{{{UNITS}}}[$__rate_interval])", "{{event}}")],
            unit="short", bars=True, legend_calcs=("sum",),
        ),
        timeseries(
            "Memory pressure (cgroup v2 only)",
            "Share of time the unit's processes were stalled waiting for memory (PSI, memory.pressure). some: "
            "at least one process waited; full: all of them did, no progress at all. Sustained values above a "
            "few percent mean the unit is short of memory (reclaim, swap-in, throttling at MemoryHigh). Needs a "
            "cgroup2 hierarchy (pure v2, or the unified tree of a hybrid setup): empty on pure cgroup v1.",
            pos(12, 23, 12, 8),
            [target(f"rate(systemd_unit_memory_pressure_seconds_total{{{UNITS}}}[$__rate_interval])", "{{kind}}")],
            unit="percentunit",
        ),
        timeseries(
            "Page cache in detail",
            "memory.stat file items. active_file/inactive_file: cache the kernel sees as recently used or not "
            "(inactive goes first; the working set leaves inactive_file out). file_mapped: mapped by processes. "
            "file_dirty/file_writeback: written but not yet on disk, cannot be dropped until written. shmem: "
            "tmpfs and shared memory.",
            pos(0, 31, 12, 8),
            [target(stat("active_file|inactive_file|file_mapped|file_dirty|file_writeback|shmem"), "{{item}}")],
        ),
        timeseries(
            "Kernel memory in detail",
            "memory.stat kernel items charged to the unit: kernel (all of it; v2 5.18+, v1 kmem usage), "
            "slab_reclaimable (dentries and inodes, shrinks under pressure), slab_unreclaimable, kernel_stack, "
            "pagetables (grows with mapped memory), percpu, sock (network buffers), vmalloc.",
            pos(12, 31, 12, 8),
            [target(stat("kernel|kernel_stack|pagetables|percpu|sock|vmalloc|slab_reclaimable|slab_unreclaimable"), "{{item}}")],
        ),
    ]
    oom_annotation = {
        "name": "OOM kills",
        "datasource": DS,
        "enable": True,
        "hide": False,
        "iconColor": "red",
        "expr": f'increase(systemd_unit_memory_events_total{{event="oom_kill", {UNITS}}}[2m]) > 0',
        "titleFormat": "OOM kill",
        "textFormat": "{{unit}}",
    }
    return dashboard(
        "systemd-memory-unit",
        "systemd unit memory",
        "One systemd unit (a row per selected unit): what its memory is made of, systemctl's number against "
        "top's, limits, OOM kills and memory pressure.",
        panels,
        default_unit="systemd-journald.service",
        annotations=[oom_annotation],
    )


# --- Why does systemctl disagree with top? -------------------------------------------------------
WHY_TEXT = """\
**systemctl's number** (`systemctl status` → *Memory:*, `MemoryCurrent`, `systemd-cgtop`) is the unit's
**cgroup usage**: every page charged to the unit's cgroup, whoever touched it and whether or not a process
still maps it.

**top's number** (*RES*, `ps` RSS) is per process: RssAnon + RssFile + RssShmem. Summed over the unit's
processes it is the second column below.

The gap is made of:

* **page cache nobody maps** — files the unit read or wrote (logs, databases, backups). Charged to the
  unit, invisible in top. Mostly **reclaimable**: the kernel drops it when memory is needed.
* **tmpfs / shm** — files in /dev/shm, tmpfs /tmp, PrivateTmp and shared memory. Looks like cache but
  can't be dropped: it leaves RAM only by being deleted or swapped.
* **kernel** — slab, kernel stacks, page tables, socket buffers charged to the unit.
* **anon + mapped − top** — what remains: negative when processes share pages (top counts a shared page
  once per process; fork()ed workers), positive for pages charged to the unit that no live process holds.

Pages stay charged to the cgroup that first touched them, also after the process exits, and move to
the parent slice when the unit stops: see *Memory charged to slices themselves*.
Swap is in neither number.
"""


def why_dashboard() -> dict:
    columns = [
        ("A", "systemctl's number", per_unit(usage())),
        ("B", "top's number", per_unit(rss())),
        ("C", "gap: systemctl − top", per_unit(gap())),
        ("D", "page cache nobody maps", per_unit(unmapped_cache())),
        ("E", "tmpfs / shm", per_unit(stat("shmem"))),
        ("F", "kernel", per_unit(kernel())),
        ("G", "anon + mapped − top", per_unit(mapped_and_anon_minus_top())),
        ("H", "reclaimable cache", per_unit(reclaimable())),
        ("I", "reclaimable share", per_unit(f"{reclaimable()}\n/ ignoring (item, type) ({usage()} > 0)")),
        ("J", "swap (in neither)", per_unit(mem("swap"))),
    ]
    table = {
        "type": "table",
        "title": "Per unit: systemctl's number, top's number, and what makes up the difference",
        "description": "One row per unit (slices left out: the table below covers them), sorted by the gap. "
        "gap ≈ page cache nobody maps + tmpfs/shm + kernel + (anon + mapped − top). Reclaimable cache = "
        "page cache − tmpfs/shm − dirty − writeback: what the kernel can drop by itself. Click a unit for its "
        "dashboard.",
        "datasource": DS,
        "gridPos": pos(0, 9, 24, 14),
        "targets": [target(expr, "", ref, instant=True, fmt="table") for ref, _, expr in columns],
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "job": True, "instance": True},
                    "indexByName": {"unit": 0, **{f"Value #{ref}": i + 1 for i, (ref, _, _) in enumerate(columns)}},
                    "renameByName": {f"Value #{ref}": name for ref, name, _ in columns},
                },
            },
        ],
        "fieldConfig": {
            "defaults": {"unit": BYTES, "decimals": 1, "custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
            "overrides": [
                {"matcher": {"id": "byName", "options": "reclaimable share"},
                 "properties": [prop("unit", "percentunit"), prop("custom.cellOptions", {"type": "gauge", "mode": "basic"}),
                                prop("min", 0), prop("max", 1)]},
                {"matcher": {"id": "byName", "options": "unit"},
                 "properties": [prop("links", drilldown_link("__value.raw")), prop("custom.width", 280)]},
                {"matcher": {"id": "byName", "options": "gap: systemctl − top"},
                 "properties": [prop("custom.cellOptions", {"type": "color-text"}), fixed("orange")]},
            ],
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "sortBy": [{"displayName": "gap: systemctl − top", "desc": True}],
            "footer": {"show": False, "reducer": ["sum"], "countRows": False, "fields": ""},
        },
    }
    # A slice's own pages: its usage minus the usage of the cgroups directly below it. The parent of
    # a cgroup comes from its control_group path; the root "/" and its children's parent "" match.
    slice_cgroup = (
        f'label_replace(systemd_unit_info{{unit_type="slice", {UNITS}}}, "cgroup", "$1", "control_group", "(.*[^/])?/?")'
    )
    children_by_parent = (
        "sum by (instance, job, cgroup) (\n  label_replace(\n"
        f"    {usage(HOST)}\n    * on (instance, job, unit) group_left (control_group)\n"
        f'    systemd_unit_info{{control_group=~"/.+", {HOST}}},\n'
        '    "cgroup", "$1", "control_group", "(.*)/[^/]+"\n  )\n)'
    )
    slice_usage = f'sum by (instance, job, unit) (\n{usage()}\nand on (instance, job, unit) systemd_unit_info{{unit_type="slice", {HOST}}}\n)'
    children = f"sum by (instance, job, unit) (\n{slice_cgroup}\n* on (instance, job, cgroup) group_left ()\n{children_by_parent}\n)"
    slices = {
        "type": "table",
        "title": "Memory charged to slices themselves",
        "description": "For each slice: its cgroup usage, the usage of the units and slices directly below it, and "
        "the difference: pages charged to the slice itself. Those were left by units that have stopped "
        "(a stopped unit's cgroup is removed and its remaining page cache and tmpfs pages move to the "
        "parent) — memory that no running unit and no process shows. Sorted by that difference.",
        "datasource": DS,
        "gridPos": pos(12, 23, 12, 10),
        "targets": [
            target(slice_usage, "", "A", instant=True, fmt="table"),
            target(children, "", "B", instant=True, fmt="table"),
            target(f"(\n{slice_usage}\n)\n-\n(\n{children}\n)", "", "C", instant=True, fmt="table"),
        ],
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "job": True, "instance": True},
                    "indexByName": {"unit": 0, "Value #A": 1, "Value #B": 2, "Value #C": 3},
                    "renameByName": {
                        "unit": "slice",
                        "Value #A": "slice usage",
                        "Value #B": "units directly below",
                        "Value #C": "charged to the slice itself",
                    },
                },
            },
        ],
        "fieldConfig": {
            "defaults": {"unit": BYTES, "decimals": 1, "custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
            "overrides": [],
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "sortBy": [{"displayName": "charged to the slice itself", "desc": True}],
            "footer": {"show": False, "reducer": ["sum"], "countRows": False, "fields": ""},
        },
    }
    parts = timeseries(
        "The gap over time, split into its parts",
        "Summed over the selected units (slices left out). Stacked: page cache nobody maps, tmpfs/shm, kernel, "
        "and anon + mapped − top (often negative: top counts shared pages once per process). The orange line "
        "is the gap itself, systemctl's number minus top's number.",
        pos(0, 23, 12, 10),
        targets(
            (f"sum(\n{not_slice(unmapped_cache())}\n)", "page cache nobody maps"),
            (f"sum(\n{not_slice(stat('shmem'))}\n)", "tmpfs / shm"),
            (f"sum(\n{not_slice(kernel())}\n)", "kernel"),
            (f"sum(\n{not_slice(mapped_and_anon_minus_top())}\n)", "anon + mapped − top"),
            (f"sum(\n{not_slice(gap())}\n)", "gap: systemctl − top"),
        ),
        stack=True,
        min0=False,
        overrides=[by_ref("E", *LINE_ON_TOP, fixed("orange"))],
    )
    text = {
        "type": "text",
        "title": "Two numbers, two definitions",
        "description": "",
        "gridPos": pos(0, 0, 24, 9),
        "options": {"mode": "markdown", "content": WHY_TEXT, "code": {"language": "plaintext", "showLineNumbers": False, "showMiniMap": False}},
    }
    return dashboard(
        "systemd-memory-why",
        "Why does systemctl disagree with top?",
        "Per unit: systemctl's memory number, top's number, and the parts that reconcile them.",
        [text, table, parts, slices],
        time_from="now-3h",
    )


DASHBOARDS = {
    "systemd-memory-overview.json": overview,
    "systemd-memory-unit.json": unit_dashboard,
    "systemd-memory-why.json": why_dashboard,
}


def render(build) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a file is out of date")
    args = parser.parse_args()
    stale = []
    for name, build in DASHBOARDS.items():
        path = OUT_DIR / name
        text = render(build)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(name)
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("out of date (run python3 grafana/build_dashboards.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
