"""systemd memory: fleet — every host of a job at once, drilling down to the host and unit dashboards.

Unlike the other dashboards it reads the fleet recording rules (deploy/prometheus/fleet-rules.yml):
a handful of series per host and per unit name, so it stays fast at thousands of hosts and works
the same on a Prometheus that federates or receives them by remote write. Only "Largest gaps:
host and unit" reads the exporter's own series, to link each row to its unit dashboard; on a
global store without per-unit series it is empty and the rest still works.
"""

from __future__ import annotations

from . import panels as p
from .frame import UNIT_DASHBOARD, dashboard, datasource_variable, query_variable
from .promql import Queries

FILE = "systemd-memory-fleet.json"
OVERVIEW_DASHBOARD = "/d/systemd-memory-overview/systemd-memory-overview"
RATIO = "percentunit"
PER_SECOND = "Bps"


def _rule(q: Queries, name: str) -> str:
    return f"{name}{{{q.sel.scope}}}"


def _kept(q: Queries) -> str:
    """The variables a link carries over: data source, [cluster,] [job]."""
    cluster = "&${cluster:queryparam}" if q.sel.cluster_label else ""
    job = "&${job:queryparam}" if q.sel.job_variable else ""
    return "${datasource:queryparam}" + cluster + job


def _host_link(q: Queries) -> list[dict]:
    return [{
        "title": "Open the host's overview",
        "url": f"{OVERVIEW_DASHBOARD}?{_kept(q)}&var-instance=${{__data.fields.instance:percentencode}}&${{__url_time_range}}",
    }]


def _unit_link(q: Queries) -> list[dict]:
    return [{
        "title": "Open the unit dashboard on this host",
        "url": f"{UNIT_DASHBOARD}?{_kept(q)}&var-instance=${{__data.fields.instance:percentencode}}"
        "&var-uid=${__data.fields.uid:percentencode}&var-unit=${__data.fields.unit:percentencode}&${__url_time_range}",
    }]


def tiles(q: Queries) -> list[dict]:
    scope = q.sel.scope
    specs = [
        ("Hosts", "Exporters Prometheus scrapes in this job (up = 1).", f"count(up{{{scope}}} == 1) or vector(0)",
         "short", "green"),
        ("Hosts down", "Targets of the job Prometheus cannot scrape (up = 0): no memory data and no alerts for them.",
         f"count(up{{{scope}}} == 0) or vector(0)", "short", "red"),
        ("systemctl's number, all hosts", "Cgroup usage of the top-level cgroups of every host, summed.",
         f"sum({_rule(q, 'job:systemd_unit_memory_cgroup_usage_bytes:sum')})", p.BYTES, "red"),
        ("Reclaimable cache, all hosts", "Page cache the kernel drops by itself (file − tmpfs/shm − dirty − "
         "writeback), summed over every host: the harmless part of systemctl's number.",
         f"sum({_rule(q, 'job:systemd_unit_memory_reclaimable_cache_bytes:sum')})", p.BYTES, "blue"),
        ("OOM kills, last hour", "Processes the OOM killer killed in non-slice units of every host, over the last "
         "hour (memory.events oom_kill).", f"sum({_rule(q, 'job:systemd_unit_memory_oom_kills:increase1h')}) or vector(0)",
         "short", "dark-red"),
        ("Series per host", "Series each exporter serves, averaged over the hosts (Prometheus' "
         "scrape_samples_scraped): what the series budget and --collector.* flags control.",
         f"avg({_rule(q, 'instance:systemd_memory_exporter_series:scraped')})", "short", "purple"),
    ]
    return [p.stat(title, description, p.pos(4 * i, 0, 4, 4), expr, unit=unit, color=color)
            for i, (title, description, expr, unit, color) in enumerate(specs)]


# The worst unit of a group of units, shared by the hosts table (the group: one host, rules
# instance:...) and the units table (the group: one unit name across hosts, rules job_unit:...):
# (column, rule after the prefix, Grafana unit of the column; None: bytes, the table's default).
WORST_UNIT = (
    ("largest gap", "systemd_unit_memory_gap_bytes:max", None),
    ("fastest anon growth", "systemd_unit_memory_anon_bytes:deriv1h_max", PER_SECOND),
    ("closest to a limit", "systemd_unit_memory_working_set_to_limit:max_ratio", RATIO),
    ("OOM kills (1h)", "systemd_unit_memory_oom_kills:increase1h", "short"),
)


def _count_column(name: str) -> dict:
    return p.by_name(name, p.prop("unit", "short"), p.prop("decimals", 0))


def _worst_unit_table(q: Queries, prefix: str, title: str, description: str, grid: dict,
                      first: list[tuple[str, str]], last: list[tuple[str, str]], counts: list[str],
                      **table) -> dict:
    """A table of `first` columns, the WORST_UNIT columns of the rules `prefix:...`, then `last`,
    sorted by the largest gap; `counts` are whole-number columns."""
    columns = first + [(name, _rule(q, f"{prefix}:{rule}")) for name, rule, _ in WORST_UNIT] + last
    units = [p.by_name(name, p.prop("unit", unit)) for name, _, unit in WORST_UNIT if unit not in (None, "short")]
    whole = [_count_column(name) for name in counts + [name for name, _, unit in WORST_UNIT if unit == "short"]]
    table.setdefault("overrides", [])
    table["overrides"] += units + whole
    return p.table(title, description, grid, columns, sort_by="largest gap", **table)


