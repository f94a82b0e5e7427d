"""The truth test in the QEMU guests (issues 5 and 11): tests/test_e2e.py's workloads and checks,
plus the figures beyond them, on each guest of tests/vm/conftest.py GUESTS (bullseye on legacy,
bookworm and trixie on unified). v2: memory.stat as the kernel prints it, memory.swap.current,
memory.events, memory.pressure and the memory.* limits. Legacy v1 gets the v1 variant of each:
memory.stat's total_* items and total_swap (swap accounting), memory.oom_control's oom_kill and
memory.failcnt, memory.limit_in_bytes, memory.max_usage_in_bytes, and no pressure series at all.
Tests marked layouts("unified") need v2 (the v2 fixture, -.slice's v2 root, Prometheus on v2).

The exporter is pip-installed into the guest's venv (tests/vm/conftest.py) and runs there as a
transient unit (`/opt/systemd-memory-exporter/bin/systemd-memory-exporter
--web.listen-address=127.0.0.1:10073 --sample.interval=1`, cwd /); tests/vm/probe.py waits
there for a fresh sample and reads `systemctl show` and the cgroup files right after it, in one
round trip. Every figure is compared with what systemd and the kernel say in the guest.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter import memory as memfiles
from tests.fleet_exporter import EVERY_SERIES_FLAGS
from tests.truth import (
    MiB,
    Scrape,
    check_accounting_off,
    check_anon_hog,
    check_explain_usage,
    check_multi_process,
    check_page_cache_reader,
    check_rss_is_proc_sums,
    check_tmpfs_writer,
    free_port,
    proc_sums,
)

from . import workloads
from .guest import EXPORTER, VENV_PYTHON, wait_until
from .relay import scrape_relay
from .image import GUEST_PROJECT, SUITES

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

INTERVAL = 1.0
PORT = 10073
URL = f"http://127.0.0.1:{PORT}/metrics"
EXPORTER_UNIT = "smx-exporter.service"
PROBE = f"{GUEST_PROJECT}/tests/vm/probe.py"
PROBE_UNIT = "smx-probe"  # the probes' own units, smx-probe-N.service: the instrument, not compared
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "v2"
# memory.stat items compared one by one with the kernel's file (the brief's v2 figures); on v1
# "kernel" comes from memory.kmem.usage_in_bytes, the others from memory.stat's total_* keys.
STAT_CHECKED = ("anon", "file", "shmem", "file_mapped", "kernel")
V1_ITEM_KEYS = {v2: v1 for v1, v2 in memfiles.V1_STAT_NAMES.items()}


def v2(vm) -> bool:
    return vm.layout == "unified"


def usage_file(vm) -> str:
    return "memory.current" if v2(vm) else "memory.usage_in_bytes"


def keyed(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}


def pressure_totals(text: str) -> dict[str, int]:
    """memory.pressure -> {"some": total µs, "full": total µs}."""
    return {line.split()[0]: int(line.rsplit("total=", 1)[1]) for line in text.splitlines() if line}


@dataclass
class Probe:
    scrape: Scrape
    text: str
    elapsed: float  # from the end of `run` (or the call) to the sample showing in a scrape
    units: dict  # name -> {"show": {prop: value}, "files": {file: text or None}}
    run: dict | None = None

    def show(self, unit: str, prop: str) -> str:
        return self.units[unit]["show"][prop]

    def file(self, unit: str, name: str) -> str | None:
        return self.units[unit]["files"][name]


class GuestExporter:
    """The exporter in the guest, seen from the host through the agent."""

    def __init__(self, vm, url: str, interval: float):
        self.vm = vm
        self.url = url
        self.interval = interval
        self.ready_seconds: float | None = None
        self._probes = 0

    def scrape_text(self) -> str:
        return self.vm.fetch(self.url)

    def scrape(self) -> Scrape:
        return Scrape.parse(self.scrape_text())

    def probe(self, units=(), props=(), files=(), run=None, wait=True) -> Probe:
        """Wait for a sample that started after this call (after `run`, if given), then read
        the cgroup `files` and `systemctl show` `props` of `units` ("all": every unit scraped)."""
        request = {"url": self.url, "units": units if units == "all" else list(units),
                   "props": list(props), "files": list(files), "run": run, "wait": wait,
                   "timeout": 5 * self.interval + 10, "root": self.vm.memory_root}
        self._probes += 1
        # Its own unit: the probe and its systemctl are charged to no unit it measures.
        argv = ["systemd-run", "--quiet", "--pipe", "--wait", "--collect",
                f"--unit={PROBE_UNIT}-{self._probes}.service", "--", VENV_PYTHON, PROBE]
        ran = self.vm.run(argv, input=json.dumps(request), timeout=60)
        assert ran.returncode == 0, f"probe failed ({ran.returncode}): {ran.stderr[-2000:]}"
        result = json.loads(ran.stdout)
        return Probe(Scrape.parse(result["scrape"]), result["scrape"], result["elapsed"],
                     result["units"], result.get("run"))

    def next_sample(self) -> Scrape:
        return self.probe().scrape

    def wait_ready(self, timeout: float) -> None:
        def ready():
            try:
                m = self.scrape()
            except subprocess.CalledProcessError:
                return False
            return (m.get("systemd_memory_exporter_source_up", source="dbus") == 1
                    and m.label_values("systemd_unit_info", "unit"))
        wait_until(ready, timeout, interval=0.2, what=f"the exporter at {self.url} ready")


@pytest.fixture(scope="module")
def exporter(vm):
    started = time.monotonic()
    # cwd /: the installed package runs, not the checkout at /project.
    vm.start_unit(EXPORTER_UNIT, [EXPORTER, f"--web.listen-address=127.0.0.1:{PORT}",
                                  f"--sample.interval={INTERVAL:g}", "--log.level=debug",
                                  *EVERY_SERIES_FLAGS], cwd="/")  # every figure is checked, opt-in ones too
    try:
        client = GuestExporter(vm, URL, INTERVAL)
        client.wait_ready(timeout=30)
        client.ready_seconds = time.monotonic() - started
        yield client
    finally:
        journal = vm.run(["journalctl", "--no-pager", "-o", "cat", "-u", EXPORTER_UNIT]).stdout
        vm.stop_unit(EXPORTER_UNIT)
    assert "Traceback" not in journal, journal[-4000:]


@pytest.fixture(scope="module")
def units(vm, exporter):
    """One of each workload (test_e2e.py's six and v2's swap, OOM and limits), started once."""
    started = workloads.sample_workloads(vm)
    try:
        exporter.next_sample()
        yield started
    finally:
        workloads.stop_units(vm, started.values())


def test_serves_within_a_few_seconds(exporter):
    # test_e2e.py asks for 5 s on the machine itself; the guest runs under TCG emulation, and
    # this counts systemd-run and the agent's round trips too (bookworm 6-9 s; bullseye's
    # Python 3.9 11 s with the other helpers' load on the 2 cores).
    assert exporter.ready_seconds < 20


def test_anon_hog_shows_its_anonymous_memory(exporter, units):
    check_anon_hog(exporter.scrape(), units["anon"])


def test_page_cache_reader_shows_cache_not_rss(exporter, units):
    check_page_cache_reader(exporter.scrape(), units["cache"])


def test_tmpfs_writer_shows_shmem_inside_page_cache(exporter, units):
    check_tmpfs_writer(exporter.scrape(), units["shm"])


def test_every_unit_usage_equals_systemctl_memory_current(vm, exporter, units):
    """cgroup_usage against MemoryCurrent and memory.current (v1: memory.usage_in_bytes), within
    2 %, unit by unit. Both
    sides are instants of a moving figure (the exporter and the agent grow while they answer),
    so a unit outside 2 % is measured again, up to 5 times, from a fresh sample."""
    pending = None
    for _attempt in range(5):
        p = exporter.probe(units="all", props=("MemoryCurrent",), files=(usage_file(vm),))
        names = set(p.units)
        assert set(units.values()) <= names
        mismatched = {}
        for name in names if pending is None else pending & names:
            if name.startswith(PROBE_UNIT + "-"):
                continue  # the probe itself, busy reading while it is sampled
            group = p.show(name, "ControlGroup")
            assert p.scrape.labels_of("systemd_unit_info", unit=name)["control_group"] == group
            current = p.show(name, "MemoryCurrent")
            usage = p.scrape.get("systemd_unit_memory_bytes", unit=name, type="cgroup_usage")
            if group == "/" and not v2(vm):
                # v1's root memory cgroup has memory.usage_in_bytes (the kernel's total), while
                # systemd makes -.slice's MemoryCurrent up from /proc/meminfo (MemTotal -
                # MemAvailable): the exporter reports the cgroup file, as for every unit.
                kernel = int(p.file(name, usage_file(vm)))
                if usage != pytest.approx(kernel, rel=0.02):
                    mismatched[name] = (usage, current, kernel)
            elif group == "/":
                # The v2 root cgroup has no memory.current; systemd 252 makes -.slice's
                # MemoryCurrent up from /proc/meminfo (MemTotal - MemAvailable). The exporter
                # reports only cgroup figures, so -.slice has none (README: host totals come
                # from the top-level cgroups on v2).
                assert p.file(name, "memory.current") is None
                assert current != "[not set]"
                assert usage is None, "-.slice: the root cgroup has no memory.current on v2"
            elif current == "[not set]":
                assert usage is None, f"{name}: systemd has no MemoryCurrent, the exporter must not invent one"
            else:
                # PID 1 is busy answering while systemctl asks it: init.scope's MemoryCurrent is
                # always read with its answer buffers charged, about 260 KiB above memory.current
                # before and after (measured in the guest), 13 % of a 2 MiB init.scope. Its
                # memory.current, read a moment later, moves as much (3.07 MiB sampled against
                # 2.83 MiB read, seen in a loaded CI run).
                answering = 512 * 1024 if name == "init.scope" else 0
                kernel = int(p.file(name, usage_file(vm)))
                if not (usage == pytest.approx(int(current), rel=0.02, abs=answering)
                        and usage == pytest.approx(kernel, rel=0.02, abs=answering)):
                    mismatched[name] = (usage, int(current), kernel)
        if pending is None:
            assert len(names) >= len(units) + 3  # the workloads plus systemd's own units
        pending = set(mismatched)
        if not pending:
            return
    pytest.fail(f"cgroup_usage differs from MemoryCurrent/{usage_file(vm)} by more than 2 % five times: {mismatched}")


def test_rss_equals_proc_sums_for_the_same_pids(vm, exporter, units):
    """Sum /proc/PID/status inside the guest, independently of the exporter's code."""
    for key in ("anon", "multi", "nested", "swap"):
        unit = units[key]
        expected = proc_sums(vm, vm.cgroup_dir(unit))
        check_rss_is_proc_sums(exporter.next_sample(), unit, expected)


