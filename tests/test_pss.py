"""--collector.pss (exporter/pss.py): the smaps_rollup parser, the budget and size cap on a
fixture tree, and on the real-systemd test host a forked unit whose PSS is below its summed RSS.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from exporter.kernelfiles import ParseError
from exporter.pss import NO_MAPPINGS, PAGE_SIZE, PssCollector, Rollup, parse_smaps_rollup
from exporter.systemd import DiscoveryResult, Unit

# /proc/self/smaps_rollup of `cat` on the development VM (Debian 12, kernel 6.18.44, x86_64),
# captured verbatim with `cat /proc/self/smaps_rollup`.
SMAPS_ROLLUP = """\
55bf21849000-7ffec15e3000 ---p 00000000 00:00 0                          [rollup]
Rss:                1712 kB
Pss:                 320 kB
Pss_Dirty:           116 kB
Pss_Anon:            116 kB
Pss_File:            204 kB
Pss_Shmem:             0 kB
Shared_Clean:       1544 kB
Shared_Dirty:          0 kB
Private_Clean:        52 kB
Private_Dirty:       116 kB
Referenced:         1712 kB
Anonymous:           116 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
"""


def test_pss_and_uss_in_bytes():
    assert parse_smaps_rollup(SMAPS_ROLLUP) == Rollup(pss=320 * 1024, uss=(52 + 116) * 1024)


def test_no_address_space_holds_nothing():
    assert parse_smaps_rollup("") == NO_MAPPINGS


@pytest.mark.parametrize(
    "text",
    [
        SMAPS_ROLLUP.replace("Pss:                 320 kB\n", ""),
        SMAPS_ROLLUP.replace("320 kB", "320 MB"),
        SMAPS_ROLLUP.replace("320 kB", "-320 kB"),
        SMAPS_ROLLUP[: SMAPS_ROLLUP.index("Private_Clean")],
        "garbage",
    ],
)
def test_bad_rollup_is_a_parse_error(text):
    with pytest.raises(ParseError):
        parse_smaps_rollup(text)


# ----------------------------------------------------------------- the collector on a tree
def rollup(pss_kib: int, private_kib: int) -> str:
    return SMAPS_ROLLUP.replace("Pss:                 320 kB", f"Pss: {pss_kib} kB").replace(
        "Private_Clean:        52 kB", "Private_Clean: 0 kB").replace(
        "Private_Dirty:       116 kB", f"Private_Dirty: {private_kib} kB")


def make_tree(tmp_path, units: dict[str, dict[int, tuple[int, int, int]]]):
    """units: cgroup path -> {pid: (rss pages, pss KiB, private KiB)}; returns (procs_root, procfs)."""
    procs_root, procfs = tmp_path / "cgroup", tmp_path / "proc"
    procs_root.mkdir()
    for cgroup, processes in units.items():
        directory = procs_root / cgroup.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in processes))
        for pid, (pages, pss, private) in processes.items():
            (procfs / str(pid)).mkdir(parents=True)
            (procfs / str(pid) / "statm").write_text(f"{pages * 2} {pages} 10 1 0 {pages} 0\n")
            (procfs / str(pid) / "smaps_rollup").write_text(rollup(pss, private))
    return str(procs_root), str(procfs)


def unit(name: str, cgroup: str) -> Unit:
    return Unit(name, name.rpartition(".")[2], "active", "running", cgroup)


class StepClock:
    """Each reading advances by ``step``: a budget of N steps reads about N processes."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_sums_nested_units_and_reads_each_process_once(tmp_path):
    root, procfs = make_tree(tmp_path, {
        "/a.slice": {},
        "/a.slice/x.service": {10: (100, 40, 30), 11: (100, 20, 10)},
        "/a.slice/y.service": {12: (100, 5, 5)},
    })
    units = [unit("a.slice", "/a.slice"), unit("x.service", "/a.slice/x.service"), unit("y.service", "/a.slice/y.service")]
    result = PssCollector(procfs, budget=60).collect(units, root)
    kib = 1024
    assert result.values == {"x.service": (60 * kib, 40 * kib), "y.service": (5 * kib, 5 * kib),
                             "a.slice": (65 * kib, 45 * kib)}
    assert result.read == 3 and not result.skipped and result.deferred_units == 0


