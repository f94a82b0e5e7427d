"""The sampler and renderer on fixture trees: real kernel files captured from real hosts
(each tree's SOURCE.md says which), read through the same code as a live /sys and /proc.

The golden /metrics files make the whole contract visible in review; regenerate them with
UPDATE_GOLDEN=1 after a deliberate change (each file it rewrites fails that run), and read the diff.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from exporter.render import DEFAULT_BUDGET, EVERY_SERIES, render
from exporter.sampler import Sampler, SamplerConfig
from exporter.snapshot import Breakdown
from exporter.systemd import DiscoveryResult, Unit

FIXTURES = Path(__file__).parent / "fixtures"
TREES = ["hybrid", "v2"]
# Families whose values are clock readings; everything else in a fixture render is fixed.
_VOLATILE = re.compile(
    r"^systemd_memory_exporter_(last_sample_timestamp|sample_duration|sample_cpu|source_last_success|build_info)"
)


def load_units(tree: Path) -> tuple[Unit, ...]:
    return tuple(Unit(**u) for u in json.loads((tree / "units.json").read_text()))


def sample_tree(tree: Path, units: tuple[Unit, ...] | None = None, interval: float = 15):
    units = load_units(tree) if units is None else units
    config = SamplerConfig(procfs=str(tree / "proc"), cgroupfs=str(tree / "sys/fs/cgroup"), interval=interval)
    sampler = Sampler(config, lambda: DiscoveryResult(units, True, "", 1.0, "system_bus"))
    return sampler.sample()


def _metric_name(line: str) -> str:
    return line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]


def stable_render(snapshot, budget=DEFAULT_BUDGET) -> str:
    lines = render(snapshot, budget).decode().splitlines()
    return "".join(line + "\n" for line in lines if not _VOLATILE.match(_metric_name(line)))


# metrics.golden: the default series budget; metrics-all.golden: every --collector.* series on.
GOLDENS = {"metrics.golden": DEFAULT_BUDGET, "metrics-all.golden": EVERY_SERIES}


@pytest.mark.parametrize("golden_name", GOLDENS)
@pytest.mark.parametrize("name", TREES)
def test_golden_metrics(name, golden_name):
    tree = FIXTURES / name
    text = stable_render(sample_tree(tree), GOLDENS[golden_name])
    golden = tree / golden_name
    if os.environ.get("UPDATE_GOLDEN") and text != golden.read_text():
        golden.write_text(text)
        # Never a pass: a run with the switch left on (an inherited environment) must not turn
        # every golden into whatever this render is and call that agreement.
        pytest.fail(f"{golden} rewritten: read the diff, then run again without UPDATE_GOLDEN")
    assert text == golden.read_text(), f"render of {name} changed; rerun with UPDATE_GOLDEN=1 and review the diff"


@pytest.mark.parametrize("golden_name", GOLDENS)
@pytest.mark.parametrize("name", TREES)
def test_golden_passes_promtool(name, golden_name):
    promtool = shutil.which("promtool")
    if promtool is None and not os.environ.get("CI"):
        pytest.skip("promtool not installed (tests/prerequisites.sh installs it)")
    result = subprocess.run([promtool, "check", "metrics"], input=(FIXTURES / name / golden_name).read_bytes(), capture_output=True)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("name", TREES)
def test_rss_sums_equal_the_status_files(name):
    """Independent arithmetic: sum every status file of every PID in the subtree by hand."""
    tree = FIXTURES / name
    snapshot = sample_tree(tree)
    procs_root = tree / "sys/fs/cgroup" / ("" if name == "v2" else "unified")
    checked = 0
    for sample in snapshot.units:
        directory = procs_root / sample.unit.control_group.lstrip("/")
        expected = 0
        count = 0
        for procs in directory.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                if pid == "0":  # outside the captured host's PID namespace
                    continue
                status = (tree / "proc" / pid / "status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if "RssAnon" in fields:
                    expected += int(fields["RssAnon"].split()[0]) * 1024
                count += 1
        assert sample.processes.rss_anon == expected, sample.unit.name
        assert sample.processes.processes == count, sample.unit.name
        checked += count
    assert checked > 0


@pytest.mark.parametrize("name", TREES)
def test_usage_and_cache_come_from_the_right_files(name):
    tree = FIXTURES / name
    snapshot = sample_tree(tree)
    v2 = name == "v2"
    memory_root = tree / "sys/fs/cgroup" / ("" if v2 else "memory")
    seen = 0
    for sample in snapshot.units:
        directory = memory_root / sample.unit.control_group.lstrip("/")
        usage_file = directory / ("memory.current" if v2 else "memory.usage_in_bytes")
        if not usage_file.exists():
            if v2 and sample.unit.control_group == "/":
                # The v2 root cgroup has memory.stat (and memory.pressure) but no memory.current:
                # -.slice gets the stat figures and no usage.
                stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
                assert sample.memory.usage is None
                assert sample.memory.page_cache == int(stat["file"])
            else:  # v1: no memory cgroup (accounting off); v2: a cgroup systemd has removed
                assert sample.memory is None
            continue
        seen += 1
        stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
        assert sample.memory.usage == int(usage_file.read_text())
        assert sample.memory.page_cache == int(stat["file" if v2 else "total_cache"])
        b = Breakdown.of(sample)
        parts = [b.anon, b.mapped_file, b.unmapped_cache, b.shmem, b.kernel or 0, b.remainder]
        assert sum(parts) == b.systemctl, "the breakdown must add up to systemctl's figure exactly"
    assert seen > 0


def test_v2_unit_without_a_cgroup_directory_is_not_a_vanished_cgroup():
    """On v2 systemd gives an idle socket (or mount, swap unit) a ControlGroup whose directory
    does not exist: dbus.socket in the v2 capture. With the slices filtered out (say
    --unit.types=service,socket) the walker starts at that path itself; it must leave the unit
    out quietly, as CgroupReader does, not count a vanished cgroup on every sample (seen in the
    cgroup-v2 guest: vanished_total{kind="cgroup"} grew by 8, one per idle socket, per sample)."""
    tree = FIXTURES / "v2"
    units = tuple(u for u in load_units(tree) if u.type != "slice")
    socket = next(u for u in units if u.name == "dbus.socket")
    assert socket.control_group and not (tree / "sys/fs/cgroup" / socket.control_group.lstrip("/")).exists()
    snapshot = sample_tree(tree, units)
    assert snapshot.unit("dbus.socket") is None
    assert snapshot.vanished.get("cgroup", 0) == 0


def test_unit_names_keep_systemd_escapes():
    tree = FIXTURES / "hybrid"
    names = [u.name for u in load_units(tree)]
    escaped = [n for n in names if "\\x2d" in n]
    assert escaped, "the hybrid fixture should hold a unit whose name has a \\x2d escape"
    text = render(sample_tree(tree)).decode()
    # The exposition format escapes a backslash as \\ inside label values.
    assert f'unit="{escaped[0].replace(chr(92), chr(92) * 2)}"' in text


def test_vanished_unit_disappears_without_error(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(FIXTURES / "hybrid", tree)
    units = load_units(tree)
    before = sample_tree(tree, units)
    victim = next(u for u in units if u.type == "service")
    for hierarchy in ("memory", "unified"):
        shutil.rmtree(tree / "sys/fs/cgroup" / hierarchy / victim.control_group.lstrip("/"), ignore_errors=True)
    snapshot = sample_tree(tree, units)
    assert snapshot.unit(victim.name) is None
    assert len(snapshot.units) == len(before.units) - 1
    assert not snapshot.errors
    assert snapshot.sources["cgroup"].up and snapshot.sources["procfs"].up


def test_bad_tree_reports_every_other_unit_and_counts_errors():
    """tests/fixtures/bad: the hybrid capture with files truncated, garbled, set to max,
    negative, enormous, missing and unreadable (see its SOURCE.md)."""
    good = sample_tree(FIXTURES / "hybrid")
    snapshot = sample_tree(FIXTURES / "bad")
    assert {s.unit.name for s in snapshot.units} == {s.unit.name for s in good.units}
    bad = {s.unit.name: s for s in snapshot.units}
    assert bad["hog.service"].memory.usage is None  # empty file: absent, not 0
    assert bad["hog.service"].memory.stat == good.unit("hog.service").memory.stat  # its other files still count
    assert bad["th-shm-2.service"].memory.usage is None  # "max" is no usage figure
    assert "max" not in bad["th-multi-3.service"].memory.events
    assert bad["th-multi-3.service"].memory.peak == 99999999999999999999999999999
    assert bad["th-nested-4.service"].memory.page_cache is None  # memory.stat missing
    assert bad["th-nested-4.service"].memory.usage == good.unit("th-nested-4.service").memory.usage
    journald = bad["systemd-journald.service"].memory.stat
    assert (journald["file"], journald["anon"], "shmem" in journald) == (100, 18446744073709551615, False)
    assert snapshot.errors[("cgroup", "parse")] == 6  # usage x2, stat, failcnt, journald's shmem line, cgroup.procs
    assert snapshot.errors[("cgroup", "io")] == 1  # the directory in place of memory.limit_in_bytes
    assert snapshot.errors[("procfs", "parse")] == 2
    assert not snapshot.sources["cgroup"].up
    render(snapshot)  # renders without raising


def test_pressure_files_that_refuse_every_read_mean_psi_is_off_not_a_failed_source():
    """A kernel built with PSI but booted without it (psi=0; openEuler's default, which needs
    psi=1) keeps every memory.pressure file and answers each read EOPNOTSUPP (kernel/sched/
    psi.c, psi_show). The fixture's reads are real; only the pressure files give that answer
    here (tests/vm/test_psi_off.py boots 5.10 with psi=0 for the real thing)."""
    tree = FIXTURES / "v2"
    units = load_units(tree)
    config = SamplerConfig(procfs=str(tree / "proc"), cgroupfs=str(tree / "sys/fs/cgroup"))
    sampler = Sampler(config, lambda: DiscoveryResult(units, True, "", 1.0, "system_bus"))
    read_many = sampler.files.read_many

    asked = []

    def psi_off(paths):
        asked.extend(path for path in paths if str(path).endswith("/memory.pressure"))
        return [OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)) if str(path).endswith("/memory.pressure")
                else data for path, data in zip(paths, read_many(paths))]

    sampler.files.read_many = psi_off
    snapshot, good = sampler.sample(), sample_tree(tree, units)
    assert not snapshot.errors and snapshot.sources["cgroup"].up
    assert good.units and all(s.memory is None or s.memory.pressure is None for s in snapshot.units)
    assert any(s.memory is not None and s.memory.pressure is not None for s in good.units)
    assert [s.memory and s.memory.usage for s in snapshot.units] == [s.memory and s.memory.usage for s in good.units]
    # Refused once, not asked again: PSI cannot come on without a reboot.
    first = len(asked)
    again = sampler.sample()
    assert first and len(asked) == first and not again.errors and again.sources["cgroup"].up


def test_a_cgroupfs_that_cannot_be_read_is_a_failed_source_not_a_failed_cycle():
    """--path.cgroupfs naming something that refuses (here a file: ENOTDIR) used to raise out of
    every cycle, which then served its last snapshot for good."""
    tree = FIXTURES / "v2"
    units = load_units(tree)
    config = SamplerConfig(procfs=str(tree / "proc"), cgroupfs=str(tree / "units.json"))
    snapshot = Sampler(config, lambda: DiscoveryResult(units, True, "", 1.0, "system_bus")).sample()
    assert not snapshot.sources["cgroup"].up and snapshot.errors[("cgroup", "io")] == 1
    assert snapshot.sources["cgroup"].message == f"cannot read {config.cgroupfs}: Not a directory"
    assert snapshot.sources["dbus"].up and snapshot.units == ()
    render(snapshot)


def test_published_keeps_the_rendered_text_compressed_and_gives_it_back_unchanged():
    from exporter.service import publish

    snapshot = sample_tree(FIXTURES / "hybrid")
    published = publish(snapshot)
    text = render(snapshot)
    assert published.body() == text and published.body_size == len(text)
    assert len(published.body_gzip_open) < len(text) / 4
    # A scrape's own lines end the open member: one member of both texts, CRC and length checked.
    tail = b"# own lines\n" * 50
    whole = zlib.decompressobj(wbits=31)
    assert whole.decompress(published.body_gzip_open + published.gzip_ending(tail)) == text + tail
    assert whole.eof and whole.unused_data == b""