def test_multi_process_unit_counts_its_processes(exporter, units):
    check_multi_process(exporter.scrape(), units["multi"])


def test_nested_slices_contain_their_service(vm, exporter, units):
    m = exporter.scrape()
    unit = units["nested"]
    assert vm.unit_property(unit, "ControlGroup") == (
        f"/smx.slice/smx-outer.slice/smx-outer-inner.slice/{unit}")
    service = m.value("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage")
    for slice_name in ("smx-outer-inner.slice", "smx-outer.slice", "smx.slice"):
        assert m.value("systemd_unit_memory_bytes", unit=slice_name, type="cgroup_usage") >= service * 0.98
        assert m.value("systemd_unit_memory_bytes", unit=slice_name, type="rss_anon") >= m.value(
            "systemd_unit_memory_bytes", unit=unit, type="rss_anon")


def test_escaped_unit_name_is_labelled_as_systemd_spells_it(vm, exporter, units):
    name = units["escaped"]
    assert "\\x2d" in name
    listed = vm.run(["systemctl", "list-units", "--plain", "--no-legend", "--", name], check=True).stdout
    assert listed.split()[0] == name
    assert exporter.scrape().value("systemd_unit_memory_bytes", unit=name, type="rss_anon") >= 9 * MiB


def test_stopped_unit_series_disappear_at_the_next_sample(vm, exporter):
    unit = workloads.anon_hog(vm, 20)
    try:
        assert exporter.next_sample().get("systemd_unit_memory_bytes", unit=unit, type="rss_anon") is not None
        # Stop it and wait for the next sample inside the guest: elapsed is guest time from
        # the end of `systemctl stop` to a scrape showing a sample that started after it.
        p = exporter.probe(run=["systemctl", "stop", unit])
        assert p.run["returncode"] == 0, p.run
    finally:
        workloads.stop_units(vm, [unit])
    assert p.elapsed <= 2 * INTERVAL + 1
    assert not [s for s in p.scrape.samples if s.labels.get("unit") == unit]