def test_a_process_over_the_cap_is_not_read_and_its_units_have_no_pss(tmp_path):
    big_pages = (8 << 30) // PAGE_SIZE
    root, procfs = make_tree(tmp_path, {
        "/s.slice": {},
        "/s.slice/big.service": {20: (big_pages, 1, 1), 21: (10, 1, 1)},
        "/s.slice/small.service": {22: (10, 7, 7)},
    })
    units = [unit("s.slice", "/s.slice"), unit("big.service", "/s.slice/big.service"),
             unit("small.service", "/s.slice/small.service")]
    collector = PssCollector(procfs, budget=60, max_rss=4 << 30)
    result = collector.collect(units, root)
    assert result.values["big.service"] is None and result.values["s.slice"] is None  # absent, not partial
    assert result.values["small.service"] == (7 * 1024, 7 * 1024)
    assert result.skipped == {"max_rss": 1} and collector.skipped_total["max_rss"] == 1


def test_budget_defers_units_and_the_next_cycle_resumes_with_them(tmp_path):
    tree = {f"/u{i}.service": {100 + i: (10, 1, 1)} for i in range(6)}
    root, procfs = make_tree(tmp_path, tree)
    units = [unit(f"u{i}.service", f"/u{i}.service") for i in range(6)]
    # budget 3.5 steps: the clock is read once to set the deadline, then once per process
    collector = PssCollector(procfs, budget=3.5, clock=StepClock(1.0))
    first = collector.collect(units, root)
    done_first = {name for name, value in first.values.items() if value is not None}
    assert done_first == {"u0.service", "u1.service", "u2.service"}
    assert first.deferred_units == 3
    second = collector.collect(units, root)
    done_second = {name for name, value in second.values.items() if value is not None}
    assert done_second == {"u3.service", "u4.service", "u5.service"}  # round-robin: the rest first
    assert collector.deferred_units_total == 6


def test_a_unit_bigger_than_the_budget_does_not_starve_the_others(tmp_path):
    tree = {"/huge.service": {200 + i: (10, 1, 1) for i in range(10)}, "/tiny.service": {300: (10, 1, 1)}}
    root, procfs = make_tree(tmp_path, tree)
    units = [unit("huge.service", "/huge.service"), unit("tiny.service", "/tiny.service")]
    collector = PssCollector(procfs, budget=3.5, clock=StepClock(1.0))
    collector.collect(units, root)
    second = collector.collect(units, root)
    assert second.values["tiny.service"] is not None


def test_the_walks_listings_are_used_and_a_cgroup_it_did_not_list_is_read(tmp_path):
    """The PSS pass takes the process walk's PIDs (cgroup.procs read once a cycle, the same PIDs
    for RSS and PSS); a cgroup missing from them is listed by the pass itself."""
    root, procfs = make_tree(tmp_path, {
        "/a.slice": {},
        "/a.slice/x.service": {10: (100, 40, 30), 11: (100, 20, 10)},
        "/a.slice/y.service": {12: (100, 5, 5)},
    })
    # Since the walk, x.service's file changed: a pass that read it again would find PID 13,
    # which has no /proc entry, and give x.service nothing.
    (Path(root) / "a.slice/x.service/cgroup.procs").write_text("13\n")
    listings = {"/a.slice/x.service": ([10, 11], [])}
    units = [unit("a.slice", "/a.slice"), unit("x.service", "/a.slice/x.service"), unit("y.service", "/a.slice/y.service")]
    result = PssCollector(procfs, budget=60).collect(units, root, listings)
    kib = 1024
    assert result.values == {"x.service": (60 * kib, 40 * kib), "y.service": (5 * kib, 5 * kib),
                             "a.slice": (65 * kib, 45 * kib)}
    assert listings == {"/a.slice/x.service": ([10, 11], [])}  # the caller's mapping is left as it was


