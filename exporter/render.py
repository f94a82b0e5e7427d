"""The exposition text: every line /metrics serves. The snapshot's lines are a pure function of
the Snapshot, rendered once per snapshot; the few lines made per scrape (the exporter's own
process, the render time) are written here by the same writer.

Written straight from the snapshot rather than through client_python's metric families and
generate_latest: the benchmark (tests/bench) measured that path at 40 % of a sample cycle's
CPU at 1,000 units (a Sample tuple and a labels dict per series, ~28 series per unit) and
this one at a fifth of it. The format is Prometheus text 0.0.4; the golden files and
`promtool check metrics` (tests/test_sampler.py) hold it to that. A unit that stopped simply
stops appearing: nothing outlives the snapshot it came from.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from . import __version__
from .memory import LIMITS, STAT_ITEMS, V2_EVENTS
from .records import record
from .snapshot import SOURCES, Snapshot

if TYPE_CHECKING:
    from prometheus_client import Metric

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


PRESSURE_KINDS = ("some", "full")


@record
class SeriesBudget:
    """Which of the optional per-unit series /metrics carries (node_exporter's style:
    --collector.<what>.fields takes a regex of field names, --collector.peak turns one on).

    The default keeps a unit at 20 series or fewer on cgroup v1 and 24 or fewer on v2, limits
    included (README, "Running it on a fleet", has the cost of each): always the five memory
    types and rss_shmem, working set, processes and info; the memory.stat items, events, limits
    and pressure kinds the shipped alerts and the dashboards' main panels read. The rest is
    opt-in. The exporter still reads every file once per cycle: `explain`, the landing page and
    working_set use all of them; only the exposition is trimmed.
    """

    stat_items: frozenset[str]
    events: frozenset[str]
    limits: frozenset[str]
    pressure: frozenset[str]
    peak: bool

    # What each field regex may name, for `SeriesBudget.of` and the flags' messages.
    FIELDS = {"stat": STAT_ITEMS, "events": V2_EVENTS, "limits": LIMITS, "pressure": PRESSURE_KINDS}

    @classmethod
    def of(cls, stat: str, events: str, limits: str, pressure: str, peak: bool) -> "SeriesBudget":
        """From field regexes, each matched against the whole name (as --unit.include is)."""
        def chosen(field: str, regex: str) -> frozenset[str]:
            pattern = re.compile(regex)
            return frozenset(name for name in cls.FIELDS[field] if pattern.fullmatch(name))

        return cls(chosen("stat", stat), chosen("events", events), chosen("limits", limits),
                   chosen("pressure", pressure), peak)


# The default fields, as the flags take them. stat: what the alerts, the recording rules and the
# dashboards' main panels read (anon, the file/shmem/mapped/dirty/writeback split of the cache,
# kernel); the LRU lists, swapcached and v2's kernel parts are detail. events: the limit and OOM
# events; low (protection breached) and oom_group_kill are rare detail. limits: the two ceilings
# (MemoryMax, MemoryHigh) that rules divide by. pressure: full, the stall that costs throughput
# and the one systemd-oomd acts on. peak: a lifetime high-water mark including cache.
DEFAULT_FIELDS = {
    "stat": "anon|file|shmem|file_mapped|file_dirty|file_writeback|kernel",
    "events": "max|high|oom|oom_kill",
    "limits": "max|high",
    "pressure": "full",
}
DEFAULT_BUDGET = SeriesBudget.of(**DEFAULT_FIELDS, peak=False)
EVERY_SERIES = SeriesBudget.of(".+", ".+", ".+", ".+", peak=True)


def label_value(value: str) -> str:
    if "\\" not in value and "\n" not in value and '"' not in value:
        return value  # nearly every unit name: three scans instead of three copies
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def number(value: int | float) -> str:
    """Integers exactly as they are (bytes and counts are integers, some above 2**53);
    floats in Python's shortest round-trip form, which Prometheus' parser reads."""
    return str(value) if type(value) is int else repr(float(value))


class Family:
    """One metric family's lines: a HELP and TYPE header, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str):
        self.name = name
        help_text = help_text.replace("\\", r"\\").replace("\n", r"\n")
        self.lines = [f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"]

    def add(self, labels: str, value: int | float) -> None:
        """``labels``: the rendered pairs, e.g. 'type="rss_anon",unit="x.service"' (or "")."""
        self.lines.append(f"{self.name}{{{labels}}} {number(value)}\n" if labels else f"{self.name} {number(value)}\n")


def _sampled(snapshot: Snapshot) -> str:
    return f" Sampled every {snapshot.interval:g}s (0: on each scrape); no timestamps."


def _no_pause() -> None:
    pass


def unit_families(snapshot: Snapshot, budget: SeriesBudget = DEFAULT_BUDGET,
                  pause: Callable[[], None] = _no_pause) -> list[Family]:
    """``pause``: called once per unit (the sample loop lets a scrape run there, service.py)."""
    sampled = _sampled(snapshot)
    memory = Family(
        UNIT_MEMORY, "gauge",
        "Memory of a systemd unit by type. cgroup_usage: what systemctl reports as MemoryCurrent "
        "(v1 memory.usage_in_bytes, v2 memory.current). page_cache: v1 memory.stat total_cache, v2 file "
        "(both include tmpfs/shm). swap: v1 memory.stat total_swap, v2 memory.swap.current. "
        "rss_anon/rss_file/rss_shmem: RssAnon/RssFile/RssShmem of /proc/PID/status summed over the "
        "unit's processes (top's RES, split). pss/uss: smaps_rollup, only with --collector.pss." + sampled,
    )
    stat = Family(
        UNIT_STAT, "gauge",
        "cgroup memory.stat of a systemd unit, hierarchical, in cgroup v2 names (v1: total_rss->anon, "
        "total_cache->file, total_mapped_file->file_mapped, ...; kernel from memory.kmem.usage_in_bytes; "
        "v2 before 5.18: kernel = kernel_stack + pagetables + percpu + vmalloc + slab)." + sampled,
    )
    working_set = Family(
        UNIT_WORKING_SET, "gauge",
        "cgroup usage minus inactive_file, floored at 0 (cAdvisor's and the kubelet's working set)." + sampled,
    )
    limit = Family(
        UNIT_LIMIT, "gauge",
        "cgroup memory limits of a systemd unit: max, high, low, min, swap_max (v2 memory.<limit>; v1 "
        "max = memory.limit_in_bytes). Absent when unlimited or unset." + sampled,
    )
    events = Family(
        UNIT_EVENTS, "counter",
        "cgroup memory events of a systemd unit, hierarchical (v2 memory.events: low, high, max, oom, "
        "oom_kill, oom_group_kill; v1: max = memory.failcnt, oom_kill = memory.oom_control oom_kill)." + sampled,
    )
    pressure = Family(
        UNIT_PRESSURE, "counter",
        "Time processes of a systemd unit stalled on memory (PSI memory.pressure total, "
        "kind some or full). Needs a cgroup2 hierarchy: v2, or hybrid's unified tree." + sampled,
    )
    peak = Family(
        UNIT_PEAK, "gauge",
        "Highest cgroup usage recorded by the kernel (v1 memory.max_usage_in_bytes, v2 memory.peak, 5.19+)."
        + sampled,
    )
    processes = Family(UNIT_PROCESSES, "gauge", "Processes in the unit's cgroup subtree (cgroup.procs)." + sampled)
    info = Family(
        UNIT_INFO, "gauge",
        "1 for every unit reported, with its unit type, states and control group (systemd over D-Bus). "
        "Units of a user manager (user@UID.service) carry uid and an empty sub_state: they are found in "
        "its cgroup tree." + sampled,
    )
    stat_items = [item for item in STAT_ITEMS if item in budget.stat_items]
    limit_kinds, event_kinds = budget.limits, budget.events
    some, full, with_peak = "some" in budget.pressure, "full" in budget.pressure, budget.peak
    # Lines are appended straight to each family (Family.add's format, inlined: about 20 lines
    # a unit, 1,000 units a cycle). Every value here but pressure's seconds is an int.
    add_memory, add_stat, add_working_set = memory.lines.append, stat.lines.append, working_set.lines.append
    add_limit, add_events, add_pressure = limit.lines.append, events.lines.append, pressure.lines.append
    add_peak, add_processes, add_info = peak.lines.append, processes.lines.append, info.lines.append
    for sample in snapshot.units:
        pause()
        u = sample.unit
        # uid only on a user manager's units; it sorts between sub_state/type and unit.
        unit = (f'uid="{u.uid}",' if u.uid is not None else "") + f'unit="{label_value(u.name)}"'
        add_info(
            f'{UNIT_INFO}{{active_state="{label_value(u.active_state)}",control_group="{label_value(u.control_group)}",'
            f'sub_state="{label_value(u.sub_state)}",{unit},unit_type="{label_value(u.type)}"}} 1\n'
        )
        totals = sample.processes
        add_processes(f"{UNIT_PROCESSES}{{{unit}}} {totals.processes}\n")
        m = sample.memory
        for kind, value in (
            ("rss_anon", totals.rss_anon), ("rss_file", totals.rss_file), ("rss_shmem", totals.rss_shmem),
            ("pss", sample.pss), ("uss", sample.uss),
            ("cgroup_usage", m and m.usage), ("page_cache", m and m.page_cache), ("swap", m and m.swap),
        ):
            if value is not None:
                add_memory(f'{UNIT_MEMORY}{{type="{kind}",{unit}}} {value}\n')
        if m is None:
            continue
        unit_stat = m.stat
        for item in stat_items:
            if item in unit_stat:
                add_stat(f'{UNIT_STAT}{{item="{item}",{unit}}} {unit_stat[item]}\n')
        working = m.working_set
        if working is not None:
            add_working_set(f"{UNIT_WORKING_SET}{{{unit}}} {working}\n")
        for kind, value in m.limits.items():
            if kind in limit_kinds:
                add_limit(f'{UNIT_LIMIT}{{limit="{kind}",{unit}}} {value}\n')
        for kind, value in m.events.items():
            if kind in event_kinds:
                add_events(f'{UNIT_EVENTS}{{event="{kind}",{unit}}} {value}\n')
        if m.pressure is not None:
            if some:
                add_pressure(f'{UNIT_PRESSURE}{{kind="some",{unit}}} {number(m.pressure.some_total_us / 1e6)}\n')
            if m.pressure.full_total_us is not None and full:
                add_pressure(f'{UNIT_PRESSURE}{{kind="full",{unit}}} {number(m.pressure.full_total_us / 1e6)}\n')
        if m.peak is not None and with_peak:
            add_peak(f"{UNIT_PEAK}{{{unit}}} {m.peak}\n")
    return [memory, stat, working_set, limit, events, pressure, peak, processes, info]


def _single(name: str, kind: str, help_text: str, value: int | float) -> Family:
    family = Family(name, kind, help_text)
    family.add("", value)
    return family


def health_families(snapshot: Snapshot) -> list[Family]:
    build = Family(SELF + "build_info", "gauge", "Version of the exporter and of the Python running it.")
    build.add(f'python_version="{platform.python_version()}",version="{__version__}"', 1)
    duration = Family(
        SELF + "sample_duration_seconds", "gauge",
        "Wall time of the latest sample cycle by phase (discovery, cgroup, procfs, pss with "
        "--collector.pss, build, total).",
    )
    for phase, seconds in snapshot.phase_seconds.items():
        duration.add(f'phase="{phase}"', seconds)
    up = Family(
        SELF + "source_up", "gauge",
        "1 if every read from the source succeeded in the latest sample (dbus: unit discovery; cgroup: "
        "cgroup memory files; procfs: /proc/PID/status).",
    )
    last = Family(
        SELF + "source_last_success_timestamp_seconds", "gauge",
        "Unix time of the latest fully successful read from the source.",
    )
    for source in SOURCES:
        health = snapshot.sources.get(source)
        up.add(f'source="{source}"', 1 if health and health.up else 0)
        if health and health.last_success is not None:
            last.add(f'source="{source}"', health.last_success)
    errors = Family(
        SELF + "errors_total", "counter",
        "Failed reads by source and reason (parse, permission, io, timeout, unavailable; rejected: a "
        "directory in a user's delegated cgroup tree skipped as a unit, which leaves source_up as it is). Each kind is "
        "logged once every 10 minutes.",
    )
    for (source, reason), count in sorted(snapshot.errors.items()):
        errors.add(f'reason="{reason}",source="{source}"', count)
    vanished = Family(
        SELF + "vanished_total", "counter",
        "Processes and cgroups that disappeared between listing and reading: missing data, not errors.",
    )
    for kind in ("process", "cgroup"):
        vanished.add(f'kind="{kind}"', snapshot.vanished.get(kind, 0))
    transport = Family(
        SELF + "dbus_transport_info", "gauge",
        "How systemd is reached: system_bus, private_socket (/run/systemd/private, when no bus daemon "
        "answers) or none.",
    )
    transport.add(f'transport="{snapshot.dbus_transport}"', 1)
    layout = Family(
        SELF + "cgroup_layout_info", "gauge",
        "cgroup layout found: unified (v2), hybrid or legacy, and the memory controller's version.",
    )
    version = snapshot.layout.memory_version
    layout.add(f'layout="{snapshot.layout.name}",memory_controller="{version.value if version else "none"}"', 1)
    families = [
        build,
        _single(SELF + "sample_interval_seconds", "gauge", "Configured --sample.interval (0: sample on each scrape).",
                snapshot.interval),
        _single(SELF + "last_sample_timestamp_seconds", "gauge",
                "Unix time the latest sample started; compare with time() to see stale data.", snapshot.taken_at),
        duration,
        _single(SELF + "sample_cpu_seconds", "gauge", "CPU time the latest sample cycle used.", snapshot.cpu_seconds),
        _single(SELF + "samples_total", "counter", "Sample cycles completed.", snapshot.samples_total),
        up, last, errors, vanished, transport, layout,
        _single(SELF + "units", "gauge", "Units in the latest sample.", len(snapshot.units)),
    ]
    if snapshot.pss_skipped is not None:  # --collector.pss
        skipped = Family(
            SELF + "pss_skipped_processes_total", "counter",
            "Processes whose smaps_rollup was not read, so their units had no pss/uss that cycle: max_rss "
            "(RSS above --collector.pss.max-rss), error (unreadable or unparsable).",
        )
        for reason in ("max_rss", "error"):
            skipped.add(f'reason="{reason}"', snapshot.pss_skipped.get(reason, 0))
        families.append(skipped)
        families.append(_single(
            SELF + "pss_deferred_units_total", "counter",
            "Units left without pss/uss for a cycle because --collector.pss.budget ran out; the next cycle "
            "starts with them.",
            snapshot.pss_deferred_units or 0,
        ))
    return families


def _text(families: list[Family]) -> bytes:
    # Joined a family at a time: one join of every line (2 MB at 1,000 units) held the GIL
    # in C for milliseconds; between families a waiting scrape can take it.
    return b"".join("".join(family.lines).encode() for family in families)


# Lines joined and compressed at a time by render_families (about 0.2 ms of GIL each).
JOIN_LINES = 2000


def render_families(snapshot: Snapshot, budget: SeriesBudget = DEFAULT_BUDGET,
                    pause: Callable[[], None] = _no_pause) -> Iterator[bytes]:
    """The snapshot's text a piece at a time, each family's lines let go once they are encoded:
    publish() compresses the pieces as they come, so the whole plain text (1.6 MB at 1,000
    units) never exists at once beside the lines it is made of."""
    families = unit_families(snapshot, budget, pause) + health_families(snapshot)
    families.reverse()
    while families:
        lines = families.pop().lines
        # In pieces: one join of a family's lines (24,000 at 3,000 units) held the GIL in C
        # for milliseconds; between pieces a waiting scrape can take it.
        for start in range(0, len(lines), JOIN_LINES):
            yield "".join(lines[start:start + JOIN_LINES]).encode()


def render(snapshot: Snapshot, budget: SeriesBudget = DEFAULT_BUDGET, pause: Callable[[], None] = _no_pause) -> bytes:
    return b"".join(render_families(snapshot, budget, pause))


def _client_family(metric: Metric) -> Family:
    """One family from a client_python collector, in the same format as the rest."""
    # client_python names a counter family without _total; the text format names it with.
    name = metric.name + "_total" if metric.type == "counter" else metric.name
    family = Family(name, metric.type, metric.documentation)
    for sample in metric.samples:
        if sample.name == name:  # a counter's _created has no place in text 0.0.4
            family.add(",".join(f'{k}="{label_value(v)}"' for k, v in sorted(sample.labels.items())), sample.value)
    return family


def render_scrape(own: Iterable[Metric], render_seconds: float | None) -> bytes:
    """The lines made per scrape: the exporter's own process (``own``: client_python's process,
    platform and GC collectors give the values) and, once there is a snapshot, how long it took
    to render and compress."""
    families = [_client_family(metric) for metric in own]
    if render_seconds is not None:
        families.append(_single(
            SELF + "render_duration_seconds", "gauge", "Time to render and compress the latest snapshot.", render_seconds
        ))
    return _text(families)