def test_short_lived_units_come_and_go_without_errors(vm, exporter):
    before = exporter.scrape().total("systemd_memory_exporter_errors_total")
    workloads.short_lived(vm, count=5, lifetime=INTERVAL * 1.5)
    m = exporter.next_sample()
    assert m.total("systemd_memory_exporter_errors_total") == before
    assert not [u for u in m.label_values("systemd_unit_info", "unit") if u.startswith("smx-short")]


def test_self_health_is_up(vm, exporter, units):
    m = exporter.scrape()
    for source in ("dbus", "cgroup", "procfs"):
        assert m.value("systemd_memory_exporter_source_up", source=source) == 1, source
    assert m.value("systemd_memory_exporter_cgroup_layout_info", layout=vm.layout,
                   memory_controller="v2" if v2(vm) else "v1") == 1
    assert len([s for s in m.samples if s.name == "systemd_memory_exporter_cgroup_layout_info"]) == 1
    assert m.total("systemd_memory_exporter_errors_total") == 0
    guest_now = float(vm.run(["date", "+%s.%N"], check=True).stdout)
    assert guest_now - m.value("systemd_memory_exporter_last_sample_timestamp_seconds") < 3 * INTERVAL + 2


def test_promtool_check_metrics_is_clean_on_a_live_scrape(vm, exporter, units):
    body = exporter.scrape_text()
    assert "systemd_unit_memory_events_total{" in body
    # v1 has no memory.pressure: the series are absent, not 0.
    assert ("systemd_unit_memory_pressure_seconds_total{" in body) == v2(vm)
    promtool = shutil.which("promtool") or "/usr/bin/promtool"  # on the host: the guest has none
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_explain_reconciles_the_workloads(vm, units):
    names = [units[k] for k in ("anon", "cache", "shm", "swap", "oom")]
    before = int(vm.unit_property(units["cache"], "MemoryCurrent"))
    out = vm.run([EXPORTER, "explain", *names], cwd="/", check=True).stdout
    after = int(vm.unit_property(units["cache"], "MemoryCurrent"))
    assert out.startswith(f"cgroup {vm.layout} layout, memory controller on {'v2' if v2(vm) else 'v1'};")
    for name in names:
        assert name in out
    sections = {name: out[out.index(name + "  ("):].split("\n\n")[0] for name in names}
    assert "reclaimable page cache" in sections[units["cache"]]  # the cache verdict
    assert "tmpfs/shared memory" in sections[units["shm"]]
    assert "are close" in sections[units["anon"]]
    check_explain_usage(sections[units["cache"]], before, after, int(vm.run(["nproc"], check=True).stdout))
    # Beyond the test host's checks: the swap that lies outside usage, the limit, the OOM kill
    # (v1 too: total_swap with swap accounting, memory.limit_in_bytes, memory.oom_control).
    swap_line = next(line for line in sections[units["swap"]].splitlines() if "swap (outside usage)" in line)
    assert "MiB" in swap_line and " 0 B" not in swap_line
    assert "MemoryMax" in sections[units["swap"]] and "64.0 MiB" in sections[units["swap"]]
    assert "OOM kills so far: 1" in sections[units["oom"]]


def test_explain_unknown_unit_fails_clearly(vm):
    r = vm.run([EXPORTER, "explain", "no-such.service"], cwd="/")
    assert r.returncode == 1
    assert "no-such.service" in r.stderr