def test_a_cycle_with_pss_reads_each_cgroup_procs_once(monkeypatch):
    """Sampler with --collector.pss on the hybrid capture: the PSS pass opens no cgroup.procs."""
    import exporter.pss
    from exporter.sampler import Sampler, SamplerConfig
    from tests.test_sampler import FIXTURES, load_units

    tree = FIXTURES / "hybrid"
    read_by_pss = []
    original = exporter.pss.read_bytes

    def recording(path):
        read_by_pss.append(os.fsdecode(path))
        return original(path)

    monkeypatch.setattr(exporter.pss, "read_bytes", recording)
    units = load_units(tree)
    config = SamplerConfig(procfs=str(tree / "proc"), cgroupfs=str(tree / "sys/fs/cgroup"), pss=True, kept_files=0)
    found = DiscoveryResult(units, True, "", time.time(), "system_bus")
    snapshot = Sampler(config, lambda: found).sample()
    assert read_by_pss, "the PSS pass read nothing: the test would prove nothing"
    assert not [path for path in read_by_pss if path.endswith("cgroup.procs")]
    # The capture has no smaps_rollup (so every process reads as gone): what can be checked is
    # that the pass asked for exactly the processes the walk listed in cgroup.procs.
    listed = {int(pid) for procs in (tree / "sys/fs/cgroup/unified").rglob("cgroup.procs") for pid in procs.read_text().split()}
    asked = {int(path.split("/")[-2]) for path in read_by_pss}
    assert asked == listed - {0}
    assert snapshot.units


# --------------------------------------------------------------------- on the test host
@pytest.mark.e2e
def test_a_process_whose_main_thread_exited_is_read_through_a_live_thread_and_capped_by_its_rss():
    """A real process of this machine's /proc that ended its main thread (tests/test_hidepid.py's
    payload): its leader's statm reads 0 and its smaps_rollup ESRCH, so the max-rss cap passed
    it and its 50 MiB read as no mappings. Given as one of the walk's leaders_gone, a live
    thread's statm and smaps_rollup are read: the cap applies, and the PSS is there."""
    import subprocess
    import sys

    from tests.test_hidepid import LEADER_EXITS

    child = subprocess.Popen([sys.executable, "-c", LEADER_EXITS])
    try:
        deadline = time.monotonic() + 15
        while "State:\tZ" not in Path(f"/proc/{child.pid}/status").read_text():
            assert time.monotonic() < deadline, "the main thread did not exit"
            time.sleep(0.05)
        unit = Unit("x.service", "service", "active", "running", "/x.service")
        listings = {"/x.service": ([child.pid], [])}  # the walk's: no cgroup.procs is read

        def pss(max_rss: int, leaders_gone) -> tuple:
            collector = PssCollector("/proc", max_rss=max_rss)
            result = collector.collect([unit], "/nonexistent", listings, leaders_gone)
            return result.values[unit.key], dict(result.skipped)

        (own_pss, _), skipped = pss(4 << 30, {child.pid})
        assert own_pss >= 45 << 20 and not skipped
        assert pss(1 << 20, {child.pid}) == (None, {"max_rss": 1})
        assert pss(4 << 30, set()) == ((0, 0), {})  # the leader's own files: what was read before
    finally:
        child.kill()
        child.wait(timeout=10)


def test_forked_unit_pss_is_below_its_summed_rss(testhost, workload):
    from tests.testhost import workloads
    from tests.truth import exporter_in_host

    unit_name = workload(workloads.multi_process, children=4, mib=20)
    with exporter_in_host(testhost, 1.0, "--collector.pss", "--unit.include=th-multi-.*") as client:
        deadline = time.monotonic() + 20
        while True:
            m = client.scrape()
            pss = m.get("systemd_unit_memory_bytes", unit=unit_name, type="pss")
            if pss is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert pss is not None, "no pss series for the forked unit"
        uss = m.value("systemd_unit_memory_bytes", unit=unit_name, type="uss")
        rss = sum(m.value("systemd_unit_memory_bytes", unit=unit_name, type=t) for t in ("rss_anon", "rss_file", "rss_shmem"))
        assert m.value("systemd_unit_processes", unit=unit_name) == 5
        # Each child holds 20 MiB of its own: that much is private to it, in every measure.
        assert uss >= 4 * 20 * (1 << 20)
        # The interpreter's pages are shared by the five processes: RSS counts them five times.
        assert uss <= pss < rss, (uss, pss, rss)
        assert m.value("systemd_memory_exporter_pss_skipped_processes_total", reason="max_rss") == 0
        assert m.get("systemd_memory_exporter_sample_duration_seconds", phase="pss") is not None
