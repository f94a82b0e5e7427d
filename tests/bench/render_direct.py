"""A proposal, measured by the benchmark and not used by the exporter: render.render() written
straight from the snapshot instead of through client_python's Metric objects and
generate_latest, byte for byte the same text.

Why: rendering was the largest phase of the cycle (about 40% of its CPU at 1,000 units, where
reading every file is the rest) and its transient objects (a Sample namedtuple and a labels dict
per series, ~28 series per unit) raise the exporter's peak memory. inner.py renders every
snapshot both ways, checks the bytes are equal and times both.

What it relies on, all from prometheus_client.exposition.generate_latest: a family's header is
"# HELP name help" and "# TYPE name type" (a counter's samples and header name end in _total);
labels are written sorted by name, values escaped for \\, newline and "; values go through
floatToGoString. The families' names and HELP texts come from render.unit_families itself (on a
snapshot without units), so they cannot drift.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString

from exporter.memory import STAT_ITEMS
from exporter.render import health_families, unit_families


def go_number(value) -> str:
    """floatToGoString for the ints that make up nearly every value, without the float."""
    if type(value) is int and 0 <= value < 10**15:  # exact as a float; repr is "<digits>.0"
        digits = str(value)
        if len(digits) > 6:  # Go's exponent form, as floatToGoString builds it
            return f"{(digits[0] + '.' + digits[1:] + '0').rstrip('0.')}e+{len(digits) - 1:02d}"
        return digits + ".0"
    return floatToGoString(value)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _header(family) -> str:
    name = family.name + "_total" if family.type == "counter" else family.name
    help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {family.type}\n"


class _Health:
    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        return health_families(self.snapshot)


def render_direct(snapshot) -> bytes:
    families = list(unit_families(dataclasses.replace(snapshot, units=())))
    memory, stat, working_set, limit, events, pressure, peak, processes, info = (
        [_header(f)] for f in families
    )
    names = [f.name + ("_total" if f.type == "counter" else "") for f in families]
    n_memory, n_stat, n_ws, n_limit, n_events, n_pressure, n_peak, n_processes, n_info = names
    for sample in snapshot.units:
        u = sample.unit
        unit = _escape(u.name)
        info.append(
            f'{n_info}{{active_state="{_escape(u.active_state)}",control_group="{_escape(u.control_group)}",'
            f'sub_state="{_escape(u.sub_state)}",unit="{unit}",unit_type="{_escape(u.type)}"}} 1.0\n'
        )
        totals = sample.processes
        processes.append(f'{n_processes}{{unit="{unit}"}} {go_number(totals.processes)}\n')
        for kind, value in (("rss_anon", totals.rss_anon), ("rss_file", totals.rss_file), ("rss_shmem", totals.rss_shmem),
                            ("pss", sample.pss), ("uss", sample.uss)):
            if value is not None:
                memory.append(f'{n_memory}{{type="{kind}",unit="{unit}"}} {go_number(value)}\n')
        m = sample.memory
        if m is None:
            continue
        for kind, value in (("cgroup_usage", m.usage), ("page_cache", m.page_cache), ("swap", m.swap)):
            if value is not None:
                memory.append(f'{n_memory}{{type="{kind}",unit="{unit}"}} {go_number(value)}\n')
        for item in STAT_ITEMS:
            if item in m.stat:
                stat.append(f'{n_stat}{{item="{item}",unit="{unit}"}} {go_number(m.stat[item])}\n')
        if m.working_set is not None:
            working_set.append(f'{n_ws}{{unit="{unit}"}} {go_number(m.working_set)}\n')
        for kind, value in m.limits.items():
            limit.append(f'{n_limit}{{limit="{_escape(kind)}",unit="{unit}"}} {go_number(value)}\n')
        for kind, value in m.events.items():
            events.append(f'{n_events}{{event="{_escape(kind)}",unit="{unit}"}} {go_number(value)}\n')
        if m.pressure is not None:
            pressure.append(f'{n_pressure}{{kind="some",unit="{unit}"}} {go_number(m.pressure.some_total_us / 1e6)}\n')
            if m.pressure.full_total_us is not None:
                pressure.append(
                    f'{n_pressure}{{kind="full",unit="{unit}"}} {go_number(m.pressure.full_total_us / 1e6)}\n'
                )
        if m.peak is not None:
            peak.append(f'{n_peak}{{unit="{unit}"}} {go_number(m.peak)}\n')
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Health(snapshot))
    text = "".join(
        "".join(lines) for lines in (memory, stat, working_set, limit, events, pressure, peak, processes, info)
    )
    return text.encode("utf-8") + generate_latest(registry)