# ---------------------------------------------------------------- figures beyond the test host's

def _matching_probe(exporter, names, files, compare, attempts=5):
    """Probe until compare(probe, name) is empty for every name (a dict of mismatches),
    re-measuring only the units that disagreed; fails with the last mismatches."""
    pending = list(names)
    for _attempt in range(attempts):
        p = exporter.probe(units=pending, files=files)
        mismatched = {name: bad for name in pending if (bad := compare(p, name))}
        if not mismatched:
            return p
        pending = list(mismatched)
    pytest.fail(f"exporter and kernel disagree {attempts} times: {mismatched}")


def v2_stat(vm, p, name) -> dict[str, int]:
    """The unit's memory.stat in v2 vocabulary: as printed on v2 (before 5.18, which prints no
    kernel total, plus "kernel" summed from the parts cgroup-v2.rst says it holds); on v1 its
    total_* keys renamed (exporter.memory.V1_STAT_NAMES) plus "kernel" from
    memory.kmem.usage_in_bytes."""
    raw = keyed(p.file(name, "memory.stat"))
    if v2(vm):
        if "kernel" not in raw:
            slab = ("slab",) if "slab" in raw else ("slab_reclaimable", "slab_unreclaimable")  # 5.9+
            raw["kernel"] = sum(raw.get(k, 0) for k in ("kernel_stack", "pagetables", "percpu", "vmalloc", *slab))
        return raw
    stat = {v2_name: raw[v1_name] for v1_name, v2_name in memfiles.V1_STAT_NAMES.items() if v1_name in raw}
    kmem = p.file(name, "memory.kmem.usage_in_bytes")
    if kmem is not None:
        stat["kernel"] = int(kmem)
    return stat


def test_memory_stat_items_equal_the_units_memory_stat(vm, exporter, units):
    """systemd_unit_memory_stat_bytes{item} = the unit's memory.stat at the same moment
    (within 2 %), and every item the exporter knows and the kernel prints is there."""
    def compare(p, name):
        stat = v2_stat(vm, p, name)
        bad = {}
        rendered = {s.labels["item"] for s in p.scrape.samples
                    if s.name == "systemd_unit_memory_stat_bytes" and s.labels["unit"] == name}
        expected_items = set(memfiles.V2_STAT_ITEMS) & set(stat)
        assert rendered == expected_items, (name, rendered ^ expected_items)
        for item in STAT_CHECKED:
            value = p.scrape.value("systemd_unit_memory_stat_bytes", unit=name, item=item)
            if value != pytest.approx(stat[item], rel=0.02):
                bad[item] = (value, stat[item])
        page_cache = p.scrape.value("systemd_unit_memory_bytes", unit=name, type="page_cache")
        if page_cache != pytest.approx(stat["file"], rel=0.02):
            bad["page_cache"] = (page_cache, stat["file"])
        # working set = usage - inactive_file (cAdvisor's definition)
        working_set = p.scrape.value("systemd_unit_memory_working_set_bytes", unit=name)
        expected = max(int(p.file(name, usage_file(vm))) - stat["inactive_file"], 0)
        if working_set != pytest.approx(expected, rel=0.02):
            bad["working_set"] = (working_set, expected)
        return bad

    files = ("memory.stat", usage_file(vm)) + (() if v2(vm) else ("memory.kmem.usage_in_bytes",))
    _matching_probe(exporter, units.values(), files, compare)


def test_swap_is_reported_for_a_unit_pushed_into_swap(vm, exporter, units):
    """v2: memory.swap.current; v1: memory.stat's total_swap (there with swap accounting)."""
    unit = units["swap"]

    def swapped(p, name):
        if v2(vm):
            return int(p.file(name, "memory.swap.current"))
        return keyed(p.file(name, "memory.stat"))["total_swap"]

    def compare(p, name):
        swap = p.scrape.value("systemd_unit_memory_bytes", unit=name, type="swap")
        current = swapped(p, name)
        return {} if swap == pytest.approx(current, rel=0.02) else {"swap": (swap, current)}

    p = _matching_probe(exporter, [unit], ("memory.swap.current" if v2(vm) else "memory.stat",), compare)
    swap = p.scrape.value("systemd_unit_memory_bytes", unit=unit, type="swap")
    assert swap >= 64 * MiB  # 150 MiB held under MemoryMax=64M: at least 86 MiB are in swap
    assert p.scrape.value("systemd_unit_memory_bytes", unit=unit, type="cgroup_usage") <= 64 * MiB
    # A unit that never swapped reports 0, not nothing: the kernel can tell on v2.
    assert p.scrape.value("systemd_unit_memory_bytes", unit=units["limited"], type="swap") == 0