def hosts_table(q: Queries) -> dict:
    panel = _worst_unit_table(
        q, "instance", "Hosts",
        "One row per host of the job, sorted by the largest gap of any of its units. systemctl's and top's numbers "
        "are host totals (top-level cgroups); closest to a limit: the highest working set / MemoryMax or "
        "MemoryHigh of any unit; fastest anon growth: the steepest 1-hour fit of any unit's anonymous memory. "
        "Click a host for its overview dashboard.",
        p.pos(0, 4, 24, 11),
        first=[
            ("systemctl's number", _rule(q, "instance:systemd_unit_memory_cgroup_usage_bytes:sum")),
            ("top's number", _rule(q, "instance:systemd_unit_memory_rss_bytes:sum")),
            ("reclaimable cache", _rule(q, "instance:systemd_unit_memory_reclaimable_cache_bytes:sum")),
        ],
        last=[("series", _rule(q, "instance:systemd_memory_exporter_series:scraped"))],
        counts=["series"],
        key="instance",
        key_name="host",
        overrides=[p.by_name("instance", p.prop("links", _host_link(q)))],
    )
    # The host is this table's key: keep the instance column the shared table hides.
    del panel["transformations"][1]["options"]["excludeByName"]["instance"]
    return panel


def units_table(q: Queries) -> dict:
    return _worst_unit_table(
        q, "job_unit", "Units across hosts",
        "One row per unit name (slices left out), over every host it runs on: on how many hosts, its largest gap "
        "on any of them, its fastest anon growth, how close it comes to a limit, and its OOM kills in the last "
        "hour, summed. The table below names the hosts.",
        p.pos(0, 15, 12, 12),
        first=[("hosts", _rule(q, "job_unit:systemd_unit_info:count"))],
        last=[],
        counts=["hosts"],
    )


def largest_gaps(q: Queries) -> dict:
    """The one panel on per-unit series: each row names a host and a unit, for the unit dashboard."""
    scope = q.sel.scope
    gap = (
        f'systemd_unit_memory_bytes{{type="cgroup_usage", {scope}}}\n- ignoring (type)\n'
        f'sum without (type) (systemd_unit_memory_bytes{{type=~"rss_anon|rss_file|rss_shmem", {scope}}})'
    )
    expr = f'topk(20,\n(\n{gap}\n)\nand on (instance, job, unit, uid) systemd_unit_info{{unit_type!="slice", {scope}}}\n)'
    panel = p.table(
        "Largest gaps: host and unit",
        "The 20 units with the largest gap (systemctl − top) on any host, from the exporter's own series (empty on "
        "a Prometheus that holds only the fleet aggregates). Click a unit for its dashboard on that host.",
        p.pos(12, 15, 12, 12),
        [("gap: systemctl − top", expr)],
        sort_by="gap: systemctl − top",
        overrides=[p.by_name("unit", p.prop("links", _unit_link(q))), p.by_name("instance", p.prop("links", _host_link(q)))],
    )
    del panel["transformations"][1]["options"]["excludeByName"]["instance"]
    return panel


def trends(q: Queries) -> list[dict]:
    # (title, description, rule, what identifies a series, legend, unit); on: None draws every
    # series above 0, otherwise the 10 largest at the end of the range, over the whole range.
    specs = [
        ("Hosts with the largest unit gap", "The 10 hosts whose largest unit gap is largest now, over time.",
         "instance:systemd_unit_memory_gap_bytes:max", "instance, job", "{{instance}}", p.BYTES),
        ("Closest to a limit", "The 10 hosts with a unit nearest MemoryMax or MemoryHigh (working set / limit).",
         "instance:systemd_unit_memory_working_set_to_limit:max_ratio", "instance, job", "{{instance}}", RATIO),
        ("Fastest anon growth by unit name", "The 10 unit names whose anonymous memory grows fastest on some host "
         "(1-hour linear fit, bytes per second). Steady growth for hours is how a leak looks.",
         "job_unit:systemd_unit_memory_anon_bytes:deriv1h_max", "job, unit", "{{unit}}", PER_SECOND),
        ("OOM kills per host, last hour", "Hosts where the OOM killer killed processes of a unit in the last hour.",
         "instance:systemd_unit_memory_oom_kills:increase1h", None, "{{instance}}", "short"),
    ]
    panels = []
    for i, (title, description, rule, on, legend, unit) in enumerate(specs):
        series = _rule(q, rule)
        expr = f"{series} > 0" if on is None else f"{series}\nand on ({on})\ntopk(10, {series} @ end())"
        panels.append(p.timeseries(title, description, p.pos(12 * (i % 2), 27 + 9 * (i // 2), 12, 9),
                                   [p.target(expr, legend)], unit=unit))
    return panels


def build(q: Queries) -> dict:
    d = dashboard(
        "systemd-memory-fleet",
        "systemd memory: fleet",
        "Every host of a job: host totals, the units with the largest gaps, growth, limits and OOM kills across "
        "hosts, from the fleet recording rules (deploy/prometheus/fleet-rules.yml). Click through to a host's "
        "overview or a unit's dashboard.",
        tiles(q) + [hosts_table(q), units_table(q), largest_gaps(q)] + trends(q),
        q.sel,
        time_from="now-24h",
    )
    # A fleet has no single host or unit to pick: only the data source, [cluster and] job.
    variables = [datasource_variable()]
    if q.sel.cluster_label:
        variables.append(query_variable("cluster", "Cluster", "systemd_memory_exporter_build_info",
                                        q.sel.cluster_label, f"Cluster (label {q.sel.cluster_label}) to show."))
    if q.sel.job_variable:
        cluster = f'{{{q.sel.cluster_label}="$cluster"}}' if q.sel.cluster_label else ""
        variables.append(query_variable("job", "Job", f"systemd_memory_exporter_build_info{cluster}", "job",
                                        "Prometheus job that scrapes systemd-memory-exporter."))
    d["templating"]["list"] = variables
    return d
