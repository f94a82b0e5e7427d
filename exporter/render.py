"""Metric families as a pure function of a Snapshot, rendered once per snapshot.

client_python's custom-collector shape: fresh families on every collect(), so a unit that
stopped simply stops appearing (a global Gauge would keep its stale series). The text is
rendered once per snapshot and cached: a scrape only copies bytes, so its cost does not grow
with the number of processes or units.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .memory import STAT_ITEMS
from .snapshot import SOURCES, Snapshot

# One place for every name, so README, dashboards and tests can be checked against it.
UNIT_MEMORY = "systemd_unit_memory_bytes"
UNIT_STAT = "systemd_unit_memory_stat_bytes"
UNIT_WORKING_SET = "systemd_unit_memory_working_set_bytes"
UNIT_LIMIT = "systemd_unit_memory_limit_bytes"
UNIT_EVENTS = "systemd_unit_memory_events_total"
UNIT_PRESSURE = "systemd_unit_memory_pressure_seconds_total"
UNIT_PEAK = "systemd_unit_memory_peak_bytes"
UNIT_PROCESSES = "systemd_unit_processes"
UNIT_INFO = "systemd_unit_info"
SELF = "systemd_memory_exporter_"


def _sampled(snapshot: Snapshot) -> str:
    return f" Sampled every {snapshot.interval:g}s (0: on each scrape); no timestamps."


class SnapshotCollector:
    """A client_python collector over one immutable snapshot."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from unit_families(self.snapshot)
        yield from health_families(self.snapshot)


def unit_families(snapshot: Snapshot) -> Iterator[Metric]:
    sampled = _sampled(snapshot)
    memory = GaugeMetricFamily(
        UNIT_MEMORY,
        "Memory of a systemd unit by type. cgroup_usage: what systemctl reports as MemoryCurrent "
        "(v1 memory.usage_in_bytes, v2 memory.current). page_cache: v1 memory.stat total_cache, v2 file "
        "(both include tmpfs/shm). swap: v1 memory.stat total_swap, v2 memory.swap.current. "
        "rss_anon/rss_file/rss_shmem: RssAnon/RssFile/RssShmem of /proc/PID/status summed over the "
        "unit's processes (top's RES, split). pss/uss: smaps_rollup, only with --collector.pss." + sampled,
        labels=["unit", "type"],
    )
    stat = GaugeMetricFamily(
        UNIT_STAT,
        "cgroup memory.stat of a systemd unit, hierarchical, in cgroup v2 names (v1: total_rss->anon, "
        "total_cache->file, total_mapped_file->file_mapped, ...; kernel from memory.kmem.usage_in_bytes)." + sampled,
        labels=["unit", "item"],
    )
    working_set = GaugeMetricFamily(
        UNIT_WORKING_SET,
        "cgroup usage minus inactive_file, floored at 0 (cAdvisor's and the kubelet's working set)." + sampled,
        labels=["unit"],
    )
    limit = GaugeMetricFamily(
        UNIT_LIMIT,
        "cgroup memory limits of a systemd unit: max, high, low, min, swap_max (v2 memory.<limit>; v1 "
        "max = memory.limit_in_bytes). Absent when unlimited or unset." + sampled,
        labels=["unit", "limit"],
    )
    events = CounterMetricFamily(
        UNIT_EVENTS,
        "cgroup memory events of a systemd unit, hierarchical (v2 memory.events: low, high, max, oom, "
        "oom_kill, oom_group_kill; v1: max = memory.failcnt, oom_kill = memory.oom_control oom_kill)." + sampled,
        labels=["unit", "event"],
    )
    pressure = CounterMetricFamily(
        UNIT_PRESSURE,
        "Time processes of a systemd unit stalled on memory (PSI memory.pressure total, "
        "kind some or full). Needs a cgroup2 hierarchy: v2, or hybrid's unified tree." + sampled,
        labels=["unit", "kind"],
    )
    peak = GaugeMetricFamily(
        UNIT_PEAK,
        "Highest cgroup usage recorded by the kernel (v1 memory.max_usage_in_bytes, v2 memory.peak, 5.19+)."
        + sampled,
        labels=["unit"],
    )
    processes = GaugeMetricFamily(
        UNIT_PROCESSES, "Processes in the unit's cgroup subtree (cgroup.procs)." + sampled, labels=["unit"]
    )
    info = GaugeMetricFamily(
        UNIT_INFO,
        "1 for every unit reported, with its unit type, states and control group (systemd over D-Bus)." + sampled,
        labels=["unit", "unit_type", "active_state", "sub_state", "control_group"],
    )
    for sample in snapshot.units:
        name = sample.unit.name
        info.add_metric(
            [name, sample.unit.type, sample.unit.active_state, sample.unit.sub_state, sample.unit.control_group], 1
        )
        totals = sample.processes
        processes.add_metric([name], totals.processes)
        for kind, value in (("rss_anon", totals.rss_anon), ("rss_file", totals.rss_file), ("rss_shmem", totals.rss_shmem)):
            memory.add_metric([name, kind], value)
        for kind, value in (("pss", sample.pss), ("uss", sample.uss)):
            if value is not None:
                memory.add_metric([name, kind], value)
        m = sample.memory
        if m is None:
            continue
        for kind, value in (("cgroup_usage", m.usage), ("page_cache", m.page_cache), ("swap", m.swap)):
            if value is not None:
                memory.add_metric([name, kind], value)
        for item in STAT_ITEMS:
            if item in m.stat:
                stat.add_metric([name, item], m.stat[item])
        if m.working_set is not None:
            working_set.add_metric([name], m.working_set)
        for kind, value in m.limits.items():
            limit.add_metric([name, kind], value)
        for kind, value in m.events.items():
            events.add_metric([name, kind], value)
        if m.pressure is not None:
            pressure.add_metric([name, "some"], m.pressure.some_total_us / 1e6)
            if m.pressure.full_total_us is not None:
                pressure.add_metric([name, "full"], m.pressure.full_total_us / 1e6)
        if m.peak is not None:
            peak.add_metric([name], m.peak)
    yield from (memory, stat, working_set, limit, events, pressure, peak, processes, info)