def test_oom_kill_is_counted(vm, exporter, units):
    """v2: memory.events; v1: oom_kill from memory.oom_control and max from memory.failcnt."""
    unit = units["oom"]

    def events_of(p, name):
        if v2(vm):
            events = keyed(p.file(name, "memory.events"))
            # oom_group_kill came in 5.17: bullseye510's 5.10 prints the other five
            lacking = set() if vm.kernel_at_least(5, 17) else {"oom_group_kill"}
            assert set(events) == set(memfiles.V2_EVENTS) - lacking, events
            return events
        return {"oom_kill": keyed(p.file(name, "memory.oom_control"))["oom_kill"],
                "max": int(p.file(name, "memory.failcnt"))}

    def compare(p, name):
        events = events_of(p, name)
        rendered = {s.labels["event"]: s.value for s in p.scrape.samples
                    if s.name == "systemd_unit_memory_events_total" and s.labels["unit"] == name}
        return {} if rendered == events else {"events": (rendered, events)}

    files = ("memory.events",) if v2(vm) else ("memory.oom_control", "memory.failcnt")
    p = _matching_probe(exporter, [unit, units["anon"]], files, compare)
    assert p.scrape.value("systemd_unit_memory_events_total", unit=unit, event="oom_kill") >= 1
    # v1: the kill came from the memory+swap cap, counted in memory.memsw.failcnt, not in
    # memory.failcnt (event="max"), which stays 0 (compared with the file above).
    assert p.scrape.value("systemd_unit_memory_events_total", unit=unit, event="max") >= (1 if v2(vm) else 0)
    assert p.scrape.value("systemd_unit_memory_events_total", unit=units["anon"], event="oom_kill") == 0
    m = p.scrape
    assert m.value("systemd_unit_memory_limit_bytes", unit=unit, limit="max") == 32 * MiB
    # v1 has no swap limit of its own (memsw caps memory plus swap): no swap_max series there.
    assert m.get("systemd_unit_memory_limit_bytes", unit=unit, limit="swap_max") == (0 if v2(vm) else None)


@pytest.mark.layouts("legacy", "hybrid")
def test_no_pressure_series_on_v1(exporter, units):
    """v1 has no memory.pressure: the series are absent, not 0 (nor -.slice's)."""
    m = exporter.scrape()
    assert not [s for s in m.samples if s.name.startswith("systemd_unit_memory_pressure")]


@pytest.mark.layouts("unified")
def test_pressure_is_reported_for_the_swapping_unit(exporter, units):
    unit = units["swap"]
    p = exporter.probe(units=[unit, units["anon"]], files=("memory.pressure",))
    after = pressure_totals(p.file(unit, "memory.pressure"))
    some = p.scrape.value("systemd_unit_memory_pressure_seconds_total", unit=unit, kind="some")
    full = p.scrape.value("systemd_unit_memory_pressure_seconds_total", unit=unit, kind="full")
    assert some > 0  # reclaiming into swap stalled it
    # Counters read by the exporter a moment before the file: never more, barely less.
    assert some <= after["some"] / 1e6 and some == pytest.approx(after["some"] / 1e6, rel=0.02)
    assert full <= after["full"] / 1e6 and full == pytest.approx(after["full"] / 1e6, rel=0.02)
    assert full <= some
    anon = pressure_totals(p.file(units["anon"], "memory.pressure"))
    assert p.scrape.value("systemd_unit_memory_pressure_seconds_total", unit=units["anon"], kind="some") == (
        pytest.approx(anon["some"] / 1e6, abs=0.1))


@pytest.mark.layouts("legacy", "hybrid")
def test_v1_limit_is_exact_and_absent_when_unlimited(exporter, units):
    """v1 has one limit, memory.limit_in_bytes (systemd writes MemoryMax there): limit="max"."""
    p = exporter.probe(units=[units["limited"], units["anon"], units["swap"]], files=("memory.limit_in_bytes",))
    limits = {name: {s.labels["limit"]: s.value for s in p.scrape.samples
                     if s.name == "systemd_unit_memory_limit_bytes" and s.labels["unit"] == name}
              for name in p.units}
    assert limits[units["limited"]] == {"max": workloads.LIMITS["MemoryMax"]}
    assert int(p.file(units["limited"], "memory.limit_in_bytes")) == workloads.LIMITS["MemoryMax"]
    assert limits[units["swap"]] == {"max": 64 * MiB}
    # Unlimited: the kernel's "no limit" (PAGE_COUNTER_MAX pages, 9223372036854771712) is no series.
    assert int(p.file(units["anon"], "memory.limit_in_bytes")) >= 1 << 62
    assert limits[units["anon"]] == {}


@pytest.mark.layouts("unified")
def test_limits_are_exact_and_absent_when_unlimited(exporter, units):
    files = ("memory.max", "memory.high", "memory.low", "memory.min", "memory.swap.max")
    p = exporter.probe(units=[units["limited"], units["anon"], units["swap"]], files=files)
    m = p.scrape
    expected = {"max": workloads.LIMITS["MemoryMax"], "high": workloads.LIMITS["MemoryHigh"],
                "low": workloads.LIMITS["MemoryLow"], "min": workloads.LIMITS["MemoryMin"],
                "swap_max": workloads.LIMITS["MemorySwapMax"]}
    limited = units["limited"]
    assert {s.labels["limit"]: s.value for s in m.samples
            if s.name == "systemd_unit_memory_limit_bytes" and s.labels["unit"] == limited} == expected
    for limit, value in expected.items():  # and what the exporter says is what the kernel holds
        assert int(p.file(limited, "memory." + limit.replace("_", "."))) == value
    assert m.value("systemd_unit_memory_limit_bytes", unit=limited, limit="max") == 209715200
    assert m.value("systemd_unit_memory_limit_bytes", unit=limited, limit="high") == 157286400
    # No limit set: memory.max/high/swap.max say "max", low/min 0, and there is no series.
    anon = units["anon"]
    assert [p.file(anon, f).strip() for f in files] == ["max", "max", "0", "0", "max"]
    assert not [s for s in m.samples if s.name == "systemd_unit_memory_limit_bytes" and s.labels["unit"] == anon]
    assert {s.labels["limit"] for s in m.samples
            if s.name == "systemd_unit_memory_limit_bytes" and s.labels["unit"] == units["swap"]} == {"max"}


def test_peak_is_memory_peak(vm, exporter, units):
    """v2: memory.peak (5.19+); v1: memory.max_usage_in_bytes. Before 5.19 v2 keeps no peak:
    no unit has a peak series, not a 0."""
    peak_file = "memory.peak" if v2(vm) else "memory.max_usage_in_bytes"
    if v2(vm) and not vm.kernel_at_least(5, 19):
        p = exporter.probe(units="all", files=(peak_file,))
        assert [name for name in p.units if p.file(name, peak_file) is not None] == []
        assert not [s for s in p.scrape.samples if s.name == "systemd_unit_memory_peak_bytes"]
        return

    def compare(p, name):
        peak = p.scrape.value("systemd_unit_memory_peak_bytes", unit=name)
        expected = int(p.file(name, peak_file))
        return {} if peak == pytest.approx(expected, rel=0.02) else {"peak": (peak, expected)}

    p = _matching_probe(exporter, [units["anon"], units["oom"]], (peak_file,), compare)
    assert p.scrape.value("systemd_unit_memory_peak_bytes", unit=units["anon"]) >= 150 * MiB
    assert p.scrape.value("systemd_unit_memory_peak_bytes", unit=units["oom"]) <= 32 * MiB


@pytest.mark.layouts("unified")
def test_root_slice_shows_what_the_v2_root_cgroup_has(exporter, units):
    """The v2 root cgroup has memory.stat and memory.pressure but no memory.current, .events,
    .max... : -.slice gets the stat items, page_cache and pressure, and nothing else."""
    p = exporter.probe(units=["-.slice"], files=(*memfiles.V2_FILES, memfiles.PRESSURE_FILE))
    present = {f for f, text in p.units["-.slice"]["files"].items() if text is not None}
    assert present == {"memory.stat", "memory.pressure"}
    m = p.scrape
    kinds = {s.labels["type"] for s in m.samples if s.name == "systemd_unit_memory_bytes" and s.labels["unit"] == "-.slice"}
    assert kinds == {"rss_anon", "rss_file", "rss_shmem", "page_cache"}
    for family in ("systemd_unit_memory_limit_bytes", "systemd_unit_memory_events_total",
                   "systemd_unit_memory_peak_bytes", "systemd_unit_memory_working_set_bytes"):
        assert not [s for s in m.samples if s.name == family and s.labels["unit"] == "-.slice"], family
    assert m.get("systemd_unit_memory_pressure_seconds_total", unit="-.slice", kind="some") is not None
    assert m.value("systemd_unit_memory_stat_bytes", unit="-.slice", item="anon") >= 150 * MiB


# ---------------------------------------------------------------- the committed v2 fixture

def _fixture_units():
    return {u["name"]: u for u in json.loads((FIXTURE / "units.json").read_text())}


def _fixture_dir(group: str) -> Path:
    return FIXTURE / "sys/fs/cgroup" / group.lstrip("/")


READ_FILES = (*memfiles.V2_FILES, memfiles.PRESSURE_FILE)
# The v2 fixture is a capture of a 6.1 guest (its SOURCE.md), compared with the guests that boot
# 6.1 (deselected elsewhere, not skipped). bullseye510's 5.10 lacks what came later: memory.peak,
# memory.stat's kernel, pagetables, vmalloc, swapcached, zswap..., the misc controller, /proc/PID/
# status's SpeculationIndirectBranch (tests/vm/NOTES.md).
ON_THE_FIXTURES_KERNEL = pytest.mark.suites(*(s.name for s in SUITES.values() if not s.own_kernel))