def health_families(snapshot: Snapshot) -> Iterator[Metric]:
    build = GaugeMetricFamily(
        SELF + "build_info", "Version of the exporter and of the Python running it.", labels=["version", "python_version"]
    )
    build.add_metric([__version__, platform.python_version()], 1)
    yield build
    yield GaugeMetricFamily(
        SELF + "sample_interval_seconds", "Configured --sample.interval (0: sample on each scrape).", value=snapshot.interval
    )
    yield GaugeMetricFamily(
        SELF + "last_sample_timestamp_seconds",
        "Unix time the latest sample started; compare with time() to see stale data.",
        value=snapshot.taken_at,
    )
    duration = GaugeMetricFamily(
        SELF + "sample_duration_seconds",
        "Wall time of the latest sample cycle by phase (discovery, cgroup, procfs, build, total).",
        labels=["phase"],
    )
    for phase, seconds in snapshot.phase_seconds.items():
        duration.add_metric([phase], seconds)
    yield duration
    yield GaugeMetricFamily(
        SELF + "sample_cpu_seconds", "CPU time the latest sample cycle used.", value=snapshot.cpu_seconds
    )
    yield CounterMetricFamily(SELF + "samples_total", "Sample cycles completed.", value=snapshot.samples_total)
    up = GaugeMetricFamily(
        SELF + "source_up",
        "1 if every read from the source succeeded in the latest sample (dbus: unit discovery; cgroup: "
        "cgroup memory files; procfs: /proc/PID/status).",
        labels=["source"],
    )
    last = GaugeMetricFamily(
        SELF + "source_last_success_timestamp_seconds",
        "Unix time of the latest fully successful read from the source.",
        labels=["source"],
    )
    for source in SOURCES:
        health = snapshot.sources.get(source)
        up.add_metric([source], 1 if health and health.up else 0)
        if health and health.last_success is not None:
            last.add_metric([source], health.last_success)
    yield up
    yield last
    errors = CounterMetricFamily(
        SELF + "errors_total",
        "Failed reads by source and reason (parse, permission, io). Each kind is logged once every 10 minutes.",
        labels=["source", "reason"],
    )
    for (source, reason), count in sorted(snapshot.errors.items()):
        errors.add_metric([source, reason], count)
    yield errors
    vanished = CounterMetricFamily(
        SELF + "vanished_total",
        "Processes and cgroups that disappeared between listing and reading: missing data, not errors.",
        labels=["kind"],
    )
    for kind in ("process", "cgroup"):
        vanished.add_metric([kind], snapshot.vanished.get(kind, 0))
    yield vanished
    transport = GaugeMetricFamily(
        SELF + "dbus_transport_info",
        "How systemd is reached: system_bus, private_socket (/run/systemd/private, when no bus daemon "
        "answers) or none.",
        labels=["transport"],
    )
    transport.add_metric([snapshot.dbus_transport], 1)
    yield transport
    layout = GaugeMetricFamily(
        SELF + "cgroup_layout_info",
        "cgroup layout found: unified (v2), hybrid or legacy, and the memory controller's version.",
        labels=["layout", "memory_controller"],
    )
    version = snapshot.layout.memory_version
    layout.add_metric([snapshot.layout.name, version.value if version else "none"], 1)
    yield layout
    yield GaugeMetricFamily(SELF + "units", "Units in the latest sample.", value=len(snapshot.units))
    if snapshot.pss_skipped is not None:  # --collector.pss
        skipped = CounterMetricFamily(
            SELF + "pss_skipped_processes_total",
            "Processes whose smaps_rollup was not read, so their units had no pss/uss that cycle: max_rss "
            "(RSS above --collector.pss.max-rss), error (unreadable or unparsable).",
            labels=["reason"],
        )
        for reason in ("max_rss", "error"):
            skipped.add_metric([reason], snapshot.pss_skipped.get(reason, 0))
        yield skipped
        yield CounterMetricFamily(
            SELF + "pss_deferred_units_total",
            "Units left without pss/uss for a cycle because --collector.pss.budget ran out; the next cycle "
            "starts with them.",
            value=snapshot.pss_deferred_units or 0,
        )


def render(snapshot: Snapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)