@pytest.mark.layouts("unified")
def test_every_dashboard_query_returns_data_in_a_real_prometheus(vm, exporter, units, tmp_path):
    """Issue 4 on cgroup v2: a real Prometheus on the machine scrapes the guest's exporter (through
    tests/vm/relay.py) with the shipped rules; every dashboard query returns data. Here that
    includes what v1 cannot have (limit="high") and the v2 branches of the host-total panels
    (-.slice has no cgroup_usage on v2, so they sum the top-level cgroups)."""
    import re

    from tests.rules import dashboard_values as model
    from tests.rules import prometheus as prom
    from tests.rules import queries

    # No --collector.pss in this exporter: PSS is the one series it cannot have.
    without_pss = ('type="pss"',)
    with scrape_relay(vm, URL, free_port()) as target, \
            prom.running([target], tmp_path, free_port(), scrape_interval="5s", scrape_timeout="5s") as (prometheus, proc):
        # Each scrape starts a python3 in the emulated guest, hence 5 s between them.
        prometheus.wait_for_scrapes(4, timeout=120, proc=proc)
        # An OOM kill that Prometheus sees happen, for the dashboards' OOM panels: the victim
        # allocates only once its oom_kill 0 was scraped (and is older than a graph step).
        trigger = "/run/smx-oom-now"
        oom = workloads.oom_victim(vm, trigger=trigger)
        # tmpfs pages mapped by the unit's process, like a database's shared memory (units["shm"]
        # writes the same amount and maps none): LargeTmpfs must tell them apart.
        mapped = workloads.shm_writer(vm, 100, mapped=True)
        try:
            counted = f'systemd_unit_memory_events_total{{unit="{oom}", event="oom_kill"}}'
            wait_until(lambda: prometheus.query(f"{counted} offset 15s == 0"), 90,
                       what=f"{oom} in Prometheus for 15 s before its kill")
            vm.run(["touch", trigger], check=True)
            workloads.wait_for_oom_kill(vm, oom)
            wait_until(lambda: prometheus.query(f"increase({counted}[1m]) > 0"), 60,
                       what=f"{oom}'s OOM kill in Prometheus")
            values = {"instance": target, "job": prom.JOB, "unit_name": oom, "__range": "2m", "__interval": "10s"}
            # Opt-in series (the series budget's --collector.peak) have data only where served.
            served = {s["metric"]["__name__"] for s in prometheus.query(f'count by (__name__) ({{job="{prom.JOB}"}})')}
            cannot = without_pss + tuple(m for m in ("systemd_unit_memory_peak_bytes",) if m not in served)
            # Data: the unit dashboard's panels for the unit with every limit, its OOM annotation for
            # the unit with the kill; "Units in trouble" without its thresholds (nothing here stalls
            # once Prometheus watches: the swap unit did at its start).
            data_queries = [q for q in queries.dashboard_queries({**values, "unit_name": units["limited"]})
                            if q.kind != "annotation"]
            data_queries += [q for q in queries.dashboard_queries(values) if q.kind == "annotation"]
            empty = [f"{q.dashboard} / {q.panel} / {q.ref_id}: {q.expr}"
                     for q in data_queries
                     # The fleet dashboard reads fleet-rules.yml (not loaded here): tests/test_fleet.py.
                     if q.uid != "systemd-memory-fleet"
                     and not any(m in q.expr for m in cannot)
                     and not prometheus.query(re.sub(r"\) > [0-9.]+$", ")", q.expr) if q.panel == "Units in trouble" else q.expr)]
            trouble = next(q for q in queries.dashboard_queries(values) if q.panel == "Units in trouble" and q.ref_id == "A")
            trouble_kills = {s["metric"]["unit"]: float(s["value"][1]) for s in prometheus.query(trouble.expr)}
            # Values, all at one instant: what each panel returns against the exporter's own series.
            at = time.time() - 1
            figures = model.unit_figures(prometheus, at, prom.JOB, target)
            host = model.host_figures(figures, "v2")
            wrong = []
            for q in queries.dashboard_queries(values):
                key = (q.panel, model.legend(q))
                if q.uid == "systemd-memory-overview" and key in model.HOST_PANELS:
                    got, expected = model.single_value(prometheus.query(q.expr, at=at)), model.HOST_PANELS[key](host)
                    if not model.compare(got, expected):
                        wrong.append(f"host {key}: panel {got}, top-level cgroups summed {expected}")
            checked = [units[k] for k in ("anon", "cache", "shm", "swap", "limited", "escaped", "nested")] + [oom, mapped]
            for unit in checked:
                expected = model.expected_unit_panels(figures[(unit, None)])
                for q in queries.dashboard_queries({**values, "unit_name": unit}):
                    key = (q.panel, model.legend(q))
                    if q.uid == "systemd-memory-unit" and key in expected:
                        got = model.single_value(prometheus.query(q.expr, at=at))
                        if not model.compare(got, expected[key]):
                            wrong.append(f"{unit} {key}: panel {got}, its series {expected[key]}")
            # The OOM bars, summed over the time range, are the one kill.
            oom_bars = next(q for q in queries.dashboard_queries(values) if q.panel == "OOM kills")
            end = time.time()
            bars = prometheus.query_range(oom_bars.expr, end - 600, end, 10)
            oom_total = sum(float(v) for series in bars for _, v in series["values"])
            # LargeTmpfs, its byte threshold lowered to the test's 100 MiB (the logic unchanged).
            tmpfs = queries.alert_expr("SystemdUnitLargeTmpfs").replace(
                "1024 * 1024 * 1024  # threshold: bytes", "50 * 1024 * 1024")
            wait_until(lambda: prometheus.query(tmpfs), 30, what="the tmpfs rules evaluated")
            tmpfs_firing = {series["metric"]["unit"] for series in prometheus.query(tmpfs)}
            pressure = prometheus.query(f'unit:systemd_unit_memory_pressure_full:rate5m{{unit="{units["swap"]}"}}')
        finally:
            workloads.stop_units(vm, [oom, mapped])
            vm.run(["rm", "-f", trigger])
        assert not (empty or wrong), "queries without data:\n" + "\n".join(empty) + "\nwrong values:\n" + "\n".join(wrong)
        assert oom_total == 1 and trouble_kills.get(oom) == 1, (oom_total, trouble_kills)
        assert units["shm"] in tmpfs_firing and mapped not in tmpfs_firing
        assert len(pressure) == 1
        high = prometheus.query(f'systemd_unit_memory_limit_bytes{{unit="{units["limited"]}", limit="high"}}')
        assert [float(series["value"][1]) for series in high] == [workloads.LIMITS["MemoryHigh"]]
        # The host-total panels' v2 branch: the top-level cgroups, not a -.slice figure.
        assert not prometheus.query('systemd_unit_memory_bytes{unit="-.slice", type="cgroup_usage"}')
        assert host["cgroup_usage"] > 300 * MiB


@pytest.mark.layouts("unified")
@ON_THE_FIXTURES_KERNEL
def test_fixture_has_the_files_the_guest_has(vm, exporter, units):
    """tests/fixtures/v2 against the live guest, for each kind of cgroup the fixture holds (the
    root, a slice, a service, a scope): the exporter's files are in the fixture exactly when
    the guest has them, and memory.stat, memory.events and memory.pressure have the same keys."""
    fixture_units = _fixture_units()
    kinds = {"root": "-.slice", "slice": "system.slice", "scope": "init.scope",
             "service": next(n for n in fixture_units if n.startswith("smx-anon-"))}
    live = {"root": "-.slice", "slice": "system.slice", "scope": "init.scope", "service": units["anon"]}
    p = exporter.probe(units=list(live.values()), files=(*READ_FILES, "cgroup.procs"), wait=False)
    for kind, name in kinds.items():
        directory = _fixture_dir(fixture_units[name]["control_group"])
        files = p.units[live[kind]]["files"]
        in_guest = {f for f in READ_FILES if files[f] is not None}
        in_fixture = {f for f in READ_FILES if (directory / f).exists()}
        assert in_fixture == in_guest, (kind, in_fixture ^ in_guest)
        assert (directory / "cgroup.procs").exists()
        for f, parse in (("memory.stat", keyed), ("memory.events", keyed), ("memory.pressure", pressure_totals)):
            if f in in_guest:
                assert list(parse((directory / f).read_text())) == list(parse(files[f])), (kind, f)
    assert (FIXTURE / "sys/fs/cgroup/cgroup.controllers").read_text().split() == (
        vm.read_text("/sys/fs/cgroup/cgroup.controllers").split())


@pytest.mark.layouts("unified")
@ON_THE_FIXTURES_KERNEL
def test_fixture_status_files_have_the_guests_fields(vm):
    fields = [line.split(":", 1)[0] for line in vm.read_text("/proc/1/status").splitlines()]
    captured = (FIXTURE / "proc/1/status").read_text()
    assert [line.split(":", 1)[0] for line in captured.splitlines()] == fields


def test_fixture_holds_the_sample_workloads():
    """What the fixture was captured with (tests/vm/capture_fixture.py): the v2 figures the
    golden file shows must be real, not zeros."""
    names = _fixture_units()
    def stat(prefix):
        name = next(n for n in names if n.startswith(prefix))
        return _fixture_dir(names[name]["control_group"])
    assert keyed((stat("smx-anon-") / "memory.stat").read_text())["anon"] >= 140 * MiB
    assert keyed((stat("smx-cache-") / "memory.stat").read_text())["file"] >= 180 * MiB
    assert keyed((stat("smx-shm-") / "memory.stat").read_text())["shmem"] >= 95 * MiB
    assert int((stat("smx-swap-") / "memory.swap.current").read_text()) > 0
    assert pressure_totals((stat("smx-swap-") / "memory.pressure").read_text())["some"] > 0
    assert keyed((stat("smx-oom-") / "memory.events").read_text())["oom_kill"] >= 1
    assert (stat("smx-limited-") / "memory.high").read_text().strip() != "max"
    assert any("\\x2d" in n for n in names)
    assert any(n.startswith("smx-nested-") for n in names) and "smx-outer-inner.slice" in names


def test_units_without_memory_accounting(vm, exporter, units):
    """MemoryAccounting=no (MemoryCurrent [not set]): in system.slice, whose other members
    account memory, the unit's cgroup still has the memory files (v2: the controller is on in
    system.slice's subtree_control; v1: its siblings' controllers) and the exporter reports
    them; alone in a slice it has none, its pages count in the slice, and the exporter reports
    no cgroup figure for it rather than the slice's."""
    sibling = workloads.anon_hog(vm, 30, "smx-noacct-sibling.service", properties=["MemoryAccounting=no"])
    alone = workloads.payload(vm, "smx-noacct-alone.service", "anon", 30,
                              properties=["MemoryAccounting=no"], slice="smx-noacct.slice")
    try:
        p = exporter.probe(units=[sibling, alone, "smx-noacct.slice"], props=("MemoryCurrent",),
                           files=(usage_file(vm),))
        for name in (sibling, alone):
            assert p.show(name, "MemoryCurrent") == "[not set]"
        own = p.file(sibling, usage_file(vm))
        assert own is not None and p.file(alone, usage_file(vm)) is None
        check_accounting_off(p.scrape, sibling, 30, int(own))
        check_accounting_off(p.scrape, alone, 30, None)
        assert p.scrape.value("systemd_unit_memory_bytes", unit="smx-noacct.slice", type="cgroup_usage") >= 30 * MiB
    finally:
        workloads.stop_units(vm, [sibling, alone])


# ---------------------------------------------------------------- last: it stops dbus-daemon

def test_private_socket_fallback_without_dbus(vm, exporter, units):
    """With dbus-daemon stopped, discovery goes to /run/systemd/private and keeps up."""
    vm.run(["systemctl", "stop", "dbus.socket", "dbus.service"], check=True)
    try:
        unit = workloads.anon_hog(vm, 10)  # systemd-run works over the private socket as root
        try:
            def switched():
                m = exporter.scrape()
                on_private = m.get("systemd_memory_exporter_dbus_transport_info", transport="private_socket") == 1
                return m if on_private and m.get("systemd_unit_memory_bytes", unit=unit, type="rss_anon") else None
            m = wait_until(switched, 30, interval=INTERVAL / 2, what="the exporter on the private socket")
            assert m.value("systemd_memory_exporter_source_up", source="dbus") == 1
        finally:
            workloads.stop_units(vm, [unit])
    finally:
        vm.run(["systemctl", "start", "dbus.socket", "dbus.service"], check=True)
